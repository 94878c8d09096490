"""What careless or hostile input may cost the kernel: bounded identifiers and text, bounded and escaped error
messages, log lines no id can forge, model names that never reach the file system, and a decision made after
its caller's deadline that a retry with its idempotency key gets back instead of deciding it again.

Real kernels over real gRPC, on both front ends: the claims pipeline (``claims_kernel``) for decisions and
reviews, conftest's test repository (``kernel``) for the Open Inference Protocol.
"""

from __future__ import annotations

import logging
import pathlib
import re
import time

import grpc
import numpy as np
import pytest

from claims_support import claim_request
from examples.claims import data
from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
from kernel._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc
from kernel._proto.inference import grpc_service_pb2 as pb
from kernel.errors import MAX_DETAILS_BYTES, NotFound, clamp, quote
from kernel.limits import MAX_TEXT_FIELD_BYTES
from lane_support import request_for

Code = grpc.StatusCode
TIMEOUT_S = 30
MIB = 1 << 20
BIG_CHANNEL = [("grpc.max_send_message_length", 64 * MIB), ("grpc.max_receive_message_length", 64 * MIB)]


# ----------------------------------------------------------------------------- helpers
@pytest.fixture
def claims(claims_kernel):
    with grpc.insecure_channel(f"127.0.0.1:{claims_kernel.port}", options=BIG_CHANNEL) as channel:
        class Stubs:
            kernel = claims_kernel
            decisions = kgrpc.DecisionServiceStub(channel)
            tasks = kgrpc.TaskServiceStub(channel)
            reviews = kgrpc.ReviewServiceStub(channel)

        yield Stubs


@pytest.fixture
def kernel_logs(caplog):
    """The kernel's log records (its ``aios`` loggers may not propagate to the root, where caplog listens)."""
    logger = logging.getLogger("aios")
    logger.addHandler(caplog.handler)
    try:
        yield caplog
    finally:
        logger.removeHandler(caplog.handler)


def refused(call, request, timeout: float = TIMEOUT_S) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=timeout)
    return info.value.code(), info.value.details() or ""


def case_request(seed: int = 5, **options) -> kpb.DecisionRequest:
    case = data.generate_cases(1, seed=seed)[0]
    return claim_request(case, text={"description": case["description"]}, **options)


def escalated_request(seed: int = 5, **options) -> kpb.DecisionRequest:
    """A claim the policy sends to a person (R04: a large claim)."""
    request = case_request(seed, **options)
    request.fields["claim_amount"].number_value = 75000.0
    request.fields["fraud_score"].number_value = 0.2
    return request


def work_done(kernel) -> tuple[int, int]:
    """(audit records, rows the claims model has run): what a refused request must not change."""
    return kernel.decisions.audit.size, kernel.hub.get("claims_triage").stats.inference_count


def decision_records(kernel, key: str, since: int) -> list:
    return [r for r in kernel.decisions.audit.read(from_sequence=since, kind=kpb.DECISION) if r.idempotency_key == key]


def reviews_of(stubs, key: str) -> list:
    listed = stubs.reviews.ListReviews(kpb.ListReviewsRequest(page_size=1000), timeout=TIMEOUT_S)
    return [r for r in listed.reviews if r.request.idempotency_key == key]


# ----------------------------------------------------------------------------- 1. tenant, request_id
BAD_IDENTIFIERS = [
    ("tenant", "t" * 129, "tenant must be at most 128 characters"),
    ("request_id", "r" * 257, "request_id must be at most 256 characters"),
    ("tenant", "acme\nINFO forged line", "tenant must not contain control characters"),
    ("request_id", "id\x1b[2J", "request_id must not contain control characters"),
    ("request_id", "nul\x00", "request_id must not contain control characters"),
    ("tenant", "del\x7f", "tenant must not contain control characters"),
    ("idempotency_key", "k" * 257, "idempotency_key must be at most 256 characters"),
    # (A tasks audit: keys took NUL and other control characters, onto audit records, while tenants did not.)
    ("idempotency_key", "order-1\x00", "idempotency_key must not contain control characters"),
    ("idempotency_key", "k\nINFO forged line", "idempotency_key must not contain control characters"),
    # (A security review: C1 controls, line separators and direction overrides passed, though a tenant is shown to
    # reviewers and every one of these goes onto audit records: NEL ends a line for str.splitlines, CSI starts
    # a terminal escape, U+202E showed the rest of a `review list` row reversed.)
    ("request_id", "r\x85forged line", "request_id must not contain control characters; it has '\\x85'"),
    ("tenant", "\x9b2Jacme", "tenant must not contain control characters; it has '\\x9b'"),
    ("tenant", "acme\u202egnihton", "tenant must not contain line separators or bidirectional override or isolate "
                                    "characters; it has '\\u202e' (U+202E) at position 4"),
    ("idempotency_key", "k\u2028forged", "idempotency_key must not contain line separators"),
    ("request_id", "id\u2066", "request_id must not contain line separators"),
]


@pytest.mark.parametrize("field, value, needle", BAD_IDENTIFIERS)
def test_an_identifier_over_its_limit_or_with_a_control_character_is_refused_before_any_work(claims, field, value,
                                                                                            needle):
    """Two Decides with 8 MB tenant and request id wrote ~163 MB each (audit log and SQLite) and broke
    ListReviews for every reviewer; now each such request is INVALID_ARGUMENT naming the field, on Decide,
    DecideStream and StartTask, and nothing is recorded, queued or run for it."""
    before = work_done(claims.kernel)
    bad = escalated_request(**{field: value})
    code, details = refused(claims.decisions.Decide, bad)
    assert code == Code.INVALID_ARGUMENT and needle in details, details
    (answer,) = claims.decisions.DecideStream(iter([bad]), timeout=TIMEOUT_S)
    assert answer.error_code == "INVALID_ARGUMENT" and needle in answer.error_message, answer.error_message
    code, details = refused(claims.tasks.StartTask, kpb.StartTaskRequest(request=bad))
    assert code == Code.INVALID_ARGUMENT and f"request.{needle}" in details, details
    assert work_done(claims.kernel) == before


def test_identifiers_at_their_limits_are_decided(claims):
    decision = claims.decisions.Decide(case_request(tenant="t" * 128, request_id="r" * 256,
                                                    idempotency_key="k" * 256), timeout=TIMEOUT_S)
    assert decision.tenant == "t" * 128 and decision.request_id == "r" * 256 and decision.audit_hash
    unicode = claims.decisions.Decide(case_request(tenant="日本" * 64, request_id="é" * 256), timeout=TIMEOUT_S)
    assert unicode.tenant == "日本" * 64 and unicode.audit_hash


# ----------------------------------------------------------------------------- 2. free text
@pytest.mark.parametrize("text, shown", [
    ("x" * (MAX_TEXT_FIELD_BYTES + 1), "at least 1048577 bytes"),
    ("é" * (MAX_TEXT_FIELD_BYTES // 2 + 1), "is 1048578 bytes"),  # fewer characters than the limit: bytes count
    ("y" * (8 * MIB), "at least 8388608 bytes"),
])
def test_a_text_field_over_1_mib_is_refused_naming_the_field_and_the_limit_not_the_text(claims, text, shown):
    """A 60 MB text field was accepted (1.2 GB peak with 8 in flight, other callers waited 1 s)."""
    before = work_done(claims.kernel)
    request = case_request()
    request.text_fields["notes"] = text
    code, details = refused(claims.decisions.Decide, request)
    assert code == Code.INVALID_ARGUMENT, details
    assert "text_fields['notes']" in details and shown in details and "1048576 bytes" in details, details
    assert text[:20] not in details and len(details) < 300
    code, details = refused(claims.tasks.StartTask, kpb.StartTaskRequest(request=request))
    assert code == Code.INVALID_ARGUMENT and "request.text_fields['notes']" in details, details
    assert work_done(claims.kernel) == before


def test_a_text_field_of_exactly_1_mib_is_decided(claims):
    request = case_request()
    request.text_fields["notes"] = "é" * (MAX_TEXT_FIELD_BYTES // 2)  # 1 MiB of UTF-8 in half as many characters
    assert claims.decisions.Decide(request, timeout=TIMEOUT_S).audit_hash


# ----------------------------------------------------------------------------- 3. reviewers and comments
@pytest.fixture
def open_review(claims) -> str:
    decision = claims.decisions.Decide(escalated_request(seed=int(time.monotonic_ns() % 10_000)), timeout=TIMEOUT_S)
    assert decision.review_id, decision
    return decision.review_id


@pytest.mark.parametrize("reviewer, needle", [
    ("r" * 129, "reviewer must be at most 128 characters"),
    ("alice\nbob", "reviewer must not contain control characters"),
    ("\x1b[31mmallory", "reviewer must not contain control characters"),
])
def test_a_reviewer_name_over_128_characters_or_with_control_characters_is_refused(claims, open_review, reviewer,
                                                                                   needle):
    for call, request in [
        (claims.reviews.ClaimReview, kpb.ClaimReviewRequest(review_id=open_review, reviewer=reviewer)),
        (claims.reviews.ResolveReview, kpb.ResolveReviewRequest(review_id=open_review, reviewer=reviewer,
                                                                action="approve")),
    ]:
        code, details = refused(call, request)
        assert code == Code.INVALID_ARGUMENT and needle in details, details
    review = claims.reviews.GetReview(kpb.ReviewRef(review_id=open_review), timeout=TIMEOUT_S)
    assert review.state == "OPEN" and not review.claimed_by


def test_a_comment_over_4096_characters_or_with_control_characters_other_than_newlines_is_refused(claims,
                                                                                                 open_review):
    """A 30 MB comment went into the permanent audit log; a bidirectional override made a comment display in
    another order than it was stored."""
    claims.reviews.ClaimReview(kpb.ClaimReviewRequest(review_id=open_review, reviewer="alice"), timeout=TIMEOUT_S)
    resolve = lambda comment: kpb.ResolveReviewRequest(
        review_id=open_review, reviewer="alice", action="deny", comment=comment)
    for comment, needle in [("c" * 4097, "comment must be at most 4096 characters, got 4097"),
                            ("c" * (30 * MIB), "comment must be at most 4096 characters"),
                            ("fine\x00", "comment must not contain control characters other than newlines"),
                            ("tab\tted", "comment must not contain control characters other than newlines"),
                            ("nel\x85", "comment must not contain control characters other than newlines"),
                            # "Trojan Source": shown as "approve ... fine" while it says something else
                            ("deny \u202eenif si siht\u202c", "bidirectional override or isolate characters"),
                            ("\u2067isolated\u2069", "it has U+2067 at position 0")]:
        code, details = refused(claims.reviews.ResolveReview, resolve(comment))
        assert code == Code.INVALID_ARGUMENT and needle in details, details
        assert len(details) < 300
    reason = "invoice looks forged \u200f(\u05de\u05d6\u05d5\u05d9\u05e3):\n"  # right-to-left text and its mark
    reason += "r" * (4096 - len(reason))
    resolved = claims.reviews.ResolveReview(resolve(reason), timeout=TIMEOUT_S)
    assert resolved.state == "RESOLVED" and resolved.comment == reason


# ----------------------------------------------------------------------------- 5. error messages
def test_an_unknown_4_mb_review_id_is_not_found_with_a_short_message(claims):
    """It was RESOURCE_EXHAUSTED "received metadata size exceeds hard limit": the whole id in the details."""
    code, details = refused(claims.reviews.GetReview, kpb.ReviewRef(review_id="x" * (4 * MIB)))
    assert code == Code.NOT_FOUND, (code, details[:200])
    assert len(details.encode()) <= MAX_DETAILS_BYTES and "more characters" in details, details
    code, details = refused(claims.tasks.GetTask, kpb.TaskRef(task_id="t" * (4 * MIB)))
    assert code == Code.NOT_FOUND and len(details.encode()) <= MAX_DETAILS_BYTES, (code, details[:200])
    code, details = refused(claims.reviews.ListReviews, kpb.ListReviewsRequest(state="s" * (4 * MIB)))
    assert code == Code.INVALID_ARGUMENT and len(details) < 300, (code, details[:200])
    # Quoted in full by a message (kernel/pipelines/registry.py), cut by bytes: gRPC percent-encodes each
    # byte of a non-ASCII character in its header, so 2,000 of them would be 18 KB there.
    request = case_request()
    request.pipeline = "日" * MIB
    code, details = refused(claims.decisions.Decide, request)
    assert code == Code.NOT_FOUND and len(details.encode()) <= MAX_DETAILS_BYTES, (code, details[:200])


def test_a_review_id_with_a_newline_is_shown_escaped_in_the_details(claims):
    code, details = refused(claims.reviews.GetReview, kpb.ReviewRef(review_id="abc\nERROR forged\x1b[0m"))
    assert code == Code.NOT_FOUND
    assert "\n" not in details and "\x1b" not in details and "abc\\nERROR forged\\x1b[0m" in details, details


def test_a_decide_stream_answer_quoting_a_4_mb_name_is_bounded_too(claims):
    """Per-message ``error_message``s (kernel/pipelines/stream.py, the stream pump) read the same bounded
    message as statuses: the error is bounded when it is made (kernel/errors.py)."""
    request = case_request(request_id="long-name")
    request.pipeline = "p\n" * (2 * MIB)
    (answer,) = claims.decisions.DecideStream(iter([request]), timeout=TIMEOUT_S)
    assert answer.error_code == "NOT_FOUND" and len(answer.error_message.encode()) <= MAX_DETAILS_BYTES
    assert "\n" not in answer.error_message and "\\n" in answer.error_message


def test_clamp_and_quote_bound_and_escape():
    assert clamp("plain message") == "plain message"
    long = clamp("x" * 10_000)
    assert len(long.encode()) <= MAX_DETAILS_BYTES and long.endswith("more characters)")
    assert clamp(long) == long  # idempotent
    wide = clamp("日" * 5000)  # 3 bytes each; gRPC percent-encodes each byte in its header
    assert len(wide.encode()) <= MAX_DETAILS_BYTES and clamp(wide) == wide
    assert clamp("a\nb\x1b\u2028") == "a\\nb\\x1b\\u2028"
    assert quote("k-1") == "'k-1'" and quote("a\nb") == "'a\\nb'"
    assert quote("z" * 1000) == repr("z" * 80) + "… (920 more characters)"
    assert NotFound("id " + "q" * 10**6).message.endswith("more characters)")


# ----------------------------------------------------------------------------- 6. log lines
def test_a_request_id_cannot_forge_a_log_line(claims, kernel_logs):
    """Injected: a request id with a newline (one stored before ids were checked) on a request whose model
    scores are not finite, which is logged with its id."""
    engine = claims.kernel.decisions.engine
    pending = engine.prepare(case_request(request_id="plain"), None)
    pending.request_id = "evil\nCRITICAL aios: forged"
    engine.run_blocking(pending)
    pending.item.outputs = [np.full_like(out, np.nan) for out in pending.item.outputs]
    engine.finish([pending])
    lines = [r.getMessage() for r in kernel_logs.records if "non-finite" in r.getMessage()]
    assert lines and all("\n" not in line and "'evil\\nCRITICAL aios: forged'" in line for line in lines), lines


# ----------------------------------------------------------------------------- 7. a decision made too late
def delay_audit(monkeypatch, audit, seconds: float = 1.5) -> None:
    """The injected fault: every audit append waits ``seconds`` first (a slow disk), so that a decision's
    deadline passes after its model has run, while its record is written. ``monkeypatch.undo()`` ends it."""
    append = audit.append_many

    def slow_append(records, write_here=False):
        time.sleep(seconds)
        return append(records, write_here)

    monkeypatch.setattr(audit, "append_many", slow_append)


def test_a_decision_recorded_after_its_deadline_is_kept_under_its_key_and_replayed(claims, monkeypatch):
    """Its deadline passes while its audit record is written: it is recorded, its review opened, its answer
    DEADLINE_EXCEEDED saying so, and its idempotency entry stored, so that retries with the key (30 of them
    with timeout_ms=1 made 24 decisions and 24 reviews) replay it."""
    kernel = claims.kernel
    since = kernel.decisions.audit.size
    key = f"late-{kernel.front_end}"
    delay_audit(monkeypatch, kernel.decisions.audit)
    code, details = refused(claims.decisions.Decide, escalated_request(seed=31, idempotency_key=key,
                                                                       request_id="late-1", timeout_ms=1000))
    monkeypatch.undo()
    assert code == Code.DEADLINE_EXCEEDED, details
    found = re.search(r"recorded at audit sequence (\d+) \(action '(\w+)', escalated to review (\w+)\)", details)
    assert found and f"a retry with the same idempotency_key ('{key}') returns it" in details, details
    sequence, action, review_id = int(found.group(1)), found.group(2), found.group(3)
    for n in range(5):  # retries, however short their deadline, get the recorded decision back
        retry = claims.decisions.Decide(escalated_request(seed=31, idempotency_key=key, request_id=f"late-r{n}",
                                                          timeout_ms=1), timeout=TIMEOUT_S)
        assert retry.replayed and retry.audit_sequence == sequence
    final = claims.decisions.Decide(escalated_request(seed=31, idempotency_key=key), timeout=TIMEOUT_S)
    assert final.replayed and (final.audit_sequence, final.action, final.review_id) == (sequence, action, review_id)
    assert [r.request_id for r in decision_records(kernel, key, since)] == ["late-1"]
    assert [r.review_id for r in reviews_of(claims, key)] == [review_id]


def test_without_a_key_a_late_decision_is_said_to_stand_on_the_record(claims, monkeypatch):
    """...in words and, for a program, in the aios-audit-sequence trailer (a DEADLINE_EXCEEDED without it:
    nothing was decided); a streamed answer carries the sequence in its audit_sequence."""
    delay_audit(monkeypatch, claims.kernel.decisions.audit)
    with pytest.raises(grpc.RpcError) as info:
        claims.decisions.Decide(case_request(seed=32, request_id="late-nokey", timeout_ms=1000), timeout=TIMEOUT_S)
    code, details = info.value.code(), info.value.details()
    assert code == Code.DEADLINE_EXCEEDED and "'late-nokey' was made" in details, details
    assert "recorded at audit sequence" in details and "it stands on the record" in details, details
    sequence = int(details.split("recorded at audit sequence ")[1].split(" ")[0])
    assert dict(info.value.trailing_metadata())["aios-audit-sequence"] == str(sequence)
    (streamed,) = claims.decisions.DecideStream(iter([case_request(seed=33, request_id="late-streamed",
                                                                   timeout_ms=1000)]), timeout=TIMEOUT_S)
    monkeypatch.undo()
    assert streamed.error_code == "DEADLINE_EXCEEDED" and streamed.audit_sequence > sequence, streamed
    assert f"recorded at audit sequence {streamed.audit_sequence} " in streamed.error_message


def test_retries_with_one_key_and_a_1_ms_timeout_make_at_most_one_decision(claims):
    """The audit's reproduction: 30 retries, one key, timeout_ms=1. Each either expires before it is decided
    (nothing recorded) or is recorded late and kept under the key; after the first is kept, all replay."""
    kernel = claims.kernel
    since = kernel.decisions.audit.size
    key = f"retried-{kernel.front_end}"
    for n in range(30):
        try:
            claims.decisions.Decide(escalated_request(seed=33, idempotency_key=key, request_id=f"retry-{n}",
                                                      timeout_ms=1), timeout=TIMEOUT_S)
        except grpc.RpcError as exc:
            assert exc.code() in (Code.DEADLINE_EXCEEDED, Code.RESOURCE_EXHAUSTED), exc.details()
    records = decision_records(kernel, key, since)
    assert len(records) <= 1 and len(reviews_of(claims, key)) <= len(records)
    final = claims.decisions.Decide(escalated_request(seed=33, idempotency_key=key), timeout=TIMEOUT_S)
    if records:
        assert final.replayed and final.audit_sequence == records[0].sequence
    assert len(decision_records(kernel, key, since)) == 1 and len(reviews_of(claims, key)) == 1


# ----------------------------------------------------------------------------- 1, 4. the inference protocol
@pytest.fixture
def oip(kernel):
    from kernel._proto.inference import grpc_service_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{kernel.port}") as channel:
        yield grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)


def model_calls(name: str) -> list:
    return [
        ("ModelInfer", request_for(name, np.ones((1, 16)))),
        ("ModelMetadata", pb.ModelMetadataRequest(name=name)),
        ("ModelConfig", pb.ModelConfigRequest(name=name, version="1")),
        ("ModelStatistics", pb.ModelStatisticsRequest(name=name)),
        ("RepositoryModelLoad", pb.RepositoryModelLoadRequest(model_name=name)),
        ("RepositoryModelUnload", pb.RepositoryModelUnloadRequest(model_name=name)),
    ]


@pytest.mark.parametrize("name, code", [
    ("m" * 300, Code.INVALID_ARGUMENT),  # File name too long: was INTERNAL with the whole name in a traceback
    ("é" * 200, Code.INVALID_ARGUMENT),  # 400 bytes
    ("tiny/1", Code.INVALID_ARGUMENT),
    ("nul\x00", Code.INVALID_ARGUMENT),
    ("m" * 255, Code.NOT_FOUND),
    ("no-such-model", Code.NOT_FOUND),
])
def test_a_model_name_no_folder_can_have_is_refused_without_touching_the_file_system(oip, monkeypatch, kernel_logs,
                                                                                     name, code):
    looked = []
    for method in ("is_dir", "iterdir", "stat"):
        real = getattr(pathlib.Path, method)

        def spy(self, *args, _real=real, **kwargs):
            if name in str(self):
                looked.append(str(self))
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(pathlib.Path, method, spy)
    for rpc, request in model_calls(name):
        got, details = refused(getattr(oip, rpc), request)
        assert got == code, f"{rpc}: {got} {details!r}"
        assert len(details) < 500 and "\x00" not in details, f"{rpc}: {details!r}"
    if code == Code.INVALID_ARGUMENT:
        assert not looked, looked
    errors = [r.getMessage()[:300] for r in kernel_logs.records if r.levelno >= logging.ERROR]
    assert not errors, errors


@pytest.mark.parametrize("field, value, needle", [
    ("id", "i" * 257, "id must be at most 256 characters"),
    ("id", "id\nforged", "id must not contain control characters"),
    ("tenant", "t" * 129, "parameter 'tenant' must be at most 128 characters"),
    ("tenant", "bell\x07", "parameter 'tenant' must not contain control characters"),
])
def test_a_model_infer_id_or_tenant_over_its_limit_or_with_control_characters_is_refused(oip, field, value, needle):
    request = request_for("tiny", np.ones((1, 16)))
    if field == "id":
        request.id = value
    else:
        request.parameters["tenant"].string_param = value
    code, details = refused(oip.ModelInfer, request)
    assert code == Code.INVALID_ARGUMENT and needle in details, details
    request.id, request.parameters["tenant"].string_param = "i" * 256, "t" * 128
    assert oip.ModelInfer(request, timeout=TIMEOUT_S).id == "i" * 256
