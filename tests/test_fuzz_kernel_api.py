"""Property-based fuzzing of the kernel's own API (``aios.kernel.v1``) over real gRPC, on both front ends.

The rule under test: a caller's mistake gets a specific gRPC status
(INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION, ...), never INTERNAL,
UNKNOWN or UNIMPLEMENTED, and never a hang. DecideStream answers a bad
message with a per-message ``error_code`` that is one of those names. After
every example the kernel must still decide a known-good case, and at the end
its audit log must still verify.

One real kernel per front end serves the claims pipeline (the small claims
model, the example pipeline and policy). Requests are well-formed messages
with hostile content (random names, Value kinds incl. NaN/inf/huge ints and
empty oneofs, huge and unicode strings, random ids, sizes, tokens, ranges,
broken pipeline and policy text) and raw bytes that may not parse at all.
The review queue's listings, claims and watches are held to a walk of every
review (any filters, page tokens truncated, garbled or of other filters, a
watch cut anywhere and resumed from its last sequence), and Decide calls in
flight at once, cancelled or past their deadline at any moment, some just
either side of the payload budget's 64 KiB, must each end once and lose nothing.

The tests at the end are regressions for kernel bugs this file found (their
docstrings give the original reproduction and symptom).
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import math
import time
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from call_outcome import outcome
from fuzz_budget import examples

from claims_support import CLAIMS, claim_request
from examples.claims import data
from examples.claims.data import REQUEST_FIELDS as FIELDS
from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
from kernel._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc
from kernel.audit import verify_directory
from kernel import paging
from kernel.wire import encode_varint

Code = grpc.StatusCode
PIPELINE_TEXT = (CLAIMS / "claims_triage.toml").read_text()
POLICY_TEXT = (CLAIMS / "policy.toml").read_text()
ACTIONS = ("approve", "deny", "request_info", "review", "fast_track")

ALLOWED = {
    Code.OK, Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.FAILED_PRECONDITION, Code.PERMISSION_DENIED,
    Code.RESOURCE_EXHAUSTED, Code.DEADLINE_EXCEEDED, Code.OUT_OF_RANGE, Code.ALREADY_EXISTS, Code.CANCELLED,
    # Two messages of one DecideStream with one idempotency key in flight at once: the second is told to retry
    # (README "Retrying"; a hypothesis example found it, once in many runs)
    Code.ABORTED,
}
ALLOWED_NAMES = {code.name for code in ALLOWED if code != Code.OK}
GUARD_S = 30.0  # only a guard against hangs: a call that runs into it has hung
SHORT_S = 0.3  # deadline of streams that would otherwise wait for ever (follow, watch)
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                                      HealthCheck.data_too_large])
UINT32 = st.integers(0, 2**32 - 1)
UINT64 = st.integers(0, 2**64 - 1)
INT64 = st.integers(-(2**63), 2**63 - 1)


# ----------------------------------------------------------------------------- the kernel
@pytest.fixture(scope="module")
def models(claims_models):
    return claims_models


@pytest.fixture(scope="module")
def kernel(claims_kernel):
    return claims_kernel


@pytest.fixture(scope="module")
def channel(kernel):
    with grpc.insecure_channel(f"127.0.0.1:{kernel.port}", options=[
        ("grpc.max_send_message_length", 16 << 20), ("grpc.max_receive_message_length", 16 << 20),
    ]) as ch:
        yield ch


@pytest.fixture(scope="module")
def stubs(channel):
    class Stubs:
        decisions = kgrpc.DecisionServiceStub(channel)
        tasks = kgrpc.TaskServiceStub(channel)
        reviews = kgrpc.ReviewServiceStub(channel)
        audit = kgrpc.AuditServiceStub(channel)
        admin = kgrpc.AdminServiceStub(channel)

    return Stubs


def good_request(seed: int = 99, **options) -> kpb.DecisionRequest:
    case = data.generate_cases(1, seed=seed)[0]
    return claim_request(case, text={"description": case["description"]}, **options)


@pytest.fixture(scope="module")
def known(stubs):
    """Real ids to aim at: tasks (some waiting for review), their reviews, a real page token."""
    task_ids = []
    for k in range(3):  # R04: large claims go to a human, so each task opens a review and waits
        request = good_request(k, request_id=f"seed-{k}")
        request.fields["claim_amount"].number_value = 75000.0
        request.fields["fraud_score"].number_value = 0.2
        task_ids.append(stubs.tasks.StartTask(kpb.StartTaskRequest(request=request), timeout=10).task_id)
    task_ids.append(stubs.tasks.StartTask(kpb.StartTaskRequest(request=good_request(7)), timeout=10).task_id)
    review_ids = []
    for task_id in task_ids[:3]:
        for task in stubs.tasks.WatchTask(kpb.TaskRef(task_id=task_id), timeout=20):
            if task.review_id:
                review_ids.append(task.review_id)
                break
    assert len(review_ids) == 3, review_ids
    page = stubs.reviews.ListReviews(kpb.ListReviewsRequest(page_size=1), timeout=10)
    assert page.next_page_token
    return {"tasks": task_ids, "reviews": review_ids, "token": page.next_page_token}


# ----------------------------------------------------------------------------- calling and judging
def call(method, request, timeout: float = GUARD_S):
    """(code, details, response, elapsed_s) of a unary call."""
    started = time.monotonic()
    try:
        response = method(request, timeout=timeout)
        return Code.OK, "", response, time.monotonic() - started
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or "", None, time.monotonic() - started


def drain(method, request, timeout: float, limit: int = 200):
    """(code, details, messages, elapsed_s) of a server stream, reading at most ``limit`` messages."""
    started = time.monotonic()
    messages = []
    stream = method(request, timeout=timeout)
    try:
        for message in stream:
            messages.append(message)
            if len(messages) >= limit:
                stream.cancel()
                return Code.OK, "", messages, time.monotonic() - started
        return Code.OK, "", messages, time.monotonic() - started
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or "", messages, time.monotonic() - started


def check(what: str, code, details: str, elapsed: float, timeout: float = GUARD_S) -> None:
    assert code in ALLOWED, f"{what}: {code} {details[:500]!r}"
    if code == Code.DEADLINE_EXCEEDED and timeout >= GUARD_S:
        assert elapsed < GUARD_S - 1, f"{what}: hung for {elapsed:.1f} s ({details!r})"
    if code not in (Code.OK, Code.CANCELLED, Code.DEADLINE_EXCEEDED):
        assert details.strip(), f"{what}: {code} without a message"


def assert_kernel_decides(stubs) -> None:
    """A known-good case still gets an audited decision."""
    code, details, decision, _ = call(stubs.decisions.Decide, good_request())
    assert code == Code.OK, f"the kernel stopped deciding a good case: {code} {details!r}"
    assert decision.action and not decision.error_code and decision.audit_hash


# ----------------------------------------------------------------------------- strategies
HUGE = st.sampled_from([10_000, 300_000, 1_000_000]).flatmap(
    lambda n: st.sampled_from(["x" * n, "é" * (n // 2), "日" * (n // 3), "\x00" * n]))
texts = st.one_of(st.text(max_size=20), st.sampled_from(["", " ", "\x00", "a/b", "../x", "é", "日本語", "🙂" * 5]), HUGE)
short_texts = st.one_of(st.text(max_size=12), st.sampled_from(["", "\x00", "é", "日本語"]))
names = st.one_of(st.sampled_from(["claims_triage", "", "claims_triage ", "Claims_Triage", "nope", "claims-triage"]),
                  st.text(max_size=16))
field_names = st.one_of(st.sampled_from(FIELDS), st.sampled_from(["", "shoe_size", "CLAIM_AMOUNT", "\x00"]),
                        st.text(max_size=10))
SPECIAL_FLOATS = [math.nan, math.inf, -math.inf, -0.0, 5e-324, 1e308, -1e308, 2.0**63, 1e7, 1e7 + 1, 0.5, -1.0]
values = st.one_of(
    st.just(kpb.Value()),  # an empty oneof
    st.builds(lambda s: kpb.Value(string_value=s), st.one_of(short_texts, st.sampled_from(
        ["bronze", "gold", "auto", "home", "diamond", "GOLD"]), HUGE)),
    st.builds(lambda x: kpb.Value(number_value=x), st.one_of(st.floats(), st.sampled_from(SPECIAL_FLOATS))),
    st.builds(lambda i: kpb.Value(int_value=i), st.one_of(INT64, st.sampled_from([0, 1, -1, 1200, 1201, 2**63 - 1, -(2**63)]))),
    st.builds(lambda b: kpb.Value(bool_value=b), st.booleans()),
)
idempotency_keys = st.one_of(st.just(""), st.sampled_from(["k1", "k2", "k3"]), st.text(max_size=8),
                             st.sampled_from(["x" * 256, "x" * 257, "é" * 256, "k" * 100_000]))
priorities = st.one_of(st.integers(0, 5), UINT32)
timeouts_ms = st.one_of(st.just(0), st.integers(1, 5), st.integers(6, 5000), UINT64)


@st.composite
def decision_requests(draw) -> kpb.DecisionRequest:
    """A good claims case with a few hostile changes, or a request random from top to bottom."""
    if draw(st.booleans()):
        request = good_request(draw(st.integers(0, 10_000)))
        for change in draw(st.lists(st.sampled_from(
                ["pipeline", "tenant", "request_id", "key", "field", "drop", "extra", "text", "priority", "timeout"]),
                max_size=3)):
            note(f"change {change}")
            if change == "pipeline":
                request.pipeline = draw(names)
            elif change == "tenant":
                request.tenant = draw(texts)
            elif change == "request_id":
                request.request_id = draw(texts)
            elif change == "key":
                request.idempotency_key = draw(idempotency_keys)
            elif change == "field":
                request.fields[draw(st.sampled_from(FIELDS))].CopyFrom(draw(values))
            elif change == "drop":
                name = draw(st.sampled_from(FIELDS))
                if name in request.fields:
                    del request.fields[name]
            elif change == "extra":
                request.fields[draw(field_names)].CopyFrom(draw(values))
            elif change == "text":
                request.text_fields[draw(short_texts)] = draw(texts)
            elif change == "priority":
                request.priority = draw(priorities)
            else:
                request.timeout_ms = draw(timeouts_ms)
        return request
    request = kpb.DecisionRequest(
        pipeline=draw(names), tenant=draw(short_texts), request_id=draw(short_texts),
        idempotency_key=draw(idempotency_keys), priority=draw(priorities), timeout_ms=draw(timeouts_ms),
    )
    for name, value in draw(st.dictionaries(field_names, values, max_size=10)).items():
        request.fields[name].CopyFrom(value)
    for name, value in draw(st.dictionaries(short_texts, texts, max_size=3)).items():
        request.text_fields[name] = value
    return request


def _replace_once(text: str, old: str, new: str) -> str:
    return text.replace(old, new, 1) if old in text else text + "\n" + new + "\n"


# (old, new) edits of the example pipeline: valid-looking TOML with wrong tables, types and numbers.
PIPELINE_EDITS = [
    ("[escalation]", "escalation = 5\n[x]"), ("[[field]]", "field = 3\n[[y]]"), ("[model]", "model = [1, 2]\n[z]"),
    ('name = "claims_triage"\nversion = ""', "name = 5\nversion = []"), ("min = 0.0", "min = nan"),
    ("max = 10000000.0", "max = inf"), ("std = 1.085472", "std = 0"), ("mean = 8.125689", "mean = nan"),
    ("default = 3419.2", "default = inf"), ("default = 28", "default = 99999999999999999999999"),
    ("priority = 0", "priority = 99999999999999999999"), ("priority = 0", "priority = -1"),
    ("priority = 0", "priority = 4294967296"), ("timeout_ms = 2000", "timeout_ms = 99999999999999999999999"),
    ("timeout_ms = 2000", "timeout_ms = 1"), ("timeout_ms = 2000", "timeout_ms = -5"),
    ("min_confidence = 0.6", "min_confidence = nan"), ("min_confidence = 0.6", "min_confidence = 2"),
    ("review_sla_s = 14400", "review_sla_s = inf"), ("review_sla_s = 14400", "review_sla_s = 1e300"),
    ('review_actions = ["approve", "deny", "request_info"]', "review_actions = [1, 2]"),
    ('review_actions = ["approve", "deny", "request_info"]', 'review_actions = "approve"'),
    ('file = "policy.toml"', 'file = "../policy.toml"'), ('file = "policy.toml"', 'file = "nope.toml"'),
    ('file = "policy.toml"', 'file = "a\\u0000b.toml"'), ('file = "policy.toml"', 'file = "' + "p" * 300 + '.toml"'),
    ('file = "policy.toml"', 'file = 7'), ('file = "policy.toml"', 'file = ""'),
    ('name = "claims_triage"\nversion = "2026', 'name = "fuzzed_' + "n" * 300 + '"\nversion = "2026'),
    ('name = "claims_triage"\nversion = "2026', 'name = "fuzzed_copy"\nversion = "2026'),
    ('name = "claims_triage"\nversion = "2026', 'name = "../x"\nversion = "2026'),
    ('name = "claims_triage"\nversion = "2026', 'name = "\\u00e9t\\u00e9"\nversion = "2026'),
    ('name = "claims_triage"\nversion = "2026', 'name = "policy"\nversion = "2026'),
    ('file = "policy.toml"', 'file = "claims_triage.toml"'), ('file = "policy.toml"', 'file = "fuzzed_copy.toml"'),
    ('version = "2026-11-25.1"\ndescription', "version = 1.5\ndescription"),
    ('values = ["bronze", "silver", "gold", "platinum"]', "values = []"),
    ('values = ["bronze", "silver", "gold", "platinum"]', 'values = ["a", 1]'),
    ('encode = "onehot"', 'encode = "magic"'), ('type = "bool"', 'type = "tensor"'),
    ('type = "integer"', 'type = "number"'), ('input = "features"', 'input = "nope"'),
    ('output = "probabilities"', 'output = "features"'), ('name = "claims_triage"\nversion = ""', 'name = "nope"\nversion = ""'),
    ('version = ""                 #', 'version = "99"  #'), ('version = ""                 #', "version = -1  #"),
    ("[pipeline]", "[pipeline]\n[pipeline]"), ("[policy]", "[policy.file]"), ("\n", "\n\x00"),
    ("[[field]]", "[[field]]\n[[field]]"), ('name = "claim_amount"', 'name = "claim_type"'),
    ("max = 1200\n", ""), ("min = 0\n", ""), ("default = 28", "default = -5"), ("default = 0.21", "default = 7"),
    ("max = 1000\n", "max = 99999999999999999999999\n"), ("min = 0\n", "min = -99999999999999999999999\n"),
    ("review_sla_s = 14400", "review_sla_s = 1e-9"), ("min_confidence = 0.6", "min_confidence = 1.0"),
    ("min_confidence = 0.6", "min_confidence = 0"), ("mean = 0.5508", "mean = 1e308"),
    ("min = 0.0\n", ""), ("max = 1.0\n", ""), ("min = 0.0", "min = 1" + "0" * 400),
    ("review_sla_s = 14400", "review_sla_s = 1" + "0" * 400), ("min_confidence = 0.6", "min_confidence = 1" + "0" * 400),
    ("std = 0.21239", "std = 1e-300"),
]
POLICY_EDITS = [
    ('hit_policy = "FIRST"', 'hit_policy = "SOMETIMES"'), ('hit_policy = "FIRST"', "hit_policy = 3"),
    ("[inputs]", "inputs = 4\n[q]"), ('claim_amount = "number"', 'claim_amount = "tensor"'),
    ("[[rule]]", "rule = 1\n[[r]]"), ('when = "fraud_score >= 0.8', 'when = "fraud_score >>= 0.8'),
    ('when = "fraud_score >= 0.8', 'when = "fraud_score >= 1e999'), ('when = "fraud_score >= 0.8', 'when = "(((((('),
    ('action = "deny"', 'action = "explode"'), ("adjust = 0.3", "adjust = nan"), ("adjust = 0.3", "adjust = inf"),
    ('classes = ["approve", "review", "deny"]', "classes = []"), ('actions = ["deny"', 'actions = [1'),
    ('version = "2026-11-25.1"', "version = 99999999999999999999999"), ('name = "claims_triage"', "name = 5"),
    ("[policy]", "[policy]\n[policy]"), ('id = "R01"', 'id = "R02"'), ("\n", "\n\x00"),
]


@st.composite
def upload_requests(draw) -> kpb.UploadPipelineRequest:
    """Pipeline and policy text: random, broken TOML, or the example with wrong tables and numbers."""
    def edited(text: str, edits) -> str:
        for old, new in draw(st.lists(st.sampled_from(edits), min_size=1, max_size=3)):
            text = _replace_once(text, old, new)
        if draw(st.booleans()):  # cut it off somewhere: broken TOML, or a table that lost its keys
            lines = text.splitlines()
            text = "\n".join(lines[: draw(st.integers(0, len(lines)))])
        return text

    kind = draw(st.sampled_from(["example", "bytes", "text", "edited", "edited", "edited"]))
    if kind == "example":
        pipeline = PIPELINE_TEXT.encode()
    elif kind == "bytes":
        pipeline = draw(st.binary(max_size=64))
    elif kind == "text":
        pipeline = draw(st.text(max_size=64)).encode()
    else:
        pipeline = edited(PIPELINE_TEXT, PIPELINE_EDITS).encode()
    kind = draw(st.sampled_from(["keep", "example", "bytes", "edited", "edited"]))
    if kind == "keep":
        policy = b""
    elif kind == "example":
        policy = POLICY_TEXT.encode()
    elif kind == "bytes":
        policy = draw(st.binary(max_size=64))
    else:
        policy = edited(POLICY_TEXT, POLICY_EDITS).encode()
    return kpb.UploadPipelineRequest(pipeline_toml=pipeline, policy_toml=policy)


def assert_disk_matches_running(kernel) -> None:
    """Nothing an upload wrote clobbered another file: each serving pipeline's file is still its text,
    and each one's policy file still holds a policy (so a restart serves the same pipelines)."""
    registry = kernel.decisions.registry
    for pipeline in registry.all():
        text = Path(pipeline.path).read_bytes()
        assert hashlib.sha256(text).hexdigest() == pipeline.hash, f"{pipeline.path} no longer holds {pipeline.name}"
        policy_path = registry.folder / pipeline.policy.source
        assert "[pipeline]" not in policy_path.read_text().splitlines(), f"{policy_path} now holds a pipeline"


def assert_numbers_are_usable(pipeline) -> None:
    """An accepted pipeline's numbers are finite, its defaults pass its own checks, its SLA is a date."""
    for spec in pipeline.fields:
        for key in ("min", "max", "mean", "std"):
            value = getattr(spec, key)
            assert value is None or math.isfinite(value), f"{spec.name}.{key} = {value}"
        if spec.type in ("number", "integer") and spec.default is not None:
            assert math.isfinite(spec.default) and -(2**63) <= spec.default < 2**63, f"{spec.name}.default = {spec.default}"
            assert spec.min is None or spec.default >= spec.min, f"{spec.name}.default {spec.default} < min {spec.min}"
            assert spec.max is None or spec.default <= spec.max, f"{spec.name}.default {spec.default} > max {spec.max}"
    assert 0 <= pipeline.priority < 2**32, pipeline.priority
    sla_ns = pipeline.escalation.review_sla_s * 1e9
    assert math.isfinite(sla_ns) and time.time_ns() + sla_ns < 2**63, pipeline.escalation.review_sla_s


def restore_example(stubs) -> None:
    code, details, _, _ = call(stubs.admin.UploadPipeline, kpb.UploadPipelineRequest(
        pipeline_toml=PIPELINE_TEXT.encode(), policy_toml=POLICY_TEXT.encode()))
    assert code == Code.OK, f"restoring the example pipeline failed: {code} {details!r}"


# ----------------------------------------------------------------------------- DecisionService
@settings(max_examples=examples(60), **SETTINGS)
@given(request=decision_requests(), deadline=st.one_of(st.just(GUARD_S), st.sampled_from([0.001, 0.05])))
def test_decide_answers_every_request_with_a_specific_status(stubs, request, deadline):
    code, details, decision, elapsed = call(stubs.decisions.Decide, request, deadline)
    check("Decide", code, details, elapsed, deadline)
    if code == Code.OK:
        assert decision.action and decision.pipeline == request.pipeline and not decision.error_code
        assert decision.replayed or decision.audit_hash
    assert_kernel_decides(stubs)


@st.composite
def stream_messages(draw) -> list[bytes]:
    messages = []
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["good", "hostile", "hostile", "bytes"]))
        if kind == "good":
            messages.append(good_request(draw(st.integers(0, 1000)), request_id=f"g{len(messages)}").SerializeToString())
        elif kind == "hostile":
            messages.append(draw(decision_requests()).SerializeToString())
        else:
            messages.append(draw(st.one_of(st.binary(max_size=40), st.just(b"\xff\xff\xff"), st.just(b"\x0a\x05ab"))))
    return messages


@settings(max_examples=examples(25), **SETTINGS)
@given(messages=stream_messages(), deadline=st.one_of(st.just(GUARD_S), st.just(SHORT_S)))
def test_decide_stream_answers_every_message_with_a_specific_code(channel, stubs, messages, deadline):
    rpc = channel.stream_stream("/aios.kernel.v1.DecisionService/DecideStream",
                                request_serializer=None, response_deserializer=kpb.Decision.FromString)
    started = time.monotonic()
    answers = []
    try:
        for answer in rpc(iter(messages), timeout=deadline):
            answers.append(answer)
        code, details = Code.OK, ""
    except grpc.RpcError as exc:
        code, details = exc.code(), exc.details() or ""
    check("DecideStream", code, details, time.monotonic() - started, deadline)
    for answer in answers:
        if answer.error_code:
            assert answer.error_code in ALLOWED_NAMES, f"{answer.error_code}: {answer.error_message!r}"
            assert answer.error_message.strip()
        else:
            assert answer.action and answer.audit_hash or answer.replayed, answer
    if deadline == GUARD_S:  # bad messages are answered one by one: the stream itself goes on to its end
        assert code == Code.OK, f"DecideStream ended {code} {details!r} after {len(answers)} of {len(messages)}"
    if code == Code.OK:
        assert len(answers) == len(messages), f"{len(messages)} messages, {len(answers)} answers"
    assert_kernel_decides(stubs)


# ----------------------------------------------------------------------------- cancelled, expired and large calls
CHARGE_ABOVE = 64 << 10  # kernel/api/payload_budget.py: requests larger than this are charged


def sized_request(seed: int, target: int, **options) -> kpb.DecisionRequest:
    """A good claim whose serialized size is ``target`` bytes (or as near as a length prefix allows), its
    description padded."""
    request = good_request(seed, **options)
    text = request.text_fields["description"]
    pad = target - request.ByteSize()
    request.text_fields["description"] = text + "x" * max(0, pad)
    while request.ByteSize() > target and len(request.text_fields["description"]) > len(text):
        request.text_fields["description"] = request.text_fields["description"][:-1]
    return request


FLIGHT_KEYS = itertools.count()  # a new key for each keyed call: a key used again with another request is refused


def flight_request(k: int, seed: int, kind: str, delta: int, keyed: bool) -> kpb.DecisionRequest:
    """Call ``k`` of a flight: a small claim, an escalated one, or one ``delta`` bytes from the charge threshold;
    with a new idempotency key if ``keyed``."""
    if kind == "near":
        request = sized_request(seed, CHARGE_ABOVE + delta, request_id=f"near-{k}")
    else:
        request = good_request(seed, request_id=f"{kind}-{k}")
    if kind == "escalated":
        request.fields["claim_amount"].number_value = 75000.0
        request.fields["fraud_score"].number_value = 0.2
    if keyed:
        request.idempotency_key = f"flight-{next(FLIGHT_KEYS)}"
    return request


# A few calls in flight at once: (seed, kind, bytes from the threshold, keyed, deadline in s, cancelled after s or
# None).
flights = st.lists(st.tuples(
    st.integers(0, 10_000), st.sampled_from(["small", "escalated", "near", "near"]), st.integers(-40, 40),
    st.booleans(), st.sampled_from([GUARD_S, GUARD_S, 0.005, 0.02, 0.1]),
    st.one_of(st.none(), st.sampled_from([0.0, 0.002, 0.01, 0.05]))), min_size=1, max_size=6)


@settings(max_examples=examples(25), **SETTINGS)
@given(calls=flights)
def test_decide_calls_cancelled_or_expired_in_flight_are_answered_once_and_lose_nothing(kernel, stubs, calls):
    """Decide calls in flight at once, some cancelled by their caller or past their deadline at any moment, some
    just above or below the 64 KiB the payload budget charges: each ends once, OK or CANCELLED /
    DEADLINE_EXCEEDED; a keyed call asked again gets its decision (the same audited one if it had been
    answered); the budget comes back to 0; the kernel decides on."""
    requests = [flight_request(k, *call[:4]) for k, call in enumerate(calls)]
    started = time.monotonic()
    futures = [(stubs.decisions.Decide.future(request, timeout=deadline), request, cancel)
               for request, (*_, deadline, cancel) in zip(requests, calls)]
    for future, _, cancel in sorted(futures, key=lambda f: f[2] if f[2] is not None else math.inf):
        if cancel is not None:
            time.sleep(max(0.0, started + cancel - time.monotonic()))
            future.cancel()
    answered = {}
    for future, request, _ in futures:
        decision, code, details = outcome(future, GUARD_S)
        check("Decide", code, details, 0.0, SHORT_S)
        # (RESOURCE_EXHAUSTED: a deadline of milliseconds the scheduler predicts it cannot meet, with a retry hint)
        assert code in (Code.OK, Code.CANCELLED, Code.DEADLINE_EXCEEDED) or (
            code == Code.RESOURCE_EXHAUSTED and "retry after" in details), f"{request.request_id}: {code} {details!r}"
        if code == Code.OK:
            assert decision.action and (decision.audit_hash or decision.replayed) and not decision.error_code
            answered[request.idempotency_key] = decision
    for _, request, _ in futures:
        if not request.idempotency_key:
            continue
        give_up = time.monotonic() + GUARD_S
        while True:  # the first may still be in flight (its caller gone): ABORTED says when to ask again
            code, details, again, _ = call(stubs.decisions.Decide, request)
            if code != Code.ABORTED or time.monotonic() > give_up:
                break
            time.sleep(0.01)
        assert code == Code.OK and again.action and not again.error_code, f"{request.request_id}: {code} {details!r}"
        first = answered.get(request.idempotency_key)
        if first is not None:
            assert again.replayed and (again.audit_sequence, again.action) == (first.audit_sequence, first.action)
    payload = kernel.service.payload
    deadline = time.monotonic() + GUARD_S
    while payload.held:  # the calls' ends give their charges back as their handlers finish
        assert time.monotonic() < deadline, f"{payload.held} bytes still charged after every call ended"
        time.sleep(0.01)
    assert_kernel_decides(stubs)


# ----------------------------------------------------------------------------- TaskService
STARTED_TASKS: list[str] = []  # tasks the fuzzer started: checked at the end for how they ended


@settings(max_examples=examples(40), **SETTINGS)
@given(data=st.data(), rpc=st.sampled_from(["StartTask", "StartTask", "GetTask", "CancelTask", "WatchTask",
                                           "ListTasks"]))
def test_task_rpcs_answer_with_a_specific_status(stubs, known, data, rpc):
    if rpc == "ListTasks":
        tenant = data.draw(st.one_of(st.just(""), st.just("acme"), short_texts, HUGE))
        states = data.draw(st.lists(st.one_of(st.integers(0, 6), st.sampled_from([7, 99, -1, 2**31 - 1])),
                                    max_size=4))
        filters = (tenant, sorted(set(states)))
        request = kpb.ListTasksRequest(tenant=tenant, states=states, page_token=data.draw(page_tokens(filters)),
                                       page_size=data.draw(st.one_of(st.integers(0, 3), UINT32)))
        code, details, response, elapsed = call(stubs.tasks.ListTasks, request)
        check(rpc, code, details, elapsed)
        if code == Code.OK:
            assert len(response.tasks) <= max(1, min(request.page_size or 50, 1000))
            assert all(task.state in states for task in response.tasks) or not states
    elif rpc == "StartTask" or not STARTED_TASKS:
        request = kpb.StartTaskRequest()
        if not STARTED_TASKS:  # a plain good claim first, so the check of how tasks ended is never vacuous
            request.request.CopyFrom(good_request(0))
        elif data.draw(st.integers(0, 9)):  # one in ten: no request at all
            request.request.CopyFrom(data.draw(decision_requests()))
        code, details, task, elapsed = call(stubs.tasks.StartTask, request)
        check(rpc, code, details, elapsed)
        if code == Code.OK:
            assert task.task_id and task.state != kpb.TASK_STATE_UNSPECIFIED
            STARTED_TASKS.append(task.task_id)
    else:
        task_id = data.draw(st.one_of(st.sampled_from(known["tasks"]), short_texts, HUGE,
                                      st.sampled_from(["", "0" * 32, known["tasks"][0].upper(), known["tasks"][0] + " "])))
        if rpc == "WatchTask":
            code, details, _, elapsed = drain(stubs.tasks.WatchTask, kpb.TaskRef(task_id=task_id), SHORT_S)
            check(rpc, code, details, elapsed, SHORT_S)
        else:
            code, details, _, elapsed = call(getattr(stubs.tasks, rpc), kpb.TaskRef(task_id=task_id))
            check(rpc, code, details, elapsed)
    assert_kernel_decides(stubs)


# ----------------------------------------------------------------------------- ReviewService
STATES = ["", "OPEN", "open", "CLAIMED", "RESOLVED", "UNRESOLVED", "ALL", "\x00", "résolu"]


@st.composite
def page_tokens(draw, filters: tuple) -> str:
    """Empty, junk, a real token for other filters, or a well-signed token with a hostile position."""
    position = draw(st.one_of(st.integers(-5, 5), st.sampled_from([2**63 - 1, 2**63, 2**64, 10**30, -(2**63)]),
                              st.sampled_from([True, 1.5, 1e400, None, "1", [1], {"a": 1}])))
    return draw(st.one_of(
        st.just(""), short_texts, st.just(paging.encode(position, filters)),
        st.sampled_from(["AAAA", "!!!!", "e30", base64.urlsafe_b64encode(b'{"after": 1}').decode(), "é",
                         base64.urlsafe_b64encode(b"[" * 100_000).decode(), "A" * 100_000]),
    ))


@settings(max_examples=examples(60), **SETTINGS)
@given(data=st.data(), rpc=st.sampled_from(["ListReviews", "ListReviews", "GetReview", "ClaimReview", "ClaimNextReview",
                                           "ResolveReview", "WatchReviews"]))
def test_review_rpcs_answer_with_a_specific_status(stubs, known, data, rpc):
    review_ids = st.one_of(st.sampled_from(known["reviews"]), short_texts, HUGE, st.just(""))
    reviewers = st.one_of(st.sampled_from(["alice", "bob", ""]), short_texts, HUGE)
    if rpc == "ListReviews":
        pipeline, tenant = data.draw(st.one_of(st.just(""), names)), data.draw(st.one_of(st.just(""), short_texts))
        state = data.draw(st.one_of(st.sampled_from(STATES), short_texts))
        token = data.draw(st.one_of(page_tokens((pipeline, tenant, state.upper())), st.just(known["token"])))
        request = kpb.ListReviewsRequest(pipeline=pipeline, tenant=tenant, state=state, page_token=token,
                                         page_size=data.draw(st.one_of(st.integers(0, 3), UINT32)))
        code, details, response, elapsed = call(stubs.reviews.ListReviews, request)
        check(rpc, code, details, elapsed)
        if code == Code.OK:
            assert len(response.reviews) <= max(1, min(request.page_size or 50, 1000))
    elif rpc == "GetReview":
        code, details, _, elapsed = call(stubs.reviews.GetReview, kpb.ReviewRef(review_id=data.draw(review_ids)))
        check(rpc, code, details, elapsed)
    elif rpc == "ClaimReview":
        request = kpb.ClaimReviewRequest(review_id=data.draw(review_ids), reviewer=data.draw(reviewers),
                                         lease_seconds=data.draw(st.one_of(st.sampled_from([0, 1, 86400, 86401]), UINT32)))
        code, details, _, elapsed = call(stubs.reviews.ClaimReview, request)
        check(rpc, code, details, elapsed)
    elif rpc == "ClaimNextReview":
        request = kpb.ClaimNextReviewRequest(pipeline=data.draw(st.one_of(st.just(""), names)),
                                             tenant=data.draw(st.one_of(st.just(""), short_texts, HUGE)),
                                             reviewer=data.draw(reviewers),
                                             lease_seconds=data.draw(st.one_of(st.sampled_from([0, 1, 86401]), UINT32)))
        code, details, _, elapsed = call(stubs.reviews.ClaimNextReview, request)
        check(rpc, code, details, elapsed)
    elif rpc == "ResolveReview":
        request = kpb.ResolveReviewRequest(review_id=data.draw(review_ids), reviewer=data.draw(reviewers),
                                           action=data.draw(st.one_of(st.sampled_from(ACTIONS), short_texts)),
                                           comment=data.draw(texts))
        code, details, _, elapsed = call(stubs.reviews.ResolveReview, request)
        check(rpc, code, details, elapsed)
    else:
        request = kpb.WatchReviewsRequest(pipeline=data.draw(st.one_of(st.just(""), names)), tenant=data.draw(short_texts),
                                          include_open=data.draw(st.booleans()), updates=data.draw(st.booleans()),
                                          from_sequence=data.draw(st.one_of(st.just(0), st.integers(0, 50), UINT64)))
        code, details, _, elapsed = drain(stubs.reviews.WatchReviews, request, SHORT_S)
        check(rpc, code, details, elapsed, SHORT_S)
    assert_kernel_decides(stubs)


# ----------------------------------------------------------------------------- review listings, claims and resumed watches
TENANTS = ("acme", "globex", "")
REVIEW_PIPELINES = st.sampled_from(["", "claims_triage", "nope"])
REVIEW_TENANTS = st.sampled_from(["", "acme", "globex", "nobody"])
LIST_STATES = st.sampled_from(["", "OPEN", "CLAIMED", "UNRESOLVED", "RESOLVED", "open", "Resolved"])
PRESENTED = {"OPEN": {"OPEN"}, "CLAIMED": {"CLAIMED"}, "UNRESOLVED": {"OPEN", "CLAIMED"}, "RESOLVED": {"RESOLVED"}}


def escalate(stubs, tenant: str, seed: int) -> None:
    """One more review: a large claim decided for ``tenant`` goes to a human."""
    request = good_request(seed, request_id=f"esc-{seed}", tenant=tenant)
    request.fields["claim_amount"].number_value = 75000.0
    request.fields["fraud_score"].number_value = 0.2
    code, details, decision, _ = call(stubs.decisions.Decide, request)
    assert code == Code.OK and decision.review_id, f"{code} {details!r} {decision}"


@pytest.fixture(scope="module")
def reviews_of_tenants(stubs, known):
    """Reviews of two tenants and none, some claimed, one resolved, beside ``known``'s."""
    for k in range(6):
        escalate(stubs, TENANTS[k % 3], 1000 + k)
    stubs.reviews.ClaimNextReview(kpb.ClaimNextReviewRequest(reviewer="seed", tenant="acme", lease_seconds=3600), timeout=10)
    claimed = stubs.reviews.ClaimNextReview(kpb.ClaimNextReviewRequest(reviewer="seed", tenant="globex"), timeout=10)
    stubs.reviews.ResolveReview(kpb.ResolveReviewRequest(review_id=claimed.review_id, reviewer="seed",
                                                         action=claimed.actions[0]), timeout=10)


def every_review(stubs) -> dict[str, kpb.Review]:
    """Every stored review by id, read a page of 1,000 at a time with no filter."""
    found, token = {}, ""
    while True:
        page = stubs.reviews.ListReviews(kpb.ListReviewsRequest(page_size=1000, page_token=token), timeout=GUARD_S)
        for review in page.reviews:
            assert review.review_id not in found, f"{review.review_id} listed twice"
            found[review.review_id] = review
        if not (token := page.next_page_token):
            return found


def matches(review: kpb.Review, pipeline: str, tenant: str, state: str = "") -> bool:
    return ((not pipeline or review.pipeline == pipeline) and (not tenant or review.tenant == tenant)
            and (not state or review.state in PRESENTED[state.upper()]))


def settled(before: dict, after: dict) -> set[str]:
    """The reviews whose state did not change between two walks (a 1-second lease another test took may lapse)."""
    return {rid for rid, review in before.items() if rid in after and after[rid].state == review.state}


@st.composite
def other_tokens(draw, token: str, filters: tuple) -> tuple[str, str]:
    """(how, token): ``token`` truncated or garbled, or a real token of other filters."""
    how = draw(st.sampled_from(["truncated", "garbled", "other_filters"]))
    if how == "truncated":
        return how, token[: draw(st.integers(1, len(token) - 1))]
    if how == "garbled":
        at = draw(st.integers(0, max(0, len(token) - 1)))
        return how, token[:at] + draw(st.sampled_from("AQZaz09-_=+/!é")) + token[at + 1:]
    pipeline, tenant, state = filters
    other = draw(st.sampled_from([(pipeline, "globex" if tenant == "acme" else "acme", state),
                                  ("" if pipeline else "claims_triage", tenant, state),
                                  (pipeline, tenant, "RESOLVED" if state != "RESOLVED" else "OPEN")]))
    return how, paging.encode(draw(st.integers(0, 50)), other)


@settings(max_examples=examples(15), **SETTINGS)
@given(pipeline=REVIEW_PIPELINES, tenant=REVIEW_TENANTS, state=LIST_STATES, size=st.integers(1, 4), data=st.data())
def test_review_pages_with_any_filter_list_what_a_walk_finds(stubs, reviews_of_tenants, pipeline, tenant, state, size,
                                                             data):
    """Paged with any filters (schema 10's index ranges), ListReviews lists exactly the matching reviews a walk of
    every review finds, oldest first, none twice; a token truncated, garbled or issued for other filters is
    refused naming page_token (a garbled one may still be a token: then it is a page like any)."""
    before = every_review(stubs)
    listed, token, pages = [], "", 0
    while True:
        if token and pages < 8 and data.draw(st.integers(0, 3)) == 0:  # (a bounded draw: the pages may be many)
            how, bad = data.draw(other_tokens(token, (pipeline, tenant, state.upper())))
            note(f"{how} token {bad!r}")
            code, details, _, elapsed = call(stubs.reviews.ListReviews, kpb.ListReviewsRequest(
                pipeline=pipeline, tenant=tenant, state=state, page_size=size, page_token=bad))
            check("ListReviews", code, details, elapsed)
            if how != "garbled" or code != Code.OK:
                assert code == Code.INVALID_ARGUMENT and "page_token" in details, f"{how}: {code} {details!r}"
        code, details, page, elapsed = call(stubs.reviews.ListReviews, kpb.ListReviewsRequest(
            pipeline=pipeline, tenant=tenant, state=state, page_size=size, page_token=token))
        check("ListReviews", code, details, elapsed)
        if pipeline == "nope":  # a pipeline that is not loaded may still be named: it lists nothing
            assert code in (Code.OK, Code.INVALID_ARGUMENT), details
        if code != Code.OK:
            assert tenant or pipeline, f"ListReviews with good filters: {code} {details!r}"
            return
        assert len(page.reviews) <= size
        listed += page.reviews
        pages += 1
        assert pages <= len(before) + 50, "paging does not end"
        if not (token := page.next_page_token):
            break
    after = every_review(stubs)
    ids = [review.review_id for review in listed]
    assert len(ids) == len(set(ids)), f"listed twice: {ids}"
    sequences = [review.sequence for review in listed]
    assert sequences == sorted(sequences), f"not oldest first: {sequences}"
    stable = settled(before, after)
    want = {rid for rid in stable if matches(after[rid], pipeline, tenant, state)}
    got = {rid for rid in ids if rid in stable}
    assert got == want, f"missing {sorted(want - got)}, not matching {sorted(got - want)}"
    for review in listed:
        assert matches(review, pipeline, tenant, state) or review.review_id not in stable, review


@settings(max_examples=examples(12), **SETTINGS)
@given(pipeline=REVIEW_PIPELINES, tenant=REVIEW_TENANTS, more=st.sampled_from(TENANTS + (None, None)),
       lease=st.sampled_from([0, 3600, 86400]), data=st.data())
def test_claim_next_review_with_any_filter_takes_the_oldest_open_match(stubs, reviews_of_tenants, pipeline, tenant,
                                                                      more, lease, data):
    """ClaimNextReview with any filters claims the oldest OPEN review matching them (as a walk finds it), or
    answers NOT_FOUND when none does; a claimed one is listed CLAIMED by its reviewer."""
    if more is not None:
        escalate(stubs, more, data.draw(st.integers(2000, 10**6)))
    before = every_review(stubs)
    code, details, review, elapsed = call(stubs.reviews.ClaimNextReview, kpb.ClaimNextReviewRequest(
        pipeline=pipeline, tenant=tenant, reviewer="fuzz-claims", lease_seconds=lease))
    check("ClaimNextReview", code, details, elapsed)
    after = every_review(stubs)
    stable = settled(before, after)
    waiting = sorted((r.sequence, r.review_id) for r in before.values()
                     if r.state == "OPEN" and matches(r, pipeline, tenant))
    if code == Code.NOT_FOUND:
        assert not [rid for _, rid in waiting if rid in stable], f"{waiting} were open: {details!r}"
        return
    assert code == Code.OK, f"{code} {details!r}"
    assert matches(review, pipeline, tenant) and review.state == "CLAIMED" and review.claimed_by == "fuzz-claims"
    assert after[review.review_id].state == "CLAIMED"
    older = [rid for sequence, rid in waiting if sequence < review.sequence and rid in stable]
    assert not older, f"claimed {review.review_id} (sequence {review.sequence}) before older open {older}"


def read_watch(stubs, request: kpb.WatchReviewsRequest, want: set[int], highest: int, timeout: float = 10.0):
    """(code, details, reviews) of a watch read until every sequence in ``want`` came (then cancelled), or its end;
    reviews stored after ``highest`` (another test's tasks, escalated meanwhile) are left out."""
    stream = stubs.reviews.WatchReviews(request, timeout=timeout if want else 0.1)  # (nothing to wait for)
    got, seen = [], set()
    try:
        for review in stream:
            if review.sequence <= highest:
                got.append(review)
                seen.add(review.sequence)
            if want <= seen:
                stream.cancel()
                break
        return Code.OK, "", got
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or "", got


@settings(max_examples=examples(15), **SETTINGS)
@given(pipeline=REVIEW_PIPELINES, tenant=REVIEW_TENANTS, include_open=st.booleans(), updates=st.booleans(),
       data=st.data())
def test_a_watch_resumed_anywhere_sends_what_a_full_watch_does(stubs, reviews_of_tenants, pipeline, tenant,
                                                               include_open, updates, data):
    """WatchReviews with any resume point and filters: a clear refusal (INVALID_ARGUMENT naming from_sequence past
    the newest + 1 or beside include_open), or every matching review stored since, oldest first, each once; and a
    watch cut anywhere and resumed from the highest sequence received + 1 sends, with what it had, exactly what
    the uncut watch sent."""
    before = every_review(stubs)
    highest = max(review.sequence for review in before.values())
    start = data.draw(st.one_of(st.just(0), st.just(1), st.integers(1, highest + 1),
                                st.sampled_from([highest, highest + 1, highest + 2, 2**63 - 1, 2**63, 2**64 - 1])))
    note(f"highest {highest}, from {start}")
    request = kpb.WatchReviewsRequest(pipeline=pipeline, tenant=tenant, include_open=include_open, updates=updates,
                                      from_sequence=start)
    if start:
        want = {r.sequence for r in before.values() if r.sequence >= start and matches(r, pipeline, tenant)}
    elif include_open:
        want = {r.sequence for r in before.values() if matches(r, pipeline, tenant, "UNRESOLVED")}
    else:
        want = set()
    code, details, got = read_watch(stubs, request, want, highest)
    check("WatchReviews", code, details, 0.0, SHORT_S)
    if start and include_open:
        assert code == Code.INVALID_ARGUMENT and "from_sequence" in details, f"{code} {details!r}"
        return
    if start > highest + 1:
        assert code == Code.INVALID_ARGUMENT and "from_sequence" in details, f"{code} {details!r}"
        return
    if pipeline == "nope" and code == Code.INVALID_ARGUMENT:
        return
    sequences = [review.sequence for review in got]
    assert code in (Code.OK, Code.DEADLINE_EXCEEDED), f"{code} {details!r} after {sequences}"
    assert all(matches(review, pipeline, tenant) for review in got), got
    if not start and include_open:  # the waiting ones as they are now: one resolved meanwhile may be left out
        assert sequences == sorted(set(sequences)), f"not in the order stored, or twice: {sequences}"
        after = every_review(stubs)
        stable = settled(before, after)
        missing = {before[rid].sequence for rid in stable if before[rid].sequence in want} - set(sequences)
        assert not missing, f"the backlog left out {sorted(missing)}; sent {sequences}"
        resolved = {before[rid].sequence for rid in stable} - want
        assert not resolved & set(sequences), f"the backlog sent resolved ones: {sorted(resolved & set(sequences))}"
        return
    if updates:  # a change to one already sent may come too
        assert want <= set(sequences), f"missed {sorted(want - set(sequences))}; sent {sequences}"
        return
    assert sequences == sorted(want), f"sent {sequences}, stored since: {sorted(want)}"
    if start and sequences:  # cut after k, resume from the highest received + 1
        k = data.draw(st.integers(0, len(sequences)))
        resume = sequences[k - 1] + 1 if k else start
        rest = {s for s in want if s >= resume}
        code, details, again = read_watch(stubs, kpb.WatchReviewsRequest(
            pipeline=pipeline, tenant=tenant, updates=updates, from_sequence=resume), rest, highest)
        assert code in (Code.OK, Code.DEADLINE_EXCEEDED), f"resumed from {resume}: {code} {details!r}"
        assert sequences[:k] + [r.sequence for r in again] == sequences, (
            f"cut after {k}, resumed from {resume}: {[r.sequence for r in again]}; uncut: {sequences}")


# ----------------------------------------------------------------------------- AuditService
@settings(max_examples=examples(60), **SETTINGS)
@given(data=st.data(), rpc=st.sampled_from(["StreamAudit", "StreamAudit", "GetInclusionProof", "GetConsistencyProof",
                                           "GetCheckpoint", "GetPublicKey"]))
def test_audit_rpcs_answer_with_a_specific_status(stubs, data, rpc):
    small = st.integers(0, 40)
    sizes = st.one_of(small, UINT64, st.sampled_from([2**63 - 1, 2**63, 2**64 - 1]))
    if rpc == "StreamAudit":
        times = st.one_of(st.just(0), INT64, st.sampled_from([1, time.time_ns(), -1, 2**63 - 1]))
        request = kpb.StreamAuditRequest(
            from_sequence=data.draw(sizes), follow=data.draw(st.booleans()), tenant=data.draw(short_texts),
            pipeline=data.draw(st.one_of(st.just(""), names)),
            kind=data.draw(st.one_of(st.integers(0, 9), st.integers(-(2**31), 2**31 - 1))),
            since_unix_ns=data.draw(times), until_unix_ns=data.draw(times),
        )
        deadline = SHORT_S if request.follow else GUARD_S
        code, details, records, elapsed = drain(stubs.audit.StreamAudit, request, deadline)
        check(rpc, code, details, elapsed, deadline)
        assert all(r.sequence >= request.from_sequence for r in records)
    elif rpc == "GetInclusionProof":
        request = kpb.InclusionProofRequest(sequence=data.draw(sizes), tree_size=data.draw(sizes))
        code, details, proof, elapsed = call(stubs.audit.GetInclusionProof, request)
        check(rpc, code, details, elapsed)
        if code == Code.OK:
            assert proof.leaf_index == request.sequence < proof.tree_size
    elif rpc == "GetConsistencyProof":
        request = kpb.ConsistencyProofRequest(old_size=data.draw(sizes), new_size=data.draw(sizes))
        code, details, proof, elapsed = call(stubs.audit.GetConsistencyProof, request)
        check(rpc, code, details, elapsed)
        if code == Code.OK:
            assert 1 <= proof.old_size <= proof.tree_size
    else:
        message = kpb.CheckpointRequest() if rpc == "GetCheckpoint" else kpb.PublicKeyRequest()
        code, details, _, elapsed = call(getattr(stubs.audit, rpc), message)
        assert code == Code.OK, f"{rpc}: {code} {details!r}"
    assert_kernel_decides(stubs)


# ----------------------------------------------------------------------------- AdminService
@settings(max_examples=examples(60), **SETTINGS)
@given(request=upload_requests(), data=st.data())
def test_upload_pipeline_refuses_bad_text_with_a_specific_status(kernel, stubs, request, data):
    code, details, info, elapsed = call(stubs.admin.UploadPipeline, request)
    check("UploadPipeline", code, details, elapsed)
    if code == Code.OK:
        note(f"accepted: {info}")
        try:
            assert_disk_matches_running(kernel)
            assert_numbers_are_usable(kernel.decisions.registry.get(info.name))
            # What an upload accepted must also serve: a good case, all defaults, a large
            # (escalated) claim, and hostile requests.
            escalated = good_request(request_id="large")
            escalated.fields["claim_amount"].number_value = 75000.0
            cases = [good_request(), kpb.DecisionRequest(), escalated, data.draw(decision_requests()),
                     data.draw(decision_requests())]
            for decide in cases:
                decide.pipeline = info.name
                code, details, _, elapsed = call(stubs.decisions.Decide, decide)
                check(f"Decide on the uploaded {info.name}", code, details, elapsed)
        finally:
            restore_example(stubs)
    for rpc, message in (("ListPipelines", kpb.ListPipelinesRequest()), ("ListModels", kpb.ListModelsRequest())):
        code, details, _, _ = call(getattr(stubs.admin, rpc), message)
        assert code == Code.OK, f"{rpc}: {code} {details!r}"
    assert_kernel_decides(stubs)


# ----------------------------------------------------------------------------- any RPC, any bytes
METHODS = [(service, method) for service in kpb.DESCRIPTOR.services_by_name.values() for method in service.methods]




def _tag(number: int, wire_type: int) -> bytes:
    return encode_varint(number << 3 | wire_type)


def _wire_junk(message) -> list[bytes]:
    """Field encodings a parser may refuse or keep as unknown fields, for each field of ``message`` (a
    descriptor): every other wire type, groups (nested too), lengths past the end, invalid UTF-8, a varint too
    long, and fields this message does not have."""
    junk = [_tag(999, 3) * 30 + _tag(999, 4) * 30, _tag(999, 0) + b"\x01", _tag(2**29 - 1, 2) + b"\x00",
            _tag(999, 3), _tag(999, 4), b"\x80", b"\xff" * 11]
    for field in message.fields:
        n = field.number
        junk += [_tag(n, 0) + b"\xff" * 9 + b"\x01", _tag(n, 1) + bytes(8), _tag(n, 5) + bytes(4), _tag(n, 3) + _tag(n, 4),
                 _tag(n, 2) + encode_varint(2**31), _tag(n, 2) + b"\x03\xff\xfe\xfd", _tag(n, 6), _tag(n, 0) + b"\xff" * 11]
    return junk


_CLAIM = good_request(5).SerializeToString()
# A well-formed request of each method's type that junk is appended to: a whole claim where the method takes one.
_SEED = {"DecisionRequest": _CLAIM, "StartTaskRequest": b"\x0a" + encode_varint(len(_CLAIM)) + _CLAIM}


@st.composite
def hostile_wire(draw, method) -> bytes:
    """A good message of the method's request type (or none) with parser-hostile fields after it."""
    head = draw(st.sampled_from([b"", _SEED.get(method.input_type.name, b"")]))
    return head + b"".join(draw(st.lists(st.sampled_from(_wire_junk(method.input_type)), min_size=1, max_size=3)))


@settings(max_examples=examples(80), **SETTINGS)
@given(target=st.sampled_from(METHODS), data=st.data())
def test_raw_bytes_to_every_rpc_get_a_specific_status(channel, stubs, target, data):
    service, method = target
    raw = data.draw(st.one_of(
        st.binary(max_size=48), st.sampled_from([b"\xff\xff\xff", b"\x0a", b"\x0a\xff\xff\xff\xff\x0f", b"\x08\x80\x80\x80"]),
        hostile_wire(method),
    ))
    path = f"/{service.full_name}/{method.name}"
    started = time.monotonic()
    deadline = SHORT_S if method.server_streaming and not method.client_streaming else GUARD_S
    try:
        if method.client_streaming:
            rpc = channel.stream_stream(path, request_serializer=lambda b: b, response_deserializer=lambda b: b)
            replies = list(rpc(iter([raw, raw]), timeout=deadline))
        elif method.server_streaming:
            rpc = channel.unary_stream(path, request_serializer=lambda b: b, response_deserializer=lambda b: b)
            replies = list(rpc(raw, timeout=deadline))
        else:
            rpc = channel.unary_unary(path, request_serializer=lambda b: b, response_deserializer=lambda b: b)
            replies = [rpc(raw, timeout=deadline)]
        code, details = Code.OK, ""
    except grpc.RpcError as exc:
        code, details, replies = exc.code(), exc.details() or "", []
    check(path, code, details, time.monotonic() - started, deadline)
    if method.name == "DecideStream":  # each message answered, the stream ends OK
        assert code == Code.OK and len(replies) == 2, f"{code} {details!r} after {len(replies)} answers"
        for reply in replies:
            answer = kpb.Decision.FromString(reply)
            assert not answer.error_code or answer.error_code in ALLOWED_NAMES, answer
    if method.name == "UploadPipeline" and code == Code.OK:
        restore_example(stubs)
    assert_kernel_decides(stubs)


# ----------------------------------------------------------------------------- afterwards
def test_no_watch_outlives_its_call(kernel, stubs, known):
    """Every WatchReviews/WatchTask above ended (deadline, cancel): no subscription is left behind."""
    side = kernel.decisions
    deadline = time.monotonic() + 10
    while side.reviews.watcher_count() or any(side.tasks.store.watcher_count(t) for t in known["tasks"]):
        assert time.monotonic() < deadline, "watch subscriptions left open after their calls ended"
        time.sleep(0.05)


def test_no_fuzzed_task_failed_with_an_internal_error(stubs):
    """A task runs its request later, off the call: a caller's mistake found then must still end the
    task with a specific code in ``Task.error``, never an internal error (an exception's name). Run without the
    fuzzer before it (``-k``, another order), it checks a plain good claim's task of its own, so it still asserts
    something (a test-suite audit: it failed when run alone)."""
    if not STARTED_TASKS:
        code, details, task, _ = call(stubs.tasks.StartTask, kpb.StartTaskRequest(request=good_request(0)))
        assert code == Code.OK, details
        STARTED_TASKS.append(task.task_id)
    for task_id in STARTED_TASKS:
        for task in stubs.tasks.WatchTask(kpb.TaskRef(task_id=task_id), timeout=GUARD_S):
            if task.state not in (kpb.QUEUED, kpb.RUNNING):
                break
        assert task.state != kpb.FAILED or task.error.split(":")[0] in ALLOWED_NAMES, task
    STARTED_TASKS.clear()  # the other front end's kernel starts its own


def test_audit_log_still_verifies(kernel, stubs):
    assert_kernel_decides(stubs)
    result = verify_directory(Path(kernel.settings.data_dir) / "audit")
    assert result.ok, result


# ----------------------------------------------------------------------------- regressions: bugs found here, fixed since
def expect_code(method, request, code: Code, *needles: str) -> str:
    got, details, _, _ = call(method, request)
    assert got == code and all(n in details for n in needles), f"{got} {details!r}"
    return details


def test_page_tokens_beyond_what_sqlite_or_json_can_hold_are_invalid_argument(stubs):
    """Regression (found by this file): ListReviews answered INTERNAL for a well-signed page token
    whose position is >= 2**63 ("OverflowError: Python int too large to convert to SQLite
    INTEGER"), and for a token of deeply nested JSON (RecursionError from json.loads). Repro:
    page_token = paging.encode(2**63, ("", "", "")) with empty filters, or
    base64(b"[" * 100000). Fixed in kernel/paging.py (int64 positions only, short tokens)."""
    for token in (paging.encode(2**63, ("", "", "")), paging.encode(True, ("", "", "")),
                  base64.urlsafe_b64encode(b"[" * 100_000).decode(), base64.urlsafe_b64encode(b"[" * 370).decode()):
        expect_code(stubs.reviews.ListReviews, kpb.ListReviewsRequest(page_token=token), Code.INVALID_ARGUMENT, "page_token")
    last = paging.encode(2**63 - 1, ("", "", ""))  # the largest position is fine: an empty page
    assert not stubs.reviews.ListReviews(kpb.ListReviewsRequest(page_token=last), timeout=10).reviews


def _named(name: str) -> str:
    return PIPELINE_TEXT.replace('name = "claims_triage"\nversion = "2026', f'name = "{name}"\nversion = "2026')


def _policy_file(name: str, text: str = PIPELINE_TEXT) -> str:
    return text.replace('file = "policy.toml"', f'file = "{name}"')


@pytest.mark.parametrize("pipeline, policy, needle", [
    (_policy_file("a\\u0000b.toml"), POLICY_TEXT, "[policy].file"),
    (_policy_file("p" * 300 + ".toml"), POLICY_TEXT, "[policy].file"),
    (_policy_file(""), POLICY_TEXT, "[policy].file"),
    (_policy_file(""), "", "[policy].file"),
    (_named("n" * 300), "", "[pipeline].name"),
    (_named("policy"), "", "[pipeline].name"),  # would have overwritten the policy file
    (_policy_file("claims_triage.toml", _named("other")), POLICY_TEXT, "[policy].file"),  # ... the pipeline file
], ids=["nul", "long-policy-name", "empty-policy-name", "empty-policy-name-no-text", "long-pipeline-name",
        "pipeline-over-policy", "policy-over-pipeline"])
def test_upload_writes_only_files_of_its_own(kernel, stubs, pipeline, policy, needle):
    """Regression (found by this file): UploadPipeline wrote uploaded text to files named by it
    without checking the names. A [policy].file with NUL or over 255 bytes, or a pipeline name
    over 255 bytes, answered INTERNAL (ValueError "embedded null byte", OSError ENAMETOOLONG);
    `file = ""` wrote ".<folder>.tmp" into the folder's *parent*, then failed INTERNAL; a pipeline
    named "policy" was accepted and overwrote policy.toml with pipeline text, and a pipeline
    naming `file = "claims_triage.toml"` with policy text overwrote that pipeline's file — both
    serving on, and lost at the next restart. Fixed in kernel/pipelines/registry.py."""
    folder = kernel.decisions.registry.folder

    def files() -> dict:  # the pipeline folder, and the folder it is in (where a stray temp file went)
        return {p: p.read_bytes() for p in [*folder.iterdir(), *folder.parent.iterdir()] if p.is_file()}

    before = files()
    expect_code(stubs.admin.UploadPipeline, kpb.UploadPipelineRequest(
        pipeline_toml=pipeline.encode(), policy_toml=policy.encode()), Code.INVALID_ARGUMENT, needle, "keeps serving")
    assert files() == before
    assert_disk_matches_running(kernel)
    assert_kernel_decides(stubs)


@pytest.mark.parametrize("old, new, needle", [
    ("priority = 0", "priority = 99999999999999999999", "[model].priority"),
    ("review_sla_s = 14400", "review_sla_s = inf", "[escalation].review_sla_s"),
    ("review_sla_s = 14400", "review_sla_s = 1e300", "[escalation].review_sla_s"),
    ("min_confidence = 0.6", "min_confidence = 1" + "0" * 400, "[escalation].min_confidence"),
    ("min = 0.0", "min = nan", "#1.min"),
    ("min = 0.0", "min = 1" + "0" * 400, "#1.min"),
    ("mean = 8.125689", "mean = nan", "#1.mean"),
    ("default = 3419.2", "default = inf", "#1.default"),
    ("default = 28", "default = 99999999999999999999999", "#2.default"),
    ("default = 28", "default = -5", "#2.default"),
])
def test_upload_refuses_numbers_the_kernel_cannot_use(stubs, old, new, needle):
    """Regression (found by this file): UploadPipeline accepted these numbers, and then decisions
    through the pipeline failed INTERNAL: priority > 2**63 (OverflowError building the scheduler's
    WorkItem), review_sla_s inf or 1e300 (every escalated case: OverflowError opening its review,
    after its audit record was written), a min of nan (ranges silently off, then log1p(-5): "math
    domain error"), an integer default beyond int64 (ValueError writing the audit record). TOML
    integers beyond any float (min, min_confidence) failed the upload itself INTERNAL (OverflowError
    in float()). Defaults outside the field's own range and non-finite means were accepted as well. Fixed in
    kernel/pipelines/spec.py: finite numbers, defaults pass the field's own checks, bounded
    priority and SLA."""
    assert old in PIPELINE_TEXT
    expect_code(stubs.admin.UploadPipeline, kpb.UploadPipelineRequest(pipeline_toml=PIPELINE_TEXT.replace(old, new, 1).encode()),
                Code.INVALID_ARGUMENT, needle)
    assert_kernel_decides(stubs)


def test_values_an_unbounded_field_cannot_encode_are_named(channel, stubs):
    """Regression (found by this file): with a pipeline that leaves a field unbounded (valid: min
    and max are optional), a claim_amount of -5 (log1p-encoded) answered INTERNAL ("math domain
    error"); fraud_score = 1e300 became inf in the float32 model input, the scores NaN, and the
    whole policy group failed INVALID_ARGUMENT "field 'confidence' ... must be present in every
    row" — naming no field of the request, and failing the other decisions of its group too;
    policy_age_months = 1e300 (a number for an integer field) did the same. Fixed in
    kernel/pipelines/fields.py (log1p domain, int64 integers, float32 range), each named."""
    unbounded = PIPELINE_TEXT.replace("min = 0.0\n", "", 1).replace("max = 1.0\n", "", 1).replace("max = 1200\n", "", 1)
    code, details, _, _ = call(stubs.admin.UploadPipeline, kpb.UploadPipelineRequest(pipeline_toml=unbounded.encode()))
    assert code == Code.OK, details
    try:
        cases = [("claim_amount", -5.0, "> -1"), ("fraud_score", 1e300, "float32"), ("policy_age_months", 1e300, "64-bit")]
        for name, value, needle in cases:
            request = good_request()
            request.fields[name].number_value = value
            expect_code(stubs.decisions.Decide, request, Code.INVALID_ARGUMENT, f"field '{name}'", needle)
        # On a stream the bad ones are answered by name and the good ones around them are decided.
        stream = [good_request(1, request_id="good-1")]
        for name, value, _ in cases:
            stream.append(good_request(2, request_id=f"bad-{name}"))
            stream[-1].fields[name].number_value = value
        stream.append(good_request(3, request_id="good-3"))
        answers = {a.request_id: a for a in stubs.decisions.DecideStream(iter(stream), timeout=GUARD_S)}
        assert answers.keys() == {r.request_id for r in stream}
        for name, _, _ in cases:
            assert answers[f"bad-{name}"].error_code == "INVALID_ARGUMENT" and name in answers[f"bad-{name}"].error_message
        assert not answers["good-1"].error_code and not answers["good-3"].error_code
    finally:
        restore_example(stubs)
    assert_kernel_decides(stubs)


def test_a_message_that_does_not_parse_is_answered_and_the_stream_goes_on(channel, stubs):
    """Regression (found by this file): one DecideStream message whose bytes are not a
    DecisionRequest ended the whole stream INVALID_ARGUMENT, on both front ends, and every message
    after it went unanswered (rpc.py raised from the request iterator, which the stream reads as
    "the request stream itself broke"). Repro: stream_stream with identity serializers, messages
    [good g0, b'\\xff\\xff\\xff', good g2] -> INVALID_ARGUMENT "...Wire format was corrupt" after at
    most one answer. Now: three answers, the bad one INVALID_ARGUMENT, and the stream ends OK.
    Fixed in kernel/api/rpc.py (client streams hand such messages on) and kernel/pipelines/stream.py."""
    rpc = channel.stream_stream("/aios.kernel.v1.DecisionService/DecideStream",
                                request_serializer=None, response_deserializer=kpb.Decision.FromString)
    messages = [good_request(1, request_id="g0").SerializeToString(), b"\xff\xff\xff",
                good_request(2, request_id="g2").SerializeToString()]
    answers = {a.request_id: a for a in rpc(iter(messages), timeout=GUARD_S)}
    assert answers.keys() == {"g0", "", "g2"}, answers
    assert answers[""].error_code == "INVALID_ARGUMENT" and "DecisionRequest" in answers[""].error_message
    assert not answers["g0"].error_code and not answers["g2"].error_code
    assert_kernel_decides(stubs)


# A good request's bytes with one of these after them still parse (each kept as an unknown field); the case is
# decided as if they were not there. 0x29/0x28/0x2d/0x2b: the `fields` map (5) as fixed64/varint/fixed32/group.
UNKNOWN_FIELD_TAILS = [b"\x29" + bytes(8), b"\x28\x01", b"\x2d" + bytes(4), b"\x2b\x2c",
                       b"\xbb\x3e" * 3 + b"\xbc\x3e" * 3]  # field 999's groups, nested


@pytest.mark.parametrize("tail", UNKNOWN_FIELD_TAILS, ids=["fixed64", "varint", "fixed32", "group", "nested-groups"])
def test_unknown_fields_in_a_request_do_not_fail_its_decision(channel, stubs, tail):
    """Regression (found by a raw-bytes campaign): Decide on a good claim's bytes followed by any of these
    answered INTERNAL ("internal error (request id ...)"), after the model had run, on both front ends;
    DecideStream answered INTERNAL for the message, and a StartTask with it ended FAILED "INTERNAL: ...". The
    audit record's inputs are re-tagged from the request's serialized bytes (kernel/wire.py retag), which
    raised "field 5 is not length-delimited" / "wire type 3" on the unknown fields the parser had kept.
    Fixed in kernel/wire.py and ext/wire.pyx: retag skips them, as the parser did."""
    raw = good_request(11, request_id="unknown-tail").SerializeToString() + tail
    decide = channel.unary_unary("/aios.kernel.v1.DecisionService/Decide",
                                 request_serializer=None, response_deserializer=kpb.Decision.FromString)
    decision = decide(raw, timeout=GUARD_S)
    assert decision.action and decision.audit_hash and not decision.error_code
    stream = channel.stream_stream("/aios.kernel.v1.DecisionService/DecideStream",
                                   request_serializer=None, response_deserializer=kpb.Decision.FromString)
    answers = list(stream(iter([raw]), timeout=GUARD_S))
    assert len(answers) == 1 and not answers[0].error_code, answers
    start = channel.unary_unary("/aios.kernel.v1.TaskService/StartTask",
                                request_serializer=None, response_deserializer=kpb.Task.FromString)
    task_id = start(b"\x0a" + encode_varint(len(raw)) + raw, timeout=GUARD_S).task_id  # StartTaskRequest.request
    for task in stubs.tasks.WatchTask(kpb.TaskRef(task_id=task_id), timeout=GUARD_S):
        if task.state not in (kpb.QUEUED, kpb.RUNNING):
            break
    assert task.state == kpb.SUCCEEDED, task
