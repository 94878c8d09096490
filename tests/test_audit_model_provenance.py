"""Model provenance for the audit log: a loaded model names the bytes it was loaded from, not today's files.

The ONNX file and model.toml are hashed once, at load, and kept on the
runtime (``onnx_sha256``, ``config_sha256``): a record written later (an
undeploy at a reload, a decision) must name what decided, even when the files
were replaced on disk since. Real kernel, real model files.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import onnx
import pytest
from claims_support import build_small_model
from conftest import start_kernel

from kernel.models import config as model_config
from kernel.models.errors import ModelConfigError
from kernel.models.runtime import OnnxModel


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def retrain_in_place(folder: Path) -> None:
    """New, valid bytes for model.onnx and model.toml (as a retraining written over version 1 would be)."""
    model = onnx.load(folder / "model.onnx")
    model.doc_string = "retrained"
    onnx.save(model, folder / "model.onnx")
    with open(folder / "model.toml", "a", encoding="utf-8") as fh:
        fh.write("# retrained\n")


@pytest.fixture
def models(tmp_path) -> Path:
    return build_small_model(tmp_path / "models")


def test_a_loaded_model_keeps_the_hashes_of_the_bytes_it_was_loaded_from(models):
    folder = models / "claims_triage" / "1"
    loaded_onnx, loaded_toml = sha256(folder / "model.onnx"), sha256(folder / "model.toml")
    server = start_kernel(models)
    try:
        first = server.hub.get("claims_triage", "1")
        assert (first.runtime.onnx_sha256, first.runtime.config_sha256) == (loaded_onnx, loaded_toml)

        retrain_in_place(folder)
        assert sha256(folder / "model.onnx") != loaded_onnx
        # Still serving the old bytes: the hashes say so, whatever the disk holds now.
        assert (first.runtime.onnx_sha256, first.runtime.config_sha256) == (loaded_onnx, loaded_toml)

        server.hub.load("claims_triage")  # the reload: the new version names the new bytes
        second = server.hub.get("claims_triage", "1")
        assert second is not first
        assert (second.runtime.onnx_sha256, second.runtime.config_sha256) == (
            sha256(folder / "model.onnx"), sha256(folder / "model.toml"))
        assert first.runtime.onnx_sha256 == loaded_onnx  # the retired one, for its undeploy record
    finally:
        server.stop(grace=1)


def test_a_reload_records_the_retiring_models_bytes_and_the_new_ones(models, tmp_path):
    """The undeploy record of a reload named the replacing file's hash (it hashed the disk at record time),
    so the log showed one model undeployed and none serving; now each record names its own bytes, model.toml
    included (its labels decide which score is which action)."""
    import json

    from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
    from kernel.audit import RecordFilter, iter_directory

    folder = models / "claims_triage" / "1"
    old = (sha256(folder / "model.onnx"), sha256(folder / "model.toml"))
    server = start_kernel(models, data_dir=str(tmp_path / "data"))
    try:
        retrain_in_place(folder)
        new = (sha256(folder / "model.onnx"), sha256(folder / "model.toml"))
        server.hub.load("claims_triage")
    finally:
        server.stop(grace=1)
    changes = [(kpb.AuditKind.Name(r.kind), json.loads(r.payload))
               for r in iter_directory(tmp_path / "data" / "audit", 0, RecordFilter())
               if r.kind in (kpb.MODEL_DEPLOY, kpb.MODEL_UNDEPLOY)]
    named = [(kind, (p["onnx_sha256"], p["config_sha256"])) for kind, p in changes]
    assert ("MODEL_UNDEPLOY", old) in named and ("MODEL_DEPLOY", new) in named, named
    assert ("MODEL_UNDEPLOY", new) not in named
    assert named[0] == ("MODEL_DEPLOY", old)
    # The reload reads in order: the old session retired (as a reload), then the same version deployed again
    # (an UNDEPLOY written last read as version 1 retired while it served on).
    assert named[1:] == [("MODEL_UNDEPLOY", old), ("MODEL_DEPLOY", new)], named
    assert changes[1][1]["reason"] == "reload"


def test_a_config_derived_from_the_graph_has_no_config_hash(models):
    path = models / "claims_triage" / "1" / "model.onnx"
    runtime = OnnxModel.load(path, None, "claims_triage", "1")
    assert runtime.onnx_sha256 == sha256(path) and runtime.config_sha256 == ""


def test_config_load_with_digest_hashes_the_bytes_it_parsed(models):
    toml = models / "claims_triage" / "1" / "model.toml"
    config, digest = model_config.load_with_digest(toml, "claims_triage", "1")
    assert digest == sha256(toml) and config == model_config.load(toml, "claims_triage", "1")


def test_injected_fault_file_replaced_during_load_is_refused(models, monkeypatch):
    """Injected fault: model.onnx is replaced between the hash and the sessions reading it; the load must
    fail rather than keep a hash of bytes the sessions never ran."""
    import kernel.models.runtime as runtime_module

    folder = models / "claims_triage" / "1"
    real_session = runtime_module.ort.InferenceSession

    def session_then_replace_the_file(*args, **kwargs):
        session = real_session(*args, **kwargs)
        retrain_in_place(folder)
        return session

    monkeypatch.setattr(runtime_module.ort, "InferenceSession", session_then_replace_the_file)
    config, digest = model_config.load_with_digest(folder / "model.toml", "claims_triage", "1")
    with pytest.raises(ModelConfigError, match="changed while it was being loaded; load the model again"):
        OnnxModel.load(folder / "model.onnx", config, "claims_triage", "1", digest)


def test_a_decision_names_the_model_file_that_decided_it_across_a_reload_in_place(models, tmp_path):
    """An analyst's walk-through: a decision's provenance was the model's name and version alone, so a version
    retrained in place and reloaded decided as 'claims_triage/1' before and after, and nothing on the decision said
    which of the two files its MODEL_DEPLOY records name had decided it. Now the answer and its record carry the
    SHA-256 of the model.onnx bytes loaded."""
    import grpc
    from conftest import start_claims_kernel

    from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
    from kernel._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc
    from kernel.decision_client import make_request

    folder = models / "claims_triage" / "1"
    server = start_claims_kernel(models, tmp_path)
    request = make_request("claims_triage", {"claim_amount": 800.0, "customer_tier": "gold"})
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            decide = kgrpc.DecisionServiceStub(channel).Decide
            first_file = sha256(folder / "model.onnx")
            before = decide(request, timeout=10)
            retrain_in_place(folder)
            server.hub.load("claims_triage")
            after = decide(request, timeout=10)
        records = {r.sequence: r for r in server.decisions.audit.read(from_sequence=0)}
    finally:
        server.stop(grace=1)
    assert (before.model.model_version, after.model.model_version) == ("1", "1")
    assert before.model.model_sha256 == first_file
    assert after.model.model_sha256 == sha256(folder / "model.onnx") != first_file
    deployed = [json.loads(r.payload)["onnx_sha256"] for r in records.values() if r.kind == kpb.MODEL_DEPLOY]
    assert deployed == [first_file, after.model.model_sha256]
    for answer in (before, after):  # the record says what the answer said
        assert records[answer.audit_sequence].decision.model == answer.model
