"""A repository with models the kernel cannot serve: each is refused with its reason, the others serve.

From a Triton user's audit: a ZipMap output (skl2onnx's default export), empty and incomplete folders,
a config.pbtxt, load overrides and model.toml values the scheduler would have clamped.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
import tritonclient.grpc as tc
from onnx import TensorProto, helper
from tritonclient.utils import InferenceServerException

from conftest import start_kernel
from kernel.cli import main as cli_main
from kernel.models import ModelConfigError, ModelHub
from kernel.testing import onnx_models


def _finish(graph: onnx.GraphProto, ml: bool = False) -> onnx.ModelProto:
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid("ai.onnx.ml", 3)] if ml else [])
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def zipmap_classifier() -> onnx.ModelProto:
    """What skl2onnx exports for a classifier by default: a label tensor and seq(map(int64, tensor(float)))."""
    scores = helper.make_sequence_type_proto(
        helper.make_map_type_proto(TensorProto.INT64, helper.make_tensor_type_proto(TensorProto.FLOAT, [])))
    graph = helper.make_graph(
        [helper.make_node("Softmax", ["X"], ["probabilities"], axis=-1),
         helper.make_node("ArgMax", ["X"], ["output_label"], axis=1, keepdims=0),
         helper.make_node("ZipMap", ["probabilities"], ["output_probability"], domain="ai.onnx.ml",
                          classlabels_int64s=[0, 1])],
        "zipmap",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 2])],
        [helper.make_tensor_value_info("output_label", TensorProto.INT64, ["N"]),
         helper.make_value_info("output_probability", scores)],
    )
    return _finish(graph, ml=True)


def sequence_input() -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("SequenceAt", ["xs", "at"], ["first"]), helper.make_node("Add", ["first", "x"], ["y"])],
        "seq_in",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2]),
         helper.make_tensor_sequence_value_info("xs", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
        initializer=[helper.make_tensor("at", TensorProto.INT64, [], [0])],
    )
    return _finish(graph)


def bfloat16_output() -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.BFLOAT16)], "bf16",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])],
        [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, ["N", 2])],
    )
    return _finish(graph)


def good(root: Path, name: str = "good", version: str = "1") -> None:
    onnx_models.save(onnx_models.mlp([16, 8, 4], seed=1), root / name / version / "model.onnx")


def single(root: Path, model: onnx.ModelProto, name: str = "m") -> ModelHub:
    onnx_models.save(model, root / name / "1" / "model.onnx")
    return ModelHub(root)


# ----------------------------------------------------------------------------- 1. non-tensor inputs/outputs
def test_a_zipmap_output_refuses_that_model_only(tmp_path, caplog):
    good(tmp_path)
    hub = single(tmp_path, zipmap_classifier(), "sklearn")
    with caplog.at_level(logging.ERROR, "aios.models"):
        loaded, failed = hub.load_all()  # was: KeyError 'seq(map(int64,tensor(float)))' out of derive_config
    assert [mv.name for mv in loaded] == ["good"]
    reason = failed["sklearn"]
    assert "output 'output_probability' is seq(map(int64,tensor(float)))" in reason
    assert "only tensor inputs and outputs are served" in reason and "zipmap=False" in reason
    assert reason.startswith(str(tmp_path / "sklearn" / "1" / "model.onnx"))
    states = {(e.name, e.state): e.reason for e in hub.index()}
    assert states[("sklearn", "UNAVAILABLE")] == reason and ("good", "READY") in states
    assert "sklearn" in caplog.text


def test_a_zipmap_model_serves_when_its_model_toml_declares_only_the_tensor_outputs(tmp_path):
    hub = single(tmp_path, zipmap_classifier(), "sklearn")
    (tmp_path / "sklearn" / "1" / "model.toml").write_text(
        'max_batch_size = 8\n[[input]]\nname = "X"\ndatatype = "FP32"\ndims = [2]\n'
        '[[output]]\nname = "output_label"\ndatatype = "INT64"\ndims = []\n')
    (mv,) = hub.load("sklearn")
    (label,) = mv.runtime.run({"X": np.array([[0.0, 1.0], [1.0, 0.0]], np.float32)})
    assert label.tolist() == [1, 0]
    (tmp_path / "sklearn" / "1" / "model.toml").write_text(  # declaring the map output: refused, naming it
        'max_batch_size = 8\n[[input]]\nname = "X"\ndatatype = "FP32"\ndims = [2]\n'
        '[[output]]\nname = "output_probability"\ndatatype = "FP32"\ndims = [2]\n')
    with pytest.raises(ModelConfigError) as info:
        hub.load("sklearn")
    assert info.value.field == "output[0].datatype" and "only tensor inputs and outputs" in str(info.value)


@pytest.mark.parametrize("model,fragment", [
    (sequence_input, "input 'xs' is seq(tensor(float)): only tensor inputs and outputs are served"),
    (bfloat16_output, "output 'y' is tensor(bfloat16): the kernel has no datatype for that element type"),
])
def test_unsupported_graph_types_are_refused_with_the_tensor_and_type(tmp_path, model, fragment):
    hub = single(tmp_path, model())
    with pytest.raises(ModelConfigError) as info:
        hub.load("m")
    assert fragment in str(info.value), str(info.value)
    assert "FP32" in str(info.value)  # the types it does serve
    (entry,) = hub.index()
    assert entry.state == "UNAVAILABLE" and fragment in entry.reason


def test_a_sequence_input_undeclarable_in_model_toml_says_why(tmp_path):
    hub = single(tmp_path, sequence_input())
    (tmp_path / "m" / "1" / "model.toml").write_text(
        'max_batch_size = 8\n[[input]]\nname = "x"\ndatatype = "FP32"\ndims = [2]\n'
        '[[output]]\nname = "y"\ndatatype = "FP32"\ndims = [2]\n')
    with pytest.raises(ModelConfigError) as info:
        hub.load("m")
    assert "input 'xs' is seq(tensor(float))" in str(info.value)


# ----------------------------------------------------------------------------- 3. empty and incomplete folders
def test_a_version_folder_that_is_not_a_number_is_not_served(tmp_path):
    """Triton reads numbered version folders only; "latest" (which sorts after the numbers) would have become
    the version a request without one gets."""
    good(tmp_path, "named", "1")
    good(tmp_path, "named", "latest")
    hub = ModelHub(tmp_path)
    loaded, failed = hub.load_all()
    assert [mv.version for mv in loaded] == ["1"] and hub.get("named").version == "1" and failed == {}
    reasons = {e.version: e.reason for e in hub.index() if e.state == "UNAVAILABLE"}
    assert "version folder named/latest is not a number" in reasons["latest"]


@pytest.mark.parametrize("odd", ["²", "01", "١"])
def test_a_version_folder_that_only_looks_like_a_number_is_not_served(tmp_path, odd):
    """(Model-owner audit) "²" passed str.isdigit and crashed the start in int(); "01" beside "1" was a second
    version 1."""
    good(tmp_path, "m", "1")
    good(tmp_path, "m", odd)
    hub = ModelHub(tmp_path)
    loaded, failed = hub.load_all()
    assert [mv.version for mv in loaded] == ["1"] and failed == {}
    reasons = {e.version: e.reason for e in hub.index() if e.state == "UNAVAILABLE"}
    assert f"version folder m/{odd} is not a number" in reasons[odd]


def test_empty_and_incomplete_folders_are_listed_with_why(tmp_path, caplog):
    good(tmp_path, "multi", "1")
    good(tmp_path, "multi", "2")
    (tmp_path / "multi" / "3").mkdir()
    (tmp_path / "multi" / "3" / "model.toml").write_text("max_batch_size = 8\n")
    (tmp_path / "empty").mkdir()
    (tmp_path / "tomlonly" / "1").mkdir(parents=True)
    (tmp_path / "tomlonly" / "1" / "model.toml").write_text("max_batch_size = 8\n")
    hub = ModelHub(tmp_path)
    with caplog.at_level(logging.WARNING, "aios.models"):
        loaded, failed = hub.load_all()
    assert sorted(mv.version for mv in loaded) == ["1", "2"] and hub.get("multi").version == "2"
    assert failed == {
        "empty": f"{tmp_path / 'empty'}: no version folders (expected empty/<version>/model.onnx)",
        "tomlonly": f"{tmp_path / 'tomlonly'}: version 1 has no model.onnx (expected tomlonly/1/model.onnx)",
    }
    index = [(e.name, e.version, e.state, e.reason) for e in hub.index()]
    assert index == [
        ("empty", "", "UNAVAILABLE", failed["empty"]),
        ("multi", "1", "READY", ""),
        ("multi", "2", "READY", ""),
        ("multi", "3", "UNAVAILABLE", "version 3 has no model.onnx (expected multi/3/model.onnx)"),
        ("tomlonly", "", "UNAVAILABLE", failed["tomlonly"]),
    ]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("multi" in w and "version 3 has no model.onnx" in w for w in warnings), warnings
    assert any("empty" in w and "no version folders" in w for w in warnings), warnings


def test_a_corrupt_version_is_not_served_and_the_others_are(tmp_path):
    """(Operator audit) one version's unreadable model.onnx made every version of the model unavailable, and
    with it every pipeline on the model; the README promises the other versions still serve."""
    good(tmp_path, "m", "1")
    (tmp_path / "m" / "2").mkdir()
    (tmp_path / "m" / "2" / "model.onnx").write_bytes(b"not an onnx file")
    hub = ModelHub(tmp_path)
    loaded, failed = hub.load_all()
    assert [mv.version for mv in loaded] == ["1"] and hub.get("m").version == "1" and failed == {}
    index = {e.version: (e.state, e.reason) for e in hub.index()}
    assert index["1"] == ("READY", "")
    assert index["2"][0] == "UNAVAILABLE" and "m/2" in index["2"][1], index


def test_a_reload_that_would_drop_a_serving_version_fails_whole_and_the_index_says_so(tmp_path):
    good(tmp_path, "m", "1")
    good(tmp_path, "m", "2")
    hub = ModelHub(tmp_path)
    assert len(hub.load("m")) == 2
    (tmp_path / "m" / "2" / "model.onnx").write_bytes(b"damaged since")
    with pytest.raises(ModelConfigError):
        hub.load("m")
    assert [mv.version for mv in hub.loaded_versions("m")] == ["1", "2"]  # the previous versions serve on
    entries = [(e.version, e.state, e.reason) for e in hub.index()]
    assert [(version, state) for version, state, _ in entries] == [("1", "READY"), ("2", "READY")]
    assert all("the last load failed" in reason and "m/2" in reason for _, _, reason in entries), entries


# ----------------------------------------------------------------------------- 4. Triton's config.pbtxt
def test_a_config_pbtxt_is_named_in_a_warning_at_load(tmp_path, caplog):
    good(tmp_path, "m")
    pbtxt = tmp_path / "m" / "config.pbtxt"
    pbtxt.write_text("max_batch_size: 8\n")
    with caplog.at_level(logging.WARNING, "aios.models"):
        (mv,) = ModelHub(tmp_path).load("m")
    assert mv.config.max_batch_size == 64  # loaded, without its settings ...
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert str(pbtxt) in warning and "none of its settings were applied" in warning  # ... and said so
    assert f"{tmp_path / 'm'}/<version>/model.toml" in warning and "Model repository" in warning


# ----------------------------------------------------------------------------- 7. model.toml ranges
TOML = 'max_batch_size = 4\n[[input]]\nname = "INPUT0"\ndatatype = "FP32"\ndims = [16]\n' \
       '[[output]]\nname = "OUTPUT0"\ndatatype = "FP32"\ndims = [4]\n'


@pytest.mark.parametrize("line,field,fragment", [
    ("priority = 7\npriority_levels = 3", "priority", "must be between 1 and priority_levels (3), got 7"),
    ("priority = 4", "priority", "must be between 1 and priority_levels (3), got 4"),  # the default levels
    # (it said "got 2" of a priority the file never set)
    ("priority_levels = 1", "priority", "not set: its default, 2, must be between 1 and priority_levels (1); set "
                                        "priority = 1"),
    ("weight = nan", "weight", "must be a finite number from 0.001 to 1000 (a share relative to the lane's other "
                               "models), got nan"),
    ("weight = inf", "weight", "must be a finite number from 0.001 to 1000"),
    ("weight = 1e-300", "weight", "must be a finite number from 0.001 to 1000"),
    ("weight = 2000", "weight", "must be a finite number from 0.001 to 1000"),
])
def test_out_of_range_settings_are_refused_not_clamped(tmp_path, line, field, fragment):
    good(tmp_path, "m")
    (tmp_path / "m" / "1" / "model.toml").write_text(line + "\n" + TOML)
    with pytest.raises(ModelConfigError) as info:
        ModelHub(tmp_path).load("m")
    assert info.value.path.endswith("m/1/model.toml") and info.value.field == field
    assert fragment in str(info.value)


@pytest.mark.parametrize("setting,field", [
    ("max_batch_size = 2147483648", "max_batch_size"),
    ("max_batch_size = 99999999999999999999", "max_batch_size"),
    ("max_batch_size = 4\nmax_queue = 9223372036854775808", "max_queue"),
    ("max_batch_size = 4\nintra_op_threads = 4294967296", "intra_op_threads"),
])
def test_integer_settings_past_int32_are_refused_naming_the_field(tmp_path, setting, field):
    """(Model repository audit) max_batch_size = 2**31 loaded, and every ModelConfig call on it answered INTERNAL
    (Triton's ModelConfig holds it as an int32); past 2**63 the load failed in the scheduler with a traceback at
    start and the index said "not loaded", no reason. Triton's fields, the scheduler's counters and onnxruntime's
    thread counts are 32-bit: a larger value is a typo, refused naming the field. (``instances`` too, not tried here:
    without the bound, 2**31 sessions.)"""
    good(tmp_path, "m")
    (tmp_path / "m" / "1" / "model.toml").write_text(TOML.replace("max_batch_size = 4", setting))
    with pytest.raises(ModelConfigError) as info:
        ModelHub(tmp_path).load("m")
    assert info.value.field == field and "must be at most 2147483647" in str(info.value), info.value


@pytest.mark.parametrize("line,fragment", [
    ('version_policy = "latest"', "every numbered version folder with a model.onnx is served"),
    ("dynamic_batching = {}", "max_queue_delay_us and preferred_batch_sizes"),
    ("instance_group = 2", "instances = N"),
])
def test_a_triton_key_in_model_toml_says_where_that_setting_goes(tmp_path, line, fragment):
    """(Model repository audit) a Triton user's `version_policy` (latest, specific) got "unknown key" and a list of
    keys with nothing about versions: the kernel serves every version folder, and says so."""
    good(tmp_path, "m")
    (tmp_path / "m" / "1" / "model.toml").write_text(line + "\n" + TOML)
    with pytest.raises(ModelConfigError) as info:
        ModelHub(tmp_path).load("m")
    assert info.value.field == line.split(" ")[0] and "unknown key (Triton's" in str(info.value)
    assert fragment in str(info.value)


def test_a_priority_within_the_levels_loads(tmp_path):
    good(tmp_path, "m")
    (tmp_path / "m" / "1" / "model.toml").write_text("priority = 5\npriority_levels = 5\n" + TOML)
    (mv,) = ModelHub(tmp_path).load("m")
    assert mv.config.priority == 5


# ----------------------------------------------------------------------------- models list (3, 4, 8)
def models_list(root: Path, capsys) -> tuple[int, str, str]:
    code = cli_main(["models", "list", "--models", str(root)])
    out, err = capsys.readouterr()
    return code, out, err


def test_models_list_shows_what_the_kernel_will_not_serve_or_read(tmp_path, capsys):
    good(tmp_path, "multi", "1")
    (tmp_path / "multi" / "3").mkdir()
    (tmp_path / "empty").mkdir()
    good(tmp_path, "triton")
    (tmp_path / "triton" / "config.pbtxt").write_text("max_batch_size: 8\n")
    code, out, _ = models_list(tmp_path, capsys)
    assert code == 1, out
    lines = {tuple(line.split()[:2]): line for line in out.splitlines()[1:]}
    assert "unavailable: no version folders (expected empty/<version>/model.onnx)" in lines[("empty", "-")]
    assert "unavailable: version 3 has no model.onnx" in lines[("multi", "3")]
    assert "derived from the graph" in lines[("multi", "1")]
    assert (f"warning: {tmp_path / 'triton' / 'config.pbtxt'} is not read: settings go in each version's folder "
            "(triton/<version>/model.toml): the model loads without them") in lines[("triton", "-")]


def test_models_list_of_a_path_that_does_not_exist(tmp_path, capsys):
    code, out, err = models_list(tmp_path / "nope", capsys)
    assert code == 2 and not out
    # (An operator walk-through: it said only "models does not exist", not which setting names the folder.)
    assert err.strip() == (f"model repository {tmp_path / 'nope'} does not exist (set --models, AIOS_MODELS or models "
                           "in kernel.toml; --address lists a running kernel's)")


# ----------------------------------------------------------------------------- over gRPC (1, 2, 3, 5, 6)
@pytest.fixture(scope="module")
def audit_repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("audit_models")
    good(root, "good", "1")
    good(root, "good", "2")
    onnx_models.save(zipmap_classifier(), root / "sklearn" / "1" / "model.onnx")
    corrupt = root / "corrupt" / "1"
    corrupt.mkdir(parents=True)
    (corrupt / "model.onnx").write_bytes(b"not a model")
    (root / "empty").mkdir()
    good(root, "multi", "1")
    (root / "multi" / "3").mkdir()
    return root


@pytest.fixture(scope="module")
def audit_client(audit_repo):
    server = start_kernel(audit_repo)  # was: KeyError out of start, for the ZipMap model
    client = tc.InferenceServerClient(f"127.0.0.1:{server.port}")
    yield client
    client.close()
    server.stop(grace=1)


def refused(call, *args, **kwargs) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call(*args, **kwargs)
    return info.value


def infer_good(client, name: str = "good", version: str = ""):
    tensor = tc.InferInput("INPUT0", [2, 16], "FP32")
    tensor.set_data_from_numpy(np.ones((2, 16), np.float32))
    return client.infer(name, [tensor], model_version=version)


def test_the_other_models_serve_beside_an_unservable_one(audit_client):
    assert infer_good(audit_client).as_numpy("OUTPUT0").shape == (2, 4)
    index = {(m.name, m.version): (m.state, m.reason) for m in audit_client.get_model_repository_index().models}
    state, reason = index[("sklearn", "")]
    assert state == "UNAVAILABLE" and "'output_probability' is seq(map(int64,tensor(float)))" in reason
    state, reason = index[("empty", "")]
    assert state == "UNAVAILABLE" and reason.endswith("no version folders (expected empty/<version>/model.onnx)")
    assert index[("multi", "1")] == ("READY", "")
    assert index[("multi", "3")] == ("UNAVAILABLE", "version 3 has no model.onnx (expected multi/3/model.onnx)")


@pytest.mark.parametrize("name,fragment", [
    ("sklearn", "only tensor inputs and outputs are served"),
    ("empty", "no version folders (expected empty/<version>/model.onnx)"),
    ("corrupt", "onnxruntime cannot load it"),
])
def test_load_of_an_unservable_model_says_why(audit_client, name, fragment, caplog):
    with caplog.at_level("WARNING", logger="aios.api"):
        error = refused(audit_client.load_model, name)  # was: INTERNAL (sklearn), NOT_FOUND "not in the repository"
    assert error.status() == "StatusCode.INVALID_ARGUMENT", error
    assert f"model '{name}' was not loaded: " in error.message() and fragment in error.message()
    assert any(f"model '{name}' was not loaded (RepositoryModelLoad)" in r.getMessage() and fragment in r.getMessage()
               for r in caplog.records), "the operator is not told"  # (was only the caller)


@pytest.mark.parametrize("call", ["metadata", "config", "infer"])
def test_a_model_that_failed_to_load_is_unavailable_with_its_reason(audit_client, call):
    calls = {"metadata": audit_client.get_model_metadata, "config": audit_client.get_model_config,
             "infer": lambda name: infer_good(audit_client, name)}
    error = refused(calls[call], "corrupt")  # was: NOT_FOUND "model 'corrupt' is not loaded; loaded models: ..."
    assert error.status() == "StatusCode.UNAVAILABLE", error
    assert "model 'corrupt' is not loaded: " in error.message() and "onnxruntime cannot load it" in error.message()
    error = refused(calls[call], "multi", "3") if call != "infer" else refused(infer_good, audit_client, "multi", "3")
    assert error.status() == "StatusCode.UNAVAILABLE" and "version 3 has no model.onnx" in error.message(), error
    error = refused(calls[call], "not_in_repo")  # not in the repository at all: still NOT_FOUND
    assert error.status() == "StatusCode.NOT_FOUND", error


def test_load_overrides_are_refused_not_ignored(audit_client):
    error = refused(audit_client.load_model, "good", config='{"max_batch_size":8}')
    assert error.status() == "StatusCode.INVALID_ARGUMENT", error
    assert error.message() == ("RepositoryModelLoad parameter 'config' is not supported: "
                               "edit the version's model.toml")
    error = refused(audit_client.load_model, "good", files={"file:1/model.onnx": b"onnx"})
    assert error.message() == ("RepositoryModelLoad parameter 'file:1/model.onnx' is not supported: put the model's "
                               "files in its repository folder (<name>/<version>/model.onnx)")
    assert audit_client.get_model_config("good").config.max_batch_size == 64  # as it was


def test_every_load_override_sent_is_named_in_the_refusal(audit_client):
    # (was: only 'config' was named; a caller that dropped it was refused again for the file)
    error = refused(audit_client.load_model, "good", config="{}",
                    files={"file:1/model.onnx": b"onnx", "file:2/model.onnx": b"onnx"})
    assert error.status() == "StatusCode.INVALID_ARGUMENT", error
    assert error.message() == (
        "RepositoryModelLoad parameters 'config', 'file:1/model.onnx', 'file:2/model.onnx' are not supported "
        "(config: edit the version's model.toml; file:<path>: put the model's files in its repository folder "
        "(<name>/<version>/model.onnx))")
    assert audit_client.get_model_config("good").config.max_batch_size == 64  # nothing was loaded


def test_statistics_without_a_version_cover_every_loaded_version(audit_client):
    infer_good(audit_client, "good", "1")
    stats = audit_client.get_inference_statistics("good").model_stats  # was: version 2 only
    assert [(s.name, s.version) for s in stats] == [("good", "1"), ("good", "2")]
    assert stats[0].inference_count >= 2
    assert [s.version for s in audit_client.get_inference_statistics("good", "2").model_stats] == ["2"]
    assert refused(audit_client.get_inference_statistics, "corrupt").status() == "StatusCode.UNAVAILABLE"


def test_a_deployment_that_cannot_be_recorded_is_one_line_not_a_traceback(tmp_path, monkeypatch, caplog):
    """(Crash audit) on a nearly full disk the first audit write at start is a model's deployment record: it failed
    as "model X not loaded: unexpected error" with a traceback, as if the kernel had a bug."""
    from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
    from kernel.audit import AuditError, AuditLog

    onnx_models.save_mlp_version(tmp_path / "models", "tiny", [16, 8, 4], seed=1, provider="cpu")
    real = AuditLog.append

    def disk_full_for_deployments(self, record, *args, **kwargs):  # fault injected on purpose
        if record.kind == kpb.MODEL_DEPLOY:
            raise AuditError("audit record was not written: No space left on device (injected)")
        return real(self, record, *args, **kwargs)

    monkeypatch.setattr(AuditLog, "append", disk_full_for_deployments)
    with caplog.at_level(logging.ERROR, logger="aios.models"):
        server = start_kernel(tmp_path / "models")
    try:
        errors = [r for r in caplog.records if "model tiny not loaded" in r.getMessage()]
        assert len(errors) == 1 and errors[0].exc_info is None
        assert "No space left on device" in errors[0].getMessage()
    finally:
        server.stop(grace=1)


@pytest.mark.parametrize("damage", ["truncated", "no model.onnx"])
def test_a_load_that_cannot_bring_up_a_new_version_says_so_while_the_others_serve(tmp_path, damage, caplog):
    """(Lifecycle audit) an operator deploying version 2 with a damaged model.onnx (or none yet) was answered OK by
    RepositoryModelLoad while every request went on to version 1: Triton answers such a load with an error naming
    the version. The versions that loaded still serve (the README's promise), and the index says why."""
    good(tmp_path, "m", "1")
    server = start_kernel(tmp_path)
    client = tc.InferenceServerClient(f"127.0.0.1:{server.port}")
    try:
        client.load_model("m")
        version_2 = tmp_path / "m" / "2"
        version_2.mkdir()
        if damage == "truncated":
            onnx_models.save(onnx_models.mlp([16, 8, 4], seed=9), version_2 / "model.onnx")
            data = (version_2 / "model.onnx").read_bytes()
            (version_2 / "model.onnx").write_bytes(data[: len(data) // 2])
        (tmp_path / "m" / "latest").mkdir()  # (a folder that is not a number is not a version: no error of its own)
        with caplog.at_level(logging.WARNING, logger="aios.api"):
            error = refused(client.load_model, "m")
        assert error.status() == "StatusCode.INVALID_ARGUMENT", error
        fragment = "onnxruntime cannot load it" if damage == "truncated" else "version 2 has no model.onnx"
        assert error.message().startswith("model 'm' version 2 was not loaded: ") and fragment in error.message()
        assert "its other versions were loaded and serve (1; a request without a version gets 1)" in error.message()
        assert "latest" not in error.message()
        assert any("version 2 was not loaded (RepositoryModelLoad)" in r.getMessage() for r in caplog.records)
        assert infer_good(client, "m").get_response().model_version == "1"
        states = {(m["version"], m["state"]) for m in client.get_model_repository_index(as_json=True)["models"]}
        assert ("1", "READY") in states and ("2", "UNAVAILABLE") in states
        onnx_models.save(onnx_models.mlp([16, 8, 4], seed=9), version_2 / "model.onnx")  # fixed: an OK, and it serves
        client.load_model("m")
        assert infer_good(client, "m").get_response().model_version == "2"
    finally:
        client.close()
        server.stop(grace=1)


def test_an_unload_after_a_failed_reload_says_not_loaded_not_the_old_failure(tmp_path):
    """(Lifecycle audit) a reload that failed, then an unload: requests and the index went on giving the failed
    load's error (UNAVAILABLE) as if the model were still trying to serve; unloaded, it is not loaded."""
    good(tmp_path, "m", "1")
    server = start_kernel(tmp_path)
    client = tc.InferenceServerClient(f"127.0.0.1:{server.port}")
    try:
        client.load_model("m")
        (tmp_path / "m" / "1" / "model.onnx").write_bytes(b"damaged")
        assert "onnxruntime cannot load it" in refused(client.load_model, "m").message()
        client.unload_model("m")
        error = refused(infer_good, client, "m")
        assert error.status() == "StatusCode.NOT_FOUND" and "onnxruntime" not in error.message(), error
        entry = [m for m in client.get_model_repository_index(as_json=True)["models"] if m["name"] == "m"]
        assert entry and "onnxruntime" not in entry[0].get("reason", ""), entry
    finally:
        client.close()
        server.stop(grace=1)


def test_a_model_toml_error_names_the_line_as_well_as_the_field(tmp_path):
    """(Model repository audit) "input[1].dims: ..." made an operator count [[input]] tables by hand; the line the
    value is on is said too (a field in an inline table or the card is named without one)."""
    good(tmp_path, "m")
    toml = tmp_path / "m" / "1" / "model.toml"
    two_inputs = TOML.replace("[[output]]", '[[input]]\nname = "B"\ndatatype = "FP32"\n\ndims = [0]\n[[output]]')
    toml.write_text("# settings\n" + two_inputs)  # B's dims on line 11
    with pytest.raises(ModelConfigError) as info:
        ModelHub(tmp_path).load("m")
    assert info.value.field == "input[1].dims" and str(info.value).endswith("got 0 (line 11)"), info.value
    toml.write_text("\n\n" + TOML.replace("max_batch_size = 4", "max_batch_size = 4.0"))
    with pytest.raises(ModelConfigError) as info:
        ModelHub(tmp_path).load("m")
    assert info.value.field == "max_batch_size" and str(info.value).endswith("got 4.0 (line 3)"), info.value


@pytest.mark.parametrize("instances", [1025, 2**31 - 1])
def test_instances_past_what_any_lane_runs_are_refused_naming_the_field(tmp_path, instances):
    """(A review) ``instances`` was bounded only by the int32 limit: 2**31 - 1 passed the check and the load made
    onnxruntime sessions one after another, each a copy of the model, until memory ran out. No lane runs more than
    1024 + 1 batches at once, so a larger value is a typo, refused before any session is made."""
    from kernel.models.config import load as load_config

    path = tmp_path / "model.toml"
    path.write_text(f"instances = {instances}\n" + TOML)
    with pytest.raises(ModelConfigError) as info:
        load_config(path, "m", "1")
    assert info.value.field == "instances" and "must be at most 1024" in str(info.value), info.value
    assert f"got {instances}" in str(info.value)
    path.write_text("instances = 1024\n" + TOML)  # the largest a lane can use still loads
    assert load_config(path, "m", "1").instances == 1024
