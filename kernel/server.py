"""Assemble the kernel: settings → model hub → device lanes → gRPC server with health and reflection.

``KernelServer`` gives both front ends one interface: ``start()`` returns the
bound port once the server accepts calls, ``stop(grace)`` drains in-flight
calls and then stops the lanes. The asyncio front end runs its loop on a
thread of its own so callers never deal with it.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import logging
import os
import platform
import socket
import sys
import threading
import time
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from . import __version__, accel, grpc_io
from ._proto import POOL
from ._proto.inference import grpc_service_pb2
from .api import (InferenceService, aio_servicer, eager_receive, kernel_services, registration, stream_pump,
                  sync_servicer, windowed_sends)
from .api.call_budget import CallBudget, StreamBudget
from .api.payload_budget import PayloadBudget
from .api.entry_gate import EntryGate, guard
from .api.handler_pool import HandlerPool, poller_policy
from .api.health import AsyncHealth, ThreadedHealth
from .api.reflection_pool import MethodSymbols
from .api.watch_budget import WatchBudget
from .config import Settings
from .models import ModelHub
from .scheduling import Lanes, device_of, make_scheduler, run_batch
from .threads import can_lower_and_restore, start_handler_thread

log = logging.getLogger("aios.server")

INFERENCE_SERVICE = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
HEALTH_SERVICE = health.SERVICE_NAME
REFLECTION_SERVICE = reflection.SERVICE_NAME
# At a stop, how long the kernel may go on taking calls while it is busy (see KernelServer._lame_duck),
# within the grace period; how long it must have been idle with nothing arriving; how often it looks.
LAME_DUCK_MAX_S = 2.0
LAME_DUCK_QUIET_S = 0.05
LAME_DUCK_POLL_S = 0.01
# Then every new call is refused at its entry (api/entry_gate.py) until none has come for REFUSAL_QUIET_S
# (or REFUSAL_MAX_S has passed): gRPC's own stop cuts those it holds CANCELLED, which clients do not retry.
REFUSAL_MAX_S = 1.0
REFUSAL_QUIET_S = 0.05
LOAD_WAIT_S = 60.0  # at a stop, how long a model load still in progress may take to end (ModelHub.wait_for_loads)
# The most often a client may send keepalive pings on a connection with nothing to send (see _options): one a
# second costs the kernel nothing; a faster flood is still refused, as gRPC refuses it.
MIN_CLIENT_PING_INTERVAL_MS = 1000
# Calls received that gRPC core may hold until the kernel takes them (see _options): a burst beyond this is cancelled.
# Each held call costs ~30 KB (a 10,000-call burst: 280 MB), so the bound stays: 10x what gRPC kept.
MAX_PENDING_CALLS = 10_000
# grpc.compression_enabled_algorithms_bitset: bit 0 identity, bit 1 deflate, bit 2 gzip (grpc_compression_algorithm).
IDENTITY_ONLY = 0b001
ALL_COMPRESSION = 0b111
KEEPALIVE_TIMEOUT_S = 20.0  # how long the kernel waits for a client's answer to its ping (at most keepalive_s)


def _register_standard_descriptors() -> None:
    """Put health and reflection in our pool so one reflection service describes everything."""
    for module in (health_pb2, reflection_pb2):
        try:
            POOL.FindFileByName(module.DESCRIPTOR.name)
        except KeyError:
            POOL.AddSerializedFile(module.DESCRIPTOR.serialized_pb)


def _on_batch(batch, now_ns: int) -> None:
    # One call and one statistics-lock round per batch, not one per request:
    # at concurrency 64 a batch holds ~30 requests (bench/RESULTS.md).
    batch.model.stats.record_batch(batch, now_ns)


def _on_item(item) -> None:
    """An item that left the lane without running (refused at admission, cancelled, expired, unloaded)."""
    now = time.monotonic_ns()
    queued = (item.started_ns or now) - item.enqueued_ns
    item.model.stats.record_request(item.error is None, item.rows, queued, now - item.enqueued_ns, item.timings)


def _gpus(devices: list[str]) -> list[str]:
    return [device for device in devices if device.startswith("cuda")]


def choose_front_end(asked: str, devices_in_use: list[str], io_path: str) -> tuple[str, str]:
    """The front end to serve on, and why when ``asked`` was "auto" ("" otherwise).

    Decided once the models are placed: the asyncio front end served GPU
    models at 16-64 in flight 1.06-1.39x the threaded one's calls/s in three
    H100 runs, the threaded one is ahead on CPUs (bench/RESULTS.md). gRPC's
    iomgr path exists only for the threaded front end, so asking for it keeps
    "auto" there.
    """
    if asked != "auto":
        return asked, ""
    gpus = _gpus(devices_in_use)
    if not gpus:
        return "sync", "auto: no model on a GPU"
    if io_path == "iomgr":
        return "sync", f"auto: models on {', '.join(gpus)}, but grpc_iomgr needs the threaded front end"
    return "aio", f"auto: models on {', '.join(gpus)}"


def front_end_hint(front_end: str, lane_names: list[str]) -> str | None:
    """A line for the log when the front end chosen is not the one measured to serve GPU models best."""
    gpus = _gpus(lane_names)
    if front_end != "sync" or not gpus:
        return None
    return (f"models on {', '.join(gpus)} with the threaded front end: on an H100 the asyncio front end "
            "(--front-end aio, or auto) served 1.06-1.39x the threaded front end's ModelInfer calls at 16-64 in flight (bench/RESULTS.md, 'GPU again', 'GPU, third time')")


class KernelServer:
    def __init__(self, settings: Settings):
        # A port in use fails before anything is made: the data dir, its signing key, the lanes' threads.
        # (start() probes again: the port may have been taken since.)
        probe_listen_address(settings.host, settings.port)
        if settings.metrics_port:
            probe_listen_address(settings.host, settings.metrics_port, "metrics_port")
        self.settings = settings
        self.front_end, self._front_end_why = settings.front_end, ""  # "auto" is settled in start()
        self.hub = ModelHub(settings.models)
        self.batch_nice = settings.batch_nice if settings.batch_nice and can_lower_and_restore(settings.batch_nice) else 0
        self.lanes = Lanes(lambda: make_scheduler(settings.scheduler), run_batch, settings.slots,
                           on_batch=_on_batch, on_item=_on_item, batch_nice=self.batch_nice)
        self.hub.add_preparer(self._models_arriving)
        self.hub.add_listener(self._models_changed)
        self.service = InferenceService(self.hub, self.lanes)
        # Large requests held at once, across every call (api/payload_budget.py; /metrics reads it).
        self.service.payload = PayloadBudget(settings.payload_budget_bytes)
        # Triton's ServerReady and gRPC health answer one rule: a probe of either (KServe's readiness uses
        # ServerReady) said ready while the audit log had failed and every decision was refused.
        self.service.ready = self.ready
        from .decisions import DecisionSide  # the decision side pulls in SQLite, crypto, policy

        self.decisions = DecisionSide(settings, self.hub, self.service)
        self.port: int | None = None
        self.failed_models: dict[str, str] = {}
        self._server = None
        self._eager = None  # the threaded front end's EagerReceive, when on (tests count its calls)
        self._pump = None  # the threaded front end's StreamPump (DecideStream), when on
        self._budget = None  # the threaded front end's CallBudget
        self._streams = None  # grpc.aio's StreamBudget (DecideStream)
        self._watches = None  # the WatchBudget shared by WatchReviews, WatchTask and StreamAudit (follow)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._health = None
        self._health_names: tuple[str, ...] = ()  # "" and each service served (set in _add_services)
        self._draining = False  # set by stop(): health stays NOT_SERVING whatever the models do
        self._hurried = False  # set by hurry(): the drain stops waiting
        self.stopped_cleanly = True  # False once a stop step failed (the decision side's record, its checkpoint)
        self._audit_failed = False  # set when the audit log fail-stops: NOT_SERVING until a restart
        if self.decisions.audit is not None:
            self.decisions.audit.failure_listeners.append(self._audit_log_failed)
        self._store_failed = False  # set when the SQLite store fail-stops (damaged, deleted): NOT_SERVING too
        # Set at the first fail-stop (the audit log's or the store's): `serve` stops on it with exit_on_fail_stop.
        self.fail_stopped = threading.Event()
        self.decisions.db.failure_listeners.append(self._store_failed_now)
        self.decisions.db.refusal_listeners.append(self._store_refusing)
        self._stopped: asyncio.Event | None = None
        self._pool: HandlerPool | None = None  # the sync front end's handler threads
        self._gate: EntryGate | None = None  # closed by stop(): new calls refused before gRPC's stop
        self._metrics = None  # the MetricsEndpoint, when metrics_port is set
        self._started_ns = 0  # when start() began serving (monotonic): the stop line says how long it served

    # -- model changes --------------------------------------------------------
    def _models_arriving(self, fresh) -> None:
        """Lanes for versions a load made, before the hub publishes them (``ModelHub.add_preparer``)."""
        for mv in fresh:
            profile = mv.runtime.profile()
            lane = self.lanes.add_model(mv, device_of(mv.runtime.provider), mv.config.schedule(), profile)
            log.info("%s/%s on lane %s; profile (rows:µs) %s", mv.name, mv.version, lane.name,
                     ", ".join(f"{rows}:{ns / 1e3:.0f}" for rows, ns in profile) or "none")
            if mv.config.instances > lane.slots + 1:  # (+1: the urgent slot)
                log.warning("%s/%s: instances = %d, but lane %s runs at most %d batches at once (its slots and "
                            "the urgent one): %d sessions can never run and only take memory; set instances in "
                            "its model.toml to %d or fewer", mv.name, mv.version, mv.config.instances, lane.name,
                            lane.slots + 1, mv.config.instances - lane.slots - 1, lane.slots + 1)

    def _models_changed(self, added, removed) -> None:
        for mv in removed:  # (a reload's old versions: their queued work finishes first, lane.py)
            self.lanes.remove_model(mv)
        self._update_health()

    def _update_health(self) -> None:
        """One rule for the whole server and for each service by name: SERVING while at least one
        model version is loaded, the kernel is not draining and neither its audit log nor its store has
        failed, else NOT_SERVING.

        Every service shares the overall status on purpose. The aios.kernel.v1 services answer
        without a model too (reviews, tasks, audit), but a kernel with none loaded is not ready for
        traffic, and a load balancer should not route one service to a replica it keeps the others
        from. DecisionService is not tied to its pipelines: they come and go while the kernel runs
        (pipeline_poll_s), and one missing is a caller's NOT_FOUND, not a replica that is down.
        """
        if self._health is None:
            return
        serving = self.ready()
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in self._health_names:
            if self._loop is not None:
                asyncio.run_coroutine_threadsafe(self._health.set(name, status), self._loop)
            else:
                self._health.set(name, status)

    def ready(self) -> bool:
        """Whether the kernel serves: at least one model version loaded, not draining, and neither the audit log
        nor the store failed (``_update_health`` says why one rule covers every service)."""
        return (bool(self.hub.loaded()) and not self._draining and not self._audit_failed and not self._store_failed
                and self.decisions.db.refusing_writes is None)

    @property
    def audit_failed(self) -> bool:
        return self._audit_failed

    @property
    def store_failed(self) -> bool:
        return self._store_failed

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def metrics_port(self) -> int | None:
        """The port the metrics endpoint listens on, or None when it is off (``metrics_port = 0``)."""
        return self._metrics.port if self._metrics is not None else None

    def _audit_log_failed(self, error) -> None:
        """The audit log stopped taking records (a full or failing disk): no decision, task or review can
        be completed, so the whole kernel says NOT_SERVING and a load balancer drains it (the shared-status
        rule of ``_update_health``); an operator fixes the cause and restarts it."""
        self._audit_failed = True
        log.error("health is NOT_SERVING: the audit log of %s failed (%s); decisions are refused until the "
                  "cause is fixed and the kernel restarted", self.settings.data_dir, error)
        self._update_health()
        self.fail_stopped.set()

    def _store_failed_now(self, error) -> None:
        """The store stopped taking reads and writes (damaged pages, its file deleted or replaced): reviews,
        tasks and idempotency keys cannot be kept, so the kernel says NOT_SERVING, as for the audit log."""
        self._store_failed = True
        log.error("health is NOT_SERVING: the store of %s failed (%s); restore the data dir and restart the kernel",
                  self.settings.data_dir, error)
        self._update_health()
        self.fail_stopped.set()

    def _store_refusing(self, cause: str | None) -> None:
        """The store refuses writes for a reason that may pass (another process holding its write lock, a full
        disk), or takes them again (``cause`` None): NOT_SERVING meanwhile, so a load balancer sends the work
        elsewhere instead of here, where a Decide with a key and a StartTask are refused (UNAVAILABLE with a retry
        hint); SERVING again by itself once a write commits (kernel/store/refusals.py)."""
        cause = self.decisions.db.refusing_writes  # (now: a refusal may have come since this was told)
        if cause is not None:
            log.error("health is NOT_SERVING while the store of %s refuses writes: %s", self.settings.data_dir, cause)
        else:
            log.warning("health: the store of %s takes writes again", self.settings.data_dir)
        self._update_health()

    def _end_health_watches(self) -> None:
        """After NOT_SERVING has gone out (``_update_health``): end open health watches too (kernel/api/health.py)."""
        if self._health is None:
            return
        if self._loop is not None:
            asyncio.run_coroutine_threadsafe(self._health.end_watches(), self._loop)
        else:
            self._health.end_watches()

    # -- lifecycle ---------------------------------------------------------------
    def _options(self) -> list[tuple[str, int]]:
        size = self.settings.max_message_bytes
        ping_timeout_ms = round(min(self.settings.keepalive_s, KEEPALIVE_TIMEOUT_S) * 1000)
        return [
            ("grpc.max_receive_message_length", size),
            ("grpc.max_send_message_length", size),
            # Identity only unless compressed_requests: gRPC inflates a compressed message in full before the kernel
            # sees it, up to max_message_bytes whatever its compressed size (config.py says what a bomb cost).
            ("grpc.compression_enabled_algorithms_bitset",
             ALL_COMPRESSION if self.settings.compressed_requests else IDENTITY_ONLY),
            ("grpc.so_reuseport", 0),  # a second kernel on the same port must fail, not share it
            # No bandwidth probe: with it gRPC widened a stream's receive window as long as the client sent, whether
            # or not the kernel read: a DecideStream whose client never read an answer stopped at the kernel's own
            # bound (1,024 requests unanswered, stream_window.py) while gRPC let in and held 25,000-114,000 more
            # (9-42 MB a stream; three took grpc.aio's RSS +300 MB). Without it a stream's window stays at what
            # gRPC starts it with; the price is throughput to a distant client (one window per round trip).
            ("grpc.http2.bdp_probe", 0),
            # Calls gRPC core holds received but not yet handed to the kernel: past its default 1,000 it cancelled
            # new ones at random (status CANCELLED "CANCELLED", nothing run, no trailer to say so), 2-20 % of a burst
            # of 1,500-3,000 calls from one client, even ServerLive; a caller cannot tell that from a call cut
            # after it was decided. Held instead, each reaches the kernel's own limits (workers: RESOURCE_EXHAUSTED).
            ("grpc.server.max_pending_requests", MAX_PENDING_CALLS),
            ("grpc.server.max_pending_requests_hard_limit", MAX_PENDING_CALLS),
            # Clients keep long idle watches (WatchReviews, WatchTask, StreamAudit with follow) and channels alive
            # through NATs and load balancers with keepalive pings. gRPC's server default takes a ping at most
            # every 5 minutes while nothing is sent (2 hours with no call open) and closes the connection at the
            # third one sooner (GOAWAY too_many_pings): a Node client pinging every 30 s lost its idle review
            # watch after 90 s, as RESOURCE_EXHAUSTED "Bandwidth exhausted", which no retry rule covers.
            ("grpc.http2.min_ping_interval_without_data_ms", MIN_CLIENT_PING_INTERVAL_MS),
            ("grpc.keepalive_permit_without_calls", 1),  # (also: the kernel's own pings below on idle connections)
            # The kernel's own pings: a client gone without a word (no FIN: its NAT forgot it) leaves one unanswered,
            # and its connection and calls end, freeing what its watches held (settings.keepalive_s). gRPC times a
            # ping out by ping_timeout_ms: with keepalive_timeout_ms alone such a watch was still held 25 s later.
            ("grpc.keepalive_time_ms", round(self.settings.keepalive_s * 1000)),
            ("grpc.keepalive_timeout_ms", ping_timeout_ms),
            ("grpc.http2.ping_timeout_ms", ping_timeout_ms),
            *self._stream_limit(),
        ]

    def _stream_limit(self) -> list[tuple[str, int]]:
        """Streams one connection may have open (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS), if max_connection_streams
        sets a limit. A client that opened streams and reset each at once, in a loop for 8 s (CVE-2023-44487, "rapid
        reset"), took the grpc.aio kernel from 124 MB to 456 MB RSS and another caller's Decide from 10 ms to 1.3 s at
        p50; with a limit of 1,024, to 164 MB and 76 ms (100: 130 MB, 24 ms; 10,000: 332 MB, no better at p99).
        Not on by default: a client's burst on a new connection goes out before it has read the limit, and the calls
        past it are refused UNAVAILABLE (692-1,092 of a 4,000-call burst at 1,024; tests/test_call_bursts.py)."""
        limit = self.settings.max_connection_streams
        return [("grpc.max_concurrent_streams", limit)] if limit else []

    def _add_services(self, server, asynchronous: bool) -> None:
        # One budget for the handler threads, shared by the RPCs that can be told apart by priority.
        budget = None if asynchronous else CallBudget(self.settings.workers, self._calls_in_progress,
                                                      max_streams=self.settings.stream_limit)
        self._budget = budget
        # Open watches have a cap of their own, well below workers, on both front ends (watch_budget.py).
        self._watches = WatchBudget(self.settings.watch_limit)
        inference = aio_servicer(self.service) if asynchronous else sync_servicer(self.service, budget)
        # grpc.aio has no CallBudget, but its DecideStreams cost threads: capped by max_streams too.
        self._streams = StreamBudget(self.settings.stream_limit) if asynchronous else None
        ours = kernel_services.generic_handlers(self.hub, self.lanes, asynchronous,
                                                self.decisions.handlers(budget, self._watches, self._streams,
                                                                        self.service.payload),
                                                refusals=self.service.refusals, payload=self.service.payload)
        self._gate = EntryGate(asynchronous)
        guard([inference, *ours], self._gate)  # (health and reflection stay open: a probe hears NOT_SERVING)
        registration.add_to_server(server, [inference, *ours])
        if not asynchronous and self.settings.eager_receive:
            self._eager = eager_receive.attach([inference, *ours], self._pool, self.settings.answer_later,
                                               self.settings.poller_inline, self.service.refusals,
                                               eager_receive.waiting_cap(self.settings.workers),
                                               eager_receive.waiting_bound(self.settings.workers), self._gate,
                                               lambda: budget.streams_open + self._watches.open, self.settings.workers)
            if self.settings.answer_later:
                self._pump = stream_pump.attach(ours, self.decisions.engine, self._pool, budget, self.service.refusals,
                                                self.service.payload)
        if not asynchronous:  # a StreamAudit follower keeps up with a busy kernel (windowed_sends.py)
            windowed_sends.attach(ours, self._pool, (("aios.kernel.v1.AuditService", "StreamAudit"),
                                                     ("aios.kernel.v1.AuditService", "StreamAuditBatches")))
        self._health = AsyncHealth() if asynchronous else ThreadedHealth()
        generated = registration.generic_only(server)  # (no method registrations on grpc.aio: registration.py)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, generated)
        _register_standard_descriptors()
        names = [INFERENCE_SERVICE, *kernel_services.SERVICE_NAMES, HEALTH_SERVICE, REFLECTION_SERVICE]
        reflection.enable_server_reflection(names, generated, pool=MethodSymbols(POOL))  # (grpcurl describe Svc.Method)
        # Health answers for the services that do something here: without an audit log
        # (audit_mode = "off") every AuditService call is refused, so a probe of it gets NOT_FOUND.
        audit_off = self.decisions.audit is None
        self._health_names = ("", INFERENCE_SERVICE, *(name for name in kernel_services.SERVICE_NAMES
                                                        if not (audit_off and name.endswith(".AuditService"))))

    def _calls_in_progress(self) -> int:
        """Calls in progress on the threaded front end as gRPC's limit counts them: those in the handler
        pool, those whose request has not arrived yet (eager_receive), and those handed on to be answered
        later (answer_later), one running on the poller thread (poller_inline), and open DecideStreams
        driven by the stream pump (they hold no thread)."""
        eager, pump = self._eager, self._pump
        streams = 0 if pump is None else pump.open
        if eager is None:
            return self._pool.in_progress() + streams
        return self._pool.in_progress() + eager.waiting + eager.outstanding.count + eager.on_poller + streams

    def _front_end_words(self) -> str:
        """The start line's front end: its name and which of its unary-call paths are on."""
        words = [f"{self.front_end} ({self._front_end_why})" if self._front_end_why else self.front_end,
                 f"grpc I/O {grpc_io.describe()}"]
        if self._eager is not None:
            words.append("eager receive")
            if self.settings.answer_later:
                words.append("answer later")
                if self.settings.poller_inline:
                    words.append("lone calls on the poller")
        if self._pump is not None:
            words.append("streams pumped")
        return ", ".join(words)

    def start(self) -> int:
        """Load the repository, start serving; returns the bound port.

        A start that fails (a port in use, say) releases what the kernel holds
        before it raises — the audit log and its directory lock, the lanes'
        threads — so the same data directory can be served again in this process.
        """
        try:
            return self._start()
        except BaseException:
            if self._server is not None:
                self.stop(grace=0)
            else:
                self._release()
            raise

    def _start(self) -> int:
        if self.settings.gil_switch_interval_us:
            sys.setswitchinterval(self.settings.gil_switch_interval_us / 1e6)  # process-wide: the kernel owns it
        if self.settings.gc_threshold:  # process-wide too (config.py says why)
            gc.set_threshold(self.settings.gc_threshold, *gc.get_threshold()[1:])
        probe_listen_address(self.settings.host, self.settings.port)  # a port in use fails before the models load
        if self.settings.metrics_port:  # (bound once the models load: its start is the kernel's as a whole)
            probe_listen_address(self.settings.host, self.settings.metrics_port, "metrics_port")
        loaded, self.failed_models = self.hub.load_all()
        self.decisions.start()  # pipelines are checked against the models just loaded
        if self.settings.metrics_port:
            from .observability.endpoint import MetricsEndpoint  # (prometheus_client: only when asked for)

            self._metrics = MetricsEndpoint(self, self.settings.host, self.settings.metrics_port)
        self.front_end, self._front_end_why = choose_front_end(self.settings.front_end, self.lanes.devices_in_use(),
                                                               grpc_io.describe())
        if self.front_end == "aio":
            self._start_aio()
        else:
            self._pool = HandlerPool(self.settings.workers, thread_name_prefix="aios-grpc",
                                     initializer=start_handler_thread, on_overlap=poller_policy)
            server = grpc.server(
                self._pool,
                options=self._options(),
                maximum_concurrent_rpcs=self.settings.workers,
            )
            self._add_services(server, asynchronous=False)
            self.port = self._bind(server)
            server.start()
            self._server = server
        self._update_health()
        self._started_ns = time.monotonic_ns()
        log.info(
            "AIOS kernel listening on %s:%d (%s; front end %s, scheduler %s, lanes %s, batch nice %s, extensions: %s); "
            "%d model versions ready%s",
            self.settings.host, self.port, _release_words(),
            self._front_end_words(),
            self.lanes.cpu.scheduler.name,
            ", ".join(f"{lane.name}×{lane.slots}" for lane in self.lanes.all()),
            self.batch_nice or ("off" if not self.settings.batch_nice else
                                f"off ({self.settings.batch_nice} asked; needs CAP_SYS_NICE or RLIMIT_NICE 20 to restore a thread)"),
            ", ".join(f"{k}={v}" for k, v in sorted(accel.CHOSEN.items())) or "none",
            len(loaded), f", {len(self.failed_models)} failed: {', '.join(self.failed_models)}" if self.failed_models else "",
        )
        if self._metrics is not None:
            log.info("metrics on http://%s:%d/metrics (Prometheus)", self.settings.host, self._metrics.port)
        if not loaded:  # ready to take calls, but health says NOT_SERVING until a model loads: say why
            log.warning("no model is loaded from %s%s: health answers NOT_SERVING until one is "
                        "(aios-kernel models load NAME, or RepositoryModelLoad)", self.settings.models,
                        "" if self.failed_models else " (expected <name>/<version>/model.onnx)")
        hint = front_end_hint(self.settings.front_end, [lane.name for lane in self.lanes.all()])
        if hint:
            log.info("%s", hint)
        low = low_descriptor_limit(self.settings.workers)
        if low:
            log.warning("%s", low)
        return self.port

    def _bind(self, server) -> int:
        address = f"{self.settings.host}:{self.settings.port}"
        try:
            port = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {address}: {exc}") from None
        if port == 0:
            raise OSError(f"cannot listen on {address} (in use, or not an address of this machine)")
        return port

    def _start_aio(self) -> None:
        try:
            import uvloop

            self._loop = uvloop.new_event_loop()
        except ImportError:
            self._loop = asyncio.new_event_loop()
        ready: futures.Future = futures.Future()

        async def serve() -> None:
            server = grpc.aio.server(options=self._options())
            self._add_services(server, asynchronous=True)
            try:
                self.port = self._bind(server)
                await server.start()
            except BaseException as exc:
                ready.set_exception(exc)
                return
            self._server = server
            self._stopped = asyncio.Event()
            ready.set_result(None)
            # Not server.wait_for_termination(): it can return as soon as
            # shutdown begins, and ending the loop then would cancel the calls
            # still draining. _shutdown() sets this after the grace period.
            await self._stopped.wait()

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(serve())

        self._loop_thread = threading.Thread(target=run, name="aios-aio-loop", daemon=True)
        self._loop_thread.start()
        ready.result()

    async def _shutdown(self, grace: float) -> None:
        try:
            await self._server.stop(grace)
        finally:
            self._stopped.set()

    def stop(self, grace: float | None = None) -> None:
        """Refuse new calls, let in-flight ones finish (up to ``grace`` s), then stop the lane."""
        grace = self.settings.grace_seconds if grace is None else grace
        if self._server is None:
            return
        # Load balancers watching health stop sending first; open watches end next (they
        # never end by themselves, so they would hold the drain for the whole grace period);
        # then gRPC refuses new calls and waits for the in-flight ones.
        self._draining = True
        self._update_health()
        self.decisions.end_watches()
        self._end_health_watches()
        self._lame_duck(min(grace, LAME_DUCK_MAX_S))
        # Open DecideStreams answer what they took and end, before gRPC's grace (kernel/pipelines/stream_drains.py).
        self.decisions.engine.stream_drains.drain()
        self._refuse_new_calls(min(grace, REFUSAL_MAX_S))
        if self._loop is not None:
            # The loop thread ends once serve() sees the server terminate; waiting
            # on the stop() future instead can hang, as the loop may exit before
            # it delivers that result.
            asyncio.run_coroutine_threadsafe(self._shutdown(grace), self._loop)
            self._loop_thread.join(timeout=grace + 5)
        else:
            self._server.stop(grace).wait()
            self._pool.shutdown(wait=False)  # its threads end once grpc handed them the last call
        self._server = None
        self._release()
        failed = self.decisions.failed_at_stop
        self.stopped_cleanly = not failed
        served = self._served_words()
        if failed:  # (each failure logged above; the serve command exits 1)
            log.error("AIOS kernel stopped, but not cleanly: %s failed; %s", ", ".join(failed), served)
        else:
            log.info("AIOS kernel stopped; %s", served)

    def _served_words(self) -> str:
        """The stop line's summary of the run: how long it served, what its models answered, what it decided
        (an incident review starts from the stop line; it said only "AIOS kernel stopped")."""
        ok = failed = 0
        for mv in self.hub.loaded():
            ok += mv.stats.success.count
            failed += mv.stats.fail.count
        counts = self.decisions.engine.tally.snapshot().values()
        outcomes = {name: sum(getattr(c, name) for c in counts) for name in ("automated", "escalated", "fallback",
                                                                             "failed")}
        seconds = int((time.monotonic_ns() - self._started_ns) / 1e9) if self._started_ns else 0
        # Read after gRPC's stop: the gate goes on refusing calls gRPC hands over during its grace (a line written
        # as the gate's quiet window ended said fewer than the clients were refused).
        refused = self.refused_while_stopping
        return (f"served {seconds // 3600}h{seconds // 60 % 60:02d}m{seconds % 60:02d}s: {ok + failed:,} model requests "
                f"({ok:,} succeeded, {failed:,} failed), {sum(outcomes.values()):,} decisions ("
                + ", ".join(f"{n:,} {name}" for name, n in outcomes.items()) + f"), {refused:,} new call"
                + ("" if refused == 1 else "s") + " refused while stopping (UNAVAILABLE, aios-not-decided: not run)")

    def drain_limit_s(self, grace: float | None = None) -> float:
        """The longest a drain (``stop``) waits: the lame-duck window, then gRPC's grace for calls in progress."""
        grace = self.settings.grace_seconds if grace is None else grace
        return min(grace, LAME_DUCK_MAX_S) + min(grace, REFUSAL_MAX_S) + grace

    def hurry(self) -> None:
        """Cut a drain short (an operator's second signal): the lame-duck wait ends and gRPC cancels the calls
        still in progress now instead of at the end of the grace period. From any thread; a no-op when no
        drain runs; once (a third signal, e.g. an orchestrator's SIGTERM after an operator's Ctrl-C, ran a second
        grpc.aio stop(0) beside the first, and the process died of SIGSEGV in a fresh clone's test run)."""
        if self._hurried:
            return
        self._hurried = True
        if self._server is None:
            return
        if self._loop is not None:
            asyncio.run_coroutine_threadsafe(self._server.stop(0), self._loop)
        else:
            self._server.stop(0)  # grpc: a later, shorter grace wins

    def _lane_work(self) -> int:
        """Every model's queued requests and running batches."""
        return sum(sum(self.lanes.load(mv)) for mv in self.hub.loaded())

    def _busy(self) -> int:
        """Work the kernel holds: calls in progress on the threaded front end, and every model's queued
        requests and running batches (the asyncio front end's calls are visible only there)."""
        held = self._lane_work()
        if self._pool is not None:
            held += self._calls_in_progress()
        return held

    def _arrivals(self) -> int:
        """Requests the lanes have taken so far (every model; ModelInfer and Decide alike)."""
        return sum(counters["submitted"] for counters in self.lanes.stats()["models"].values())

    def _lame_duck(self, limit_s: float) -> None:
        """Keep taking calls until the kernel has been idle, with no new request, for LAME_DUCK_QUIET_S,
        or ``limit_s`` has passed; then gRPC may stop taking them.

        gRPC's stop cancels (CANCELLED, which clients do not retry) every call it has received but not
        yet handed to the kernel: a burst that arrived just before SIGTERM lost most of its calls that
        way while the kernel had threads to spare. While work is in progress or still arriving, more
        calls may be waiting in gRPC (or, on the asyncio front end, on the event loop, where the kernel
        cannot count them), so the kernel goes on serving them. Health already says NOT_SERVING, so
        clients that watch it have stopped sending; an idle kernel stops after the short quiet window.
        """
        now = time.monotonic_ns()
        end, quiet_ns = now + int(limit_s * 1e9), int(LAME_DUCK_QUIET_S * 1e9)
        quiet_since, seen = now, self._arrivals()
        while now < end and not self._hurried:
            if self._busy():
                quiet_since = now
            else:
                arrivals = self._arrivals()
                if arrivals != seen:
                    seen, quiet_since = arrivals, now
                elif now - quiet_since >= quiet_ns:
                    return
            time.sleep(LAME_DUCK_POLL_S)
            now = time.monotonic_ns()

    @property
    def refused_while_stopping(self) -> int:
        """Calls refused at their entry by the stop (UNAVAILABLE, not run)."""
        return 0 if self._gate is None else self._gate.refused

    def _refuse_new_calls(self, limit_s: float) -> None:
        """Close the entry gate, then wait until no call has been refused, and no batch is queued or running, for
        REFUSAL_QUIET_S (or ``limit_s`` has passed): calls gRPC received before its stop are then answered
        UNAVAILABLE, not run, instead of being cut CANCELLED by it."""
        gate = self._gate
        gate.close()
        now = time.monotonic_ns()
        end, quiet_ns = now + int(limit_s * 1e9), int(REFUSAL_QUIET_S * 1e9)
        while now < end and not self._hurried:
            # (Batches in the lanes only, not calls in progress: an idle open stream held every stop of the threaded
            # front end to the whole REFUSAL_MAX_S, a review found. A batch about to answer is what brings a
            # closed-loop client's next call.)
            if not self._lane_work() and now - gate.last_refusal_ns >= quiet_ns:
                refused = gate.refused
                self._loop_caught_up(end - now)
                if gate.refused == refused:
                    break
            time.sleep(LAME_DUCK_POLL_S)
            now = time.monotonic_ns()

    def _loop_caught_up(self, limit_ns: int) -> None:
        """On the asyncio front end, wait until the event loop has run what was queued for it so far (the calls
        gRPC has received reach the gate there): a loop slowed by a busy machine may hold calls longer than
        the quiet window. (On the threaded front end gRPC reads the gate as it takes a call, on its poller thread:
        a refusal waiting for a handler thread is a call in progress, which gRPC's stop lets finish.)"""
        if self._loop is None or limit_ns <= 0:
            return
        try:
            asyncio.run_coroutine_threadsafe(asyncio.sleep(0), self._loop).result(timeout=limit_ns / 1e9)
        except (futures.TimeoutError, RuntimeError):
            pass  # (the loop is slower than the drain's limit, or already closed)

    def _release(self) -> None:
        if self._metrics is not None:  # (first: the parts a scrape reads close below; the drain, before, was scraped)
            self._metrics.close()
            self._metrics = None
        if not self.hub.wait_for_loads(0.0):  # (a RepositoryModelLoad whose call the drain cut: see wait_for_loads)
            log.warning("waiting for a model load in progress to finish before stopping (up to %.0f s)", LOAD_WAIT_S)
            if not self.hub.wait_for_loads(LOAD_WAIT_S):
                log.error("a model load was still in progress after %.0f s; stopping anyway", LOAD_WAIT_S)
        self.decisions.close()  # tasks stop using the lanes; the audit log flushes and checkpoints
        self.lanes.close()
        self.service.expiry.close()


# The soft open-file limit a serving kernel raises itself to when its hard limit is unlimited (Linux's default
# fs.nr_open: a higher soft limit is refused).
OPEN_FILES_WHEN_UNLIMITED = 1 << 20


def raise_descriptor_limit() -> tuple[int, int] | None:
    """Raise this process's soft open-file limit to its hard limit; ``(before, after)`` if it did, else None.

    systemd starts a service with 1024 (soft) under a hard limit of 524288, and the soft one is meant to be raised
    by the programs that need more (as Go's runtime and nginx do): the kernel served with 1024, a descriptor per
    client connection, and a flood of idle connections ran it out — new clients timed out and the audit log could
    not open its next segment. Only the serving process does this (``aios-kernel serve``), not a library user's."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = OPEN_FILES_WHEN_UNLIMITED if hard == resource.RLIM_INFINITY else hard
        if soft == resource.RLIM_INFINITY or soft >= target:
            return None
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ImportError, OSError, ValueError):
        return None  # (not raised: the start line's warning says what the limit is)
    return soft, target


def low_descriptor_limit(workers: int, soft: int | None = None) -> str:
    """A warning when the process may open too few files for ``workers`` calls in progress ("" if not).

    Each client connection, model file and log segment takes a descriptor. Out of them, gRPC only logged
    "File descriptor limit reached" every second while new clients timed out and health still said SERVING
    (operator audit); a start line naming the limit tells the operator before the clients do."""
    if soft is None:
        try:
            import resource

            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        except (ImportError, OSError, ValueError):
            return ""
    want = max(1024, 2 * workers + 256)
    if soft == -1 or soft >= want:  # (-1: RLIM_INFINITY)
        return ""
    return (f"open-file limit (RLIMIT_NOFILE) is {soft}: with workers = {workers} the kernel may need about {want} "
            f"(a descriptor per client connection, plus models and logs); past it new clients time out. "
            f"Raise it (ulimit -n, LimitNOFILE=, docker --ulimit nofile=)")


def probe_listen_address(host: str, port: int, setting: str = "port") -> None:
    """Raise ``OSError`` ("cannot listen on ...") if the kernel could not listen on ``host:port``; ``setting``
    names the port's setting (``port``, or ``metrics_port`` for the metrics endpoint).

    gRPC binds for real once the models are loaded (the front end depends on
    them); without this a port conflict, a host name that does not resolve or an
    address of another machine was reported only after loading every model —
    minutes for large ones — in gRPC's own words, and after the start had
    written its model-deploy records to the audit log for a kernel that never
    served. The probe sets ``SO_REUSEADDR`` as gRPC's listener does, so a
    closed kernel's lingering connections do not count; bind errors it has no
    words for are left to gRPC's own bind. Port 0 (any free port) is never in use.
    """
    where = f"cannot listen on {host}:{port}" + ("" if setting == "port" else f" ({setting})")
    names = "--port or AIOS_PORT" if setting == "port" else f"{setting}, AIOS_{setting.upper()}"
    try:
        found = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise OSError(f"{where}: {host!r} does not resolve here ({exc.strerror}); set --host or AIOS_HOST to a name or "
                      "address of this machine (0.0.0.0: every address)") from None
    for family, kind, protocol, _, address in found:
        with socket.socket(family, kind, protocol) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE and port:
                    raise OSError(f"{where}: something already listens there (another "
                                  f"port: {names}" + ("; 0 takes any free one)" if setting == "port" else ")")) from None
                if exc.errno == errno.EADDRNOTAVAIL:
                    raise OSError(f"{where}: {address[0]} is not an address of this machine (--host or AIOS_HOST; "
                                  "0.0.0.0 listens on every address)") from None
                if exc.errno == errno.EACCES:
                    raise OSError(f"{where}: permission denied (ports below 1024 need privileges: {names})") from None


def _release_words() -> str:
    """The release and runtimes serving, and the process: what an on-call engineer needs first from a start's
    log (which kernel is this, which pid to signal) and found nowhere in it (an incident drill: the version was
    only on the audit log's "kernel started" record)."""
    import onnxruntime  # (imported by the models already)

    return (f"aios-kernel {__version__}, pid {os.getpid()}, Python {platform.python_version()}, grpcio {grpc.__version__}, "
            f"onnxruntime {onnxruntime.__version__}")
