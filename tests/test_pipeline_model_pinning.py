"""A pipeline decides on the model version it was checked against (model-owner audit, 2026-11-27).

A new version the pipeline does not fit (here: a fourth class its policy does not declare) is refused with the
running pipeline kept — but decisions went on running on the newest version all the same: every one a FALLBACK
for another input width, or AUTOMATED on scores the policy never declared. Now they stay on the version that
was checked, and move to a new one only once it binds.
"""

from __future__ import annotations

import shutil

import grpc
import numpy as np
import onnx
from onnx import numpy_helper

from claims_support import build_small_model, claim_request
from conftest import start_claims_kernel
from examples.claims import data
from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
from kernel._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc
from kernel._proto.inference import grpc_service_pb2 as pb
from kernel._proto.inference import grpc_service_pb2_grpc as pb_grpc
from kernel.testing.onnx_models import mlp_from_weights, save

MODEL = "claims_triage"


def _four_class_version(models, version: str) -> None:
    """v1's weights with a fourth class ("fraud") beside approve/review/deny."""
    v1 = models / MODEL / "1"
    weights = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(v1 / "model.onnx")).graph.initializer}
    w, b = weights["W0"], weights["B0"]
    w4 = np.hstack([w, w[:, 1:2] * 0.5]).astype(np.float32)
    b4 = np.append(b, -1.0).astype(np.float32)
    folder = models / MODEL / version
    save(mlp_from_weights([(w4, b4)], "features", "probabilities", softmax=True, graph_name=MODEL), folder / "model.onnx")
    toml = (v1 / "model.toml").read_text()
    assert 'dims = [3]' in toml and 'labels = ["approve", "review", "deny"]' in toml
    (folder / "model.toml").write_text(toml.replace("dims = [3]", "dims = [4]").replace(
        'labels = ["approve", "review", "deny"]', 'labels = ["approve", "review", "deny", "fraud"]'))


def test_a_pipeline_stays_on_its_checked_version_until_a_new_one_binds(tmp_path):
    models = build_small_model(tmp_path / "models", provider="cpu")
    server = start_claims_kernel(models, tmp_path)
    request = claim_request(data.generate_cases(1, seed=11)[0])
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            decide = kgrpc.DecisionServiceStub(channel).Decide
            admin = kgrpc.AdminServiceStub(channel)
            load = pb_grpc.GRPCInferenceServiceStub(channel).RepositoryModelLoad

            def bound() -> str:
                (info,) = admin.ListPipelines(kpb.ListPipelinesRequest(), timeout=10).pipelines
                return info.model_version

            assert decide(request, timeout=10).model.model_version == "1" and bound() == "1"
            _four_class_version(models, "2")
            load(pb.RepositoryModelLoadRequest(model_name=MODEL), timeout=30)
            refused = admin.ListPipelines(kpb.ListPipelinesRequest(), timeout=10).refused
            (why,) = refused.values()
            assert "declares classes" in why and "fraud" in why, why
            answer = decide(request, timeout=10)
            assert answer.model.model_version == "1" and bound() == "1"  # not the refused version 2
            assert answer.outcome != kpb.FALLBACK and "fraud" not in answer.model.class_scores
            # A version the pipeline fits takes over as soon as it loads.
            shutil.copytree(models / MODEL / "1", models / MODEL / "3")
            load(pb.RepositoryModelLoadRequest(model_name=MODEL), timeout=30)
            assert decide(request, timeout=10).model.model_version == "3" and bound() == "3"
    finally:
        server.stop(grace=1)


def test_a_reload_that_would_no_longer_fit_the_pipeline_deciding_on_that_version_is_refused(tmp_path):
    """A model.toml edited in place (its labels renamed) and loaded again: the load answered OK, the pipeline's new
    binding was refused "the running version keeps serving", and that running version went on deciding on the
    reloaded version: every Decide failed, INVALID_ARGUMENT "field 'label': 'accept' is not one of the model's
    classes" (a live-change audit). Now the reload is refused and version 1 as loaded before keeps deciding."""
    models = build_small_model(tmp_path / "models", provider="cpu")
    server = start_claims_kernel(models, tmp_path)
    request = claim_request(data.generate_cases(1, seed=11)[0])
    toml = models / MODEL / "1" / "model.toml"
    text = toml.read_text()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            decide = kgrpc.DecisionServiceStub(channel).Decide
            load = pb_grpc.GRPCInferenceServiceStub(channel).RepositoryModelLoad
            assert decide(request, timeout=10).model.model_version == "1"
            toml.write_text(text.replace('"approve", "review", "deny"', '"accept", "review", "deny"'))
            try:
                load(pb.RepositoryModelLoadRequest(model_name=MODEL), timeout=30)
                raise AssertionError("a reload that breaks the serving pipeline was accepted")
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error.details()
                assert "pipeline 'claims_triage'" in error.details() and "accept" in error.details(), error.details()
                assert "keep serving (1)" in error.details(), error.details()
            answer = decide(request, timeout=10)  # (failed INVALID_ARGUMENT before)
            assert answer.model.model_version == "1" and set(answer.model.class_scores) == {"approve", "review", "deny"}
            # A pipeline following the newest version is not held to the one it leaves: with a version 2 it fits
            # loaded beside it, the same files load, and it moves to version 2.
            shutil.copytree(models / MODEL / "1", models / MODEL / "2")
            (models / MODEL / "2" / "model.toml").write_text(text)
            load(pb.RepositoryModelLoadRequest(model_name=MODEL), timeout=30)
            assert decide(request, timeout=10).model.model_version == "2"
    finally:
        server.stop(grace=1)


def test_a_pipeline_moves_off_a_version_its_load_drops_before_the_load_is_published(tmp_path):
    """Version 2's folder removed, then the model loaded again: the pipeline following the newest version was moved to
    version 1 only by the registry's listener, after the hub had published the load; every Decide in between found
    version 2 gone, UNAVAILABLE (13 in one live-change run). A listener of the kernel's, which runs before the
    registry's, sees what such a Decide would: the pipeline on a version that is loaded."""
    from claims_support import copy_pipelines
    from kernel.models import ModelHub
    from kernel.pipelines import PipelineRegistry
    from kernel.policy import load_policy, parse_policy

    models = build_small_model(tmp_path / "models", provider="cpu")
    shutil.copytree(models / MODEL / "1", models / MODEL / "2")
    hub = ModelHub(models)
    hub.load_all()
    found = []

    def decide_at_publish(added, removed):  # (added before the registry's own listener, as the kernel's are)
        pipeline = registry.get("claims_triage")
        found.append((pipeline.bound_version, hub.get(pipeline.model, pipeline.bound_version) is not None))

    hub.add_listener(decide_at_publish)
    registry = PipelineRegistry(copy_pipelines(tmp_path / "pipelines"), hub, load_policy, parse_policy, poll_s=0)
    registry.start()
    try:
        assert registry.get("claims_triage").bound_version == "2"
        shutil.rmtree(models / MODEL / "2")
        hub.load(MODEL)
        assert found == [("1", True)]
        assert registry.get("claims_triage").bound_version == "1"
    finally:
        registry.stop()
