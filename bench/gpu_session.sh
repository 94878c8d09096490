#!/usr/bin/env bash
# What runs on a lent NVIDIA GPU machine (bench/RESULTS.md, "GPU"): the test suite with every model
# that does not pin `provider = "cpu"` on the GPU (tests/test_gpu.py: the CUDA execution provider itself),
# and bench.frontends with the kernel and the naive server both on the GPU.
#
# Expects: python3 that imports onnxruntime-gpu (CUDA 13 build) and the test dependencies, and the
# CUDA 13 / cuDNN 9 libraries pip-installed under its site-packages/nvidia (as PyTorch brings them).
#
#   bench/gpu_session.sh OUT_DIR [tests|bench|all]      (default all)
#
# `tests` runs the whole suite with models on the GPU wherever a test leaves `provider = "auto"`
# (~4-5 min); `bench` runs the front-end benchmark (~2.5 min). One 10-minute device call fits either.
#
# Knobs (environment): PYTHON (python3), SERVER_CPU (0-3), CLIENT_CPU (4-7), PAIRS (2),
# WINDOW_MS (1000), TESTS_LIMIT_S (420), BENCH_LIMIT_S (300): both parts in one 10-minute call need
# limits that add up to less, e.g. 320 and 240. OUT_DIR gets the logs and the benchmark's JSON and tables (a handful of files).
set -u
out=${1:?usage: bench/gpu_session.sh OUT_DIR [tests|bench|all]}
what=${2:-all}
mkdir -p "$out"
py=${PYTHON:-python3}

# onnxruntime-gpu dlopens CUDA and cuDNN by soname: point the loader at the pip-installed copies.
libs=$("$py" - <<'EOF'
import glob, os, site
dirs = {os.path.dirname(p) for sp in site.getsitepackages()
        for p in glob.glob(os.path.join(sp, "nvidia", "**", "lib*.so*"), recursive=True)}
print(":".join(sorted(dirs)))
EOF
)
export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

echo "== machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
echo "cores: $(nproc); $("$py" -V 2>&1)"
"$py" -c 'import onnxruntime as o; print("onnxruntime", o.__version__, o.get_available_providers())'

echo "== build (Cython extensions)"
if "$py" setup.py build_ext --inplace -j 8 >"$out/build.log" 2>&1; then echo built
else echo "build failed, the pure-Python references run (tail of $out/build.log):"; tail -5 "$out/build.log"; fi

if [ "$what" != bench ]; then
    echo "== tests (whole suite; log in $out/tests.log)"
    # SIGINT, not SIGTERM, at the limit: pytest then still prints its summary of failures.
    timeout -s INT "${TESTS_LIMIT_S:-420}" "$py" -m pytest -q -p no:cacheprovider --tb=short tests >"$out/tests.log" 2>&1
    echo "pytest exit status $?"
    grep -E "^(FAILED|ERROR)|[0-9]+ (passed|failed)" "$out/tests.log" | tail -40
fi

if [ "$what" != tests ]; then
    echo "== bench.frontends on the GPU"
    work=$(mktemp -d)
    timeout "${BENCH_LIMIT_S:-300}" "$py" -m bench.frontends --pairs "${PAIRS:-2}" --window-ms "${WINDOW_MS:-1000}" --models tiny,large \
        --wait-idle 0 --server-cpu "${SERVER_CPU:-0-3}" --client-cpu "${CLIENT_CPU:-4-7}" --no-snapshot \
        --out "$work" >"$out/bench.log" 2>&1
    echo "bench exit status $?"
    tail -45 "$out/bench.log"
    cp "$work"/frontends-*.json "$work"/frontends-*.md "$out/" 2>/dev/null  # models, repos and server logs stay in $work
    "$py" -m bench.gpu_probe 2>&1 | tee "$out/probe.log"
fi
