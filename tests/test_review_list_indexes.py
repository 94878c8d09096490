"""A filtered ListReviews reads the reviews its filters can match, not every review the store has kept.

ListReviews by tenant (or by pipeline) over every state, or RESOLVED ones, walked every review in position order:
a page for a tenant with 5 of 200,000 reviews took 40-90 ms, growing with the store's history. Schema version 10
indexes reviews by tenant and by pipeline; the unresolved filters (and ClaimNextReview, and the SLA count) keep
reading the unresolved reviews only, however long the tenant's own history. Work is counted in SQLite's steps
(kernel/testing/sqlite_work.py), not time. Real SQLite files.
"""

from __future__ import annotations

import sqlite3

from test_review_queue import S, SettableClock, escalate

from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
from kernel.review import ReviewQueue
from kernel.store import open_database
from kernel.store.schema import latest_version
from kernel.testing.sqlite_work import read_steps

COLUMNS = ("review_id, pipeline, tenant, task_id, resolved, lease_expires_unix_ns, sla_deadline_unix_ns, "
           "resolved_unix_ns, delivered, revision, body")
NOW = 1_700_000_000 * S


def _rows(conn: sqlite3.Connection, history: int, tenant_history: int) -> None:
    """``history`` resolved reviews of other tenants on pipeline 'busy', ``tenant_history`` resolved ones of
    tenant 'small' on 'busy', then 'small''s 4 on pipeline 'rare': 2 resolved (one late), 2 waiting (one late)."""
    def row(n: int, pipeline: str, tenant: str, resolved: int, sla: int, resolved_at: int):
        body = kpb.Review(review_id=f"r{n}", pipeline=pipeline, tenant=tenant,
                          state="RESOLVED" if resolved else "OPEN", resolved_action="approve" if resolved else "",
                          sla_deadline_unix_ns=sla, resolved_unix_ns=resolved_at)
        return f"r{n}", pipeline, tenant, "", resolved, 0, sla, resolved_at, 1, 1, body.SerializeToString()

    rows = [row(n, "busy", f"t{n % 7}", 1, 0, NOW - S) for n in range(history)]
    rows += [row(history + n, "busy", "small", 1, 0, NOW - S) for n in range(tenant_history)]
    first = history + tenant_history
    rows += [row(first, "rare", "small", 1, NOW - 9 * S, NOW - 5 * S),  # resolved after its SLA deadline
             row(first + 1, "rare", "small", 1, 0, NOW - S),
             row(first + 2, "rare", "small", 0, NOW - S, 0),  # waiting past its SLA deadline
             row(first + 3, "rare", "small", 0, 0, 0)]
    conn.executemany(f"INSERT INTO reviews ({COLUMNS}) VALUES ({', '.join('?' * 11)})", rows)
    conn.commit()


def _ids(response: kpb.ListReviewsResponse) -> list[str]:
    return [review.review_id for review in response.reviews]


def _steps(tmp_path, history: int, tenant_history: int, read) -> int:
    def run(db) -> None:
        read(ReviewQueue(db, clock=lambda: NOW), history + tenant_history)

    return read_steps(tmp_path / f"{history}-{tenant_history}", lambda conn: _rows(conn, history, tenant_history), run)


def _tail(first: int, *offsets: int) -> list[str]:
    return [f"r{first + offset}" for offset in offsets]


def test_a_tenants_or_pipelines_page_reads_its_own_reviews_not_the_whole_history(tmp_path):
    def read(queue: ReviewQueue, first: int) -> None:
        every = queue.list(tenant="small", pipeline="rare")
        assert _ids(every) == _tail(first, 0, 1, 2, 3) and every.sla_missed == 2
        resolved = queue.list(tenant="small", state="RESOLVED", page_size=1)
        assert _ids(resolved) == _tail(first, 0) and resolved.sla_missed == 1
        assert _ids(queue.list(tenant="small", state="RESOLVED", page_token=resolved.next_page_token)) == \
            _tail(first, 1)
        assert _ids(queue.list(pipeline="rare")) == _tail(first, 0, 1, 2, 3)

    few, many = _steps(tmp_path, 100, 0, read), _steps(tmp_path, 20_000, 0, read)
    assert many <= few + 5, (few, many)  # (it read all 20,000: ~15,000 more steps)


def test_the_waiting_reviews_of_a_tenant_are_read_without_its_resolved_history(tmp_path):
    def read(queue: ReviewQueue, first: int) -> None:
        assert _ids(queue.list(tenant="small", state="UNRESOLVED")) == _tail(first, 2, 3)  # (the CLI's default)
        assert _ids(queue.list(tenant="small", state="OPEN", pipeline="rare")) == _tail(first, 2, 3)
        assert queue.list(tenant="small", state="UNRESOLVED").sla_missed == 1
        assert queue.claim_next("alice", 60, tenant="small").review_id == f"r{first + 2}"

    few, many = _steps(tmp_path, 100, 100, read), _steps(tmp_path, 100, 20_000, read)
    assert many <= few + 5, (few, many)  # (the tenant's own resolved reviews are not read)


def test_a_store_from_before_the_indexes_gains_them_and_lists_as_before(tmp_path):
    """A store of schema version 9 gains versions 10 and 11's indexes and version 12's counts at open; its
    reviews list as before, with the same SLA counts."""
    with open_database(tmp_path) as db:
        with sqlite3.connect(db.path) as conn:
            _rows(conn, 10, 3)
    conn = sqlite3.connect(tmp_path / "kernel.sqlite3", isolation_level=None)
    for index in ("reviews_by_tenant", "reviews_by_pipeline", "reviews_waiting", "reviews_waiting_by_tenant",
                  "reviews_waiting_by_pipeline"):  # (versions 10 and 11)
        conn.execute(f"DROP INDEX {index}")
    for trigger in ("inserted", "changed", "deleted"):  # (version 12's)
        conn.execute(f"DROP TRIGGER reviews_sla_counted_{trigger}")
    conn.execute("DROP TABLE review_sla_counts")
    conn.execute("PRAGMA user_version = 9")  # as the release before schema version 10 left it
    conn.close()
    with open_database(tmp_path) as db:
        assert db.schema_version == latest_version() >= 11
        queue = ReviewQueue(db, clock=lambda: NOW)
        assert _ids(queue.list(tenant="small", state="RESOLVED")) == ["r10", "r11", "r12", "r13", "r14"]
        assert _ids(queue.list(pipeline="rare")) == ["r13", "r14", "r15", "r16"]
        assert _ids(queue.list(tenant="small", state="OPEN")) == ["r15", "r16"]
        assert queue.claim_next("alice", 60, pipeline="rare").review_id == "r15"
        assert queue.list(tenant="small").sla_missed == 2 and queue.list(state="RESOLVED").sla_missed == 1
        _agree(db, NOW)


def test_a_page_of_waiting_reviews_and_a_claim_next_cost_the_same_at_any_backlog(tmp_path):
    """The waiting reviews of a page (the CLI's default listing) and ClaimNextReview's oldest open case were read
    from reviews_by_filter, ordered by pipeline and tenant, so each page and each claim sorted the whole backlog:
    ~250 ms a claim at 200,000 waiting (a desk months behind), for every reviewer. Schema version 11 keeps the
    waiting reviews in list order (alone, by tenant, by pipeline); a claimed one is read from the running leases."""
    def fill(backlog: int):
        def rows(conn: sqlite3.Connection) -> None:
            def row(n: int, pipeline: str, tenant: str, lease: int):
                body = kpb.Review(review_id=f"w{n}", pipeline=pipeline, tenant=tenant, state="OPEN", actions=["a"],
                                  sla_deadline_unix_ns=NOW - S, claimed_by="bob" if lease else "",
                                  lease_expires_unix_ns=lease)
                return f"w{n}", pipeline, tenant, "", 0, lease, NOW - S, 0, 0, 1, body.SerializeToString()

            # a claimed one and two open ones of tenant 'small' on 'rare' first, then the backlog behind them
            made = [row(0, "rare", "small", NOW + 60 * S), row(1, "rare", "small", 0), row(2, "rare", "small", 0)]
            made += [row(3 + n, f"p{n % 2}", f"t{n % 3}", 0) for n in range(backlog)]
            conn.executemany(f"INSERT INTO reviews ({COLUMNS}) VALUES ({', '.join('?' * 11)})", made)
        return rows

    def read(db) -> None:
        def ids(**filters) -> list[str]:
            return [review.review_id for _, review, _ in db.reviews.page(now_unix_ns=NOW, after_seq=0, limit=2,
                                                                           **filters)]
        assert ids(pipeline="", tenant="", state="UNRESOLVED") == ["w0", "w1"]
        assert ids(pipeline="", tenant="small", state="OPEN") == ["w1", "w2"]
        assert ids(pipeline="rare", tenant="", state="OPEN") == ["w1", "w2"]
        assert ids(pipeline="rare", tenant="small", state="UNRESOLVED") == ["w0", "w1"]
        assert ids(pipeline="", tenant="", state="CLAIMED") == ["w0"]
        queue = ReviewQueue(db, clock=lambda: NOW)
        assert queue.claim_next("alice", 60).review_id == "w1"
        assert queue.claim_next("alice", 60, tenant="small").review_id == "w2"
        assert queue.claim_next("alice", 60, pipeline="p1").review_id == "w4"

    few = read_steps(tmp_path / "few", fill(200), read)
    many = read_steps(tmp_path / "many", fill(20_000), read)
    assert many <= few + 5, (few, many)  # (it sorted the backlog: ~10,000 more steps at 20,000)


# The SLA count as a count over every matching row computes it (what ListReviews read for each page before).
_DIRECT = {
    "waiting": "resolved = 0 AND sla_deadline_unix_ns > 0 AND :now > sla_deadline_unix_ns",
    "resolved": "resolved = 1 AND sla_deadline_unix_ns > 0 AND resolved_unix_ns > sla_deadline_unix_ns",
}
_STATES = {"": ("waiting", "resolved"), "RESOLVED": ("resolved",), "UNRESOLVED": ("waiting",),
           "OPEN": ("waiting",), "CLAIMED": ("waiting",)}
_LEASE = {"OPEN": " AND lease_expires_unix_ns <= :now", "CLAIMED": " AND lease_expires_unix_ns > :now"}


def _direct(db, pipeline: str, tenant: str, state: str, now: int) -> int:
    filters = (" AND pipeline = :pipeline" if pipeline else "") + (" AND tenant = :tenant" if tenant else "")
    with db.read() as conn:
        return sum(conn.execute(f"SELECT count(*) FROM reviews WHERE {_DIRECT[part]}{filters}{_LEASE.get(state, '')}",
                                dict(now=now, pipeline=pipeline, tenant=tenant)).fetchone()[0]
                   for part in _STATES[state])


def _agree(db, now: int) -> None:
    for pipeline in ("", "claims", "fraud"):
        for tenant in ("", "acme", "globex"):
            for state in _STATES:
                assert db.reviews.count_sla_missed(pipeline, tenant, state, now) == \
                    _direct(db, pipeline, tenant, state, now), (pipeline, tenant, state)


def test_the_sla_count_of_every_page_costs_the_same_at_any_backlog_or_history(tmp_path):
    """Every ListReviews page counted the matching reviews that missed their SLA over every waiting one (and every
    late resolved one): ~150 ms a page at 200,000 waiting, so paging through them counted them once per page. The
    counts per pipeline and tenant are kept as rows change (schema version 12); what depends on the time is read
    from the reviews not yet due and the running leases, bounded by traffic, not by the backlog."""
    def fill(waiting: int, late_resolved: int):
        def rows(conn: sqlite3.Connection) -> None:
            made = [(f"w{n}", f"p{n % 2}", f"t{n % 3}", "", 0, 0, NOW - S, 0, 0, 1, b"") for n in range(waiting)]
            made += [(f"l{n}", f"p{n % 2}", f"t{n % 3}", "", 1, 0, NOW - 9 * S, NOW - S, 1, 1, b"")
                     for n in range(late_resolved)]
            made += [("due", "p0", "t0", "", 0, 0, NOW + S, 0, 0, 1, b""),  # not due yet
                     ("held", "p1", "t1", "", 0, NOW + 60 * S, NOW - S, 0, 0, 1, b"")]  # late, claimed
            conn.executemany(f"INSERT INTO reviews ({COLUMNS}) VALUES ({', '.join('?' * 11)})", made)
        return rows

    def read(db) -> None:
        for pipeline, tenant in (("", ""), ("p1", ""), ("", "t1"), ("p1", "t1")):
            for state in _STATES:
                db.reviews.count_sla_missed(pipeline, tenant, state, NOW)

    few = read_steps(tmp_path / "few", fill(60, 60), read)
    many = read_steps(tmp_path / "many", fill(12_000, 12_000), read)
    assert many <= few + 5, (few, many)  # (it counted them: ~25,000 more steps)
    with open_database(tmp_path / "many") as db:
        for pipeline, tenant in (("", ""), ("p1", ""), ("", "t1"), ("p1", "t1")):
            for state in _STATES:
                assert db.reviews.count_sla_missed(pipeline, tenant, state, NOW) == \
                    _direct(db, pipeline, tenant, state, NOW), (pipeline, tenant, state)


def test_the_sla_counts_follow_claims_resolutions_withdrawals_lapses_and_retention(tmp_path):
    clock = SettableClock()
    db = open_database(tmp_path / "var")
    queue = ReviewQueue(db, clock=clock)
    try:
        made = [escalate(queue, pipeline=("claims", "fraud")[n % 2], tenant=("acme", "globex")[n % 3 % 2],
                         sla=10 + n, amount=n) for n in range(12)]
        escalate(queue, sla=0, amount=99)  # no SLA: never late
        _agree(db, clock())
        queue.claim(made[0].review_id, "ann", 60)
        queue.resolve(made[0].review_id, "ann", "approve")  # on time
        queue.claim(made[1].review_id, "ann", 30)
        clock.advance(15)  # some deadlines pass
        _agree(db, clock())
        for review in made[2:5]:
            queue.claim(review.review_id, "bob", 5)
        queue.resolve(made[2].review_id, "bob", "deny")  # late
        queue.withdraw(made[3].review_id, "its task was cancelled")  # never late
        _agree(db, clock())
        clock.advance(20)  # every deadline passed; bob's leases lapsed, ann's still runs
        _agree(db, clock())
        clock.advance(3600)
        assert db.reviews.delete_resolved_before(clock() - 60 * S, 1000) == 3
        _agree(db, clock())
    finally:
        queue.close()
        db.close()
