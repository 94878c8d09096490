"""The kernel's counters as Prometheus metrics, read when scraped.

Nothing here runs on the hot path: every value is one the kernel already keeps
(``ModelStats``, the scheduler's counters, the decision tally, the calls
answered with an error (refusals.py), the audit writer's and the store's) or
counts when asked (reviews, tasks: indexed counts of the rows not final, and a
count kept per pipeline, never a count over the store's history), read at each
scrape. Names follow Prometheus' conventions: ``aios_`` first, base units
(``_seconds``), ``_total`` on counters. Labels are bounded by what an operator
deploys — model, version, pipeline, the kernel's own method names, and fixed
sets of reasons, codes and states —
never a tenant, a request id or an error's text, so the number of series
cannot grow with traffic.

Counters only grow: a model version's counters keep counting across a reload
(``ModelStats`` and its ``retired`` scheduler counts are kept by the reload);
an unloaded version's series go, and start again from 0 if it is loaded again,
which Prometheus reads as a new series.
"""

from __future__ import annotations

import logging
import time

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, SummaryMetricFamily

from .._proto.aios.kernel.v1 import kernel_pb2 as kpb
from ..errors import KernelError
from .repeats import RepeatedFailure

log = logging.getLogger("aios.metrics")

MODEL = ["model", "version"]
# Task states counted (the ones not final: finished tasks are kept for store_retention_days and only pile up).
_TASK_STATES = {kpb.QUEUED: "queued", kpb.RUNNING: "running", kpb.WAITING_FOR_REVIEW: "waiting_for_review"}


def _seconds(ns: int) -> float:
    return ns / 1e9


class KernelCollector:
    """A ``prometheus_client`` collector over a running ``KernelServer`` (its hub, lanes and decision side)."""

    def __init__(self, server):
        self._server = server
        self._store_reads = RepeatedFailure(log, "reading reviews and tasks for the metrics endpoint")
        # Set as the kernel stops, before its parts close: a scrape then reads only whether it serves (one taken
        # just before the stop read the closed store: an ERROR line at a clean stop).
        self.closed = False

    def describe(self):
        return []  # (no description up front: families are read at each scrape, register() must not call collect)

    def collect(self):
        server = self._server
        yield from self._kernel(server)
        if self.closed:
            return
        yield from self._models(server.hub, server.lanes)
        side = server.decisions
        yield from self._decisions(side.engine.tally.snapshot())
        if side.audit is not None:
            yield from self._audit(side.audit)
        yield from self._store(side.db)

    # -- the kernel as a whole ------------------------------------------------------------------
    @staticmethod
    def _kernel(server):
        ready = GaugeMetricFamily("aios_ready", "1 while the kernel serves (gRPC health SERVING, Triton ServerReady): "
                                  "a model loaded, not draining, audit log and store working")
        ready.add_metric([], 1.0 if server.ready() else 0.0)
        yield ready
        failed = GaugeMetricFamily("aios_failed", "1 once a part the kernel cannot serve without has fail-stopped "
                                   "(until a restart; the log says why)", labels=["part"])
        failed.add_metric(["audit_log"], 1.0 if server.audit_failed else 0.0)
        failed.add_metric(["store"], 1.0 if server.store_failed else 0.0)
        yield failed
        draining = GaugeMetricFamily("aios_draining", "1 while the kernel is stopping (SIGTERM): it finishes what it "
                                     "took and refuses new calls")
        draining.add_metric([], 1.0 if server.draining else 0.0)
        yield draining
        failed_calls = CounterMetricFamily("aios_calls_failed", "Calls answered with an error status, and requests "
                                           "inside a stream answered with an error (ModelStreamInfer, DecideStream), "
                                           "by method and gRPC code, every service's, whether refused before any "
                                           "work or failed after", labels=["method", "code"])
        for (method, code), count in sorted(server.service.refusals.snapshot().items()):
            failed_calls.add_metric([method, code], count)
        yield failed_calls
        stopping = CounterMetricFamily("aios_calls_refused_while_stopping", "Calls refused at their entry by a stop "
                                       "(UNAVAILABLE with aios-not-decided: not run; not in aios_calls_failed)")
        stopping.add_metric([], server.refused_while_stopping)
        yield stopping
        payload = server.service.payload
        if payload is not None:
            held = GaugeMetricFamily("aios_payload_held_bytes", "Bytes of large requests (over 64 KiB on the wire "
                                     "or decoded) held now, from their arrival to their answer, against "
                                     "payload_budget_bytes")
            held.add_metric([], payload.held)
            yield held
            refused = CounterMetricFamily("aios_payload_refused", "Large requests refused because they would pass "
                                          "payload_budget_bytes (RESOURCE_EXHAUSTED with retry-after-ms; also in "
                                          "aios_calls_failed)")
            refused.add_metric([], payload.refused)
            yield refused

    # -- models ---------------------------------------------------------------------------------
    @staticmethod
    def _models(hub, lanes):
        versions = sorted(hub.loaded(), key=lambda mv: (mv.name, mv.version))
        scheduler = lanes.version_counters()
        ready = GaugeMetricFamily("aios_model_ready", "1 for each model version loaded and served", labels=MODEL)
        load_failed = GaugeMetricFamily("aios_model_load_failed", "1 when a model's last load failed (the versions "
                                        "loaded before, if any, still serve; RepositoryIndex says why)",
                                        labels=["model"])
        requests = CounterMetricFamily("aios_model_requests", "Requests that finished, by result (Triton's "
                                       "success and fail counts)", labels=[*MODEL, "result"])
        inferences = CounterMetricFamily("aios_model_inferences", "Rows inferred by requests that succeeded "
                                         "(Triton's inference_count)", labels=MODEL)
        executions = CounterMetricFamily("aios_model_executions", "Model calls that succeeded (Triton's "
                                         "execution_count: inferences / executions is the mean batch size)",
                                         labels=MODEL)
        duration = SummaryMetricFamily("aios_model_request_duration_seconds", "Time requests spent in the kernel, "
                                       "queue and compute, by result", labels=[*MODEL, "result"])
        queue = SummaryMetricFamily("aios_model_queue_duration_seconds", "Time successful requests waited in the "
                                    "queue", labels=MODEL)
        compute = SummaryMetricFamily("aios_model_compute_duration_seconds", "Compute time charged to successful "
                                      "requests, by Triton's phase", labels=[*MODEL, "phase"])
        rejected = CounterMetricFamily("aios_model_rejected", "Requests refused at once, by reason: queue_full and "
                                       "tenant_full (max_queue, max_tenant_queue), deadline (cannot be met given the "
                                       "queue), busy (calls in progress at the limit)", labels=[*MODEL, "reason"])
        expired = CounterMetricFamily("aios_model_expired", "Requests whose deadline passed, by where: before_queue, "
                                      "queued, batch_predicted (taken out of a batch predicted to end after it), "
                                      "finished_late (the model finished after it), batch_stopped (while it ran, "
                                      "its batch then stopped)", labels=[*MODEL, "where"])
        errors = CounterMetricFamily("aios_model_errors", "Requests the model failed, by kind: internal (it raised "
                                     "at run time: INTERNAL) or refused_input (onnxruntime refused the request's "
                                     "input: INVALID_ARGUMENT)", labels=[*MODEL, "kind"])
        cancelled = CounterMetricFamily("aios_model_cancelled", "Requests their caller cancelled: queued, or "
                                        "running in a batch then stopped", labels=MODEL)
        stopped = CounterMetricFamily("aios_model_stopped_batches", "Batches stopped part-way because every request "
                                      "in them was cancelled or past its deadline", labels=MODEL)
        queued = GaugeMetricFamily("aios_model_queued_requests", "Requests waiting in the queue", labels=MODEL)
        running = GaugeMetricFamily("aios_model_running_batches", "Batches running now", labels=MODEL)
        for mv in versions:
            key = [mv.name, mv.version]
            stats = mv.stats
            with stats.lock:  # (one consistent reading of the recorders' fields)
                success, fail, queue_ns = (stats.success.count, stats.success.ns), (stats.fail.count, stats.fail.ns), \
                    (stats.queue.count, stats.queue.ns)
                phases = [(name, getattr(stats.compute, f"compute_{name}")) for name in ("input", "infer", "output")]
                phases = [(name, d.count, d.ns) for name, d in phases]
                counts = (stats.inference_count, stats.execution_count, stats.expired_before_queue,
                          stats.rejected_busy, stats.finished_late, stats.model_errors, stats.refused_inputs,
                          stats.stopped_batches, stats.stopped_cancelled, stats.stopped_expired)
            (inference_count, execution_count, before_queue, busy, late, internal, refused, stopped_batches,
             stopped_cancelled, stopped_expired) = counts
            sched = scheduler.get(id(stats), {})
            ready.add_metric(key, 1.0)
            requests.add_metric([*key, "success"], success[0])
            requests.add_metric([*key, "failure"], fail[0])
            inferences.add_metric(key, inference_count)
            executions.add_metric(key, execution_count)
            duration.add_metric([*key, "success"], success[0], _seconds(success[1]))
            duration.add_metric([*key, "failure"], fail[0], _seconds(fail[1]))
            queue.add_metric(key, queue_ns[0], _seconds(queue_ns[1]))
            for name, count, ns in phases:
                compute.add_metric([*key, name], count, _seconds(ns))
            for reason, value in (("queue_full", sched.get("rejected_queue_full", 0)),
                                  ("tenant_full", sched.get("rejected_tenant_full", 0)),
                                  ("deadline", sched.get("rejected_deadline", 0)), ("busy", busy)):
                rejected.add_metric([*key, reason], value)
            predicted = sched.get("expired_predicted", 0)  # (a part of the scheduler's `expired`: not counted twice)
            for where, value in (("before_queue", before_queue), ("queued", sched.get("expired", 0) - predicted),
                                 ("batch_predicted", predicted), ("finished_late", late),
                                 ("batch_stopped", stopped_expired)):
                expired.add_metric([*key, where], value)
            errors.add_metric([*key, "internal"], internal)
            errors.add_metric([*key, "refused_input"], refused)
            cancelled.add_metric(key, sched.get("cancelled", 0) + stopped_cancelled)
            stopped.add_metric(key, stopped_batches)
            queued.add_metric(key, sched.get("queued", 0))  # (a reload's old copy's too: they run there)
            running.add_metric(key, sched.get("in_flight", 0))
        for name in sorted(hub.load_failures()):
            load_failed.add_metric([name], 1.0)
        yield from (ready, load_failed, requests, inferences, executions, duration, queue, compute, rejected,
                    expired, errors, cancelled, stopped, queued, running)

    # -- decisions, reviews, tasks --------------------------------------------------------------
    @staticmethod
    def _decisions(tally: dict):
        decisions = CounterMetricFamily("aios_decisions", "Decisions since the start, by pipeline and outcome "
                                        "(failed: answered with an error once accepted); replays of an idempotency "
                                        "key are not counted", labels=["pipeline", "outcome"])
        late = CounterMetricFamily("aios_decisions_late", "Decisions recorded after their request's deadline "
                                   "(answered DEADLINE_EXCEEDED; counted in aios_decisions_total too)",
                                   labels=["pipeline"])
        for pipeline in sorted(tally):
            counts = tally[pipeline]
            for outcome in ("automated", "escalated", "fallback", "failed"):
                decisions.add_metric([pipeline, outcome], getattr(counts, outcome))
            late.add_metric([pipeline], counts.late)
        yield decisions
        yield late

    def _store(self, db):
        stats = db.stats()
        for name, key, text in (
            ("aios_store_commits", "commits", "Store transactions committed (each holds a group of writes)"),
            ("aios_store_durable_commits", "durable_commits", "Store transactions committed with an fsync"),
            ("aios_store_writes", "writes", "Store writes committed"),
        ):
            family = CounterMetricFamily(name, text)
            family.add_metric([], stats[key])
            yield family
        queued = GaugeMetricFamily("aios_store_queued_writes", "Store writes waiting for the commit in progress")
        queued.add_metric([], stats["queued_writes"])
        yield queued
        busy = CounterMetricFamily("aios_store_busy_refusals", "Store reads and writes refused as busy (UNAVAILABLE "
                                   "with retry-after-ms: a lock held too long, a full disk)")
        busy.add_metric([], db.busy_refusals)
        yield busy
        refusing = GaugeMetricFamily("aios_store_refusing_writes", "1 while the store refuses writes for a reason that "
                                     "may pass (a lock held elsewhere, a full disk): keyed Decides and StartTask are "
                                     "refused with retry-after-ms, health says NOT_SERVING")
        refusing.add_metric([], 1 if db.refusing_writes is not None else 0)
        yield refusing
        if db.failure is not None:
            return  # (a fail-stopped store answers nothing: aios_failed{part="store"} says so)
        try:
            reviews = db.reviews.gauges(time.time_ns())
            tasks = db.tasks.count_in_states(tuple(_TASK_STATES))
        except KernelError as exc:  # (busy: this scrape goes without them)
            self._store_reads.failed(exc.message, traceback=False)
            return
        self._store_reads.succeeded()
        open_ = GaugeMetricFamily("aios_reviews", "Unresolved reviews, by pipeline and state (open, or claimed "
                                  "by a reviewer whose lease runs)", labels=["pipeline", "state"])
        overdue = GaugeMetricFamily("aios_reviews_overdue", "Unresolved reviews past their SLA deadline",
                                    labels=["pipeline"])
        late = GaugeMetricFamily("aios_reviews_resolved_late", "Resolved reviews kept in the store that were "
                                 "resolved after their SLA deadline (retention deletes old ones)", labels=["pipeline"])
        for pipeline in sorted(reviews):
            counts = reviews[pipeline]
            open_.add_metric([pipeline, "open"], counts["open"])
            open_.add_metric([pipeline, "claimed"], counts["claimed"])
            overdue.add_metric([pipeline], counts["overdue"])
            late.add_metric([pipeline], counts["resolved_late"])
        task_family = GaugeMetricFamily("aios_tasks", "Durable tasks not finished yet, by state", labels=["state"])
        for state, name in _TASK_STATES.items():
            task_family.add_metric([name], tasks[state])
        yield from (open_, overdue, late, task_family)

    # -- the audit log --------------------------------------------------------------------------
    @staticmethod
    def _audit(audit):
        stats = audit.stats()
        size = GaugeMetricFamily("aios_audit_records", "Records on the audit log, durable (its size)")
        size.add_metric([], stats["size"])
        pending = GaugeMetricFamily("aios_audit_pending_records", "Records appended but not yet durable")
        pending.add_metric([], stats["pending"])
        groups = CounterMetricFamily("aios_audit_commit_groups", "Record groups committed by this process (one write "
                                     "and, in fsync mode, one fsync each)")
        groups.add_metric([], stats["groups"])
        checkpoints = CounterMetricFamily("aios_audit_checkpoints", "Signed checkpoints written by this process")
        checkpoints.add_metric([], stats["checkpoints"])
        histogram = audit.sync_times
        fsync = HistogramMetricFamily("aios_audit_fsync_duration_seconds", "Each record group's fsync (audit_mode "
                                      "fsync): a slow or stalling disk shows here first")
        buckets = histogram.cumulative()
        fsync.add_metric([], [(_bucket(bound), count) for bound, count in buckets],
                         _seconds(histogram.sum_ns) if buckets[-1][1] else 0.0)
        yield from (size, pending, groups, checkpoints, fsync)


def _bucket(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)
