"""Model repositories for the servers: ``model.toml`` text (batching knobs) and the on-disk layout."""

from __future__ import annotations

import os
from pathlib import Path

from bench.tiny_models import MODELS, write_model


def model_toml(model: str, max_batch_size: int = 64, max_queue_delay_us: int = 0,
               preferred_batch_sizes: tuple[int, ...] = ()) -> str:
    widths = MODELS[model]
    lines = [f"max_batch_size = {max_batch_size}"]
    if max_queue_delay_us:
        lines.append(f"max_queue_delay_us = {max_queue_delay_us}")
    if preferred_batch_sizes:
        lines.append(f"preferred_batch_sizes = [{', '.join(map(str, preferred_batch_sizes))}]")
    lines += ["", "[[input]]", 'name = "INPUT0"', 'datatype = "FP32"', f"dims = [{widths[0]}]",
              "", "[[output]]", 'name = "OUTPUT0"', 'datatype = "FP32"', f"dims = [{widths[-1]}]", ""]
    return "\n".join(lines)


def build_repo(out: Path, name: str, models: dict[str, str]) -> Path:
    """``out/repos-openloop/<name>/<model>/1/{model.onnx,model.toml}``; ``models``: model -> toml text."""
    onnx_dir = out / "onnx"
    onnx_dir.mkdir(parents=True, exist_ok=True)
    root = out / "repos-openloop" / name
    for model, toml in models.items():
        src = write_model(model, onnx_dir)
        folder = root / model / "1"
        folder.mkdir(parents=True, exist_ok=True)
        dst = folder / "model.onnx"
        if not dst.exists() or dst.stat().st_size != src.stat().st_size:
            dst.unlink(missing_ok=True)
            try:
                os.link(src, dst)
            except OSError:
                dst.write_bytes(src.read_bytes())
        (folder / "model.toml").write_text(toml)
    return root
