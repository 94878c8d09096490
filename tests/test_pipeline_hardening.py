"""Hostile or malformed pipeline files are refused with FILE:LINE, never a crash: on upload (INVALID_ARGUMENT)
and on hot reload (listed in ``errors``, the other files still loaded); an upload is validated once, and
not activated after its caller's deadline; version labels cannot forge log lines."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import grpc
import pytest
from claims_support import copy_pipelines, loaded_hub

from kernel.errors import DeadlineExceeded, InvalidArgument, NotFound
from kernel.pipelines import PipelineError, PipelineRegistry, parse_pipeline
from kernel.policy import load_policy, parse_policy

ROOT = Path(__file__).resolve().parent.parent
CLAIMS = ROOT / "examples" / "claims" / "pipelines"
PIPELINE_TEXT = (CLAIMS / "claims_triage.toml").read_text()
POLICY_TEXT = (CLAIMS / "policy.toml").read_text()


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    return loaded_hub(tmp_path_factory.mktemp("hardening_models"))


@pytest.fixture
def folder(tmp_path):
    return copy_pipelines(tmp_path)


def _registry(folder, hub, load=load_policy) -> PipelineRegistry:
    registry = PipelineRegistry(folder, hub, load, parse_policy, poll_s=0)
    registry.reload()
    return registry


def _twin(name: str = "claims_twin", text: str = PIPELINE_TEXT) -> str:
    assert 'name = "claims_triage"' in text
    return text.replace('name = "claims_triage"', f'name = "{name}"', 1)


def _line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


def _without(text: str, header: str) -> str:
    """``text`` less every table headed ``header`` (up to the next header)."""
    return re.sub(rf"(?ms)^{re.escape(header)}\n.*?(?=^\[|\Z)", "", text)


_DEEP = "[" * 3000 + "]" * 3000
# Each: (the text, the text on the line the error must name, what the message says)
MALFORMED = {
    "field-not-a-table": ("field = [1]\n" + _without(PIPELINE_TEXT, "[[field]]"), "field = [1]", "[[field]] #1: must be a table"),
    "escalation-not-a-table": ("escalation = 5\n" + _without(PIPELINE_TEXT, "[escalation]"), "escalation = 5", "[escalation]: must be a table"),
    "deep-nesting": (PIPELINE_TEXT.replace('description = "', f'junk = {_DEEP}\ndescription = "', 1),
                     "junk = [[[", "nested too deeply"),
    "integer-of-5000-digits": (PIPELINE_TEXT.replace("timeout_ms = 2000", "timeout_ms = " + "9" * 5000, 1),
                               "timeout_ms = 999", "more than 4300 digits"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_pipeline_file_is_refused_with_its_line(case):
    text, needle, says = MALFORMED[case]
    with pytest.raises(PipelineError) as info:
        parse_pipeline(text.encode(), "p.toml", lambda name: load_policy(CLAIMS / name))
    message = str(info.value)
    assert message.startswith(f"p.toml:{_line_of(text, needle)}: "), message
    assert says in message, message


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_upload_is_invalid_argument_and_changes_nothing(hub, folder, case):
    registry = _registry(folder, hub)
    running = registry.get("claims_triage")
    text, needle, says = MALFORMED[case]
    with pytest.raises(InvalidArgument) as info:
        registry.put(_twin(text=text).encode())
    assert f"<upload>:{_line_of(text, needle)}: " in info.value.message and says in info.value.message
    assert not (folder / "claims_twin.toml").exists() and registry.get("claims_triage") is running


def test_a_bad_file_on_hot_reload_is_listed_and_a_good_one_beside_it_still_loads(hub, folder):
    registry = _registry(folder, hub)
    text, needle, _ = MALFORMED["deep-nesting"]
    (folder / "aaa_bad.toml").write_text(_twin("bad", text))
    (folder / "zzz_good.toml").write_text(_twin("good"))
    assert registry.reload() == ["good"]
    why = registry.errors[str(folder / "aaa_bad.toml")]
    assert why.startswith(f"{folder / 'aaa_bad.toml'}:{_line_of(text, needle)}: "), why
    assert registry.get("good") and registry.reload() == []


def test_a_defect_the_checks_miss_refuses_that_file_only_naming_it(hub, folder, caplog):
    registry = _registry(folder, hub)
    (folder / "aaa_crash.toml").write_text(_twin("crash"))
    (folder / "zzz_good.toml").write_text(_twin("good"))
    bind = registry._bind

    def crashing_bind(pipeline):
        if pipeline.name == "crash":
            raise RecursionError("maximum recursion depth exceeded")
        return bind(pipeline)

    registry._bind = crashing_bind
    assert registry.reload() == ["good"]
    why = registry.errors[str(folder / "aaa_crash.toml")]
    assert why.startswith(f"{folder / 'aaa_crash.toml'}:0: cannot be loaded (RecursionError"), why
    assert any(str(folder / "aaa_crash.toml") in r.getMessage() for r in caplog.records if r.levelname == "ERROR")
    with pytest.raises(NotFound):
        registry.get("crash")


def test_files_a_look_did_not_get_to_are_loaded_by_the_next_one(hub, folder):
    registry = _registry(folder, hub)
    (folder / "aaa_first.toml").write_text(_twin("first"))
    (folder / "zzz_second.toml").write_text(_twin("second"))

    class Stop(BaseException):
        pass

    def listener(old, new):  # the look stops half-way (a listener raised, the process is stopping, ...)
        if new.name == "first":
            registry.listeners.remove(listener)
            raise Stop

    registry.listeners.append(listener)
    with pytest.raises(Stop):
        registry.reload()
    assert registry.reload() == ["second"]  # not skipped as already seen
    assert registry.get("first") and registry.get("second")


def test_an_upload_is_validated_once_not_again_at_the_next_look(hub, folder):
    calls = []

    def counting(path):
        calls.append(Path(path).name)
        return load_policy(path)

    registry = _registry(folder, hub, counting)
    policy = POLICY_TEXT.replace("fraud_score >= 0.8", "fraud_score >= 0.9", 1)
    registry.put(_twin().encode(), policy.encode())
    calls.clear()
    assert registry.reload() == []
    assert calls == []  # neither the uploaded pipeline nor its policy file is loaded again


def test_an_upload_past_its_deadline_is_not_activated(hub, folder):
    registry = _registry(folder, hub)
    with pytest.raises(DeadlineExceeded):
        registry.put(_twin().encode(), time_left=lambda: 0.0)
    assert not (folder / "claims_twin.toml").exists()
    with pytest.raises(NotFound):
        registry.get("claims_twin")
    assert registry.put(_twin().encode(), time_left=lambda: 30.0).name == "claims_twin"


def test_an_upload_with_no_deadline_waits_for_good(hub, folder):
    """A call with no deadline: gRPC's time_remaining is then ~1e18 s, past what a lock's wait takes (a review
    audit: OverflowError, answered INTERNAL)."""
    registry = _registry(folder, hub)
    assert registry.put(_twin().encode(), time_left=lambda: 1e18).name == "claims_twin"


def test_an_upload_whose_deadline_passes_while_it_waits_is_not_validated(hub, folder):
    import threading

    registry = _registry(folder, hub)
    registry._work.acquire()  # another upload is running
    try:
        outcome = []
        waiter = threading.Thread(target=lambda: outcome.append(_put_or_error(registry, lambda: 0.05)))
        waiter.start()
        waiter.join(timeout=5)
    finally:
        registry._work.release()
    assert outcome and isinstance(outcome[0], DeadlineExceeded), outcome
    assert not (folder / "claims_twin.toml").exists()


def _put_or_error(registry, time_left):
    try:
        return registry.put(_twin().encode(), time_left=time_left)
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        return exc


@pytest.mark.parametrize("key, value, says", [
    ("version", '"v2\\n2026-11-27T05:41:00.000Z INFO aios.pipelines: FORGED"', "'\\n'"),
    ("version", '"v2\\u001b[2J"', "'\\x1b'"),
    ("description", '"fine\\u0000"', "'\\x00'"),
])
def test_control_characters_in_labels_are_refused_naming_field_and_line(key, value, says):
    text = re.sub(rf"(?m)^{key} = .*$", lambda m: f"{key} = {value}", PIPELINE_TEXT, count=1)
    with pytest.raises(PipelineError) as info:
        parse_pipeline(text.encode(), "p.toml", lambda name: load_policy(CLAIMS / name))
    message = str(info.value)
    assert message.startswith(f"p.toml:{_line_of(text, f'{key} = ')}: [pipeline].{key}: contains the control "
                              f"character {says}"), message


def test_a_description_may_span_lines():
    text = re.sub(r'(?m)^description = .*$', 'description = """two\n\tlines"""', PIPELINE_TEXT, count=1)
    pipeline = parse_pipeline(text.encode(), "p.toml", lambda name: load_policy(CLAIMS / name))
    assert pipeline.description == "two\n\tlines"


def test_an_upload_rpc_whose_caller_gave_up_while_it_waited_is_never_activated(claims_models, tmp_path):
    """The UploadPipeline RPC hands its gRPC deadline to the registry: a caller told DEADLINE_EXCEEDED must not
    find its pipeline served later, once the upload ahead of it is done."""
    from conftest import start_claims_kernel
    from lane_support import until
    from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
    from kernel._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc

    server = start_claims_kernel(claims_models, tmp_path)
    registry = server.decisions.registry
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            admin = kgrpc.AdminServiceStub(channel)
            registry._work.acquire()  # another upload is being validated
            try:
                with pytest.raises(grpc.RpcError) as info:
                    admin.UploadPipeline(kpb.UploadPipelineRequest(pipeline_toml=_twin().encode()), timeout=0.3)
                assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            finally:
                registry._work.release()
            until(lambda: server._pool.in_progress() == 0, "the refused upload's handler to have had its turn")
            names = [p.name for p in admin.ListPipelines(kpb.ListPipelinesRequest(), timeout=10).pipelines]
    finally:
        server.stop(grace=1)
    assert "claims_twin" not in names


def test_a_second_file_naming_a_served_pipeline_is_refused_and_takes_over_only_when_the_first_goes(hub, folder):
    """(Operator audit) a copy naming claims_triage silently took the pipeline over, and removing the copy
    took the pipeline down though claims_triage.toml was still there."""
    registry = _registry(folder, hub)
    original = registry.get("claims_triage")
    copy = folder / "copy.toml"
    copy.write_text(PIPELINE_TEXT.replace('version = "2026-11-25.1"', 'version = "draft"', 1))
    registry.reload()
    assert registry.get("claims_triage") is original  # the served one stays
    refused = registry.errors[str(copy)]
    assert refused.startswith(f"{copy}:{_line_of(PIPELINE_TEXT, 'name = ')}: [pipeline].name: pipeline "
                              f"'claims_triage' is already served from {folder / 'claims_triage.toml'}"), refused
    copy.unlink()
    registry.reload()
    registry.reload()
    assert registry.get("claims_triage") is original and str(copy) not in registry.errors
    # Now the other way: the served file goes (two looks, as an editor's save is allowed one), the copy serves.
    copy.write_text(PIPELINE_TEXT.replace('version = "2026-11-25.1"', 'version = "draft"', 1))
    registry.reload()
    (folder / "claims_triage.toml").unlink()
    registry.reload()
    registry.reload()
    assert registry.get("claims_triage").path == str(copy) and str(copy) not in registry.errors


def test_a_folder_look_that_keeps_failing_logs_one_traceback_not_one_per_look(hub, folder, caplog):
    """(Operator audit) out of file descriptors, the watcher logged a full traceback every poll."""
    import logging

    from lane_support import until

    registry = PipelineRegistry(folder, hub, load_policy, parse_policy, poll_s=0.01)
    looks = []

    def failing_look(settle=False):  # fault injected on purpose: every look fails as with no file descriptors left
        looks.append(1)
        raise OSError(24, "Too many open files")

    registry.reload = failing_look
    with caplog.at_level(logging.ERROR, "aios.pipelines"):
        registry._watcher = threading.Thread(target=registry._watch, daemon=True)
        registry._watcher.start()
        try:
            until(lambda: len(looks) >= 10, "ten failed looks")
        finally:
            registry.stop()
    failures = [r for r in caplog.records if "looking at the pipeline folder" in r.getMessage()]
    assert len(failures) == 1 and failures[0].exc_info is not None, [r.getMessage() for r in failures]
    assert "Too many open files" in failures[0].getMessage()


def _long_lists(what: str) -> tuple[bytes, bytes]:
    """An upload whose pipeline lists 40,000 values of a field or offers reviewers 40,000 actions, or whose policy
    lists 30,000 actions."""
    if what == "field values":
        tiers = 'values = ["bronze", "silver", "gold", "platinum"]'
        assert tiers in PIPELINE_TEXT
        values = ", ".join(f'"v{i}"' for i in range(40_000))
        return _twin(text=PIPELINE_TEXT.replace(tiers, f'values = ["bronze", "silver", "gold", "platinum", {values}]'))\
            .encode(), b""
    if what == "review actions":
        offered = 'review_actions = ["approve", "deny", "request_info"]'
        assert offered in PIPELINE_TEXT
        actions = ", ".join(f'"r{i % 20_000}"' for i in range(40_000))  # (each twice: repeats are warned about)
        return _twin(text=PIPELINE_TEXT.replace(offered, f'review_actions = [{actions}]')).encode(), b""
    listed = 'actions = ["deny", "review", "approve", "fast_track"]'
    assert listed in POLICY_TEXT
    actions = ", ".join(f'"a{i}"' for i in range(30_000))
    policy = POLICY_TEXT.replace(listed, f'actions = ["deny", "review", "approve", "fast_track", {actions}]')
    return _twin().replace('file = "policy.toml"', 'file = "wide.toml"').encode(), policy.encode()


@pytest.mark.parametrize("what", ["field values", "policy actions", "review actions"])
def test_an_upload_with_long_lists_is_checked_in_linear_time(claims_models, tmp_path, what):
    """Duplicates in a list were found with list.count per item: 30,000 actions took ~50 s (a 1 MiB policy's
    100,000, 168 s), holding the registry's lock against every other upload and reload."""
    import time

    from conftest import start_claims_kernel
    from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
    from kernel._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc

    pipeline, policy = _long_lists(what)
    server = start_claims_kernel(claims_models, tmp_path)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            admin = kgrpc.AdminServiceStub(channel)
            started = time.monotonic()
            try:
                admin.UploadPipeline(kpb.UploadPipelineRequest(pipeline_toml=pipeline, policy_toml=policy), timeout=30)
                code = grpc.StatusCode.OK
            except grpc.RpcError as exc:
                code, details = exc.code(), exc.details()
            took = time.monotonic() - started
    finally:
        server.stop(grace=1)
    assert took < 5, f"{took:.1f} s"
    assert code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT), (code, details)
