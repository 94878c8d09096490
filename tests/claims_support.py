"""The claims demo as test equipment: its small model, its pipeline folder, requests built from cases."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from examples.claims import build_models
from examples.claims.data import REQUEST_FIELDS
from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
from kernel.decision_client import make_request

ROOT = Path(__file__).resolve().parent.parent
CLAIMS = ROOT / "examples" / "claims" / "pipelines"


def build_small_model(folder: Path, provider: str = "auto") -> Path:
    """``claims_triage`` (the logistic-regression model, built in well under a second) into ``folder``;
    ``provider = "cpu"`` pins it to the CPU lane (tests that queue it behind a busy CPU lane: on a GPU
    machine ``auto`` would put it on the GPU lane, which nothing occupies)."""
    build_models.build(folder, models=build_models.MODELS[:1], log=lambda line: None)
    if provider != "auto":
        toml = folder / build_models.MODELS[0].name / "1" / "model.toml"
        text = toml.read_text(encoding="utf-8")
        assert 'provider = "auto"' in text, "build_models no longer writes the provider line this replaces"
        toml.write_text(text.replace('provider = "auto"', f'provider = "{provider}"'), encoding="utf-8")
    return folder


def loaded_hub(folder: Path):
    """A ``ModelHub`` over the claims model built into ``folder``, every model loaded (registry tests)."""
    from kernel.models import ModelHub

    hub = ModelHub(build_small_model(folder))
    hub.load_all()
    return hub


def copy_pipelines(folder: Path) -> Path:
    """A private copy of the claims pipeline and policy (tests upload and edit them)."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in CLAIMS.glob("*.toml"):
        shutil.copy(path, folder / path.name)
    return folder


def claim_request(case: dict, **options) -> kpb.DecisionRequest:
    """A DecisionRequest for the claims pipeline from a synthetic case (tenant "acme" unless given)."""
    options.setdefault("tenant", "acme")
    return make_request("claims_triage", {name: case[name] for name in REQUEST_FIELDS}, **options)


# A claim the model is unsure of (its confidence about 0.4, below the policy's 0.6): R02 sends it to a human.
UNSURE_CASE = {"claim_amount": 3612.47, "policy_age_months": 28, "customer_tier": "bronze", "claim_type": "health",
               "prior_claims": 1, "fraud_score": 0.366, "days_since_incident": 10, "has_police_report": False}


def model_weights(version: Path) -> tuple[np.ndarray, np.ndarray]:
    """The small claims model's one layer (W0, B0) from its version folder."""
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(version / "model.onnx")).graph.initializer}
    return inits["W0"], inits["B0"]


def faulty_claims_model(good: Path, out: Path, fault: str) -> None:
    """The small claims model (version folder ``good``) at ``out``, failing for a standardized claim amount above
    1: ``fault="nan"`` makes its scores NaN there (0 * sqrt(1 - x0)); ``fault="refuse"`` makes onnxruntime refuse
    the input there (a Gather whose index, 1000 * relu(x0 - 1), falls outside its one-row table).
    ``fault="logits"``: no Softmax at the end (its weights scaled up), so its scores are not probabilities."""
    from kernel.testing.onnx_models import _finish, mlp_from_weights, save

    w, b = model_weights(good)
    if fault == "logits":
        out.mkdir(parents=True)
        save(mlp_from_weights([(w * 8, b)], "features", "probabilities", softmax=False), out / "model.onnx")
        shutil.copy(good / "model.toml", out / "model.toml")
        return
    floats = TensorProto.FLOAT
    consts = {"col0": np.array([0], np.int64), "one": np.array(1.0, np.float32), "zero": np.array(0.0, np.float32),
              "thousand": np.array(1000.0, np.float32), "table": np.zeros((1, 1), np.float32), "last": np.array([2], np.int64)}
    pick = [helper.make_node("Gather", ["features", "col0"], ["x0"], axis=1)]
    if fault == "nan":
        poison = [helper.make_node("Sub", ["one", "x0"], ["room"]), helper.make_node("Sqrt", ["room"], ["root"]),
                  helper.make_node("Mul", ["root", "zero"], ["poison"])]
    else:
        poison = [helper.make_node("Sub", ["x0", "one"], ["over"]), helper.make_node("Relu", ["over"], ["excess"]),
                  helper.make_node("Mul", ["excess", "thousand"], ["scaled"]),
                  helper.make_node("Cast", ["scaled"], ["index"], to=TensorProto.INT64),
                  helper.make_node("Gather", ["table", "index"], ["row"], axis=0),  # [batch, 1, 1]
                  helper.make_node("Mul", ["row", "zero"], ["zeros"]),
                  helper.make_node("Squeeze", ["zeros", "last"], ["poison"])]  # [batch, 1]
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["features", "W0", "B0"], ["logits"]),
         helper.make_node("Softmax", ["logits"], ["soft"], axis=-1), *pick, *poison,
         helper.make_node("Add", ["soft", "poison"], ["probabilities"])],
        f"claims_triage_{fault}",
        [helper.make_tensor_value_info("features", floats, ["batch", w.shape[0]])],
        [helper.make_tensor_value_info("probabilities", floats, ["batch", w.shape[1]])],
        initializer=[numpy_helper.from_array(w, "W0"), numpy_helper.from_array(b, "B0"),
                     *(numpy_helper.from_array(value, name) for name, value in consts.items())])
    out.mkdir(parents=True)
    save(_finish(graph), out / "model.onnx")
    shutil.copy(good / "model.toml", out / "model.toml")


def hold_attempts_after_deciding(monkeypatch, runner, timeout_s: float = 20.0):
    """Fault injected on purpose: each task attempt of ``runner``, once decided (its review opened, if it asked
    for one), waits for ``go_on``; ``(decided, go_on)``, two events."""
    decided, go_on = threading.Event(), threading.Event()
    real_run = runner.run_fn

    def held_after_deciding(task):
        outcome = real_run(task)
        decided.set()
        go_on.wait(timeout_s)
        return outcome

    monkeypatch.setattr(runner, "run_fn", held_after_deciding)
    return decided, go_on
