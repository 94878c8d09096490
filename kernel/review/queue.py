"""The human review queue: escalated decisions wait here for a reviewer.

A review is OPEN until a reviewer claims it, CLAIMED while that reviewer's
lease runs, OPEN again if the lease expires unresolved (anyone may claim it
then), and RESOLVED once its lease holder gives the final action, or when
the kernel withdraws it because its task was cancelled (RESOLVED with no
action: ``withdrawn``). Two reviewers never hold one review: a claim is one
atomic read-modify-write of the stored record, and ``claim_next`` checks
that the oldest open review is still open and claims it in one transaction.

Watchers of updates are told of each claim and resolution, and of each
lease that lapses (``kernel/review/leases.py``: a timer on the earliest
running lease, started by the first such watch, stopped by ``end_watches``).

Lease expiry and SLA deadlines are **wall-clock** times (``time.time_ns``):
they are persisted and must mean the same after a restart or on another
replica. A review misses its SLA when it is resolved after its deadline, or
is still unresolved past it; a withdrawn one never does (it was taken away).

``on_resolved(fn)`` hooks run after a resolution is stored: the decision
layer writes the audited resolution decision there (a hook may return it, and
it becomes ``Review.resolution``) and finishes the waiting task. A review is
marked delivered once every hook has run; ``redeliver()`` runs the hooks
again for resolutions a crash or a failing hook interrupted, so hooks must be
idempotent.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable

from .._proto.aios.kernel.v1 import kernel_pb2 as kpb
from ..field_values import to_value
from ..errors import FailedPrecondition, Internal, InvalidArgument, KernelError, NotFound, Unavailable, quote
from ..os_faults import EnvironmentFault, answerable
from ..limits import (MAX_REVIEWER_CHARS, MAX_TENANT_CHARS, check_comment, check_identifier, check_name,
                      check_pipeline_filter)
from ..store import Feed
from ..store.faults import RETRY_AFTER_MS, StoreBusy
from ..store.sqlite_reviews import STATE_FILTERS, withdrawn
from .. import paging
from ..observability.repeats import RepeatedFailure
from .leases import LeaseTimer
from .watch import CREATED, UPDATED, ReviewWatch

log = logging.getLogger("aios.review")

OPEN, CLAIMED, RESOLVED = "OPEN", "CLAIMED", "RESOLVED"
DEFAULT_LEASE_S = 300
MAX_LEASE_S = 86_400
NS = 1_000_000_000
# A WatchReviews backlog (include_open) is read a page at a time and each page is held until it is sent:
# at most 500 reviews or about this many bytes of them (they carry their requests' text).
BACKLOG_PAGE_BYTES = 2 << 20
# On a resume point retention passed: the first position from which a watch now resumes with nothing deleted
# (the trailer StreamAudit names where its log begins with, for a client to act on without parsing the message).
FIRST_SEQUENCE_TRAILER = "aios-first-sequence"


def _iso(unix_ns: int, until: bool = False) -> str:
    """UTC, to the second. ``until``: an end still to come, rounded up (a lease held until 12:00:00.8 said "until
    12:00:00Z", and a claim made then, as told, was refused with the same time)."""
    seconds = -(-unix_ns // NS) if until else unix_ns // NS
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def _required(value: str, field: str) -> None:
    if not value:
        raise InvalidArgument(f"{field} is required")


def _lease_ns(lease_seconds: float) -> int:
    if lease_seconds < 0 or lease_seconds > MAX_LEASE_S:
        raise InvalidArgument(f"lease_seconds must be 0..{MAX_LEASE_S} (0 = {DEFAULT_LEASE_S}), got {lease_seconds}")
    return int((lease_seconds or DEFAULT_LEASE_S) * NS)


def _filters(pipeline: str, tenant: str) -> str:
    """The filters as an error message names them."""
    return (f"filters: pipeline {quote(pipeline) if pipeline else 'any'}, "
            f"tenant {quote(tenant) if tenant else 'any'}")


def _reviewer(reviewer: str) -> None:
    """A reviewer's name is stored on the review and on the resolution's audit record (its principal):
    required, at most MAX_REVIEWER_CHARS, not blank, no control or invisible characters and no whitespace
    around it (kernel/limits.py, ``check_name``)."""
    _required(reviewer, "reviewer")
    check_name(reviewer, "reviewer", MAX_REVIEWER_CHARS)


def _refuse_past_retention(from_sequence: int, deleted: int) -> None:
    """FAILED_PRECONDITION when retention deleted a review at or past ``from_sequence`` (``deleted``: its mark)."""
    if from_sequence <= deleted:
        raise FailedPrecondition(
            f"from_sequence {from_sequence}: reviews up to sequence {deleted} were deleted by retention since "
            f"(store_retention_days), so some stored after the watch's last one can no longer be sent; watch "
            f"again with include_open (the reviews still waiting) and read ListReviews state RESOLVED",
            trailers=((FIRST_SEQUENCE_TRAILER, str(deleted + 1)),))


class ReviewQueue:
    """Reviews in one backend (``db.reviews``)."""

    def __init__(self, db, clock: Callable[[], int] = time.time_ns):
        self._records = db.reviews
        self._clock = clock  # wall clock, in ns: leases and SLAs are persisted
        self._feed = Feed()
        # The highest review position whose "created" event has been published (or that was stored before this
        # queue existed, never to be published): a watch subscribes and reads it under the lock, so it knows which
        # backlog reviews it will also hear of as new (ReviewWatch).
        self._created_lock = threading.Lock()
        self._published_through = self._records.highest_position()
        self._hooks: list[Callable[[kpb.Review], object]] = []
        # One resolution's follow-up (the hooks: its audit record, its task) at a time, each after a fresh look
        # at whether it is done: identical ResolveReview calls at once (a double click, a retrying client) all
        # found the row undelivered and each ran the hooks, one audit record per call for one resolution.
        self._delivering = threading.Lock()
        # A follow-up refused for a reason that may pass (a full disk, a fail-stopped audit log) is said once per
        # episode, then counted: every reviewer's retry logged an ERROR line (300 in 7 s in a full-disk drill).
        self._refused_follow_ups = RepeatedFailure(log, "finishing review resolutions")
        self._barriers: list[Callable[[], None]] = []
        # review id (or None: any) -> how many rows of answered decisions still wait to be stored after a settle
        self._waiting: list[Callable[[str | None], int]] = []
        # Changes are published from the store's after-commit hooks: once durable, in commit
        # order, and without a lock of ours around the write, so concurrent writes share a commit.
        self._leases = LeaseTimer(self._publish_lapsed, clock)

    def add_read_barrier(self, settle: Callable[[], None], waiting: Callable[[str | None], int] | None = None) -> None:
        """Call ``settle()`` before every read or change: rows stored in the background are there first
        (see kernel/review/deferred.py), so a caller always finds the review its decision named. ``waiting(id)``:
        how many rows (of review ``id``, or of any when None) the store would not take, still in memory."""
        self._barriers.append(settle)
        if waiting is not None:
            self._waiting.append(waiting)

    def _settle(self) -> None:
        for settle in self._barriers:
            settle()

    def _refuse_if_waiting(self, review_id: str | None, what: str) -> None:
        """StoreBusy (UNAVAILABLE, retry-after-ms) when answered decisions' reviews wait in memory for a store that
        refuses writes: a read would say NOT_FOUND for an acknowledged review, or list the queue without it."""
        count = sum(waiting(review_id) for waiting in self._waiting)
        if count:
            raise StoreBusy(f"{what}: {count} review{'s' if count > 1 else ''} of answered decisions wait in memory "
                            f"to be stored (the store refuses writes now); retry after {RETRY_AFTER_MS} ms")

    # -- views --------------------------------------------------------------------------------
    def _present(self, review: kpb.Review, now: int | None = None) -> kpb.Review:
        """The review as of ``now``: an expired lease reads as OPEN, the SLA flag is current."""
        now = self._clock() if now is None else now
        view = kpb.Review()
        view.CopyFrom(review)
        if view.state != RESOLVED:
            if view.lease_expires_unix_ns > now:
                view.state = CLAIMED
            else:
                view.state = OPEN
                view.claimed_by = ""
                view.lease_expires_unix_ns = 0
                view.claimed_unix_ns = 0
        deadline = view.sla_deadline_unix_ns
        finished = view.resolved_unix_ns if view.state == RESOLVED else now
        # A withdrawn case was taken away from the desk (its task was cancelled): no SLA of the desk's was missed.
        view.sla_missed = bool(deadline) and finished > deadline and not withdrawn(view)
        return view

    def get(self, review_id: str) -> kpb.Review:
        _required(review_id, "review_id")
        self._settle()
        review = self._records.get(review_id)
        if review is None:
            self._refuse_if_waiting(review_id, f"review {quote(review_id)} is not stored yet")
            raise NotFound(f"review {quote(review_id)} does not exist")
        return self._present(review)

    def list(self, pipeline: str = "", tenant: str = "", state: str = "", page_size: int = 0,
             page_token: str = "") -> kpb.ListReviewsResponse:
        """One page of matching reviews, oldest first, with the filter's SLA-missed count."""
        state = _state_filter(state)
        _check_filters(pipeline, tenant)
        limit = paging.page_size(page_size)
        filters = (pipeline, tenant, state)
        after = paging.decode(page_token, filters)
        self._settle()
        self._refuse_if_waiting(None, "the review queue cannot be listed whole now")
        now = self._clock()
        rows = self._records.page(pipeline, tenant, state, now, after, limit + 1)
        response = kpb.ListReviewsResponse(sla_missed=self._records.count_sla_missed(pipeline, tenant, state, now))
        # (Bounded by bytes too: reviews carry their requests' text fields, up to 1 MiB each, and 40 such in a
        # default page of 50 passed gRPC's 64 MiB, so ListReviews failed for every reviewer.)
        response.next_page_token = paging.fill(rows, limit, filters, response.reviews.append,
                                               lambda review: self._present(review, now))
        return response

    def sla_missed_count(self, pipeline: str = "", tenant: str = "", state: str = "") -> int:
        _check_filters(pipeline, tenant)
        self._settle()
        return self._records.count_sla_missed(pipeline, tenant, _state_filter(state), self._clock())

    def watch(self, pipeline: str = "", tenant: str = "", include_open: bool = False, updates: bool = False,
              timeout_s: float | None = None, from_sequence: int = 0) -> ReviewWatch:
        """New reviews matching the filters as they are created (see ``ReviewWatch``); first, with
        ``include_open``, the reviews waiting, or with ``from_sequence`` every matching review stored at or after
        that position (a cut watch resuming: see ``_check_resume``)."""
        _check_filters(pipeline, tenant)
        if from_sequence and include_open:
            raise InvalidArgument(f"from_sequence ({from_sequence}) resumes a watch, include_open starts one: give "
                                  "one of them (a resumed watch is sent every review stored since, waiting or not)")

        def match(event) -> bool:
            kind, review = event
            return ((updates or kind == CREATED) and (not pipeline or review.pipeline == pipeline)
                    and (not tenant or review.tenant == tenant))

        self._settle()
        if from_sequence:
            self._check_resume(from_sequence)
        if updates:
            self._leases.start()  # lapsed leases are news only to watchers of updates
        with self._created_lock:
            sub = self._feed.subscribe(None, match, timeout_s)
            published = self._published_through
        if from_sequence:
            backlog = self._pages(pipeline, tenant, "", from_sequence - 1, resumed=True)
        else:
            backlog = self._pages(pipeline, tenant, "UNRESOLVED", 0) if include_open else iter(())
        return ReviewWatch(sub, backlog, self._present, published)

    def _check_resume(self, from_sequence: int) -> None:
        """A resume point this store handed out, with every review stored since still here: INVALID_ARGUMENT past
        the newest review + 1 (another kernel's, or a database restored from an older backup); FAILED_PRECONDITION
        at or below a review retention deleted (it can no longer be sent: the watch would have a gap), with
        where a resume now misses nothing in a trailer, as StreamAudit's for archived records."""
        highest = self._records.highest_position()
        if from_sequence > highest + 1:
            raise InvalidArgument(f"from_sequence {from_sequence} is past the newest review stored ({highest}): "
                                  "this kernel's store never handed it out; watch again without it")
        _refuse_past_retention(from_sequence, self._records.deleted_through())

    def watcher_count(self) -> int:
        """Open watches (each WatchReviews call holds one until it ends)."""
        return self._feed.subscriber_count(None)

    def end_watches(self, error: Callable[[], BaseException]) -> None:
        """End every watch, open or opened later, with ``error()`` (the kernel is draining), and stop the
        lease timer: with no watch left, a lapsing lease is news to nobody."""
        self._feed.close(error)
        self._leases.stop()

    def close(self) -> None:
        """Stop the lease timer (``end_watches`` does too); the database is the caller's to close."""
        self._leases.stop()

    def leases_settled(self) -> bool:
        """Whether the lease timer has made every look that is due (see ``LeaseTimer.settled``)."""
        return self._leases.settled()

    def check_leases(self) -> int:
        """Publish the leases that lapsed since the last look (the timer does this when one ends); how many."""
        return self._leases.check()

    def _pages(self, pipeline: str, tenant: str, state: str, after: int, resumed: bool = False):
        """``(position, review)`` of the matching reviews stored after position ``after``, oldest first, read a
        page at a time as they are sent. ``resumed``: a resumed watch's, which must have no gap — each page is
        followed by a look at retention's mark, since a sweep may have deleted reviews past the last one sent
        after ``_check_resume`` passed (then FAILED_PRECONDITION, as that check answers: found by two audits)."""
        first = after + 1
        while True:  # (a page may end early, at its bytes: the backlog ends with an empty one)
            rows = self._records.page(pipeline, tenant, state, self._clock(), after, 500, BACKLOG_PAGE_BYTES)
            if resumed and self._records.deleted_through() > after:  # (one of them may be missing from this page)
                _refuse_past_retention(first, self._records.deleted_through())
            if not rows:
                return
            for after, review, _nbytes in rows:
                yield after, review

    # -- changes ------------------------------------------------------------------------------
    def create(self, decision: kpb.Decision, request: kpb.DecisionRequest, actions: list[str],
               sla_seconds: float, task_id: str = "", review_id: str = "", defaults=None) -> kpb.Review:
        """Queue ``decision`` (escalated) for review; ``actions`` are what a reviewer may resolve it with.

        ``sla_seconds`` > 0 sets the SLA deadline from now; 0 means none. A
        task has one review: creating one again for the same ``task_id``
        returns the existing review (in whatever state), so a task re-run
        after a restart does not queue its case twice. ``review_id`` names
        the review (the caller may name it first, to audit it before); empty
        makes a new id. ``defaults``: the fields ``request`` left out, each
        with the value the decision used for it (``Review.defaults``; a
        ``Value`` or a plain value). Durable when it returns; concurrent
        creates share one commit (group commit).
        """
        review = self._new_review(decision, request, actions, sla_seconds, task_id, review_id, 0, defaults,
                                  now=self._clock())
        stored, _created = self._records.insert(review, after_commit=self._publish_created)
        return self._present(stored)

    def create_many(self, items, durable: bool = True, recorded_before: Callable[[], int] | None = None,
                    now: int | None = None, answer: bool = True) -> list[kpb.Review] | None:
        """``create`` for each item,
        ``(decision, request, actions, sla_seconds[, task_id[, review_id[, created[, defaults[, text_digests]]]]])``.

        All items are checked first (a bad one raises INVALID_ARGUMENT naming
        ``items[i]``, and nothing is stored); then all reviews are stored in
        one transaction (one commit, shared with concurrent writers), or none
        if storing fails. Returns the reviews in item
        order (an existing one where a ``task_id`` already had a review).

        ``durable=False`` skips the commit's fsync: for reviews of decisions
        whose durable audit records can open them again (``recorded_before``,
        evaluated in the same transaction, says up to which audit sequence;
        see ``kernel/review/reopen.py``). ``now`` (wall clock) backdates the
        reviews, for those reopened from their records; an item's own
        ``created`` (wall-clock ns, 0 = ``now``) wins over it: reviews stored
        in the background are dated by their decision's audit record, as a
        reopened one would be. ``answer=False``:
        return None instead of the stored reviews (a background writer has
        nobody to show them to).
        """
        now = self._clock() if now is None else now
        reviews = []
        for index, item in enumerate(items):
            if not isinstance(item, (tuple, list)) or not 4 <= len(item) <= 9:
                raise InvalidArgument(
                    f"items[{index}] must be a tuple (decision, request, actions, sla_seconds[, task_id[, review_id"
                    f"[, created[, defaults[, text_digests]]]]]), got {item!r}"
                )
            reviews.append(self._new_review(*item, now=now, where=f"items[{index}]."))
        if not reviews:
            return []

        def publish(results, position: int) -> None:
            with self._created_lock:
                for result in results:
                    self._publish_one(result)
                self._published_through = max(self._published_through, position)

        stored = self._records.insert_many(reviews, publish, durable=durable, recorded_before=recorded_before)
        if not answer:
            return None
        return [self._present(review, self._clock()) for review, _created in stored]

    def recorded_before(self) -> int:
        """The audit sequence below which every escalated decision's review row is stored."""
        return self._records.recorded_before()

    def mark_recorded_before(self, sequence: int) -> None:
        self._records.mark_recorded_before(sequence)

    def lower_recorded_before(self, sequence: int) -> None:
        """Set the mark to ``sequence`` even if lower (the audit log lost records past it)."""
        self._records.lower_recorded_before(sequence)

    def skip_reserved_positions(self) -> None:
        """At start, before any review is stored: see ``SqliteReviewRecords.skip_reserved_positions``."""
        self._records.skip_reserved_positions()
        self._published_through = max(self._published_through, self._records.highest_position())

    def release_reserved_positions(self) -> None:
        """At a clean stop, once every review is stored: see ``SqliteReviewRecords.release_reserved_positions``."""
        self._records.release_reserved_positions()

    def exists(self, review_id: str) -> bool:
        self._settle()
        return self._records.get(review_id) is not None

    def _new_review(self, decision: kpb.Decision, request: kpb.DecisionRequest, actions, sla_seconds: float,
                    task_id: str = "", review_id: str = "", created: int = 0, defaults=None, text_digests=None, *,
                    now: int,
                    where: str = "") -> kpb.Review:
        now = created or now
        actions = list(actions)
        if not actions or any(not isinstance(a, str) or not a for a in actions):
            raise InvalidArgument(f"{where}actions must be a non-empty list of action names, got {actions!r}")
        if not sla_seconds >= 0:
            raise InvalidArgument(f"{where}sla_seconds must be >= 0 (0 = no SLA), got {sla_seconds}")
        review = kpb.Review(
            review_id=review_id or uuid.uuid4().hex,  # the caller may name it first (to audit it before)
            request_id=decision.request_id or request.request_id,
            pipeline=decision.pipeline or request.pipeline,
            tenant=decision.tenant or request.tenant,
            state=OPEN,
            created_unix_ns=now,
            sla_deadline_unix_ns=now + int(sla_seconds * NS) if sla_seconds else 0,
            task_id=task_id,
            actions=actions,
        )
        review.proposed.CopyFrom(decision)
        review.proposed.review_id = review.review_id
        review.request.CopyFrom(request)
        for name, value in (defaults or {}).items():  # (what the decision used for a field the request left out)
            review.defaults[name].CopyFrom(value if isinstance(value, kpb.Value) else to_value(value))
        review.text_digests.update(text_digests or {})  # (reopened from a record: the texts it keeps no more)
        return review

    def _publish_created(self, result: tuple[kpb.Review, bool], position: int) -> None:
        # Runs once the insert is durable, on the committing thread, in commit order.
        with self._created_lock:
            self._publish_one(result)
            self._published_through = max(self._published_through, position)

    def _publish_one(self, result: tuple[kpb.Review, bool]) -> None:
        if result[1]:
            self._feed.publish((CREATED, result[0]), size=result[0].ByteSize)

    def claim(self, review_id: str, reviewer: str, lease_seconds: float = 0) -> kpb.Review:
        """Give ``reviewer`` the review for ``lease_seconds`` (0 = 300 s); claiming again renews the lease."""
        _reviewer(reviewer)
        return self._present(self._change(review_id, self._lease(reviewer, _lease_ns(lease_seconds)))[0])

    def claim_next(self, reviewer: str, lease_seconds: float = 0, pipeline: str = "", tenant: str = "") -> kpb.Review:
        """Claim the oldest OPEN review matching the filters for ``reviewer`` (as ``claim``), atomically.

        The check that it is still open and the claim are one write
        transaction (see ``SqliteReviewRecords.update_oldest``): concurrent
        callers each get a different review, and none is refused for a
        review another took first. A review whose lease lapsed is OPEN again and
        may be taken; one ``reviewer`` holds already is not (it is CLAIMED).
        NOT_FOUND when none matches.
        """
        _reviewer(reviewer)
        _check_filters(pipeline, tenant)
        mutate = self._lease(reviewer, _lease_ns(lease_seconds))
        self._settle()
        result = self._records.update_oldest(pipeline, tenant, OPEN, self._clock, mutate,
                                             after_commit=self._publish_updated)
        if result is None:
            raise NotFound(f"no open review to claim ({_filters(pipeline, tenant)}); wait for one "
                           "(WatchReviews) or widen the filters")
        return self._present(result[0])

    def _lease(self, reviewer: str, lease_ns: int) -> Callable[[kpb.Review], bool]:
        """The change a claim makes: ``reviewer`` holds the review for ``lease_ns`` from now."""
        def mutate(review: kpb.Review) -> bool:
            now = self._clock()
            if review.state == RESOLVED:
                raise _closed(review)
            if review.lease_expires_unix_ns > now and review.claimed_by != reviewer:
                raise FailedPrecondition(
                    f"review '{review.review_id}' is claimed by {review.claimed_by} until "
                    f"{_iso(review.lease_expires_unix_ns, until=True)}"
                )
            if review.lease_expires_unix_ns <= now or review.claimed_by != reviewer:  # a new claim, not a renewal
                review.claimed_unix_ns = now
            review.state = CLAIMED
            review.claimed_by = reviewer
            review.lease_expires_unix_ns = now + lease_ns
            return True

        return mutate

    def resolve(self, review_id: str, reviewer: str, action: str, comment: str = "") -> kpb.Review:
        """The lease holder's final ``action``; runs the on_resolved hooks.

        Repeating a resolution (same reviewer, action and comment) returns
        the stored one, running any hooks that did not finish; a repeat with
        another comment is refused, since the first comment is the one on the
        audit record and the new one would be silently dropped.

        ``comment`` (at most MAX_COMMENT_CHARS, newlines allowed, no other
        control characters) is the reviewer's reason: it stays on the
        resolution's audit record for good, as part of what makes the decision
        defensible, so it must never hold customer data.
        """
        _reviewer(reviewer)
        _required(action, "action")
        check_comment(comment)

        def mutate(review: kpb.Review) -> bool:
            now = self._clock()
            if review.state == RESOLVED:
                if review.resolved_by == reviewer and review.resolved_action == action:
                    if review.comment != comment:
                        raise _other_comment(review)
                    return False  # a retry: nothing to write; deliver below if that did not finish
                raise _closed(review)
            if action not in review.actions:
                raise InvalidArgument(
                    f"action {quote(action)} is not allowed for review {quote(review_id)}; allowed: "
                    f"{', '.join(review.actions)}"
                )
            if review.claimed_by != reviewer:
                if review.claimed_by and review.lease_expires_unix_ns > now:  # someone else's live lease
                    raise FailedPrecondition(
                        f"review '{review_id}' is claimed by {review.claimed_by} until "
                        f"{_iso(review.lease_expires_unix_ns, until=True)}; only {review.claimed_by} can resolve it "
                        "until then"
                    )
                raise FailedPrecondition(f"review '{review_id}' is not claimed by {reviewer}; claim it (ClaimReview) "
                                         "before resolving it")
            if review.lease_expires_unix_ns <= now:
                raise FailedPrecondition(
                    f"the lease of {reviewer} on review '{review_id}' expired at "
                    f"{_iso(review.lease_expires_unix_ns)}; claim it again"
                )
            review.state = RESOLVED
            review.resolved_action = action
            review.resolved_by = reviewer
            review.comment = comment
            review.resolved_unix_ns = now
            review.sla_missed = bool(review.sla_deadline_unix_ns) and now > review.sla_deadline_unix_ns
            return True

        review, _changed, delivered = self._change(review_id, mutate)
        if not delivered:
            review = self._deliver_once(review)
        return self._present(review)

    def newest_of(self, pipeline: str) -> kpb.Review | None:
        """``pipeline``'s most recently stored review, or None."""
        return self._records.newest_of(pipeline)

    def for_task(self, task_id: str) -> kpb.Review | None:
        """The review ``task_id`` opened, if any (stored as it is: no lease view)."""
        return self._records.for_task(task_id)

    def withdraw(self, review_id: str, reason: str, task_id: str = "") -> kpb.Review:
        """Take an unresolved review off the queue (its task was cancelled): RESOLVED with no action, never
        counted as a missed SLA; claiming or resolving it is refused with "withdrawn: ``reason``".

        No on_resolved hook runs (there is no decision to record or task to
        finish); a review already resolved is returned as it is. ``task_id``: only if that task opened it (a
        task that adopted a keyed Decide's escalated answer waits on the Decide caller's review, which its
        cancel must leave alone: a review audit).
        """
        def mutate(review: kpb.Review) -> bool:
            if review.state == RESOLVED or (task_id and review.task_id != task_id):
                return False
            now = self._clock()
            review.state = RESOLVED
            review.resolved_action = ""
            review.resolved_by = "kernel"
            review.comment = f"withdrawn: {reason}"
            review.resolved_unix_ns = now
            review.claimed_by = ""
            review.lease_expires_unix_ns = 0
            review.claimed_unix_ns = 0
            review.sla_missed = False  # taken away from the desk: not an SLA it missed
            return True

        review, _changed, _delivered = self._change(review_id, mutate, delivered=True)
        return self._present(review)

    def open_of_cancelled_tasks(self) -> list[tuple[str, str]]:
        """``(review_id, task_id)`` of every unresolved review whose task was cancelled: the cancel is durable before
        its withdrawal, so a kill between the two leaves the review on the desk (claimable, never resolvable)."""
        return self._records.open_of_cancelled_tasks()

    def on_resolved(self, fn: Callable[[kpb.Review], object]) -> None:
        """Call ``fn(review)`` after each resolution; a Decision it returns becomes ``review.resolution``."""
        self._hooks.append(fn)

    def redeliver(self) -> int:
        """Run the hooks for resolutions whose hooks did not all finish; returns how many were finished."""
        done = 0
        for review in self._records.undelivered():
            try:
                self._deliver_once(review)
                done += 1
            except Internal:
                pass  # logged; stays undelivered for the next try
            except Unavailable as exc:  # a full or failing store (kernel/store/faults.py): the start goes on
                log.warning("review %s: its resolution's follow-up could not be finished now, it is tried again at "
                            "the next start: %s", review.review_id, exc.message)
        return done

    def _change(self, review_id: str, mutate, delivered: bool | None = None) -> tuple[kpb.Review, bool, bool]:
        _required(review_id, "review_id")
        self._settle()
        result = self._records.update(review_id, mutate, delivered, after_commit=self._publish_updated)
        if result is None:
            raise NotFound(f"review {quote(review_id)} does not exist")
        return result

    def _publish_updated(self, result) -> None:
        # Runs once the change is durable, on the committing thread, in commit order.
        if result is not None and result[1]:
            review, _changed, delivered = result
            if review.state == RESOLVED and not delivered:
                return  # watchers hear of a resolution once, when it is delivered (with its audited decision)
            self._feed.publish((UPDATED, review), size=review.ByteSize)
            if review.state != RESOLVED:
                self._leases.expect(review.lease_expires_unix_ns)  # a claim: its lapse will be news

    def _publish_lapsed(self, after_unix_ns: int) -> tuple[int, list[kpb.Review], int]:
        """The lease timer's look: the reviews whose lease ended since ``after_unix_ns``, each published as
        updated (a watcher is sent it as OPEN; a claim that follows the lapse comes as an event of its own).
        No read barrier: only stored rows can hold a lease."""
        def publish(result) -> None:
            # In commit order with the claims: a claim right after the lapse is published after it.
            for review in result[1]:
                self._feed.publish((UPDATED, review), size=review.ByteSize)

        return self._records.lapsed_leases(self._clock, after_unix_ns, after_commit=publish)

    def _deliver_once(self, review: kpb.Review) -> kpb.Review:
        """``_deliver``, unless a concurrent call already delivered this resolution (then the stored review)."""
        with self._delivering:
            current, _changed, delivered = self._change(review.review_id, lambda _stored: False)  # (writes nothing)
            return current if delivered else self._deliver(current)

    def _deliver(self, review: kpb.Review) -> kpb.Review:
        failures, resolution = [], None
        for hook in self._hooks:
            try:
                result = hook(self._present(review))
            except Exception as exc:
                exc = answerable(exc, "finishing a review resolution")  # descriptors, memory, disk (os_faults.py)
                if isinstance(exc, EnvironmentFault):  # (said once per episode where it was made)
                    failures.append(exc)
                    continue
                if _may_pass(exc):
                    # A condition that may pass (a full disk, a busy store, an audit log that fail-stopped and waits
                    # for a restart): one line per episode, no traceback (it was one per call, with one).
                    self._refused_follow_ups.failed(f"review {review.review_id}: {exc.message}", traceback=False)
                    failures.append(exc)
                    continue
                log.exception("on_resolved hook %r failed for review %s", hook, review.review_id)
                failures.append(exc)
                continue
            if isinstance(result, kpb.Decision):
                resolution = result
        if failures:
            said = "; ".join(f.message if _may_pass(f) else f"{type(f).__name__}: {f}" for f in failures)
            message = (f"review '{review.review_id}' is resolved ({review.resolved_action}), but finishing it failed: "
                       f"{said}. Resolve it again with the same reviewer, action and comment to retry")
            if all(_may_pass(f) for f in failures):
                # UNAVAILABLE with the cause's retry hint, as the store's own refusal is (it was INTERNAL, a kill-loop
                # audit on a full disk), but never "not decided": the resolution's record may be on the log already.
                hints = [t for f in failures for t in f.trailers if t[0] == "retry-after-ms"]
                raise Unavailable(message, trailers=tuple(hints[:1]))
            raise Internal(message)

        self._refused_follow_ups.succeeded()

        def attach(stored: kpb.Review) -> bool:
            if resolution is not None:
                stored.resolution.CopyFrom(resolution)
            return True

        return self._change(review.review_id, attach, delivered=True)[0]


def _may_pass(exc: BaseException) -> bool:
    """Whether a hook's error is a refusal that may pass, answered UNAVAILABLE: the store's (``Unavailable``) or the
    audit log's (an ``AuditError`` is a ``KernelError`` coded UNAVAILABLE, not an ``Unavailable``)."""
    return isinstance(exc, KernelError) and exc.code == "UNAVAILABLE"


def _closed(review: kpb.Review) -> FailedPrecondition:
    """Why a resolved review can be neither claimed nor resolved again (with another action or reviewer)."""
    if withdrawn(review):
        return FailedPrecondition(
            f"review {quote(review.review_id)} was {review.comment or 'withdrawn'}; there is nothing to decide")
    return FailedPrecondition(
        f"review {quote(review.review_id)} is already resolved ({review.resolved_action} by {review.resolved_by})")


def _other_comment(review: kpb.Review) -> FailedPrecondition:
    """A repeated resolution whose comment differs: the first comment is on the audit record for good."""
    return FailedPrecondition(
        f"review {quote(review.review_id)} was already resolved ({review.resolved_action} by {review.resolved_by}) "
        f"with another comment, which its audit record keeps; repeat it with the same comment (GetReview shows "
        "it) to get that resolution, or leave it as it is")


def _state_filter(state: str) -> str:
    state = state.upper()
    if state and state not in STATE_FILTERS:
        raise InvalidArgument(f"state must be one of {', '.join(STATE_FILTERS)} or empty, got {quote(state)}")
    return state


def _check_filters(pipeline: str, tenant: str) -> None:
    """A tenant filter no review can have (over the tenant limit, or with a control character, such as the newline
    of a value read from a file) is refused, naming it, as ListTasks refuses it: it matched nothing, so a watch
    waited for ever in silence and a list came back empty. So is a pipeline filter no pipeline can be named."""
    check_pipeline_filter(pipeline)
    check_identifier(tenant, "tenant", MAX_TENANT_CHARS)
