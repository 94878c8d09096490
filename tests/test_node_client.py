"""The API from another language: Node's @grpc/grpc-js (clients/node/) against a real kernel.

`cross_language_check.js` makes its calls and prints what it got as one JSON object;
here each answer is held to an independent source: onnxruntime for ModelInfer, the
Python client for the same decisions. Skipped, never failed, where Node or the
client's packages are not installed.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from google.protobuf import json_format

from claims_support import copy_pipelines
from conftest import ROOT, start_kernel
from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
from kernel._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc
from kernel._proto.inference import grpc_service_pb2 as pb
from kernel._proto.inference import grpc_service_pb2_grpc as pb_grpc

NODE_CLIENT = ROOT / "clients" / "node"
INSTALL = "run `make node-deps` (or `npm ci --prefix clients/node`)"


@pytest.fixture(scope="module")
def node() -> str:
    """The node executable, or a skip saying how to install what is missing (before any model is built)."""
    node = shutil.which("node")
    if node is None:
        pytest.skip(f"node is not on PATH: install Node.js 18 or later, then {INSTALL}")
    if not (NODE_CLIENT / "node_modules" / "@grpc" / "grpc-js").is_dir():
        pytest.skip(f"clients/node/node_modules is missing: {INSTALL}")
    return node


@pytest.fixture(scope="module", params=["sync", "aio"])
def served(request, node, claims_models, tmp_path_factory):
    """(address, report): a kernel serving the claims pipeline, and what Node got from it; once per front end
    (the Node run adds well under a second to each)."""
    pipelines = copy_pipelines(tmp_path_factory.mktemp("pipelines"))
    server = start_kernel(claims_models, request.param, pipelines=str(pipelines),
                          data_dir=str(tmp_path_factory.mktemp("data")), pipeline_poll_s=0)
    address = f"127.0.0.1:{server.port}"
    try:
        run = subprocess.run([node, str(NODE_CLIENT / "cross_language_check.js"), "--address", address],
                             capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert run.returncode == 0, run.stderr
        yield address, json.loads(run.stdout)
    finally:
        server.stop(grace=1)


@pytest.fixture(scope="module")
def report(served) -> dict:
    return served[1]


@pytest.fixture
def channel(served):
    with grpc.insecure_channel(served[0]) as ch:
        yield ch


def python_decide(channel, sent: dict, request_id: str) -> kpb.Decision:
    """The Python client's answer to the request Node sent (parsed from the proto JSON Node reported)."""
    request = json_format.ParseDict(sent, kpb.DecisionRequest())
    request.request_id = request_id
    return kgrpc.DecisionServiceStub(channel).Decide(request, timeout=10)


def test_node_sees_the_kernel_live_and_serving(report):
    assert report["live"] is True
    assert report["health"] == {"server": "SERVING", "decision_service": "SERVING"}


def test_node_model_metadata_matches_python(report, channel):
    meta = pb_grpc.GRPCInferenceServiceStub(channel).ModelMetadata(pb.ModelMetadataRequest(name="claims_triage"))
    expected = json_format.MessageToDict(meta, preserving_proto_field_name=True)  # int64 as strings, as Node has them
    assert report["metadata"]["name"] == "claims_triage"
    assert report["metadata"]["versions"] == expected["versions"]
    assert report["metadata"]["inputs"] == expected["inputs"]
    assert report["metadata"]["outputs"] == expected["outputs"]


def test_node_model_infer_matches_onnxruntime(report, claims_models):
    infer = report["infer"]
    row = np.array([infer["input"]], np.float32)
    assert row.shape[1] == int(report["metadata"]["inputs"][0]["shape"][-1])
    session = ort.InferenceSession(str(claims_models / "claims_triage" / "1" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    (expected,) = session.run([infer["output_name"]], {infer["input_name"]: row})
    assert infer["id"] == "node-infer-1"
    assert infer["output_datatype"] == "FP32" and infer["output_shape"] == list(expected.shape)
    np.testing.assert_allclose(np.array(infer["output"], np.float32).reshape(expected.shape), expected, rtol=1e-5)


def test_node_decide_matches_the_python_client(report, channel):
    decide = report["decide"]
    assert decide["request_id"] == "node-decide-1"
    # Typed fields went out as the Value kind each names (int64 as a decimal string).
    kinds = {name: next(iter(value)) for name, value in decide["request"]["fields"].items()}
    assert kinds["claim_amount"] == "number_value" and kinds["prior_claims"] == "int_value"
    assert kinds["customer_tier"] == "string_value" and kinds["has_police_report"] == "bool_value"
    assert decide["request"]["text_fields"] == {"description": "hail damage to the windshield"}

    expected = python_decide(channel, decide["request"], "python-decide-1")
    assert decide["action"] == expected.action
    assert decide["outcome"] == kpb.Outcome.Name(expected.outcome)
    assert decide["reasons"] and [r["rule_id"] for r in decide["reasons"]] == [r.rule_id for r in expected.reasons]
    assert decide["policy_name"] == expected.policy_name
    model = decide["model"]
    assert (model["model_name"], model["model_version"]) == (expected.model.model_name, expected.model.model_version)
    assert model["confidence"] == pytest.approx(expected.model.confidence, rel=1e-6)
    assert model["class_scores"] == pytest.approx(dict(expected.model.class_scores), rel=1e-6)
    # Acknowledged once audited: Node's record came before the Python client's, later, one.
    assert decide["audit_sequence"].isdigit() and 0 < int(decide["audit_sequence"]) < expected.audit_sequence


def test_node_gets_status_codes_that_name_the_field(report):
    assert report["bad_field"]["code"] == "INVALID_ARGUMENT"
    assert "customer_tier" in report["bad_field"]["details"]
    assert report["unknown_pipeline"]["code"] == "NOT_FOUND"
    assert "no_such_pipeline" in report["unknown_pipeline"]["details"]


def test_node_decide_stream_answers_each_request_by_id(report, channel):
    stream = report["stream"]
    sent = {r["request_id"]: r for r in stream["requests"]}
    answers = {a["request_id"]: a for a in stream["answers"]}
    assert len(sent) == 5 and len(stream["answers"]) == 5 and answers.keys() == sent.keys()
    for request_id, answer in answers.items():
        assert answer["error_code"] == "", answer["error_message"]
        # The answer is the one for its own request: the Python client decides it the same way.
        expected = python_decide(channel, sent[request_id], f"python-{request_id}")
        assert (answer["action"], answer["outcome"]) == (expected.action, kpb.Outcome.Name(expected.outcome)), request_id
    assert len({a["action"] for a in answers.values()}) > 1  # the claims differ enough to be told apart
