#!/usr/bin/env bash
# Pack what bench/gpu_session.sh needs on a GPU machine that reaches no package index: onnxruntime-gpu
# (its CUDA 13 build, to match a PyTorch cu13 image's CUDA and cuDNN libraries) and the kernel's runtime
# and test dependencies for that machine's Python, installed into one `site/` folder, plus perf_analyzer
# (this checkout's .cache/perf_analyzer, set up by any bench run here), as a zstd tar cut in pieces that
# each fit one device call's 64 MiB.
#
#   bench/gpu_payload.sh OUT_DIR            (~4 min: a 256 MB download, ~1.5 min of zstd -19)
#
# On the device (commands run in a copy of the repo; pieces carried one per call, kept in /tmp there
# while the machine stays warm, i.e. with the next call within ~30 s):
#   calls 1..N-1:  mkdir -p /tmp/stash && cp .gpuxfer/part* /tmp/stash/
#   last call:     cat /tmp/stash/part* .gpuxfer/part* | .gpuxfer/zstd -dq | tar x -C /tmp/g  (mkdir -p /tmp/g first)
#                  PYTHONPATH=/tmp/g/site:$PWD AIOS_PERF_ANALYZER_CACHE=/tmp/g/pa bench/gpu_session.sh "$OUT" tests
# (the device image had no zstd: carry this machine's /usr/bin/zstd with the last piece.)
#
# Knobs (environment): PY_VERSION (3.12), PIECE_MB (56).
set -euo pipefail
out=${1:?usage: bench/gpu_payload.sh OUT_DIR}
root=$(cd "$(dirname "$0")/.." && pwd)
pyver=${PY_VERSION:-3.12}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$out"

# Same versions as this checkout's virtualenv, so the device runs what was tested here.
pin() { "$root/.venv/bin/python" -c "from importlib.metadata import version; print('$1==' + version('$1'))"; }
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do platforms+=(--platform "$p"); done
python3 -m pip install -q --no-deps --no-compile --target "$work/pa-site/site" --only-binary=:all: \
    --python-version "$pyver" --implementation cp "${platforms[@]}" \
    onnxruntime-gpu "$(pin grpcio)" "$(pin grpcio-health-checking)" "$(pin grpcio-reflection)" "$(pin protobuf)" \
    "$(pin grpcio-tools)" "$(pin cryptography)" "$(pin cffi)" "$(pin pycparser)" "$(pin tritonclient)" "$(pin python-rapidjson)" \
    "$(pin prometheus-client)"
site="$work/pa-site/site"
# tritonclient's old perf_analyzer binaries (34 MB) are not used (bench/perf_analyzer.py brings 2.60),
# nor is the TensorRT provider library.
rm -f "$site/bin/perf_analyzer" "$site/bin/perf_client" "$site/onnxruntime/capi/libonnxruntime_providers_tensorrt.so"

cache="$root/.cache/perf_analyzer"
if [ -f "$cache/sysroot-trixie/.complete" ] && [ -x "$cache/perf_analyzer-2.60.0/perf_analyzer" ]; then
    mkdir -p "$work/pa-site/pa"
    cp -a "$cache/perf_analyzer-2.60.0" "$cache/sysroot-trixie" "$work/pa-site/pa/"
else
    echo "note: no perf_analyzer set up in $cache (run a bench here first): the payload has none" >&2
fi

tar -C "$work/pa-site" -cf - . | zstd -19 --long=27 -T0 -q -o "$work/payload.tar.zst"
split -b "${PIECE_MB:-56}M" -d -a 2 "$work/payload.tar.zst" "$out/part"
ls -l "$out"
echo "gpu_payload: $(ls "$out"/part* | wc -l) pieces in $out; carry one per device call (see the header)"
