"""The API from another language: Node's @grpc/grpc-js (clients/node/) against a real kernel.

`cross_language_check.js` makes its calls and prints what it got as one JSON object;
here each answer is held to an independent source: onnxruntime for ModelInfer, the
Python client for the same decisions. Skipped, never failed, where Node or the
client's packages are not installed.
"""

from __future__ import annotations

import json
import subprocess

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from google.protobuf import json_format

from claims_support import copy_pipelines
from conftest import NODE_CLIENT, ROOT, start_kernel
from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
from kernel._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc
from kernel._proto.inference import grpc_service_pb2 as pb
from kernel._proto.inference import grpc_service_pb2_grpc as pb_grpc



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


# ── the client a JavaScript caller uses: values, refusals, retries, streams, channel (clients/node/aios_client.js) ──

INT64_MIN = -(2**63)


def test_node_refuses_values_it_would_send_wrong_naming_the_field(report):
    values = report["values"]
    # protobufjs wraps an int64 modulo 2^64 without a word (2**64 + 5 decided as 5; 2**63 arrives negative).
    for case in ("too_large", "int64_max_plus_one", "raw_int_value_too_large"):
        assert values[case]["error"] == "RangeError", case
        assert "prior_claims" in values[case]["message"], case
    assert str(2**64 + 5) in values["too_large"]["message"]
    # int64's own edge goes out exact: the kernel quotes it back unwrapped.
    assert values["int64_min"]["code"] == "INVALID_ARGUMENT"
    assert "prior_claims" in values["int64_min"]["details"] and str(INT64_MIN) in values["int64_min"]["details"]
    # A lone surrogate is refused before sending, naming the field (the kernel can only say "bad UTF-8").
    assert values["lone_surrogate_text"]["error"] == "TypeError"
    assert "description" in values["lone_surrogate_text"]["message"]
    assert "customer_tier" in values["lone_surrogate_field"]["message"]


def test_node_sends_minus_zero_as_zero(report, channel):
    values = report["values"]
    assert values["minus_zero_is_zero"] is True
    sent = values["minus_zero_request"]
    assert sent["fields"]["fraud_score"] == {"number_value": 0}
    # The input hash is that of 0.0: -0 would hash differently (and miss an idempotent replay).
    expected = python_decide(channel, sent, "python-minus-zero")
    assert values["minus_zero_input_hash"] == expected.input_hash


def test_node_refusals_carry_the_kernels_trailers(report):
    aborted = report["refusals"]["aborted"]
    assert aborted["kernel_error"] and aborted["has_metadata"]
    assert (aborted["code"], aborted["numeric_code"]) == ("ABORTED", grpc.StatusCode.ABORTED.value[0])
    assert "idempotency_key" in aborted["details"]
    assert isinstance(aborted["retry_after_ms"], int) and aborted["retry_after_ms"] >= 0
    assert aborted["retry_after_ms_helper"] == aborted["retry_after_ms"]
    assert aborted["audit_sequence"] is None and aborted["audit_sequence_helper"] is None

    late = report["refusals"]["late"]  # made after its timeout_ms, recorded all the same
    assert late["code"] == "DEADLINE_EXCEEDED" and late["audit_sequence_type"] == "string"
    assert late["audit_sequence"].isdigit() and late["audit_sequence_helper"] == late["audit_sequence"]
    assert f"audit sequence {late['audit_sequence']}" in late["details"]
    assert late["replay"] == {"replayed": True, "audit_sequence": late["audit_sequence"]}


def test_node_decide_retries_as_the_readme_says(report):
    refusals = report["refusals"]
    retried = refusals["retried"]  # twelve calls with one idempotency key at once, retries: 8
    results = retried["results"]
    assert all(r["code"] == "OK" for r in results), results
    assert len({r["audit_sequence"] for r in results}) == 1  # one decision ...
    assert sum(not r["replayed"] for r in results) == 1  # ... made once, replayed to the others
    assert retried["attempts"] > retried["calls"]  # ABORTED answers were sent again
    # DEADLINE_EXCEEDED is sent again with an idempotency key (the retry gets the recorded decision) ...
    assert refusals["late_retried"] is not None, "no late decision was retried"
    assert refusals["late_retried"]["code"] == "OK" and refusals["late_retried"]["attempts"] > 1
    # ... never without one (a retry could decide twice).
    assert refusals["unkeyed_deadline"] == {"code": "DEADLINE_EXCEEDED", "attempts": 1}


def test_node_per_call_deadline_and_metadata(report):
    refusals = report["refusals"]
    defaults = refusals["defaults"]  # the client's own: deadlineMs 7000, its metadata
    assert defaults["metadata"] == {"x-aios-client": "node-check"}
    assert 6000 < defaults["deadline_ms"] <= 7000
    per_call = refusals["per_call"]  # a call's own deadline, its metadata added to the client's
    assert per_call["method"].endswith("/Decide")
    assert 2000 < per_call["deadline_ms"] <= 2500
    assert per_call["metadata"] == {"x-aios-client": "node-check", "x-request-tag": "call-1"}
    assert refusals["tiny_deadline"]["code"] == "DEADLINE_EXCEEDED"


def test_node_stream_is_not_held_to_the_unary_deadline(report):
    many = report["streams"]["many"]
    assert many["stream_deadline_ms"] is None  # no deadline on the stream unless asked
    assert many["answers"] == many["distinct_ids"] == many["requests"] == 1500 and many["errors"] == 0
    assert many["elapsed_ms"] > many["unary_deadline_ms"]  # it did outlast the client's unary deadline
    assert many["audit_sequence_types"] == ["string"]


def test_node_stream_deadline_keeps_the_answers_received(report):
    # Three answers, then the caller dawdles past the stream's own 700 ms deadline.
    assert report["streams"]["stream_deadline"] == {"code": "DEADLINE_EXCEEDED", "answers": 3}


def test_node_stream_yields_answers_as_they_come_and_can_be_cancelled(report):
    streams = report["streams"]
    assert streams["cancelled"] == {"got": 5, "threw": None, "status": "CANCELLED"}
    assert streams["broke_out"] == {"status": "CANCELLED"}
    backpressure = streams["backpressure"]
    assert backpressure["drain_waits"] > 0  # the writer waited for room instead of buffering without bound
    assert backpressure["written"] == backpressure["answers"] == backpressure["distinct_ids"] == 32
    assert streams["bad_request"]["error"] == "RangeError" and "prior_claims" in streams["bad_request"]["message"]


def test_node_channel_takes_credentials_and_options(report):
    chan = report["channel"]
    assert chan["explicit_insecure_live"] is True
    # A channel option reached the channel: a 64-byte receive limit refuses ModelMetadata's answer.
    assert chan["max_receive_64"]["code"] == "RESOURCE_EXHAUSTED"


def test_node_health_proto_matches_grpcs(report):
    from grpc_health.v1 import health_pb2

    service = health_pb2.DESCRIPTOR.services_by_name["Health"]
    assert report["channel"]["health_methods"] == [m.name for m in service.methods]
    listed = report["channel"]["health_list"]
    if listed["code"] == "OK":
        assert listed["statuses"].get("aios.kernel.v1.DecisionService") == "SERVING"
    else:  # the kernel's servicer does not implement List (yet): the call is still well-formed
        assert listed["code"] == "UNIMPLEMENTED"


def test_node_gets_int64_as_exact_strings(report, channel):
    got = report["int64"]
    assert got["created_type"] == got["audit_from_sequence_type"] == "string"
    assert report["decide"]["phase_timing_types"] == ["string"]
    task = kgrpc.TaskServiceStub(channel).GetTask(kpb.TaskRef(task_id=got["task_id"]), timeout=10)
    assert task.created_unix_ns > 2**53  # a double would have lost its low bits
    assert got["created_unix_ns"] == str(task.created_unix_ns)


# An UNAVAILABLE that carries `aios-audit-sequence` (the decision was recorded, its review could not be stored,
# nothing kept under its key) must not be sent again by decide({retries}): each retry would decide again.
NODE_DECIDE_ONCE = """
const { KernelClient, statusName } = require(process.argv[1]);
const [address, requestJson] = process.argv.slice(2);
(async () => {
  const client = new KernelClient(address, { deadlineMs: 30000 });
  try {
    await client.decide(JSON.parse(requestJson), { retries: 5 });
    console.log(JSON.stringify({ code: 'OK' }));
  } catch (err) {
    console.log(JSON.stringify({ code: statusName(err.code), auditSequence: err.auditSequence }));
  } finally {
    client.close();
  }
})();
"""


def test_node_does_not_send_a_recorded_decision_again(node, claims_models, tmp_path, monkeypatch):
    from claims_support import claim_request
    from conftest import start_claims_kernel
    from examples.claims import data
    from kernel.pipelines import group_finish
    from test_decision_isolation import FailingReviews

    server = start_claims_kernel(claims_models, tmp_path)
    try:
        engine = server.decisions.engine
        monkeypatch.setattr(group_finish, "MAX_REVIEW_BACKLOG", 0)  # reviews stored before answers
        monkeypatch.setattr(engine.services, "reviews", FailingReviews(engine.services.reviews))  # injected fault
        large = dict(data.generate_cases(1, seed=40)[0], claim_amount=75000.0)  # R04: a person decides
        request = claim_request(large, request_id="node-recorded-once")
        sent = json_format.MessageToDict(request, preserving_proto_field_name=True)
        run = subprocess.run([node, "-e", NODE_DECIDE_ONCE, str(NODE_CLIENT / "aios_client.js"),
                              f"127.0.0.1:{server.port}", json.dumps(sent)],
                             capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert run.returncode == 0, run.stderr
        got = json.loads(run.stdout)
        assert got["code"] == "UNAVAILABLE" and got["auditSequence"], got
        decided = [r for r in server.decisions.audit.read(from_sequence=0, kind=kpb.DECISION)
                   if r.request_id == "node-recorded-once"]
        assert len(decided) == 1  # decided once: the Node client did not retry it
    finally:
        server.stop(grace=1)


# gRPC's own UNAVAILABLE ending a call in progress ("Cancelling all calls" at the end of a drain's grace) may
# follow a decision: decide({retries}) sends a keyless request again only after an UNAVAILABLE the kernel
# marks aios-not-decided (a docs audit: the Node client retried it, deciding twice wherever the retry landed).
NODE_DECIDE_COUNTED = """
const { KernelClient, statusName } = require(process.argv[1]);
const [address, requestJson] = process.argv.slice(2);
(async () => {
  const client = new KernelClient(address, { deadlineMs: 30000 });
  const call = client.call.bind(client);
  let sent = 0;
  client.call = (...args) => { if (args[1] === 'Decide') sent += 1; return call(...args); };
  try {
    await client.decide(JSON.parse(requestJson), { retries: 3 });
    console.log(JSON.stringify({ code: 'OK', sent }));
  } catch (err) {
    console.log(JSON.stringify({ code: statusName(err.code), details: err.details, sent }));
  } finally {
    client.close();
  }
})();
"""


def test_node_does_not_send_a_call_grpc_cut_at_the_drain_again_without_a_key(node, claims_models, tmp_path,
                                                                               monkeypatch):
    from claims_support import claim_request
    from conftest import start_claims_kernel
    from examples.claims import data
    from lane_support import hold_model_runs

    server = start_claims_kernel(claims_models, tmp_path)
    release, running = hold_model_runs(monkeypatch)  # the call's batch is held past the drain's grace
    request = claim_request(data.generate_cases(1, seed=41)[0], request_id="node-cut-at-grace")
    sent = json_format.MessageToDict(request, preserving_proto_field_name=True)
    caller = subprocess.Popen([node, "-e", NODE_DECIDE_COUNTED, str(NODE_CLIENT / "aios_client.js"),
                               f"127.0.0.1:{server.port}", json.dumps(sent)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert running.wait(30)
        server.stop(grace=0.5)  # the call is still in the model when the grace ends
    finally:
        release.set()
    out, err = caller.communicate(timeout=60)
    assert caller.returncode == 0, err
    got = json.loads(out)
    assert got["code"] == "UNAVAILABLE" and got["sent"] == 1, got
