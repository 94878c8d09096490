"""Write the benchmark models of ``/work/shared/PEERS.md`` as ONNX files.

* ``tiny_mlp``:   INPUT0 FP32 [-1, 16]  -> 64 ReLU -> 4 softmax (OUTPUT0)
* ``medium_mlp``: INPUT0 FP32 [-1, 64]  -> 1024 -> 1024 -> 1024 -> 8 (8.7 MB, fits in cache)
* ``large_mlp``:  INPUT0 FP32 [-1, 64]  -> 2048 -> 2048 -> 2048 -> 8 (where batching pays)

The weights come from a fixed seed (``kernel.testing.onnx_models``), so every run
and every machine builds byte-identical files; nothing binary is committed.

CLI: ``python -m bench.tiny_models OUT_DIR [--only tiny_mlp ...]`` prints the paths.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from kernel.testing import onnx_models

#: name -> layer widths (input first)
MODELS: dict[str, list[int]] = {
    "tiny_mlp": [16, 64, 4],
    "medium_mlp": [64, 1024, 1024, 1024, 8],
    "large_mlp": [64, 2048, 2048, 2048, 8],
}


def write_model(name: str, folder, overwrite: bool = False) -> Path:
    """Write model ``name`` (a key of ``MODELS``) to ``folder/name.onnx`` and return the path."""
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; known: {sorted(MODELS)}")
    path = Path(folder) / f"{name}.onnx"
    if overwrite or not path.exists():
        tmp = path.with_name(path.name + ".tmp")
        onnx_models.save(onnx_models.mlp(MODELS[name]), tmp)
        tmp.replace(path)
    return path


def write_tiny_mlp(folder, overwrite: bool = False) -> Path:
    return write_model("tiny_mlp", folder, overwrite)


def write_large_mlp(folder, overwrite: bool = False) -> Path:
    return write_model("large_mlp", folder, overwrite)


def write_models(folder, names=("tiny_mlp", "large_mlp"), overwrite: bool = False) -> dict[str, Path]:
    """Write the named models (default: tiny and large) into ``folder``; return name -> path."""
    return {name: write_model(name, folder, overwrite) for name in names}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tiny_models", description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("--only", nargs="+", choices=sorted(MODELS), help="models to write (default: tiny_mlp large_mlp)")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    for name, path in write_models(args.folder, args.only or ("tiny_mlp", "large_mlp"), args.overwrite).items():
        print(f"{name}\t{path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
