"""Where ``provider = "auto"`` puts the benchmark models here, and what TF32 does to their outputs.

Prints, for the large MLP of ``bench.tiny_models``: the provider the naive server's and the
kernel's sessions run on, and the largest difference from the CPU's outputs at batch 32 with
CUDA's TF32 off (the kernel's default, ``cuda_tf32 = false``) and on (onnxruntime's default).

    python -m bench.gpu_probe [--rows 32]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

from bench.naive_server import NaiveModel
from bench.tiny_models import write_model
from kernel.models.runtime import CPU, CUDA, OnnxModel


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_probe", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=32)
    args = parser.parse_args(argv)
    path = write_model("large_mlp", Path(tempfile.mkdtemp(prefix="gpu-probe-")))
    print(f"onnxruntime {ort.__version__}: {ort.get_available_providers()}")
    print(f"naive server session: {NaiveModel(str(path), 'large_mlp').provider}")
    print(f"kernel session:       {OnnxModel.load(path, None, 'large_mlp', '1').provider}")
    if CUDA not in ort.get_available_providers():
        return 0
    x = np.random.default_rng(0).normal(size=(args.rows, 64)).astype(np.float32)
    want = ort.InferenceSession(str(path), providers=[CPU]).run(None, {"INPUT0": x})[0]
    for tf32 in ("0", "1"):
        got = ort.InferenceSession(str(path), providers=[(CUDA, {"use_tf32": tf32}), CPU]).run(None, {"INPUT0": x})[0]
        diff = np.abs(got - want)
        print(f"use_tf32={tf32}: max |cuda - cpu| {diff.max():.3g}, max relative {(diff / np.abs(want).clip(1e-6)).max():.3g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
