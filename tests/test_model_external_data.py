"""A model that keeps its weights in a side file (ONNX external data, as exports over 2 GB must): it serves, and what
the kernel says it loaded (``onnx_sha256``, named by every deploy record and decision) covers those weights too."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from kernel.models import ModelConfigError, ModelHub
from kernel.testing import onnx_models

ROW = {"INPUT0": np.ones((1, 4), np.float32)}


def _save_external(model: onnx.ModelProto, folder: Path, location: str = "weights.bin") -> None:
    (folder / location).parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(folder / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location=location, size_threshold=0)


def test_new_weights_in_the_side_file_are_a_new_digest(tmp_path):
    """(Model repository audit) onnx_sha256 hashed model.onnx alone: weights.bin replaced and the model reloaded, it
    answered differently under the very digest it had before, so the audit log could not tell the two models apart."""
    version = tmp_path / "ext" / "1"
    _save_external(onnx_models.mlp([4, 8, 2], seed=1), version)
    hub = ModelHub(tmp_path)
    (before,) = hub.load("ext")
    answer = before.runtime.run(ROW)[0]
    _save_external(onnx_models.mlp([4, 8, 2], seed=2), tmp_path / "other")
    shutil.copy(tmp_path / "other" / "weights.bin", version / "weights.bin")  # model.onnx itself unchanged
    (after,) = hub.load("ext")
    assert not np.allclose(after.runtime.run(ROW)[0], answer)
    assert after.runtime.onnx_sha256 != before.runtime.onnx_sha256


def test_a_model_in_one_file_is_named_by_that_files_own_sha256(tmp_path):
    """Without external data the digest is still the file's: `sha256sum model.onnx` checks it (beside other files)."""
    onnx_models.save(onnx_models.mlp([4, 8, 2], seed=1), tmp_path / "plain" / "1" / "model.onnx")
    (tmp_path / "plain" / "1" / "NOTES.md").write_text("trained on ...\n")
    (mv,) = ModelHub(tmp_path).load("plain")
    assert mv.runtime.onnx_sha256 == hashlib.sha256((tmp_path / "plain" / "1" / "model.onnx").read_bytes()).hexdigest()


def test_a_missing_side_file_refuses_that_version_naming_the_file(tmp_path):
    version = tmp_path / "ext" / "1"
    _save_external(onnx_models.mlp([4, 8, 2], seed=1), version, location="w/weights.bin")
    (version / "w" / "weights.bin").unlink()
    with pytest.raises(ModelConfigError) as info:
        ModelHub(tmp_path).load("ext")
    assert "w/weights.bin" in str(info.value)


@pytest.mark.parametrize("location", ["/absolute/weights.bin", "../weights.bin"])
def test_external_data_outside_the_model_folder_is_refused_naming_the_location(tmp_path, location):
    """Its files are the model's: one elsewhere (written into the graph, which onnx's own save refuses to write)
    would be read, hashed and served from outside the repository."""
    version = tmp_path / "ext" / "1"
    _save_external(onnx_models.mlp([4, 8, 2], seed=1), version)
    graph = onnx.load(str(version / "model.onnx"), load_external_data=False)
    for tensor in graph.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(graph, str(version / "model.onnx"))
    onnx_models.save(onnx_models.mlp([4, 8, 2], seed=1), tmp_path / "good" / "1" / "model.onnx")
    loaded, failed = ModelHub(tmp_path).load_all()
    assert [mv.name for mv in loaded] == ["good"]
    assert f"external data location '{location}' is outside the model's folder" in failed["ext"], failed
