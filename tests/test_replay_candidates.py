"""``aios-kernel audit replay`` holds a candidate to what the kernel itself accepts.

A candidate model is checked as a load checks it (model.toml against the graph) and bound to the
pipeline as the registry binds one (input name and width, output and labels, the policy's classes and
``score.<class>`` reads); a candidate policy is checked against the classes the records carry. What the
kernel would refuse is refused in one line with exit 2, never replayed (nor crashed on: exit 1 means
"some decision would change"). With a candidate model, FALLBACK decisions are re-decided too.

The log: real decisions of the claims pipeline by a model that gives NaN scores for large claims, so
some of them are FALLBACK decisions (the kernel's non-finite check), as a faulty model in production
leaves them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from claims_support import build_small_model, claim_request, copy_pipelines, faulty_claims_model, model_weights as _weights
from conftest import start_kernel
from examples.claims import data
from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
from kernel.audit import RecordFilter, iter_directory
from kernel.cli import main as cli_main
from kernel.decision_client import DecisionClient
from kernel.models import config as model_config
from kernel.models.errors import ModelConfigError
from kernel.models.runtime import OnnxModel
from kernel.pipelines.fields import encode_rows
from kernel.pipelines.spec import load_pipeline
from kernel.policy import load_policy
from kernel.testing.onnx_models import _finish, mlp_from_weights, save

DECISIONS = 160


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """(audit dir, pipelines folder, the good model's version folder, FALLBACK count): a log of real
    decisions of the claims pipeline, some of them FALLBACK (the model failed on large claims)."""
    good = build_small_model(tmp_path_factory.mktemp("good")) / "claims_triage" / "1"
    faulty = tmp_path_factory.mktemp("faulty")
    faulty_claims_model(good, faulty / "claims_triage" / "1", fault="nan")
    pipelines = copy_pipelines(tmp_path_factory.mktemp("pipelines"))
    data_dir = tmp_path_factory.mktemp("data")
    server = start_kernel(faulty, pipelines=str(pipelines), data_dir=str(data_dir), pipeline_poll_s=0)
    try:
        cases = data.generate_cases(DECISIONS, seed=47)
        requests = [claim_request(c, request_id=f"q{i}") for i, c in enumerate(cases)]
        with DecisionClient(f"127.0.0.1:{server.port}") as client:
            answers = list(client.decide_stream(requests, timeout=120))
    finally:
        server.stop(grace=1)
    assert len(answers) == DECISIONS and not any(a.error_code for a in answers)
    fallbacks = sum(a.outcome == kpb.FALLBACK for a in answers)
    assert 0 < fallbacks < DECISIONS // 2, fallbacks  # the log has both kinds
    return data_dir / "audit", pipelines, good, fallbacks


def _run(capsys, recorded, *extra: str, policy: Path | None = None) -> tuple[int, str, str]:
    audit, pipelines, _, _ = recorded
    code = cli_main(["audit", "replay", str(audit), "--pipeline", str(pipelines / "claims_triage.toml"),
                     "--policy", str(policy or pipelines / "policy.toml"), *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _refused(code: int, out: str, err: str) -> str:
    """A refusal: exit 2, one line on stderr naming the problem, nothing replayed, no traceback."""
    assert code == 2, (out, err)
    assert out == "" and "Traceback" not in err and err.count("\n") == 1, (out, err)
    assert err.startswith("aios-kernel audit replay: ")
    return err.strip()


def _candidate(good: Path, folder: Path, model: onnx.ModelProto, toml_edits=()) -> Path:
    folder.mkdir(parents=True)
    save(model, folder / "model.onnx")
    text = (good / "model.toml").read_text()
    for old, new in toml_edits:
        assert old in text, old
        text = text.replace(old, new)
    (folder / "model.toml").write_text(text)
    return folder


# -- finding 1: a model.toml that disagrees with its graph -------------------------------------------

def test_a_candidate_whose_toml_names_an_output_its_graph_lacks_is_refused_as_a_load_refuses_it(
        recorded, tmp_path, capsys):
    """model.toml names 'probabilities'; the graph's outputs are 'logits' and 'probs' (the same weights).
    Replay read the logits as scores (decisions "changed"); the kernel's load refuses the version."""
    _, _, good, _ = recorded
    w, b = _weights(good)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["features", "W0", "B0"], ["logits"]),
         helper.make_node("Softmax", ["logits"], ["probs"], axis=-1)],
        "mislabeled", [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", w.shape[0]])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", w.shape[1]]),
         helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", w.shape[1]])],
        initializer=[numpy_helper.from_array(w, "W0"), numpy_helper.from_array(b, "B0")])
    folder = _candidate(good, tmp_path / "claims_triage" / "2", _finish(graph))
    line = _refused(*_run(capsys, recorded, "--model", str(folder), "--fail-on-change"))
    assert line.endswith(f"{folder / 'model.toml'}: output[0].name: 'probabilities' is not a graph output; "
                         "the graph has ['logits', 'probs']"), line
    # The kernel's own load of this version says the same.
    config = model_config.load(folder / "model.toml", "claims_triage", "2")
    with pytest.raises(ModelConfigError) as load:
        OnnxModel.load(folder / "model.onnx", config, "claims_triage", "2")
    assert line.endswith(str(load.value))


# -- finding 2: an incompatible candidate crashed (exit 1, a traceback) ------------------------------

@pytest.mark.parametrize("kind", ["width15", "input_name"])
def test_a_candidate_the_pipelines_fields_cannot_feed_is_refused_in_one_line(recorded, tmp_path, capsys, kind):
    _, _, good, _ = recorded
    w, b = _weights(good)
    if kind == "width15":  # one more input column than the fields encode: onnxruntime raised InvalidArgument
        model = mlp_from_weights([(np.vstack([w, np.zeros((1, w.shape[1]), np.float32)]), b)],
                                 "features", "probabilities")
        edits, expected = [("dims = [14]", "dims = [15]")], "[model].input: the fields encode 14 columns but " \
                                                           "'features' takes [15]"
    else:  # the graph's input is another name: replay fed its first input whatever it was called
        model = mlp_from_weights([(w, b)], "x", "probabilities")
        edits, expected = [('name = "features"', 'name = "x"')], "[model].input: model 'claims_triage' has no " \
                                                                 "input 'features' (has x)"
    folder = _candidate(good, tmp_path / "claims_triage" / "2", model, edits)
    line = _refused(*_run(capsys, recorded, "--model", str(folder), "--fail-on-change"))
    assert "claims_triage.toml:" in line and line.endswith(expected), line


@pytest.mark.parametrize("declared", [True, False])
def test_a_candidate_policy_reading_a_class_the_records_lack_is_refused(recorded, tmp_path, capsys, declared):
    """A policy for a 4-class model (score.fraud) against records of 3 classes: PolicyInputError, exit 1."""
    _, pipelines, _, _ = recorded
    text = (pipelines / "policy.toml").read_text()
    old_rule = "when = \"label in {'review', 'deny'} or score.deny >= 0.4\""
    assert old_rule in text and 'classes = ["approve", "review", "deny"]' in text
    text = text.replace(old_rule, old_rule[:-1] + ' or score.fraud >= 0.3"')
    classes = 'classes = ["approve", "review", "deny"]'
    text = text.replace(classes, classes[:-1] + ', "fraud"]' if declared else "")
    policy = tmp_path / "candidate.toml"
    policy.write_text(text)
    load_policy(policy)  # a valid policy: only the records' classes refuse it
    line = _refused(*_run(capsys, recorded, "--fail-on-change", policy=policy))
    if declared:
        assert "declares classes ['approve', 'review', 'deny', 'fraud'] but decision #" in line, line
        assert "has labels ['approve', 'deny', 'review']" in line, line
    else:
        assert "reads score.fraud but decision #" in line and "has no such class" in line, line
    assert "(the scores of model 'claims_triage' version 1)" in line, line


def test_a_failure_while_re_deciding_is_exit_2_never_the_gates_exit_1(recorded, tmp_path, capsys):
    """A candidate the kernel binds but that fails inside onnxruntime (it gathers a column past the row's end:
    fine by shape, an error when run). One line, exit 2: a CI gate must not read it as a change."""
    _, _, good, _ = recorded
    w, b = _weights(good)
    columns = np.array([*range(w.shape[0] - 1), 99], np.int64)  # column 99 does not exist
    graph = helper.make_graph(
        [helper.make_node("Gather", ["features", "columns"], ["picked"], axis=1),
         helper.make_node("Gemm", ["picked", "W0", "B0"], ["logits"]),
         helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1)],
        "past_the_row", [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", w.shape[0]])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", w.shape[1]])],
        initializer=[numpy_helper.from_array(w, "W0"), numpy_helper.from_array(b, "B0"),
                     numpy_helper.from_array(columns, "columns")])
    folder = _candidate(good, tmp_path / "claims_triage" / "2", _finish(graph), [])
    line = _refused(*_run(capsys, recorded, "--model", str(folder), "--fail-on-change"))
    assert "could not re-decide the recorded decisions:" in line, line


def test_a_candidate_taking_another_input_type_is_refused_at_binding(recorded, tmp_path, capsys):
    """An FP64 input bound (and then failed on every decision in the kernel); pipelines encode FP32 rows."""
    _, _, good, _ = recorded
    w, b = _weights(good)
    graph = helper.make_graph(
        [helper.make_node("Cast", ["features"], ["as_float"], to=TensorProto.FLOAT),
         helper.make_node("Gemm", ["as_float", "W0", "B0"], ["logits"]),
         helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1)],
        "fp64_input", [helper.make_tensor_value_info("features", TensorProto.DOUBLE, ["batch", w.shape[0]])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", w.shape[1]])],
        initializer=[numpy_helper.from_array(w, "W0"), numpy_helper.from_array(b, "B0")])
    folder = _candidate(good, tmp_path / "claims_triage" / "2", _finish(graph),
                        [('datatype = "FP32"\ndims = [14]', 'datatype = "FP64"\ndims = [14]')])
    line = _refused(*_run(capsys, recorded, "--model", str(folder), "--fail-on-change"))
    assert line.endswith("[model].input: 'features' of model 'claims_triage' takes FP64; pipelines encode FP32 rows"), line


# -- finding 3: a candidate the kernel would refuse to bind ------------------------------------------

def test_a_candidate_whose_labels_the_policy_does_not_declare_is_refused_with_the_kernels_text(
        recorded, tmp_path, capsys):
    _, pipelines, good, _ = recorded
    w, b = _weights(good)
    model = mlp_from_weights([(np.hstack([w, w[:, 1:2] * 0.5]), np.append(b, -1.0).astype(np.float32))],
                             "features", "probabilities")
    folder = _candidate(good, tmp_path / "claims_triage" / "2", model, [
        ("dims = [3]", "dims = [4]"),
        ('labels = ["approve", "review", "deny"]', 'labels = ["approve", "review", "deny", "fraud"]')])
    line = _refused(*_run(capsys, recorded, "--model", str(folder)))
    # What the registry says when it binds the pipeline to this version (PipelineRegistry._bind).
    assert line.endswith(f"[model].output: the policy {pipelines / 'policy.toml'} declares classes ['approve', "
                         "'review', 'deny'] but output 'probabilities' of model 'claims_triage' version 2 has labels "
                         "['approve', 'review', 'deny', 'fraud']"), line


# -- the candidates that fit are replayed as before ------------------------------------------------

def test_a_graph_with_more_outputs_is_read_by_the_output_the_pipeline_names(recorded, tmp_path, capsys):
    """The graph's first output is the logits; model.toml declares both, and the pipeline reads
    'probabilities': the scores come from that one, so the same weights change nothing (but the
    FALLBACK decisions, which any working model re-decides)."""
    _, _, good, fallbacks = recorded
    w, b = _weights(good)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["features", "W0", "B0"], ["logits"]),
         helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1)],
        "two_outputs", [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", w.shape[0]])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", w.shape[1]]),
         helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", w.shape[1]])],
        initializer=[numpy_helper.from_array(w, "W0"), numpy_helper.from_array(b, "B0")])
    folder = _candidate(good, tmp_path / "claims_triage" / "2", _finish(graph),
                        [("[[output]]", '[[output]]\nname = "logits"\ndatatype = "FP32"\ndims = [3]\n\n[[output]]')])
    report = tmp_path / "r.json"
    code, out, err = _run(capsys, recorded, "--model", str(folder), "--report", str(report))
    assert code == 0, (out, err)
    result = json.loads(report.read_text())
    assert result["rules_changed"] == 0 and result["changed"] == result["fallbacks_redecided"] == fallbacks
    assert all(case["from"]["outcome"] == "FALLBACK" for case in result["changed_cases"])


# -- finding 4: FALLBACK decisions and a candidate model ---------------------------------------------

def test_fallback_decisions_are_re_decided_by_a_candidate_model(recorded, tmp_path, capsys):
    audit, pipelines, good, fallbacks = recorded
    # Without a model there are no scores to decide them on: skipped, and the reason says what would.
    report = tmp_path / "policy.json"
    code, out, err = _run(capsys, recorded, "--report", str(report))
    assert code == 0, (out, err)
    result = json.loads(report.read_text())
    assert result["skipped"] == fallbacks and result["examined"] == DECISIONS - fallbacks
    assert result["changed"] == 0 and result["fallbacks_redecided"] == 0
    assert "give --model to re-decide" in out

    # The fixed model re-decides every one of them from its recorded inputs; the others do not change.
    report = tmp_path / "model.json"
    code, out, err = _run(capsys, recorded, "--model", str(good), "--report", str(report))
    assert code == 0, (out, err)
    result = json.loads(report.read_text())
    assert result["skipped"] == 0 and result["examined"] == DECISIONS
    assert result["fallbacks_redecided"] == fallbacks and result["changed"] == fallbacks
    assert f"({fallbacks} FALLBACK decisions re-decided by the model)" in out
    changed = {case["sequence"]: case for case in result["changed_cases"]}
    assert all(case["from"]["outcome"] == "FALLBACK" for case in changed.values())

    # Each as the kernel would decide it with the fixed model: encode, run, policy, escalation.
    import onnxruntime as ort

    pipeline = load_pipeline(pipelines / "claims_triage.toml", load_policy)
    session = ort.InferenceSession(str(good / "model.onnx"), providers=["CPUExecutionProvider"])
    labels = ["approve", "review", "deny"]
    records = [r for r in iter_directory(audit, 0, RecordFilter(kind=kpb.DECISION))
               if r.decision.outcome == kpb.FALLBACK]
    assert sorted(changed) == sorted(r.sequence for r in records)
    for record in records:
        values = {}
        for spec in pipeline.fields:
            value = record.inputs[spec.name]
            values[spec.name] = getattr(value, value.WhichOneof("kind"))
        (scores,) = session.run(["probabilities"], {"features": encode_rows(pipeline.fields, [values], pipeline.width)})
        row = dict(values, label=labels[int(np.argmax(scores[0]))], confidence=float(np.max(scores[0])),
                   **{f"score.{name}": float(scores[0][j]) for j, name in enumerate(labels)})
        result = pipeline.policy.evaluate_reference([row])
        escalated = bool(result.escalate[0]) or row["confidence"] < pipeline.escalation.min_confidence
        assert changed[record.sequence]["to"]["action"] == str(result.action[0])
        assert changed[record.sequence]["to"]["outcome"] == ("ESCALATED" if escalated else "AUTOMATED")
