"""The decision side of the kernel, assembled: pipelines, policy, reviews, tasks, idempotency, audit.

``KernelServer`` builds one ``DecisionSide`` next to its model hub and
lanes. It owns the data directory (audit segments and keys, one SQLite
database) and wires the parts together: an escalated decision opens a
review; a task waits for it; a review's resolution is itself an audited
decision (outcome ``REVIEWED``) linked to the escalated one, and finishes
the waiting task with the reviewer's action.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sqlite3
import threading
import time
from pathlib import Path

from . import __version__
from .origin import origin
from ._proto.aios.kernel.v1 import kernel_pb2 as kpb
from .api.audit_service import audit_handlers
from .api.refusal_records import RefusalRecords
from .api.decision_service import decision_handlers
from .api.review_service import review_handlers
from .api.task_service import task_handlers
from .audit import AuditCorrupt, AuditLog
from .audit.errors import AuditTimeout
from .config import Settings
from .errors import (Aborted, DeadlineExceeded, DeadlineTooShort, FailedPrecondition, KernelError, NotFound,
                     ResourceExhausted, TransientError, Unavailable, shutting_down)
from .os_faults import environment_fault
from .pipelines import DecisionEngine, PipelineRegistry, Services
from .pipelines.provenance import resolution_record
from .policy import load_policy, parse_policy
from .review import ReviewQueue, reopen_reviews
from .review.reopen import recorded_defaults
from .review.queue import RESOLVED
from .store import DATABASE_FILE, open_database
from .store.faults import os_cause
from .store.idempotency import restore_answers
from .store.audit_needs import RECORDING_PREFIX, RESOLUTIONS_TENANT as _RESOLUTIONS
from .store.retention import RetentionSweeper, Swept
from .tasks import IdempotencyStore, TaskRunner, TaskStore, UntilRestart, WaitingForReview

log = logging.getLogger("aios.decisions")
# How far the wall clock may have stepped back between a resolution and its "recording" note (_resolution_on_record).
_NOTE_CLOCK_SLACK_NS = 3600 * 10**9

BACKUP_STAGING = ".backup-being-written"  # kernel/backup.py STAGING (not imported: a start needs none of it)

DEFAULT_PIPELINES = Settings().pipelines


class DecisionSide:
    def __init__(self, settings, hub, inference):
        self.settings = settings
        self.failed_at_stop: list[str] = []  # the steps of close() that failed
        self._withdrawing = threading.Lock()  # one withdrawal at a time (_withdraw)
        data = Path(settings.data_dir)
        try:
            # Owner only: the store keeps escalated cases' free text (customers' own words) and audit/ the signing
            # key; an operator walk-through found both readable by every local user under the usual umask.
            data.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:  # (the start's error line: name the setting, not only the path)
            raise OSError(f"data_dir {data} cannot be created: {exc.strerror or exc}") from None
        if data.stat().st_mode & 0o007:
            log.warning("data_dir %s is open to every local user (mode %o): it holds escalated cases' free text "
                        "and the audit signing key; `chmod 700 %s` (a new data dir is made owner-only)",
                        data, data.stat().st_mode & 0o777, data)
        if (data / BACKUP_STAGING).is_dir():  # (a restore killed half-way: a start here would begin an empty store)
            raise FailedPrecondition(
                f"data_dir {data} holds an unfinished backup or restore ({BACKUP_STAGING}: it was stopped half-way); "
                f"refusing to start (nothing was changed): run `aios-kernel restore` again into an empty folder, or "
                f"remove {data / BACKUP_STAGING} to start without it")
        if settings.audit_mode == "off" and (data / "audit").is_dir() and any((data / "audit").iterdir()):
            raise _unaudited_on_a_log(data)
        # A kernel has run here before (its lock file stays): a missing audit log is then news, not a first start.
        used_before = (data / "kernel.lock").exists()
        new_store = not (data / DATABASE_FILE).exists()
        self.db = open_database(data)  # one line naming data_dir when it cannot (kernel/store/faults.py)
        self.audit = None
        if settings.audit_mode != "off":
            if used_before and not (data / "audit").exists():
                mark = ReviewQueue(self.db).recorded_before()
                if settings.audit_mode == "fsync" and mark > 0:  # refused before a new log and key are made
                    self.db.close()
                    raise _lost_in_fsync_mode(data / "audit", 0, mark - 1)
                log.warning("data_dir %s was used by a kernel before but has no audit log: a new log (and signing "
                            "key) is being started; if %s was removed by mistake, stop this kernel and restore it",
                            data, data / "audit")
            try:
                self.audit = self._open_audit(data)
                if new_store and self.audit.size > 0:
                    raise _store_missing(data, self.audit.size)
            except BaseException:
                if self.audit is not None:
                    self.audit.close()
                self.db.close()  # its lock too: the same data dir may be served again in this process
                if new_store:  # (made by this start: as it was)
                    _remove_new_store(data)
                raise
        else:
            log.warning("audit_mode = off: decisions are NOT recorded (a benchmark baseline, not for production)")
        self.reviews = ReviewQueue(self.db)
        self.idempotency = IdempotencyStore(self.db)
        # The log's end as found, before anything (a model's deploy record) is appended: records the review
        # store saw past it were lost, and in fsync mode that refuses the start right here (_lost_records).
        self._opened = self.audit.size if self.audit is not None else 0
        try:
            planted = self.idempotency.forget_callers_under(_RESOLUTIONS)
            if planted:
                log.warning("forgot %d answers that callers of an older kernel stored under its own tenant %r (a "
                            "review's resolution would have answered them)", planted, _RESOLUTIONS)
            # (An older kernel's answers name their record in their bytes only: read once, so the check sees them.)
            if self.audit is not None:
                self.idempotency.fill_old_sequences(skip_tenant=_RESOLUTIONS)
                self.idempotency.unmark_unrecorded(skip_tenant=_RESOLUTIONS)  # (an unaudited kernel's answers)
            self._lost = self._lost_records(self._opened)
        except BaseException:
            self.audit.close()
            self.db.close()
            raise
        self.registry = PipelineRegistry(settings.pipelines, hub, load_policy, parse_policy, settings.pipeline_poll_s)
        self.engine = DecisionEngine(self.registry, inference, Services(self.audit, self.reviews, self.idempotency))
        self.db.refusal_listeners.append(self.engine.store_takes_writes)
        self.tasks = TaskRunner(TaskStore(self.db), self._run_task, workers=settings.task_workers,
                                validate=self.engine.validate, max_attempts=settings.task_max_attempts,
                                backoff_s=settings.task_backoff_s, max_backoff_s=settings.task_max_backoff_s,
                                audit_position=(lambda: self.audit.size) if self.audit is not None else None,
                                recorded=lambda task_id: task_id in self._recorded_tasks)
        # A Decide and a StartTask with one key: the Decide yields to a task's key, a task to a Decide's.
        self.engine.services.task_key_holder = self.tasks.store.key_holder
        self.tasks.store.check_key = self.engine.check_task_key
        self._draining = threading.Event()  # set by end_watches(): StreamAudit followers end
        self._started = False  # a "kernel stopping" record is written only after a "kernel started" one
        # Set once a stop's wait for running attempts is over (close): one still running then has what it uses closed
        # under it, and ends at the next start. Not before: an attempt that ends within the wait keeps its outcome
        # (one that failed for good was QUEUED "not counted" and decided by the next start; one that may pass lost
        # its count and back-off).
        self._closing = False
        # The stop raises the review mark to what this run stored, which covers the records past the mark a crash
        # left only once this start has reopened their reviews and stored their keys (_reopen_reviews).
        self._reopened = False
        # Refused calls on the audit log, one record a minute per RPC with a count (kernel/api/refusal_records.py).
        self._refusals = RefusalRecords(self.audit) if self.audit is not None else None
        # task id -> the decision record its attempt made before the kernel stopped (see _reopen_reviews)
        self._recorded_tasks: dict[str, kpb.AuditRecord] = {}
        self._warned_archived = False  # (_records_since: a log archived past what the store reads back)
        self.reviews.on_resolved(self._resolved)
        self.tasks.on_cancelled.append(self._task_cancelled)
        self._retention = (RetentionSweeper(self.db, settings.store_retention_days, self._swept,
                                            on_sweeping=self._sweeping)
                           if settings.store_retention_days else None)
        # Governance events go on the record next to the decisions they affect.
        hub.add_listener(self._models_changed)
        self.registry.listeners.append(self._pipeline_changed)
        self.registry.removed_listeners.append(self._pipeline_removed)

    def _open_audit(self, data: Path) -> AuditLog:
        settings = self.settings
        try:
            return AuditLog.open(
                data / "audit", mode=settings.audit_mode, key_path=settings.audit_key or None,
                checkpoint_records=settings.audit_checkpoint_records, checkpoint_ms=settings.audit_checkpoint_ms,
                segment_bytes=settings.audit_segment_bytes, preallocate_bytes=settings.audit_preallocate_bytes,
                sign_adopted=False,  # signed once the start record names them (start())
            )
        except OSError as exc:  # bare, it said "[Errno 17] File exists: '.../audit'" and nothing of the data dir
            raise OSError(_audit_open_error(data, exc)) from None
        except AuditCorrupt as exc:  # (some of its lines name a segment file only: say whose, crash audit)
            if str(data / "audit") in exc.message:
                raise
            raise AuditCorrupt(f"audit log {data / 'audit'}: {exc.message}") from None

    def start(self) -> None:
        # (The release too: an auditor reading the log years later, or an operator rolling back, can tell which
        # kernel wrote each stretch of it.)
        started = {"event": "kernel started", "kernel_version": __version__, "settings": _public_settings(self.settings)}
        if self.audit is not None:  # what opening the log found: adopted unsigned records, torn tails cut, a new key
            started["recovery"] = self.audit.recovery
        if self._lost is not None:  # on the record too, where an auditor reads the log months later
            started["lost_records"] = {"first": self._lost[0], "last": self._lost[1], "audit_mode": self.audit.mode}
        self._record(kpb.CONFIG_CHANGE, started)
        if self.audit is not None:  # (durable now: what a crash left unsigned is named on the log before it is signed)
            self.audit.adoption_recorded()
        self._started = True
        self.registry.start()
        self.reviews.skip_reserved_positions()  # (a power cut took back positions watches were sent: none again)
        self._reopen_reviews(self._opened)
        self._find_task_decisions()
        self.tasks.start()
        orphans = self.reviews.open_of_cancelled_tasks()  # (after the reopening: one it reopened too)
        for review_id, task_id in orphans:
            self._withdraw(review_id, task_id, f"task {task_id} was cancelled (withdrawn at start: the kernel stopped "
                                               "before the cancel withdrew it)")
        if orphans:
            log.warning("withdrew %d reviews of cancelled tasks: the kernel stopped between a cancel and its "
                        "withdrawal of the task's review", len(orphans))
        self.reviews.redeliver()  # resolutions a crash or a failed hook cut off are finished now
        if self._retention is not None:  # (after redeliver: a resolution it finishes then ages like the others)
            self._retention.start()
        names = ", ".join(f"{p.name} ({p.label}, policy {p.policy.version})" for p in self.registry.all())
        data = Path(self.settings.data_dir).resolve()
        log.info("decisions: pipelines %s; data dir %s: audit log audit/ (%s, %d records), tasks and reviews in %s",
                 names or "(none)", data, self.settings.audit_mode, self.audit.size if self.audit else 0,
                 DATABASE_FILE)
        if not self.registry.folder.is_dir():
            # A folder someone named and mistyped would otherwise show only as NOT_FOUND answers; the default one
            # missing is a kernel that serves models only.
            named = self.settings.pipelines != DEFAULT_PIPELINES
            log.log(logging.WARNING if named else logging.INFO,
                    "pipeline folder %s does not exist: no pipelines are served (Decide answers NOT_FOUND) until "
                    "pipeline files appear there", self.registry.folder)

    def handlers(self, budget=None, watches=None, streams=None, payload=None) -> dict:
        """The RPC handlers; ``budget`` (kernel.api.call_budget.CallBudget) may refuse a Decide by priority,
        ``watches`` (kernel.api.watch_budget.WatchBudget) caps the open watches of the three watch RPCs,
        ``streams`` (a StreamBudget: grpc.aio) the open DecideStreams, ``payload`` (a PayloadBudget) the large
        requests a DecideStream holds."""
        return {
            **decision_handlers(self.engine, self.registry, budget, streams, payload),
            **review_handlers(self.reviews, watches),
            **task_handlers(self.tasks, watches),
            **(audit_handlers(self.audit, allow_stream=self.settings.audit_stream_enabled, draining=self._draining,
                              watches=watches, refusals=self._refusals)
               if self.audit else {}),
        }

    def end_watches(self) -> None:
        """The drain's first step: every open watch (WatchReviews, WatchTask, a StreamAudit that follows
        the log) ends now with UNAVAILABLE "shutting down", and one opened later ends at once.

        Watches have no end of their own, so left open they would hold the drain for its whole
        grace period and then be cut off with gRPC's bare "Cancelling all calls".
        """
        self._draining.set()
        self.reviews.end_watches(shutting_down)
        self.tasks.store.end_watches(shutting_down)

    def close(self) -> None:
        # The "kernel stopping" record comes once nothing else can append (tasks, pipeline reloads and the
        # finisher have stopped) and right before the log closes, whose final checkpoint then signs it.
        # (A store refusing writes for a lock released since its last probe takes them again first: each write the
        # stop makes was refused at once, and the restart redid them, or lost a task's back-off.)
        steps = (*((self._retention.stop,) if self._retention else ()), self.db.write_again_now, self._stop_tasks,
                 self.registry.stop, self.engine.close, self._mark_reviews_recorded,
                 *((self._record_stopping, self.audit.close) if self.audit else ()), self.db.close)
        self.failed_at_stop = []  # (the serve command's exit status: a stop that lost its record is not a clean one)
        for step in steps:
            try:
                step()
            except _EXPECTED_AT_STOP as exc:  # a full or failing disk, a failed store or log: said in one line
                self.failed_at_stop.append(_step_name(step))
                if isinstance(exc, KernelError) and exc.code == "INTERNAL":
                    log.exception("stopping: %s failed", _step_name(step))
                else:
                    log.error("stopping: %s failed: %s", _step_name(step), _cause(exc))
            except Exception:  # a bug: one part failing to stop must not keep the others open
                self.failed_at_stop.append(_step_name(step))
                log.exception("stopping: %s failed", _step_name(step))
        if self.audit is not None and self.audit.failure is not None and not self.failed_at_stop:
            # (It fail-stopped while closing: its final checkpoint, or a check of its files, failed; said above.)
            self.failed_at_stop.append("the audit log")

    def _stop_tasks(self) -> None:
        """Stop the task workers, waiting for running attempts (TaskRunner.stop); from then on an attempt still
        running waits for the next start (``_until_restart``), whatever it fails with."""
        try:
            self.tasks.stop()
        finally:
            self._closing = True

    def _record_stopping(self) -> None:
        """The log's last record on a clean stop: months later it tells a stop from a crash (after a kill
        or a power cut the log just ends), and names what was serving until then."""
        if not self._started:
            return  # a start that failed before its own record: nothing to pair it with
        serving = {p.name: {"pipeline_version": p.hash, "policy_hash": p.policy.hash} for p in self.registry.all()}
        if self._refusals is not None:
            self._refusals.flush()  # the refusals counted since their last record: on the log before it closes
        self._record(kpb.CONFIG_CHANGE, {"event": "kernel stopping", "pipelines": serving})

    # -- reviews the audit log holds -----------------------------------------------------------
    def _lost_records(self, opened: int) -> tuple[int, int] | None:
        """The records the review store saw that the log, ``opened`` records long, no longer has: (first, last).

        In "async" mode a power cut or OS crash can take the newest records (never a crash of the kernel
        alone): said, and the kernel goes on. In "fsync" mode every record was on disk before its decision
        was answered, so missing ones mean the log was rolled back, replaced (a backup restored, another
        kernel's log) or its storage failed: the kernel refuses to start, since it would hand their
        sequence numbers, which callers already hold, to new decisions and sign over the gap."""
        if self.audit is None:
            return None
        # What the store saw: the review mark, and the highest record a stored answer cites (a review audit: the
        # mark alone rises only with escalations, so a loss after the last one went unseen, and answers citing
        # lost records were replayed).
        since = max(self.reviews.recorded_before(), self.idempotency.highest_sequence() + 1)
        if since <= opened:
            return None
        first, last = opened, since - 1
        if self.audit.mode == "fsync":
            raise _lost_in_fsync_mode(self.audit.directory, opened, last)
        log.warning("the audit log ends at record #%d but the review and idempotency store saw records up to #%d: "
                    "records #%d-#%d were lost (audit_mode %r: a power cut or OS crash loses the newest records); "
                    "recorded as such", opened, last, first, last, self.audit.mode)
        return first, last

    def _reopen_reviews(self, opened: int) -> None:
        """Open the reviews a crash cut off (see kernel/review/reopen.py), then move the mark up. ``opened``:
        the log's size when this start began (``_lost_records`` has said what it lost)."""
        if self.audit is None:
            return
        since = self.reviews.recorded_before()
        if self._lost is not None:
            # Lost records (async mode): their sequence numbers go to new decisions now, so the mark comes down
            # to where the log ended: escalations from here on must still be reopened after a crash. (A review
            # whose record was lost keeps its proposal; its resolution will not link to the new record there.)
            if since > opened:
                self.reviews.lower_recorded_before(opened)
            forgotten = self.idempotency.forget_recorded_from(opened, skip_tenant=_RESOLUTIONS)
            if forgotten:
                log.warning("forgot the idempotency entries of %d decisions whose records #%d on were lost: their "
                            "sequence numbers go to new decisions now, so a retry with one of those keys is decided "
                            "again (and recorded) instead of answered with a number that names another decision",
                            forgotten, opened)
            since = min(since, opened)
        reopened = reopen_reviews(self.reviews, self._records_since(since, kpb.DECISION),
                                  self._review_settings, self._cancelled_task)
        restored = restore_answers(self.idempotency, self._records_since(since, kpb.DECISION))
        self.reviews.mark_recorded_before(self.audit.size)  # nothing is in flight yet
        self._reopened = True
        if reopened:
            log.warning("reopened %d reviews from the audit log (records #%d to #%d): their rows were lost "
                        "in a crash after the decisions were recorded", reopened, since, self.audit.size - 1)
        if restored:
            log.warning("stored the idempotency keys of %d decisions from the audit log (records #%d to #%d): "
                        "they were recorded just before the kernel stopped, and a retry gets them back",
                        restored, since, self.audit.size - 1)

    def _cancelled_task(self, task_id: str) -> bool:
        """Whether ``task_id`` was cancelled (a review reopened for its record is then withdrawn at start)."""
        try:
            return self.tasks.store.get(task_id).state == kpb.CANCELLED
        except NotFound:  # (deleted by retention: it ended long ago, and its review with it)
            return False

    def _find_task_decisions(self) -> None:
        """For each task the kernel stopped in (still RUNNING), the decision its attempt recorded, if it got
        that far: the restarted task takes it (``_run_task_once``) instead of deciding again, so the log holds
        one decision per task (and a newer policy cannot decide it anew). Read from where the earliest of
        those attempts began (``Task.audit_from_sequence``), so it costs nothing when no task was running."""
        if self.audit is None:
            return
        # (and each task queued again after an attempt, which may have recorded its decision before taking it failed
        # in a way that may pass: _run_task)
        running = {task.task_id: task.audit_from_sequence for task in self.tasks.store.in_states((kpb.RUNNING,))}
        # (and one whose attempt waited for this restart, uncounted: its audit_from says it began one)
        running.update((task.task_id, task.audit_from_sequence) for task in self.tasks.store.in_states((kpb.QUEUED,))
                       if task.attempts or task.audit_from_sequence)
        if not running:
            return
        start = min(min(running.values()), self.audit.size)  # (a log that lost its newest records: async mode)
        for record in self._records_since(start, kpb.DECISION):
            if record.task_id in running:
                self._recorded_tasks[record.task_id] = record

    def _records_since(self, sequence: int, kind: int):
        """The log's records of ``kind`` from ``sequence`` on, or from its archive base when that is later. The
        archive stops before the oldest record the store may read back (kernel/store/audit_needs.py), so that
        happens only to a log archived without its store: said once per start."""
        first = self.audit.first_sequence
        if sequence < first and not self._warned_archived:
            self._warned_archived = True
            log.warning("the audit log was archived up to #%d, past #%d, which the store still reads back (archived "
                        "without --store?): a task stopped mid-attempt may be decided again, and a resolution cut "
                        "off mid-delivery recorded again", first - 1, sequence)
        return self.audit.read(from_sequence=max(sequence, first), kind=kind)

    def _review_settings(self, pipeline_name: str, decision: kpb.Decision) -> tuple[list[str], float]:
        try:
            escalation = self.registry.get(pipeline_name).escalation
        except KernelError:
            # The actions its pipeline offered on a review still stored, else the proposed one alone: that alone
            # is "review" for an escalation, which left the case with no decision a reviewer could make (review
            # desk audit).
            stored = self.reviews.newest_of(pipeline_name)  # (the newest: an older one may be an older version's)
            actions = list(dict.fromkeys([decision.action, *(stored.actions if stored is not None else ())]))
            log.warning("pipeline %s is no longer loaded: its reopened review %s offers %s (%s), with no SLA",
                        pipeline_name, decision.review_id, ", ".join(actions),
                        "as its newest stored review does" if stored is not None else "the proposed action only: none "
                                                                                      "of its reviews is stored")
            return actions, 0.0
        return list(escalation.review_actions), escalation.review_sla_s

    def _mark_reviews_recorded(self) -> None:
        # A start that failed before reopening (a full disk failed a model's record) leaves the mark where the
        # crash left it: raised to the log's end, it hid the reviews and keys past it from the next start for good.
        if self.audit is not None and self._reopened:
            self.reviews.mark_recorded_before(self.engine.recorded_before())
        if self._started:  # every review row is stored (engine.close): the next start need skip no position
            self.reviews.release_reserved_positions()

    def _recorded(self, proposed: kpb.Decision) -> bool:
        """Whether the audit log holds the record ``proposed`` was answered with (its sequence and hash):
        the only record a resolution may link to. Not so for a decision decided without the log, or
        one whose record a power cut took in "async" mode (its number then belongs to another)."""
        if not proposed.audit_hash:
            return False
        if proposed.audit_sequence < self.audit.first_sequence:
            return True  # archived since: the log verified strictly with it before the archive (audit/archive.py)
        record = next(iter(self.audit.read(from_sequence=proposed.audit_sequence)), None)
        if record is not None and record.sequence == proposed.audit_sequence and _hex(record.hash) == proposed.audit_hash:
            return True
        log.warning("the audit log does not hold record #%d with hash %s, which review decision %s was answered "
                    "with (lost to a power cut in async mode?): its resolution is recorded without a link",
                    proposed.audit_sequence, proposed.audit_hash[:16], proposed.request_id)
        return False

    # -- governance events -----------------------------------------------------------------
    def _sweeping(self, cutoff_unix_ns: int) -> None:
        """Before retention deletes anything: the cut-off on the record first (then the counts, ``_swept``)."""
        self._record(kpb.CONFIG_CHANGE, {"event": "retention starting", "ended_before_unix_ns": cutoff_unix_ns,
                                         "store_retention_days": self.settings.store_retention_days})

    def _swept(self, swept: Swept) -> None:
        """Retention deleted rows: on the record, so the log says why a review or task it names is gone."""
        self._record(kpb.CONFIG_CHANGE, {"event": "retention", "ended_before_unix_ns": swept.cutoff_unix_ns,
                                         "reviews_deleted": swept.reviews, "tasks_deleted": swept.tasks,
                                         "store_retention_days": self.settings.store_retention_days})

    def _record(self, kind: int, detail: dict, wait: bool = True) -> None:
        if self.audit is None:
            return
        record = kpb.AuditRecord(kind=kind, principal="kernel", payload=json.dumps(detail, sort_keys=True).encode())
        ticket = self.audit.append(record)
        if wait:
            ticket.wait(10.0)

    def _models_changed(self, added, removed) -> None:
        # Retirements first: a reload replaces every version's session, and an UNDEPLOY of version 1 written
        # after the DEPLOY of its successor read as version 1 retired while it served on (model-owner audit).
        reloaded = {(m.name, m.version) for m in added}
        for mv, kind in [*((m, kpb.MODEL_UNDEPLOY) for m in removed), *((m, kpb.MODEL_DEPLOY) for m in added)]:
            # The bytes hashed when this version was loaded (an undeploy names the retiring model's own, not
            # whatever replaced the file since), and model.toml's: its labels say which score is which action.
            payload = {"model": mv.name, "version": mv.version, "provider": mv.runtime.provider,
                       "onnx_sha256": mv.runtime.onnx_sha256, "config_sha256": mv.runtime.config_sha256}
            if kind == kpb.MODEL_UNDEPLOY:
                # "reload": the same version is deployed again by the next record(s), from the files as they are now
                payload["reason"] = "reload" if (mv.name, mv.version) in reloaded else "unload"
            payload["requested_by"] = origin() or "kernel"  # an RPC's caller, or the kernel's own start
            self._record(kind, payload)

    def _pipeline_changed(self, old, new) -> None:
        # The texts themselves, not only their hashes (each hash is the sha256 of its text's UTF-8 bytes):
        # the rules a decision was made under can be read from the log alone, with no archive of old files.
        self._record(kpb.POLICY_CHANGE, {
            "pipeline": new.name, "pipeline_version": new.hash, "pipeline_label": new.label,
            "policy": new.policy.name, "policy_version": str(new.policy.version), "policy_hash": new.policy.hash,
            "previous_pipeline_version": old.hash if old else "", "previous_policy_hash": old.policy.hash if old else "",
            "pipeline_toml": new.text, "policy_toml": new.policy.text,
            "requested_by": origin() or "kernel",  # an upload's caller, or the kernel (its start, the folder)
        })

    def _pipeline_removed(self, old) -> None:
        # On the record too: decisions stop being made under this pipeline from here on.
        self._record(kpb.POLICY_CHANGE, {
            "event": "pipeline unloaded", "pipeline": old.name, "pipeline_version": "",
            "previous_pipeline_version": old.hash, "previous_policy_hash": old.policy.hash,
        })

    # -- tasks and reviews -------------------------------------------------------------
    def _run_task(self, task: kpb.Task):
        """A task runs its pipeline like Decide, but nobody waits on it; escalation makes it wait for a review.

        An attempt's deadline (the request's ``timeout_ms``, else the pipeline's
        ``[model] timeout_ms``) bounds its wait for the model, as it does for
        Decide, so a task queues as a decision would; it is no deadline for the
        task. An attempt that fails in a way that may pass is retried by the
        runner with backoff (``task_max_attempts``, ``task_backoff_s``): see
        ``_may_pass``. Anything else fails the task with its reason.

        One decision per task: an attempt that failed after its decision was
        recorded (answered DEADLINE_EXCEEDED because it was recorded past its
        deadline, or UNAVAILABLE because its review could not be stored) is
        not run again; that decision is the task's outcome.
        """
        try:
            return self._run_task_once(task)
        except KernelError as exc:
            failure = exc
        except Exception as exc:  # the environment ran out (kernel/os_faults.py)? It may pass, as an UNAVAILABLE does
            failure = environment_fault(exc, "a task's attempt")
            if failure is None:
                raise
        if isinstance(failure, AuditTimeout) and failure.sequence >= 0:
            failure = self._await_record(failure)
        elif not (isinstance(failure, TransientError) or self._may_pass(task, failure) or self._until_restart()):
            raise failure
        recorded = self._attempt_record(task)
        if recorded is not None:
            try:
                return self._decided_before(task, recorded, f"its attempt failed after recording it ({failure.code})")
            except KernelError as exc:
                if not self._may_pass(task, exc):
                    raise
                # Taking it failed in a way that may pass too (the store's write lock held by another process: the
                # review it opens refused again): the task failed at once, its escalated decision on the log and no
                # review open (a race review). Its next run takes that decision (TaskRunner.recorded), not a new one.
                self._recorded_tasks[task.task_id] = recorded
                raise TransientError(f"{exc.code}: {exc.message}") from exc
        if self._until_restart():  # (it failed the task at once: an AuditError is no Unavailable)
            # Nothing can be decided until the kernel starts again: the operator fixes the disk and restarts it, as
            # the log's failure says, or it is stopping (an attempt that outlasted the stop's wait found the log
            # closed). The task waits for that, its attempts unspent (it was FAILED for good, and its key with it).
            raise UntilRestart(f"{failure.code}: {failure.message}") from failure
        if isinstance(failure, TransientError):
            raise failure
        raise TransientError(f"{failure.code}: {failure.message}") from failure

    def _await_record(self, timeout: AuditTimeout) -> KernelError:
        """The attempt's record was taken, but the disk was slower than the decision's wait for it (a stall, not a
        failure): nobody waits on a task's answer, so its attempt waits for that record, which ``_run_task`` then
        takes as the outcome (answered "not durable within 10 s", the task FAILED at once, and the record, durable
        a moment later, held a decision of a FAILED task). The log's error if it failed or closed meanwhile."""
        try:
            self.audit.wait_durable(timeout.sequence)
        except KernelError as exc:
            return exc
        return timeout

    def _until_restart(self) -> bool:
        """Whether nothing can be decided until the kernel starts again: its audit log fail-stopped, or a stop's wait
        for running attempts is over (``_stop_tasks``: what they use is being closed)."""
        return self._closing or (self.audit is not None and self.audit.failure is not None)

    def _may_pass(self, task: kpb.Task, exc: KernelError) -> bool:
        """Whether an attempt's failure may pass if the task runs again later.

        A full queue (RESOURCE_EXHAUSTED), a model being swapped or an audit
        log that cannot take records now (UNAVAILABLE), a Decide with the
        task's idempotency key in flight (ABORTED), and a deadline that passed
        in a busy queue (DEADLINE_EXCEEDED: the model did not answer in time,
        so nothing was decided) may all pass. So may a model that is not loaded
        while its pipeline still is: an operator reloading it; and a pipeline
        refused for want of its model, served once it loads (at a start the model did not load: the tasks the restart
        resumed failed for good). A pipeline that is gone fails the task. So does an attempt's timeout shorter than
        the model's own predicted run (DeadlineTooShort, nothing ahead of it): every attempt has that timeout, and
        the model that run (it was retried task_max_attempts times, ~4 minutes by default, to fail "gave up after 10
        attempts" all the same).
        """
        if isinstance(exc, DeadlineTooShort) and exc.run_ns >= self._attempt_timeout_ns(task):
            return False
        if isinstance(exc, (ResourceExhausted, Unavailable, Aborted, DeadlineExceeded)):
            return True
        return isinstance(exc, NotFound) and (self._pipeline_loaded(task.request.pipeline)
                                              or self.registry.waits_for_model(task.request.pipeline))

    def _attempt_timeout_ns(self, task: kpb.Task) -> int:
        """The whole time each attempt of ``task`` has for the model (as DecisionEngine.prepare reads it)."""
        if task.request.timeout_ms:
            return task.request.timeout_ms * 10**6
        try:
            return self.registry.get(task.request.pipeline).timeout_ms * 10**6
        except KernelError:  # (unloaded since: the task fails on that at its next attempt)
            return 0

    def _pipeline_loaded(self, name: str) -> bool:
        try:
            self.registry.get(name)
        except KernelError:
            return False
        return True

    def _attempt_record(self, task: kpb.Task) -> kpb.AuditRecord | None:
        """The decision record the task's current attempt wrote, if it got that far; read from where the
        attempt began (``Task.audit_from_sequence``), so only the records written meanwhile are read."""
        if self.audit is None:
            return None
        start = min(task.audit_from_sequence, self.audit.size)
        for record in self._records_since(start, kpb.DECISION):
            if record.task_id == task.task_id:
                return record
        return None

    def _run_task_once(self, task: kpb.Task):
        recorded = self._recorded_tasks.pop(task.task_id, None)
        if recorded is not None:
            return self._decided_before(task, recorded, "its attempt was cut off by a stop of the kernel")
        pending = self.engine.prepare(task.request, None, task_id=task.task_id)
        if isinstance(pending, kpb.Decision):  # answered before (idempotency key), maybe cut off before it waited
            if pending.outcome in (kpb.ESCALATED, kpb.FALLBACK) and pending.review_id:
                return WaitingForReview(pending.review_id, pending)
            return pending
        pending.task_id = task.task_id
        try:
            self.engine.run_blocking(pending)
            result = self.engine.outcome(pending)  # decided on this thread (a task's item has no finisher)
        finally:
            self.engine.release(pending)  # (refused before it ran; otherwise finish released it already)
        if result.outcome in (kpb.ESCALATED, kpb.FALLBACK) and result.review_id:
            return WaitingForReview(result.review_id, result)
        return result

    def _decided_before(self, task: kpb.Task, record: kpb.AuditRecord, why: str):
        """The decision ``record`` holds, as this task's outcome (its review opened if it has none)."""
        decision = kpb.Decision()
        decision.CopyFrom(record.decision)
        decision.audit_sequence, decision.audit_hash = record.sequence, record.hash.hex()
        log.info("task %s takes the decision recorded at #%d (%s) instead of deciding again: %s",
                 task.task_id, record.sequence, decision.action, why)
        if decision.outcome in (kpb.ESCALATED, kpb.FALLBACK) and decision.review_id:
            actions, sla_seconds = self._review_settings(record.pipeline, decision)
            # (the one it opened, if it was stored)
            self.reviews.create_many([(decision, task.request, actions, sla_seconds, task.task_id, decision.review_id,
                                       record.time_unix_ns, recorded_defaults(record))])
            return WaitingForReview(decision.review_id, decision)
        return decision

    def _task_cancelled(self, task: kpb.Task) -> None:
        """Nobody should work a case whose task is gone: its review is withdrawn, found by the task's id when the
        task does not name it yet (the attempt that opened it still runs; the store refuses its resolution)."""
        review_id = task.review_id or getattr(self.reviews.for_task(task.task_id), "review_id", "")
        if review_id:  # (only one the task opened: one it adopted from a Decide is that caller's)
            self._withdraw(review_id, task.task_id, f"task {task.task_id} was cancelled")

    def _withdraw(self, review_id: str, task_id: str, reason: str) -> None:
        """Take the review ``task_id`` opened off the desk, on the record: its escalated decision is on the log, so
        is how the case ended (an operator walk-through: a cancel left the escalation with no resolution and no
        word of why). The record comes first, once (a withdrawal cut short by a kill finds it at the next start,
        as a resolution's delivery does); a reviewer can no longer resolve the review meanwhile: the cancel is
        durable, and the store refuses that resolution."""
        # One at a time, the review read again inside: the cancel's hook and the attempt ending (it opened the review
        # as the cancel landed, _cancelled_while_running) can both get here for one review, and both recorded the
        # withdrawal (a session review: 11 of 30 such races). Withdrawals are rare: one lock for all.
        with self._withdrawing:
            review = self.reviews.for_task(task_id)
            if review is None or review.review_id != review_id or review.state == RESOLVED:
                return
            if self.audit is not None and self._resolution_on_record(review, self._cancelled_at(task_id)) is None:
                withdrawn = kpb.Review()
                withdrawn.CopyFrom(review)
                withdrawn.resolved_by, withdrawn.comment = "kernel", f"withdrawn: {reason}"
                withdrawn.resolved_unix_ns = time.time_ns()
                resolution = self._resolution_of(withdrawn, "", "WITHDRAWN", f"withdrawn: {reason}")
                self.audit.append_and_wait(self._resolution_record(withdrawn, resolution), timeout_s=10.0)
            self.reviews.withdraw(review_id, reason, task_id)

    def _cancelled_at(self, task_id: str) -> int:
        """When ``task_id`` was cancelled (wall clock; 0 if that is not known)."""
        try:
            history = self.tasks.store.get(task_id).history
        except NotFound:
            return 0
        return next((change.at_unix_ns for change in history if change.state == kpb.CANCELLED), 0)

    def _resolution_on_record(self, review: kpb.Review, begun_unix_ns: int) -> kpb.AuditRecord | None:
        """The REVIEW_RESOLUTION record of ``review`` if one is on the log already (a delivery cut off by a kill
        after its record, before its done entry; found by a crash audit: the next start recorded it twice).
        Where to look from is noted before each recording (first note kept), so a first delivery reads nothing
        and a delivered-again one reads only the records since its first try.

        The note is an idempotency entry, which expires (and is purged) a retention period after it was taken:
        a delivery finished later than that (a kernel started again a day after the kill) found none, and recorded
        the resolution again (a random-kill audit). ``begun_unix_ns`` (wall clock): when the first try began at the
        earliest (the resolution, the cancel); once its note may have expired, the search starts at the escalated
        decision's record, before which no resolution of it can be."""
        # (Fsynced: the record written next is, and a power cut that kept it but took an unsynced note would have
        # the next start look from past it, and record the resolution again. One fsync a resolution, at human rates.)
        since = int(self.idempotency.put(_RESOLUTIONS, RECORDING_PREFIX + review.review_id, "",
                                         str(self.audit.size).encode(), durable=True))
        if self.idempotency.now() - begun_unix_ns >= self.idempotency.retention_ns - _NOTE_CLOCK_SLACK_NS:
            since = min(since, review.proposed.audit_sequence)
        return next((record for record in self._records_since(since, kpb.REVIEW_RESOLUTION)
                     if record.decision.review_id == review.review_id), None)

    def _resolved(self, review: kpb.Review) -> kpb.Decision:
        # Delivered at least once (again after a crash): the first resolution recorded is the one.
        done_key = "review:" + review.review_id
        stored = self.idempotency.get(_RESOLUTIONS, done_key)
        if stored is not None:
            resolution = kpb.Decision.FromString(stored[1])
            self._finish_waiting_task(review, resolution)
            return resolution
        resolution = self._resolution_of(review, review.resolved_action, "REVIEW",
                                         f"decided by {review.resolved_by}: {review.comment}".rstrip(": "))
        if self.audit is not None:
            recorded = self._resolution_on_record(review, review.resolved_unix_ns)
            if recorded is not None:  # a kill came between its record and the entry below: that record is the one
                resolution = kpb.Decision()
                resolution.CopyFrom(recorded.decision)
                resolution.audit_sequence, resolution.audit_hash = recorded.sequence, _hex(recorded.hash)
            else:
                sequence, digest = self.audit.append_and_wait(self._resolution_record(review, resolution),
                                                              timeout_s=10.0)
                resolution.audit_sequence, resolution.audit_hash = sequence, _hex(digest)
        self.idempotency.put(_RESOLUTIONS, done_key, "", resolution.SerializeToString())
        self._finish_waiting_task(review, resolution)
        return resolution

    @staticmethod
    def _resolution_of(review: kpb.Review, action: str, rule_id: str, description: str) -> kpb.Decision:
        """How ``review`` ended, as a decision linked to the escalated one: a reviewer's action, or none (withdrawn)."""
        proposed = review.proposed
        resolution = kpb.Decision(
            request_id=review.request_id or proposed.request_id,
            action=action,
            outcome=kpb.REVIEWED,
            pipeline=proposed.pipeline,
            pipeline_version=proposed.pipeline_version,
            tenant=review.tenant,
            policy_name=proposed.policy_name,
            policy_hash=proposed.policy_hash,
            policy_version=proposed.policy_version,
            input_hash=proposed.input_hash,
            review_id=review.review_id,
            links_to_audit_sequence=proposed.audit_sequence,
        )
        resolution.model.CopyFrom(proposed.model)
        resolution.reasons.add(rule_id=rule_id, description=description)
        return resolution

    def _resolution_record(self, review: kpb.Review, resolution: kpb.Decision) -> kpb.AuditRecord:
        """The REVIEW_RESOLUTION record of ``resolution``, linked to the escalated decision's record when the log
        has it (``resolution`` says so: its link is cleared otherwise)."""
        proposed = review.proposed
        linked = self._recorded(proposed)
        if not linked:
            resolution.links_to_audit_sequence = 0
        record = resolution_record(resolution, review.resolved_by, proposed.audit_sequence if linked else None, review)
        record.task_id = review.task_id  # a task's final decision is found by its task, as its escalation is
        return record

    def _finish_waiting_task(self, review: kpb.Review, resolution: kpb.Decision) -> None:
        """The task waiting on ``review`` finishes with the human's decision: the task that opened it, or one that
        adopted a keyed Decide's escalated answer (StartTask with the key and request of a Decide: the review names
        no task; a review audit found such a task waiting for good). For a keyed review the resolution is kept for
        a task that may adopt it later (TaskStore.enter_waiting finds it), until retention deletes the review."""
        if review.task_id or review.request.idempotency_key:
            self.tasks.complete_from_review(review.review_id, resolution, task_id=review.task_id)


def _lost_in_fsync_mode(directory: Path, opened: int, last: int) -> AuditCorrupt:
    return AuditCorrupt(
        f"the audit log {directory} ends at record #{opened} but the review and idempotency store saw records up to #{last}: "
        f"records #{opened}-#{last} were on disk before their decisions were answered (audit_mode 'fsync') and are "
        "gone (the log rolled back or replaced, a copy of a running kernel's data dir that took audit/ before "
        "kernel.sqlite3 — aios-kernel backup copies them in the right order —, or its storage failed); refusing to "
        "start. Restore the log (aios-kernel audit verify DIR checks a copy), or, to accept the loss, start once "
        "with AIOS_AUDIT_MODE=async: the loss is then recorded in the log, and stored answers that cite the lost "
        "records are forgotten")


def _store_missing(data: Path, records: int) -> FailedPrecondition:
    """A data dir whose audit log has records but whose store is gone (removed: a crash cannot do it). Started,
    the kernel would reopen reviews already resolved and forget every task and idempotency key (crash audit)."""
    return FailedPrecondition(
        f"data_dir {data} has an audit log of {records} records but no {DATABASE_FILE}: its reviews, tasks and "
        f"idempotency keys are gone, and a start would reopen resolved reviews as open and decide retried keys "
        f"again; refusing to start (nothing was changed on disk). Restore {DATABASE_FILE} from a backup, or, to "
        f"start afresh on purpose, move the audit log ({data / 'audit'}) aside too")


def _unaudited_on_a_log(data: Path) -> FailedPrecondition:
    """audit_mode "off" on a data dir with an audit log: its decisions, reviews and tasks would be missing from the
    log without a trace (an operator walk-through: a later audited start looked like a clean stop and a start)."""
    return FailedPrecondition(
        f"audit_mode is 'off', but data_dir {data} has an audit log ({data / 'audit'}): the decisions, reviews and "
        f"tasks of this run would be missing from it without a trace; refusing to start (nothing was changed on "
        f"disk). Serve this data dir with audit_mode 'fsync' or 'async', or use another data_dir for unaudited runs")


def _remove_new_store(data: Path) -> None:
    for name in (DATABASE_FILE, DATABASE_FILE + "-wal", DATABASE_FILE + "-shm"):
        try:
            (data / name).unlink()
        except FileNotFoundError:
            pass


# What a step of close() may fail with that is no bug (the disk filled, the store or the audit log fail-stopped).
_EXPECTED_AT_STOP = (KernelError, OSError, sqlite3.Error)


def _step_name(step) -> str:
    """"DecisionSide._record_stopping", not "<bound method ... of <kernel.decisions.DecisionSide object at 0x...>>"."""
    return getattr(step, "__qualname__", None) or repr(step)


def _cause(exc: BaseException) -> str:
    return exc.message if isinstance(exc, KernelError) else f"{type(exc).__name__}: {exc}"


def _audit_open_error(data: Path, exc: OSError) -> str:
    """The start's error line for an audit log folder that cannot be opened: names data_dir and the path."""
    folder = data / "audit"
    if folder.exists() and not folder.is_dir():
        return f"data_dir {data}: {folder} is a file, not the audit log's folder: move it aside and start again"
    where = exc.filename or folder
    return f"data_dir {data}: the audit log cannot be opened ({where}): {os_cause(exc)}"


def _public_settings(settings) -> dict:
    return {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)}


def _hex(digest) -> str:
    return digest.hex() if isinstance(digest, bytes) else str(digest)

