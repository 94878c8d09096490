"""The idempotency store: same key + same request → the stored answer; a different request → FAILED_PRECONDITION.

Real SQLite files in a temporary data directory; expiry is driven by a
settable wall clock handed to the store (it reads no other clock).
"""

from __future__ import annotations

import threading

import pytest

from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
from kernel.errors import FailedPrecondition, InvalidArgument
from kernel.store import open_database
from kernel.tasks import IdempotencyStore, request_hash

HOUR_NS = 3600 * 10**9


class SettableClock:
    """A wall clock the test moves by hand (expiry without waiting hours)."""

    def __init__(self, now_ns: int = 1_700_000_000 * 10**9):
        self.now_ns = now_ns

    def __call__(self) -> int:
        return self.now_ns


@pytest.fixture
def db(tmp_path):
    database = open_database(tmp_path / "var")
    yield database
    database.close()


def request(**fields) -> kpb.DecisionRequest:
    req = kpb.DecisionRequest(pipeline="claims", tenant="acme", idempotency_key="k1")
    for name, value in fields.items():
        req.fields[name].number_value = value
    return req


def test_same_key_same_request_replays_and_other_request_is_refused(db):
    store = IdempotencyStore(db)
    first = request(amount=10)
    digest = request_hash(first)
    assert store.get("acme", "k1") is None
    assert store.check("acme", "k1", digest) is None
    assert store.put("acme", "k1", digest, b"answer-1") == b"answer-1"
    assert store.get("acme", "k1") == (digest, b"answer-1")
    assert store.check("acme", "k1", digest) == b"answer-1"

    other = request_hash(request(amount=11))
    with pytest.raises(FailedPrecondition, match="idempotency_key 'k1' was used before with a different request"):
        store.check("acme", "k1", other)
    with pytest.raises(FailedPrecondition, match="different request"):
        store.put("acme", "k1", other, b"answer-2")
    assert store.get("acme", "k1") == (digest, b"answer-1")


def test_first_answer_stored_wins(db):
    store = IdempotencyStore(db)
    assert store.put("acme", "k", "h", b"first") == b"first"
    assert store.put("acme", "k", "h", b"second") == b"first"
    assert store.get("acme", "k") == ("h", b"first")


def test_keys_are_per_tenant(db):
    store = IdempotencyStore(db)
    store.put("acme", "k", "h1", b"a")
    store.put("globex", "k", "h2", b"b")
    assert store.get("acme", "k") == ("h1", b"a")
    assert store.get("globex", "k") == ("h2", b"b")


def test_request_hash_ignores_request_id_timeout_and_priority_only():
    """A retry may carry another id, timeout or priority (sooner, please): the same request, the same decision."""
    base = request(amount=5, score=2)
    retried = kpb.DecisionRequest()
    retried.CopyFrom(base)
    retried.request_id, retried.timeout_ms, retried.priority = "other-id", 250, 1
    assert request_hash(retried) == request_hash(base)
    reordered = request(score=2, amount=5)  # map insertion order must not matter
    assert request_hash(reordered) == request_hash(base)
    for change in (request(amount=6, score=2), kpb.DecisionRequest(pipeline="other", tenant="acme")):
        assert request_hash(change) != request_hash(base)
    for name in ("pipeline", "tenant", "idempotency_key"):
        changed = kpb.DecisionRequest()
        changed.CopyFrom(base)
        setattr(changed, name, getattr(base, name) + "-x")
        assert request_hash(changed) != request_hash(base), name
    with_text = kpb.DecisionRequest()
    with_text.CopyFrom(base)
    with_text.text_fields["description"] = "hail"
    assert request_hash(with_text) != request_hash(base)


def test_a_whole_number_is_the_same_request_however_it_was_sent():
    """(Cross-language audit) JavaScript sends 800 as a double; the Python client sends it as an integer: a
    retry of the one by the other was FAILED_PRECONDITION "a different request"."""
    def with_amount(**value) -> kpb.DecisionRequest:
        r = kpb.DecisionRequest(pipeline="claims", tenant="acme")
        r.fields["amount"].CopyFrom(kpb.Value(**value))
        return r

    as_int = request_hash(with_amount(int_value=800))
    assert request_hash(with_amount(number_value=800.0)) == as_int
    assert request_hash(with_amount(number_value=-0.0)) == request_hash(with_amount(int_value=0))
    assert request_hash(with_amount(number_value=800.5)) != as_int
    assert request_hash(with_amount(string_value="800")) != as_int
    assert request_hash(with_amount(number_value=1e300)) != as_int  # (past int64: left as a double)


def test_an_answer_stored_under_an_earlier_hash_still_replays_its_retry():
    """A key stored by an earlier kernel (before whole numbers hashed alike; before the priority was left out)
    is matched by that kernel's hash too, for the same request only."""
    from kernel.store.idempotency import earlier_request_hashes, matches

    r = kpb.DecisionRequest(pipeline="claims", tenant="acme", priority=2)
    r.fields["amount"].CopyFrom(kpb.Value(number_value=800.0))
    with_priority, as_sent = earlier_request_hashes(r)
    assert len({with_priority, as_sent, request_hash(r)}) == 3
    for stored in (with_priority, as_sent, request_hash(r)):
        assert matches(stored, r, request_hash(r))
    other = kpb.DecisionRequest(pipeline="claims", tenant="acme", priority=2)
    other.fields["amount"].CopyFrom(kpb.Value(number_value=801.0))
    for stored in earlier_request_hashes(other):
        assert not matches(stored, r, request_hash(r))


def test_keys_expire_after_the_retention_and_can_be_reused(db):
    clock = SettableClock()
    store = IdempotencyStore(db, retention_hours=2, clock=clock)
    store.put("acme", "k", "h1", b"old")
    clock.now_ns += 2 * HOUR_NS - 1
    assert store.get("acme", "k") == ("h1", b"old")
    clock.now_ns += 1
    assert store.get("acme", "k") is None
    assert store.put("acme", "k", "h2", b"new") == b"new"  # an expired key takes a new request
    assert store.get("acme", "k") == ("h2", b"new")


def test_purge_deletes_only_expired_keys(db):
    clock = SettableClock()
    store = IdempotencyStore(db, retention_hours=1, clock=clock)
    for n in range(5):
        store.put("acme", f"old{n}", "h", b"x")
    clock.now_ns += HOUR_NS // 2
    store.put("acme", "young", "h", b"y")
    clock.now_ns += HOUR_NS // 2
    assert store.purge_expired() == 5
    assert store.purge_expired() == 0
    with db.read() as conn:
        assert [row[0] for row in conn.execute("SELECT key FROM idempotency")] == ["young"]


def test_stored_answers_survive_reopening(tmp_path):
    with open_database(tmp_path) as db:
        IdempotencyStore(db).put("acme", "k", "h", b"kept")
    with open_database(tmp_path) as db:
        assert IdempotencyStore(db).get("acme", "k") == ("h", b"kept")


def test_durable_puts_also_store(tmp_path):
    with open_database(tmp_path) as db:
        IdempotencyStore(db, durable=True).put("acme", "k", "h", b"fsynced")
    with open_database(tmp_path) as db:
        assert IdempotencyStore(db).get("acme", "k") == ("h", b"fsynced")


def test_bad_keys_and_settings_are_named(db):
    store = IdempotencyStore(db)
    with pytest.raises(InvalidArgument, match="idempotency_key must be at most 256 characters"):
        store.put("acme", "k" * 257, "h", b"x")
    with pytest.raises(InvalidArgument, match="idempotency_key must be at most 256"):
        store.get("acme", "k" * 257)
    with pytest.raises(InvalidArgument, match="retention_hours must be > 0"):
        IdempotencyStore(db, retention_hours=0)


def test_concurrent_puts_of_one_key_agree_on_one_answer(db):
    store = IdempotencyStore(db)
    start = threading.Barrier(8)
    answers = []

    def racer(n: int) -> None:
        start.wait(timeout=10)
        answers.append(store.put("acme", "race", "h", f"answer-{n}".encode()))

    threads = [threading.Thread(target=racer, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert len(answers) == 8 and len(set(answers)) == 1
    assert store.get("acme", "race") == ("h", answers[0])
