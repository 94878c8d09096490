"""The bundled claims-triage demo: synthetic data, feature encoding, trained ONNX models."""

from __future__ import annotations

import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # plain `pytest` does not put the repository root on sys.path
    sys.path.insert(0, str(ROOT))

from examples.claims import build_models, data, features  # noqa: E402

SMALL, LARGE = "claims_triage", "claims_triage_large"
FILES = ("model.onnx", "model.toml", "features.toml")


@pytest.fixture(scope="module")
def builds(demo_build, tmp_path_factory):
    """Two independent builds of both models, with their wall times: the session's and one of our own."""
    folder = tmp_path_factory.mktemp("models_b")
    started = time.perf_counter()
    results = build_models.build(folder, log=lambda line: None)
    return [demo_build, (folder, {r["name"]: r for r in results}, time.perf_counter() - started)]


@pytest.fixture(scope="module")
def models_dir(builds):
    return builds[0][0]


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _toml(path: Path) -> dict:
    with open(path, "rb") as fh:
        return tomllib.load(fh)


def test_builds_are_byte_identical(builds):
    (a, _, _), (b, _, _) = builds
    for name in (SMALL, LARGE):
        for file in FILES:
            left, right = a / name / "1" / file, b / name / "1" / file
            assert left.read_bytes() == right.read_bytes(), f"{name}/1/{file} differs between builds"


def test_existing_models_are_skipped_unless_forced(models_dir):
    onnx_file = models_dir / SMALL / "1" / "model.onnx"
    before = onnx_file.stat().st_mtime_ns
    results = build_models.build(models_dir, models=build_models.MODELS[:1], log=lambda line: None)
    assert results[0]["skipped"] and onnx_file.stat().st_mtime_ns == before
    results = build_models.build(models_dir, force=True, models=build_models.MODELS[:1],
                                 log=lambda line: None)
    assert not results[0]["skipped"]


def test_accuracy_floors_and_large_beats_small(builds, models_dir):
    results = builds[0][1]
    assert results[SMALL]["accuracy"] >= 0.70
    assert results[LARGE]["accuracy"] >= 0.88
    assert results[LARGE]["accuracy"] >= results[SMALL]["accuracy"] + 0.03
    assert results[LARGE]["params"] > 100 * results[SMALL]["params"]
    # The card's number is what onnxruntime gets on the held-out split.
    cases = data.generate_cases(build_models.TEST_N, build_models.TEST_SEED)
    x, y = features.encode(cases), data.labels_array(cases)
    for name in (SMALL, LARGE):
        probs = _session(models_dir / name / "1" / "model.onnx").run(None, {"features": x})[0]
        card = _toml(models_dir / name / "1" / "model.toml")["card"]["metrics"]
        assert abs(float(np.mean(probs.argmax(axis=1) == y)) - card["accuracy"]) < 1e-3


@pytest.mark.parametrize("name", [SMALL, LARGE])
def test_onnxruntime_matches_numpy_forward(models_dir, name):
    model = onnx.load(str(models_dir / name / "1" / "model.onnx"))
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    layers = [(weights[f"W{i}"], weights[f"B{i}"]) for i in range(len(weights) // 2)]
    x = features.encode(data.generate_cases(257, seed=99))
    expected = build_models.softmax(build_models.forward(layers, x)[-1])
    got = _session(models_dir / name / "1" / "model.onnx").run(None, {"features": x})[0]
    assert got.dtype == np.float32 and got.shape == (257, 3)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("name", [SMALL, LARGE])
def test_model_toml_matches_graph(models_dir, name):
    folder = models_dir / name / "1"
    cfg = _toml(folder / "model.toml")
    assert cfg["platform"] == "onnxruntime_onnx" and cfg["max_batch_size"] == 64
    assert cfg["instances"] == 1 and cfg["provider"] == "auto" and cfg["intra_op_threads"] == 1
    assert set(cfg["card"]) >= {"owner", "intended_use", "training_data", "limitations", "metrics"}
    assert set(cfg["card"]["metrics"]) == {"accuracy", "macro_f1"}
    graph = onnx.load(str(folder / "model.onnx")).graph
    for declared, actual in ((cfg["input"], graph.input), (cfg["output"], graph.output)):
        assert len(declared) == len(actual) == 1
        dims = actual[0].type.tensor_type.shape.dim
        assert declared[0]["name"] == actual[0].name and declared[0]["datatype"] == "FP32"
        assert actual[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        assert dims[0].dim_param  # dynamic batch dim, implied by max_batch_size > 0
        assert declared[0]["dims"] == [d.dim_value for d in dims[1:]]
    assert cfg["input"][0]["dims"] == [features.width()]
    assert cfg["output"][0]["labels"] == list(data.LABELS)


def test_features_toml_round_trips(models_dir):
    spec = features.read_spec(models_dir / LARGE / "1" / "features.toml")
    assert spec == features.FEATURES
    cases = data.generate_cases(50, seed=7)
    np.testing.assert_array_equal(features.encode(cases, spec), features.encode(cases))


def test_encode_layout_and_missing_fields():
    x = features.encode([{}, {"customer_tier": "gold", "claim_type": "unknown", "has_police_report": True}])
    assert x.dtype == np.float32 and x.shape == (2, features.width()) == (2, 14)
    # Missing numeric fields take the training median, which standardizes to about 0.
    assert np.all(np.abs(x[0, :5]) < 1.0)
    assert not x[0, 5:].any()  # unknown categories and missing booleans are all zeros
    assert x[1, 5:9].tolist() == [0, 0, 1, 0]  # gold
    assert not x[1, 9:13].any() and x[1, 13] == 1


def test_data_is_deterministic_and_balanced():
    cases = data.generate_cases(4000, seed=3)
    assert cases == data.generate_cases(4000, seed=3)
    assert cases != data.generate_cases(4000, seed=4)
    share = np.bincount(data.labels_array(cases), minlength=3) / len(cases)
    np.testing.assert_allclose(share, [0.55, 0.25, 0.20], atol=0.05)
    assert all(isinstance(c["description"], str) and c["description"] for c in cases)
    assert any("@example.com" in c["description"] for c in cases)
    assert any("555-01" in c["description"] for c in cases)
