"""A pipeline is refused at load, not at every decision, when it does not fit its policy or model; an
upload cannot break the other pipelines sharing its policy file; uploaded and folder pipelines reload
alike; files that are gone, models that load later and text that is not UTF-8 are handled."""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import pytest
from claims_support import copy_pipelines

from examples.claims import build_models
from kernel.errors import InvalidArgument, NotFound
from kernel.models import ModelHub
from kernel.pipelines import PipelineError, PipelineRegistry, parse_pipeline
from kernel.pipelines.fields import FieldSpec
from kernel.policy import load_policy, parse_policy

ROOT = Path(__file__).resolve().parent.parent
CLAIMS = ROOT / "examples" / "claims" / "pipelines"


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("binding_models")
    build_models.build(folder, models=build_models.MODELS[:1], log=lambda line: None)
    return folder


@pytest.fixture(scope="module")
def hub(model_folder):
    hub = ModelHub(model_folder)
    hub.load_all()
    return hub


@pytest.fixture
def folder(tmp_path):
    return copy_pipelines(tmp_path)


def _registry(folder, hub) -> PipelineRegistry:
    registry = PipelineRegistry(folder, hub, load_policy, parse_policy, poll_s=0)
    registry.reload()
    return registry


def _line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


def _edit(path: Path, old: str, new: str) -> str:
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))
    return path.read_text()


PIPELINE_TEXT = (CLAIMS / "claims_triage.toml").read_text()
POLICY_TEXT = (CLAIMS / "policy.toml").read_text()


# -- 1. policy and model mismatches are refused at load ---------------------------------------------------------

def test_a_policy_integer_input_on_a_number_field_is_refused_naming_line_and_field(folder):
    start = PIPELINE_TEXT.index('name = "policy_age_months"')
    bad = PIPELINE_TEXT[:start] + PIPELINE_TEXT[start:].replace('type = "integer"', 'type = "number"', 1)
    with pytest.raises(PipelineError) as info:
        parse_pipeline(bad.encode(), "p.toml", lambda name: load_policy(folder / name))
    line = _line_of(bad[start:], 'type = "number"') + bad[:start].count("\n")
    assert str(info.value) == (f"p.toml:{line}: [[field]] #2.type: the policy reads 'policy_age_months' as integer "
                               "but the pipeline declares it number")


def test_a_policy_number_input_still_takes_an_integer_field(folder):
    policy = POLICY_TEXT.replace('policy_age_months = "integer"', 'policy_age_months = "number"', 1)
    (folder / "policy.toml").write_text(policy)
    pipeline = parse_pipeline(PIPELINE_TEXT.encode(), "p.toml", lambda name: load_policy(folder / name))
    assert pipeline.policy.inputs["policy_age_months"] == "number"


def _refer_policy(text: str = POLICY_TEXT) -> str:
    """The claims policy with the class the model calls 'review' named 'refer'."""
    old = "label in {'review', 'deny'}"
    assert old in text and 'classes = ["approve", "review", "deny"]' in text
    return (text.replace('classes = ["approve", "review", "deny"]', 'classes = ["approve", "refer", "deny"]', 1)
            .replace(old, "label in {'refer', 'deny'}", 1))


def test_policy_classes_that_are_not_the_models_labels_are_refused_at_load(hub, folder):
    (folder / "policy.toml").write_text(_refer_policy())
    registry = _registry(folder, hub)
    with pytest.raises(NotFound):
        registry.get("claims_triage")
    target = folder / "claims_triage.toml"
    line = _line_of(PIPELINE_TEXT, 'output = "probabilities"')
    message = registry.errors[str(target)]
    assert message.startswith(f"{target}:{line}: [model].output: the policy "), message
    assert "classes ['approve', 'refer', 'deny']" in message and "labels ['approve', 'review', 'deny']" in message


def test_policy_classes_that_are_not_the_models_labels_are_refused_at_hot_reload(hub, folder):
    registry = _registry(folder, hub)
    running = registry.get("claims_triage")
    (folder / "policy.toml").write_text(_refer_policy())
    assert registry.reload() == []
    assert registry.get("claims_triage") is running  # the old version keeps serving
    assert "'refer'" in registry.errors[str(folder / "claims_triage.toml")]


def test_policy_classes_in_another_order_are_the_same_classes(hub, folder):
    _edit(folder / "policy.toml", 'classes = ["approve", "review", "deny"]', 'classes = ["deny", "approve", "review"]')
    registry = _registry(folder, hub)
    assert registry.errors == {} and registry.get("claims_triage").policy.classes[0] == "deny"


def test_a_policy_reading_the_score_of_a_class_the_model_lacks_is_refused(hub, folder):
    policy = POLICY_TEXT.replace('[model]\nclasses = ["approve", "review", "deny"]\n', "", 1)
    assert policy != POLICY_TEXT and "score.deny >= 0.4" in policy
    (folder / "policy.toml").write_text(policy.replace("score.deny >= 0.4", "score.refer >= 0.4", 1))
    registry = _registry(folder, hub)
    message = registry.errors[str(folder / "claims_triage.toml")]
    line = _line_of(PIPELINE_TEXT, 'output = "probabilities"')
    assert message.startswith(f"{folder / 'claims_triage.toml'}:{line}: [model].output: the policy "), message
    assert "reads score.refer" in message and "labels ['approve', 'review', 'deny']" in message
    with pytest.raises(NotFound):
        registry.get("claims_triage")


def test_a_policy_comparing_label_with_a_class_the_model_lacks_is_warned_about(hub, folder):
    """Without [model] classes the policy takes any label literal; the model's labels are known at binding (a
    pipeline author's walk-through: `label == 'fraud'` was accepted without a word). A warning, not a refusal: the
    rule can never fire on it, but the pipeline served before."""
    policy = POLICY_TEXT.replace('[model]\nclasses = ["approve", "review", "deny"]\n', "", 1)
    assert policy != POLICY_TEXT and "label in {'review', 'deny'}" in policy
    registry = _registry(folder, hub)
    warnings: list[str] = []
    registry.put(PIPELINE_TEXT.encode(), policy.replace("label in {'review', 'deny'}", "label in {'review', 'fraud'}",
                                                        1).encode(), warnings=warnings)
    assert any("compares label with 'fraud', which model claims_triage/1 never answers" in w for w in warnings), warnings


# -- 2. an uploaded policy must suit every pipeline sharing its file -------------------------------------------------

def _region_upload() -> tuple[bytes, bytes]:
    """A new pipeline with a field 'region' and, for the shared policy.toml, a policy that reads it."""
    pipeline = PIPELINE_TEXT.replace('name = "claims_triage"', 'name = "claims_regional"', 1) + (
        '\n[[field]]\nname = "region"\ntype = "string"\ndefault = ""\nencode = "none"\n')
    rule = ('[[rule]]\nid = "R11"\ndescription = "Northern claims"\nwhen = "region == \'north\'"\n'
            'action = "review"\nescalate = true\n\n[[rule]]\nid = "DEFAULT"')
    policy = (POLICY_TEXT.replace('has_police_report = "bool"', 'has_police_report = "bool"\nregion = "string"', 1)
              .replace('[[rule]]\nid = "DEFAULT"', rule, 1))
    assert 'region = "string"' in policy and "R11" in policy
    return pipeline.encode(), policy.encode()


def test_an_upload_whose_policy_would_break_another_pipeline_is_refused(hub, folder):
    registry = _registry(folder, hub)
    running = registry.get("claims_triage")
    pipeline, policy = _region_upload()
    parse_pipeline(pipeline, "new.toml", lambda name: parse_policy(policy, source=name))  # valid on its own
    with pytest.raises(InvalidArgument) as info:
        registry.put(pipeline, policy)
    message = info.value.message
    assert "pipeline 'claims_triage'" in message and "the policy reads input 'region'" in message, message
    assert (folder / "policy.toml").read_text() == POLICY_TEXT  # nothing written
    assert not (folder / "claims_regional.toml").exists()
    assert registry.reload() == [] and registry.get("claims_triage") is running and registry.errors == {}
    with pytest.raises(NotFound):
        registry.get("claims_regional")


def test_an_upload_whose_policy_suits_the_pipelines_sharing_it_is_taken(hub, folder):
    registry = _registry(folder, hub)
    pipeline = PIPELINE_TEXT.replace('name = "claims_triage"', 'name = "claims_twin"', 1).encode()
    policy = POLICY_TEXT.replace("fraud_score >= 0.8", "fraud_score >= 0.9", 1).encode()
    uploaded = registry.put(pipeline, policy)
    assert uploaded.name == "claims_twin"
    assert registry.get("claims_triage").policy.hash == uploaded.policy.hash  # taken at once
    assert registry.reload() == []  # and not validated a second time


def test_an_upload_the_folder_cannot_take_is_failed_precondition_naming_the_folder(hub, folder):
    """A docs audit: a pipelines folder the kernel's user cannot write (root's, in the container image) answered
    an upload INTERNAL. The fault here: the file's temporary twin's name is taken by a folder, so writing fails
    with an OSError as a read-only folder's would (the tests may run as root, whom permissions do not stop)."""
    from kernel.errors import FailedPrecondition

    registry = _registry(folder, hub)
    (folder / ".claims_twin.toml.tmp").mkdir()
    twin = PIPELINE_TEXT.replace('name = "claims_triage"', 'name = "claims_twin"', 1).encode()
    with pytest.raises(FailedPrecondition) as info:
        registry.put(twin)
    message = info.value.message
    assert "upload valid but not activated" in message and str(folder) in message, message
    assert "nothing was changed" in message and "writable" in message, message
    assert not (folder / "claims_twin.toml").exists()
    with pytest.raises(NotFound):
        registry.get("claims_twin")


def test_an_upload_writes_a_new_file_not_through_a_link_planted_at_its_temporary_name(hub, folder, tmp_path):
    """The upload's temporary twin (``.<name>.tmp``) was opened as found: a link planted there had the kernel write
    the upload over the file it pointed to, outside the folder. Now the name is made afresh."""
    outside = tmp_path / "outside.txt"
    outside.write_text("not the kernel's")
    (folder / ".claims_twin.toml.tmp").symlink_to(outside)
    twin = PIPELINE_TEXT.replace('name = "claims_triage"', 'name = "claims_twin"', 1)
    assert _registry(folder, hub).put(twin.encode()).name == "claims_twin"
    assert outside.read_text() == "not the kernel's"
    assert (folder / "claims_twin.toml").read_text() == twin and not (folder / "claims_twin.toml").is_symlink()
    assert not (folder / ".claims_twin.toml.tmp").exists()


# -- 3. text that is not UTF-8 is refused --------------------------------------------------------------------

def test_an_uploaded_policy_that_is_not_utf8_is_refused(hub, folder):
    registry = _registry(folder, hub)
    twin = PIPELINE_TEXT.replace('name = "claims_triage"', 'name = "claims_twin"', 1).encode()
    with pytest.raises(InvalidArgument, match=r"policy.toml:1: file: is not UTF-8 text \(byte 5\)"):
        registry.put(twin, b"# caf\xe9\n" + POLICY_TEXT.encode())
    assert (folder / "policy.toml").read_text() == POLICY_TEXT and not (folder / "claims_twin.toml").exists()


def test_a_pipeline_that_is_not_utf8_is_refused_uploaded_or_in_the_folder(hub, folder):
    bad = b"# r\xe9sum\xe9\n" + PIPELINE_TEXT.encode()
    with pytest.raises(PipelineError, match=r"^p.toml:1: file: is not UTF-8 text \(byte 3\)"):
        parse_pipeline(bad, "p.toml", lambda name: load_policy(folder / name))
    registry = _registry(folder, hub)
    with pytest.raises(InvalidArgument, match="is not UTF-8 text"):
        registry.put(bad)
    (folder / "claims_latin1.toml").write_bytes(bad.replace(b'name = "claims_triage"', b'name = "claims_latin1"', 1))
    registry.reload()
    assert "is not UTF-8 text" in registry.errors[str(folder / "claims_latin1.toml")]


# -- 4. an uploaded pipeline follows later edits of its policy file ---------------------------------------------------

def test_an_uploaded_pipeline_reloads_when_its_policy_file_changes(hub, folder):
    registry = _registry(folder, hub)
    twin = registry.put(PIPELINE_TEXT.replace('name = "claims_triage"', 'name = "claims_twin"', 1).encode())
    _edit(folder / "policy.toml", "fraud_score >= 0.8", "fraud_score >= 0.85")
    assert sorted(registry.reload()) == ["claims_triage", "claims_twin"]
    assert registry.get("claims_twin").policy.hash != twin.policy.hash
    assert registry.get("claims_twin").policy.hash == registry.get("claims_triage").policy.hash


# -- 5. defaults are encoded at load ---------------------------------------------------------------------------

def test_a_default_the_float32_input_cannot_hold_is_refused_naming_line_and_field(folder):
    start = PIPELINE_TEXT.index('name = "fraud_score"')
    bad = PIPELINE_TEXT[:start] + PIPELINE_TEXT[start:].replace("std = 0.21239", "std = 1e-40", 1)
    with pytest.raises(PipelineError) as info:
        parse_pipeline(bad.encode(), "p.toml", lambda name: load_policy(folder / name))
    line = bad[:start].count("\n") + _line_of(bad[start:], "default = 0.21")
    assert str(info.value).startswith(f"p.toml:{line}: [[field]] #4.default: 'fraud_score' = 0.21 (its default) "
                                      "encodes with mean = 0.268473 and std = 1e-40 to a value beyond"), info.value


def test_a_raw_default_beyond_float32_is_refused(folder):
    start = PIPELINE_TEXT.index('name = "claim_amount"')
    bad = PIPELINE_TEXT[:start] + PIPELINE_TEXT[start:].replace(
        'default = 3419.2\nmin = 0.0\nmax = 10000000.0\nencode = "standardize"\ntransform = "log1p"\n'
        'mean = 8.125689\nstd = 1.085472', 'default = 1e300\nencode = "raw"', 1)
    assert "1e300" in bad
    with pytest.raises(PipelineError, match=r"\[\[field\]\] #1.default: 'claim_amount' = 1e\+300 \(its default\) "
                                            r"encodes to a value beyond"):
        parse_pipeline(bad.encode(), "p.toml", lambda name: load_policy(folder / name))


def test_a_default_the_policy_cannot_read_is_refused_naming_line_and_field(folder):
    """An integer default no 64-bit float holds loaded, and then every request leaving the field out was refused
    with INVALID_ARGUMENT for a value the caller never sent."""
    start = PIPELINE_TEXT.index('name = "prior_claims"')
    bad = PIPELINE_TEXT[:start] + PIPELINE_TEXT[start:].replace("default = 0\nmin = 0\nmax = 1000\n",
                                                                  f"default = {2**53 + 1}\n", 1)
    assert str(2**53 + 1) in bad
    with pytest.raises(PipelineError) as info:
        parse_pipeline(bad.encode(), "p.toml", lambda name: load_policy(folder / name))
    line = bad[:start].count("\n") + _line_of(bad[start:], f"default = {2**53 + 1}")
    assert str(info.value).startswith(f"p.toml:{line}: [[field]] #3.default: the policy cannot read it: field "
                                      "'prior_claims': is an integer field, got 9007199254740993"), info.value


# -- 6. a model loaded later brings its refused pipelines in -------------------------------------------------------

def test_a_pipeline_refused_for_want_of_its_model_loads_with_the_model(model_folder, folder):
    hub = ModelHub(model_folder)  # nothing loaded yet
    registry = PipelineRegistry(folder, hub, load_policy, parse_policy, poll_s=0)
    registry.start()
    try:
        target = str(folder / "claims_triage.toml")
        line = _line_of(PIPELINE_TEXT, "[model]") + 1  # the [model] table's name key
        assert registry.errors[target] == (f"{target}:{line}: [model].name: model 'claims_triage' (any version) is "
                                           "not loaded; the pipeline is tried again when the model loads")
        with pytest.raises(NotFound):
            registry.get("claims_triage")
        # An upload is not kept when refused: it is not "tried again" (a pipeline author's walk-through)
        with pytest.raises(InvalidArgument, match="is not loaded; load the model, then upload again"):
            registry.put(PIPELINE_TEXT.encode())
        hub.load("claims_triage")
        assert registry.get("claims_triage").model == "claims_triage"
        assert registry.errors == {}
    finally:
        registry.stop()


# -- 7. a pipeline whose file is gone stops being served ------------------------------------------------------

def test_a_deleted_pipeline_file_unloads_its_pipeline_at_the_next_look(hub, folder, caplog):
    registry = _registry(folder, hub)
    target = folder / "claims_triage.toml"
    target.unlink()
    with caplog.at_level(logging.WARNING, logger="aios.pipelines"):
        assert registry.reload() == []
        assert registry.get("claims_triage")  # one look: an editor's save may be half done
        assert "the file is gone" in registry.errors[str(target)]
        assert registry.reload() == []
    with pytest.raises(NotFound):
        registry.get("claims_triage")
    assert registry.errors == {}
    assert any("claims_triage" in r.getMessage() and "no longer served" in r.getMessage() for r in caplog.records)


def test_a_file_removed_and_written_again_between_looks_keeps_serving(hub, folder):
    registry = _registry(folder, hub)
    running = registry.get("claims_triage")
    target = folder / "claims_triage.toml"
    target.unlink()
    registry.reload()
    target.write_text(PIPELINE_TEXT)  # (an editor that removes the file before writing it anew)
    assert registry.reload() == []
    assert registry.get("claims_triage") is running and registry.errors == {}
    assert registry.reload() == [] and registry.get("claims_triage") is running


def test_a_file_that_names_another_pipeline_now_unloads_the_one_it_named(hub, folder):
    registry = _registry(folder, hub)
    _edit(folder / "claims_triage.toml", 'name = "claims_triage"', 'name = "claims_renamed"')
    assert registry.reload() == ["claims_renamed"]
    with pytest.raises(NotFound):
        registry.get("claims_triage")


def test_a_refused_file_that_is_deleted_is_no_longer_listed(hub, folder):
    registry = _registry(folder, hub)
    bad = folder / "broken.toml"
    bad.write_text(PIPELINE_TEXT.replace('name = "claims_triage"', 'name = "broken"', 1).replace(
        'encode = "onehot"', 'encode = "sparkle"', 1))
    registry.reload()
    assert "sparkle" in registry.errors[str(bad)]
    bad.unlink()
    registry.reload()
    assert registry.errors == {}


# -- 8. range errors tell the limit and the value apart ------------------------------------------------------------

@pytest.mark.parametrize("spec, value, expected", [
    (FieldSpec("claim_amount", "number", min=0.0, max=10000000.0), 10000000.01,
     "field 'claim_amount' must be <= 10000000, got 10000000.01"),
    (FieldSpec("fraud_score", "number", min=0.0, max=1.0), 1.0000001,
     "field 'fraud_score' must be <= 1, got 1.0000001"),
    (FieldSpec("fraud_score", "number", min=0.0, max=1.0), -1e-300, "field 'fraud_score' must be >= 0, got -1e-300"),
    (FieldSpec("days", "integer", min=0.0, max=36500.0), 36501, "field 'days' must be <= 36500, got 36501"),
    (FieldSpec("big", "number", max=1e300), 1.0000000000000001e300 * 1.000001,
     "field 'big' must be <= 1e+300, got 1.000001e+300"),
])
def test_range_errors_print_the_limit_and_the_value_so_they_differ(spec, value, expected):
    with pytest.raises(InvalidArgument) as info:
        spec.check_number(value)
    assert info.value.message == expected


# -- 9. binding errors name the line -------------------------------------------------------------------------------

def test_a_binding_error_names_the_line_of_the_model_key(hub, folder):
    text = _edit(folder / "claims_triage.toml", 'encode = "bool"', 'encode = "none"')
    registry = _registry(folder, hub)
    target = folder / "claims_triage.toml"
    assert registry.errors[str(target)] == (
        f"{target}:{_line_of(text, 'input = ')}: [model].input: the fields encode 13 columns but 'features' takes [14]")
    with pytest.raises(InvalidArgument, match=re.escape(f"<upload>:{_line_of(text, 'input = ')}: [model].input")):
        registry.put(text.encode())


def test_models_load_brings_a_refused_pipeline_into_a_running_kernel(tmp_path):
    """End to end: a kernel started without the pipeline's model refuses the pipeline; loading the model
    over the repository API (``aios-kernel models load``) makes it serve, with no edit of its file, and
    the audit log has the model's deployment before the pipeline's activation."""
    import grpc
    from conftest import start_kernel

    from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
    from kernel._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc
    from kernel._proto.inference import grpc_service_pb2 as pb
    from kernel._proto.inference import grpc_service_pb2_grpc as pb_grpc
    from kernel.audit import iter_directory
    from kernel.decision_client import make_request

    models, pipelines = tmp_path / "models", tmp_path / "pipelines"
    models.mkdir()
    shutil.copytree(CLAIMS, pipelines)
    server = start_kernel(models, pipelines=str(pipelines), data_dir=str(tmp_path / "data"))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            admin, decide = kgrpc.AdminServiceStub(channel), kgrpc.DecisionServiceStub(channel)
            request = make_request("claims_triage", {"claim_amount": 1200.0})
            refused = admin.ListPipelines(kpb.ListPipelinesRequest(), timeout=10).refused
            assert "is not loaded" in refused[str(pipelines / "claims_triage.toml")]
            with pytest.raises(grpc.RpcError) as info:
                decide.Decide(request, timeout=10)
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
            build_models.build(models, models=build_models.MODELS[:1], log=lambda line: None)
            pb_grpc.GRPCInferenceServiceStub(channel).RepositoryModelLoad(
                pb.RepositoryModelLoadRequest(model_name="claims_triage"), timeout=60)
            listed = admin.ListPipelines(kpb.ListPipelinesRequest(), timeout=10)
            assert [p.name for p in listed.pipelines] == ["claims_triage"] and not listed.refused
            assert decide.Decide(request, timeout=10).action
    finally:
        server.stop(grace=1)
    kinds = [record.kind for record in iter_directory(tmp_path / "data" / "audit")]
    assert kinds.index(kpb.MODEL_DEPLOY) < kinds.index(kpb.POLICY_CHANGE) < kinds.index(kpb.DECISION)


def test_a_rule_testing_for_null_a_field_the_pipeline_always_fills_is_warned_about(hub, folder):
    """A pipeline author's walk-through: `vendor_risk is null` passed `policy test` (a row may leave it out) and
    the upload, yet never fires when served: every request has the field, or its default."""
    policy = POLICY_TEXT.replace('id = "R01"', 'id = "R00"\nwhen = "fraud_score is null"\naction = "review"\n'
                                               'escalate = true\n\n[[rule]]\nid = "R01"', 1)
    assert policy != POLICY_TEXT
    registry = _registry(folder, hub)
    warnings: list[str] = []
    registry.put(PIPELINE_TEXT.encode(), policy.encode(), warnings=warnings)
    assert any("rule R00" in w and "tests whether fraud_score is null, which it never is here" in w
               and "it takes its default" in w for w in warnings), warnings
