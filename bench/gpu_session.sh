#!/usr/bin/env bash
# What runs on a lent NVIDIA GPU machine (bench/RESULTS.md, "GPU"): the CUDA execution-provider
# tests, a slice of the gRPC suite with every model placed on the GPU lane by provider = "auto",
# and bench.frontends with the kernel and the naive server both on the GPU.
#
# Expects: python3 that imports onnxruntime-gpu (CUDA 13 build) and the test dependencies, and the
# CUDA 13 / cuDNN 9 libraries pip-installed under its site-packages/nvidia (as PyTorch brings them).
#
#   bench/gpu_session.sh OUT_DIR
#
# Knobs (environment): PYTHON (python3), SERVER_CPU (0-3), CLIENT_CPU (4-7), PAIRS (2),
# WINDOW_MS (1000). OUT_DIR gets the logs and the benchmark's JSON and tables (a handful of files).
set -u
out=${1:?usage: bench/gpu_session.sh OUT_DIR}
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

echo "== tests"
timeout 150 "$py" -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_oip.py tests/test_scheduling_grpc.py \
    tests/test_arrival_deadlines.py tests/test_decisions.py >"$out/tests.log" 2>&1
echo "pytest exit status $?"
tail -15 "$out/tests.log"

echo "== bench.frontends on the GPU"
work=$(mktemp -d)
timeout 300 "$py" -m bench.frontends --pairs "${PAIRS:-2}" --window-ms "${WINDOW_MS:-1000}" --models tiny,large \
    --wait-idle 0 --server-cpu "${SERVER_CPU:-0-3}" --client-cpu "${CLIENT_CPU:-4-7}" --no-snapshot \
    --out "$work" >"$out/bench.log" 2>&1
echo "bench exit status $?"
tail -45 "$out/bench.log"
cp "$work"/frontends-*.json "$work"/frontends-*.md "$out/" 2>/dev/null  # models, repos and server logs stay in $work
