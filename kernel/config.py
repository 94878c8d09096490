"""One settings object: embedded defaults < kernel.toml < AIOS_* environment < command-line flags.

Every value is validated once, here; an error names the setting and where
it came from (file, environment variable or flag).
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import os
import re
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

FRONT_ENDS = ("auto", "sync", "aio")
SCHEDULERS = ("auto", "cython", "reference")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# "off" runs decisions without an audit log: a benchmark baseline, never for production
# (decisions then carry no audit sequence and nothing can be verified or replayed).
AUDIT_MODES = ("fsync", "async", "off")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


class SettingsError(ValueError):
    """A bad setting; the message names it and its source."""


class OperatorPath(str):
    """A file path an operator set (kernel.toml, an AIOS_* variable or a flag), and where it came from.

    Everywhere else a plain ``str``; what opens the file can tell that it must already exist: an
    ``audit_key`` set this way is never created (kernel/audit/keys.py), so a secret mount that failed
    stops the start instead of a new key signing from then on. ``AuditLog.open(key_path=...)`` given a
    plain path still creates the key: that is the library's API, and tests rely on it. The check is
    made when the key is opened, not here, so that ``load_settings`` alone (a client command, a test
    of the layers) does not need the file.
    """

    source: str

    def __new__(cls, value: str, source: str = "") -> "OperatorPath":
        path = super().__new__(cls, value)
        path.source = source
        return path


@dataclass(frozen=True, slots=True)
class Settings:
    host: str = "127.0.0.1"  # listen address; "0.0.0.0" to accept other machines (containers)
    port: int = 8001  # Triton's gRPC port, so perf_analyzer and tritonclient defaults just work
    models: str = "models"  # model repository folder
    # "sync" (thread pool), "aio" (grpc.aio on uvloop), or "auto": chosen at start, once the models are
    # placed — aio when a model runs on a GPU (sync served 0.72-0.94x its calls/s at 16-64 in flight in
    # three H100 runs), else sync (ahead on CPUs); bench/RESULTS.md, "GPU, third time" and "Front ends".
    front_end: str = "auto"
    # Handler threads of the sync front end, and its limit on calls in progress: a call
    # beyond it is refused at once (RESOURCE_EXHAUSTED) instead of waiting, unseen by
    # the scheduler's admission control, in gRPC's own queue. Blocked threads are cheap.
    workers: int = 512
    # Watches open at once (WatchReviews, WatchTask, StreamAudit with follow, together): each holds one of the
    # `workers` handler threads on the sync front end, so left uncapped they could take them all and lock every
    # other call out. One beyond it is refused at once (RESOURCE_EXHAUSTED, retry-after-ms; kernel/api/watch_budget.py).
    # 0 = a quarter of `workers` (128 by default); health watches are not counted.
    max_watches: int = 0
    # Client streams open at once on the threaded front end (DecideStream, ModelStreamInfer, together): an open
    # stream holds a call slot however long it idles, so one client opening hundreds of idle streams locked every
    # other caller out of ordinary calls (kernel/api/call_budget.py). 0 = half of `workers` (256 by default).
    max_streams: int = 0
    # How long a client's connection may stay silent before the kernel pings it; a client that does not answer within
    # the same time (at most 20 s) is dropped and its calls end. A watch whose client vanished without closing its
    # connection (a laptop asleep behind a NAT that forgot it) sends nothing, so nothing failed: it held its place
    # of max_watches, and on the threaded front end its handler thread, for good (kernel/server.py).
    keepalive_s: float = 60.0
    # Threaded front end: a unary call takes a handler thread only once its request is in
    # (kernel/api/eager_receive.py); false = grpc's standard path, a thread per call from its start.
    eager_receive: bool = True
    # With eager_receive: a ModelInfer call (on a model with batches of >= 0.2 ms) or a Decide call
    # frees its handler thread once its work is queued, and the thread that runs its batch (Decide:
    # the decision finisher) answers it (kernel/api/answer_later.py); false = the handler thread
    # sleeps until its answer is ready. Also DecideStream: driven from the poller, answered by the decision
    # finisher, with no thread of its own (kernel/api/stream_pump.py).
    answer_later: bool = True
    # With answer_later: a ModelInfer that arrives while no other call is in progress runs on gRPC's
    # poller thread, with no hand-off to a handler thread; a batch predicted to take over 0.2 ms goes
    # to the lane's threads instead, so the poller never waits on a model (kernel/api/eager_receive.py).
    poller_inline: bool = True
    # Threaded front end: gRPC core's older iomgr I/O path instead of its EventEngine threads (one thread
    # hop less per message: +9-18 % calls/s, but urgent calls next to a saturating neighbour wait 1.4-1.8x
    # longer at p99, so off by default; set through GRPC_EXPERIMENTS by `serve`, never over the operator's
    # own value; kernel/grpc_io.py).
    grpc_iomgr: bool = False
    # How long a Python thread may hold the GIL while another waits for it (sys.setswitchinterval).
    # Every request is a handler thread here: a short slice lets a high-priority request's thread
    # in between a busy neighbour's threads. 0 = leave Python's default (5000 µs).
    gil_switch_interval_us: int = 0
    # The garbage collector's young-generation threshold while serving (gc.set_threshold's first value).
    # A call's objects die by reference count, not in cycles; at Python's 700 a busy kernel ran ~60
    # collections a second that found nothing, plus full passes over everything the start loaded: ~4 % of
    # its core (bench/RESULTS.md, "The garbage collector"). Cycles are still collected, 10,000 net
    # allocations apart. 0 = leave Python's default.
    gc_threshold: int = 10_000
    lane_slots: int = 0  # batches run at once on the CPU lane; 0 = one per usable core (at most MAX_LANE_SLOTS)
    # While priority-1 requests arrive, the model compute of a batch led by a lower priority runs at this much lower OS
    # priority (nice), so the urgent requests' front-end work is not queued behind its compute
    # (kernel/scheduling/lane.py). Needs CAP_SYS_NICE (root on a host; containers: --cap-add SYS_NICE); without, off, and the
    # start log says so. 0 = off.
    batch_nice: int = 10
    scheduler: str = "auto"  # "auto" (Cython core when built), "cython" or "reference"
    max_message_bytes: int = 64 * 1024 * 1024  # larger requests get RESOURCE_EXHAUSTED
    # The bytes of large requests (over 64 KiB) held at once across every call, from their arrival until their
    # answer (ModelInfer and ModelStreamInfer requests by their bytes or, when more, their decoded inputs; Decide,
    # DecideStream, StartTask): one that would pass it is refused at once with RESOURCE_EXHAUSTED, retry-after-ms.
    # Each request is bounded on its own, their sum was not: 64 calls of 32 MiB held 2 GiB and more, until the
    # process was OOM-killed with every call in flight (kernel/api/payload_budget.py). A request larger than
    # the budget is taken while nothing else is held.
    payload_budget_bytes: int = 1 << 30
    # Streams one client connection may have open at once (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS). 0 = gRPC's
    # default, no limit: a burst of thousands of calls on a new connection goes out before the client has read the
    # limit, and gRPC refuses those past it (UNAVAILABLE "Stream removed", REFUSED_STREAM). A limit near 1,000 bounds
    # what a "rapid reset" client (CVE-2023-44487) costs (kernel/server.py, docs/operations.md).
    max_connection_streams: int = 0
    # Accept requests compressed with gzip or deflate. Off: such a request is refused by gRPC core with UNIMPLEMENTED
    # ("Compression algorithm 'gzip' is disabled.") before it is inflated. A 64 KB gzip message inflates to 64 MiB
    # (max_message_bytes bounds the inflated size, not the ratio): twenty of them from one client, 1.2 MB sent, took
    # the grpc.aio kernel to 2 GB RSS and answered no other caller for 6 s (kernel/server.py, docs/operations.md).
    compressed_requests: bool = False
    grace_seconds: float = 10.0  # SIGTERM: how long in-flight calls may take to finish
    # Prometheus metrics over HTTP (GET /metrics) on this port of `host` (Triton serves its own on 8002); 0 = off
    # (kernel/observability/metrics.py lists them).
    metrics_port: int = 0
    log_level: str = "INFO"
    data_dir: str = "var"  # audit segments, keys, and the SQLite store of tasks, reviews, idempotency keys
    pipelines: str = "pipelines"  # folder of pipeline files (*.toml with a [pipeline] table) and their policies
    pipeline_poll_s: float = 1.0  # how often changed pipeline files are looked for; 0 = only at start
    # The audit log lives in <data_dir>/audit (kernel/audit).
    # "fsync": a decision is answered once its record is on disk. "async": once written to the OS;
    # a power loss or OS crash can then lose the records of the last checkpoint interval.
    audit_mode: str = "fsync"
    # Ed25519 key signing checkpoints: a PEM file that must exist; "" = <data_dir>/audit/signing-key.pem, created if absent
    audit_key: str = ""
    audit_checkpoint_records: int = 1000  # sign a checkpoint every this many records...
    audit_checkpoint_ms: float = 1000.0  # ...or this long after a record, whichever comes first
    audit_segment_bytes: int = 64 * 1024 * 1024  # segment files rotate at this size
    # Zeros written ahead of the records at a time, so a group's fsync commits no file-size change
    # (bench/RESULTS.md, "preallocated segments"); 0 = append (copy-on-write file systems gain nothing).
    audit_preallocate_bytes: int = 256 * 1024
    audit_stream_enabled: bool = False  # allow StreamAudit and StreamAuditBatches (until RBAC grants them to auditors)
    # When the audit log or the store fail-stops (a full disk, a damaged file), `aios-kernel serve` stops and exits
    # 75 instead of staying up NOT_SERVING: for a supervisor that restarts on failure but reads no health check
    # (systemd's Restart=on-failure); the fault must still be fixed for the restart to serve.
    exit_on_fail_stop: bool = False
    # Durable tasks retry a failure that may pass (a full queue, a model being reloaded, a deadline that
    # ran out in a busy queue) after task_backoff_s, doubling each time up to task_max_backoff_s, until
    # task_max_attempts runs were made. The defaults keep trying for about 4 minutes (1+2+4+...+60 s):
    # long enough for a model reload or a burst to pass, short enough that a task does not hang for good.
    task_max_attempts: int = 10
    # Threads that run durable tasks (StartTask): tasks beyond them wait QUEUED. A task's thread is held
    # while its model call runs, not while it waits for a review.
    task_workers: int = 2
    task_backoff_s: float = 1.0
    task_max_backoff_s: float = 60.0
    # Resolved reviews and finished tasks are deleted this many days after they ended (they hold the cases'
    # requests, free text included); the audit log keeps every decision and resolution regardless. Swept at start
    # and hourly, each sweep recorded on the audit log (kernel/store/retention.py). 0 = keep them for good.
    store_retention_days: float = 0.0

    def usable_cores(self) -> int:
        try:
            return len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            return os.cpu_count() or 1

    @property
    def slots(self) -> int:
        return self.lane_slots or self.usable_cores()

    @property
    def stream_limit(self) -> int:
        """``max_streams``, or its default: half of ``workers`` (at least 1)."""
        return self.max_streams or max(1, self.workers // 2)

    @property
    def watch_limit(self) -> int:
        """``max_watches``, or its default: a quarter of ``workers`` (at least 1)."""
        return self.max_watches or max(1, self.workers // 4)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


_FIELDS = {f.name: f for f in fields(Settings)}
_FOLDERS = ("models", "pipelines", "data_dir")  # settings naming a folder: never empty


_MIN_POLL_S = 0.1  # a look reads every pipeline file's status; more often is a busy loop, not a faster reload
_MAX_GRPC_INT = 2**31 - 1  # gRPC's channel arguments (message size limits) are C ints
# payload_budget_bytes: below a MiB a few ordinary large requests would be refused; past a TiB it bounds nothing.
_MIN_PAYLOAD_BUDGET, _MAX_PAYLOAD_BUDGET = 1 << 20, 1 << 40

# Durations: a longer one is a typo, and past threading.TIMEOUT_MAX (~292 years) a wait on it raises
# OverflowError inside a kernel thread.
_MAX_SECONDS = 86_400  # a day
MAX_LANE_SLOTS = 1024  # batches at once on one lane: far past any CPU's cores, each a thread


def _coerce(name: str, value: Any, source: str, typed: bool = False) -> Any:
    """``value`` as setting ``name``'s type. ``typed``: it comes from kernel.toml, where TOML says what it is."""
    kind = _FIELDS[name].type
    given = value
    if typed:
        _check_toml_type(name, kind, value, source)
    try:
        if kind == "int":
            # bool is an int in Python, and int() would cut 8302.9 down to 8302: both refused
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            value = int(value)
        elif kind == "float":
            if isinstance(value, bool):
                raise ValueError
            value = float(value)
        elif kind == "str":
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            value = str(value)
        elif kind == "bool":
            if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
                value = value.strip().lower() in _TRUE
            elif not isinstance(value, bool):
                raise ValueError
    except (TypeError, ValueError):
        raise SettingsError(f"{name} (from {source}) must be {kind}, got {given!r}") from None
    if kind == "float" and not math.isfinite(value):  # "nan" and "inf" parse, in TOML too, and pass range checks
        raise SettingsError(f"{name} (from {source}) must be a finite number, got {given!r}")
    if kind == "str" and "\x00" in value:  # (TOML's "\u0000": a path with it ended the start in a traceback)
        raise SettingsError(f"{name} (from {source}) must not hold a NUL character, got {given!r}")
    return value


def _check_toml_type(name: str, kind: str, value: Any, source: str) -> None:
    """Refuse a kernel.toml value whose TOML type is not the setting's: a number or a boolean in quotes ("5",
    "0.5", "true"), or a number where a string goes. They were read as the setting's type without a word, where the
    file's other type errors (workers = 5.5, port = true) are refused; an environment variable is text by nature,
    and its text is read as the type (AIOS_WORKERS=5)."""
    if kind in ("int", "float", "bool") and isinstance(value, str):
        try:
            meant = _coerce(name, value, source)  # (text that is no number at all: that error, as it was)
        except SettingsError:
            return
        written = str(meant).lower() if kind == "bool" else value.strip()
        raise SettingsError(f"{name} (from {source}) must be {kind}, got the string {value!r}: in kernel.toml write "
                            f"it without quotes ({name} = {written})")
    if kind == "str" and not isinstance(value, str):
        raise SettingsError(f"{name} (from {source}) must be a string, got {value!r}: in kernel.toml write it in "
                            f"quotes ({name} = \"{value}\")")


def _validate(settings: Settings, sources: dict[str, str]) -> None:
    def bad(name: str, why: str) -> SettingsError:
        return SettingsError(f"{name} (from {sources.get(name, 'defaults')}) {why}")

    for name in _FOLDERS:
        # "" is the current directory: a templated AIOS_DATA_DIR=${DATA_DIR} left unset put the audit log and the
        # store in whatever directory the kernel started in, and AIOS_PIPELINES= served any *.toml there.
        if not getattr(settings, name).strip():
            raise bad(name, f"is empty: name a folder (an empty value would be the directory the kernel starts in); "
                            f"leave it unset for the default, {_FIELDS[name].default!r}")
    if not 0 <= settings.port <= 65535:
        raise bad("port", f"must be 0..65535 (0 = any free port), got {settings.port}")
    if not 0 <= settings.metrics_port <= 65535:
        raise bad("metrics_port", f"must be 0..65535 (0 = no metrics endpoint), got {settings.metrics_port}")
    if settings.metrics_port and settings.metrics_port == settings.port:
        raise bad("metrics_port", f"must differ from port ({settings.port}): both would listen on it")
    if settings.front_end not in FRONT_ENDS:
        raise bad("front_end", f"must be one of {', '.join(FRONT_ENDS)}, got {settings.front_end!r}")
    if settings.workers < 2:  # (the last handler thread is kept for priority 1: with one, every other call is refused)
        raise bad("workers", f"must be >= 2 (at least one call slot is kept for priority-1 calls, so with "
                             f"{settings.workers} every ordinary call would be refused), got {settings.workers}")
    if settings.max_watches < 0:
        raise bad("max_watches", f"must be >= 0 (0 = a quarter of workers), got {settings.max_watches}")
    if settings.max_watches >= settings.workers:
        raise bad("max_watches", f"must be below workers ({settings.workers}): each open watch holds a handler "
                  f"thread of the sync front end, and calls beyond workers are refused; got {settings.max_watches}")
    if settings.max_streams < 0:
        raise bad("max_streams", f"must be >= 0 (0 = half of workers), got {settings.max_streams}")
    if settings.max_streams > settings.workers:
        raise bad("max_streams", f"must be at most workers ({settings.workers}): each open stream holds a call "
                  f"slot; got {settings.max_streams}")
    if not 1 <= settings.keepalive_s <= _MAX_SECONDS:
        raise bad("keepalive_s", f"must be 1..{_MAX_SECONDS} (a day), got {settings.keepalive_s}")
    if not 0 <= settings.gil_switch_interval_us <= 1_000_000:
        raise bad("gil_switch_interval_us", f"must be 0..1000000 (0 = Python's default), got {settings.gil_switch_interval_us}")
    if not 0 <= settings.gc_threshold <= 10_000_000:
        raise bad("gc_threshold", f"must be 0..10000000 (0 = Python's default), got {settings.gc_threshold}")
    if not 0 <= settings.lane_slots <= MAX_LANE_SLOTS:
        # (a thread each: 5,000 started 5,001 threads and made every stop take seconds, for nothing a CPU can run)
        raise bad("lane_slots", f"must be 0..{MAX_LANE_SLOTS} (0 = one per core), got {settings.lane_slots}")
    if not 0 <= settings.batch_nice <= 19:
        raise bad("batch_nice", f"must be 0..19 (0 = off), got {settings.batch_nice}")
    if not 1024 <= settings.max_message_bytes <= _MAX_GRPC_INT:
        # (gRPC takes its channel arguments as C ints: a larger value ended the start in an OverflowError traceback)
        raise bad("max_message_bytes", f"must be 1024..{_MAX_GRPC_INT} (2 GiB - 1, gRPC's limit), got "
                                       f"{settings.max_message_bytes}")
    if not _MIN_PAYLOAD_BUDGET <= settings.payload_budget_bytes <= _MAX_PAYLOAD_BUDGET:
        raise bad("payload_budget_bytes", f"must be {_MIN_PAYLOAD_BUDGET}..{_MAX_PAYLOAD_BUDGET} (1 MiB to 1 TiB), "
                                          f"got {settings.payload_budget_bytes}")
    if not 0 <= settings.max_connection_streams <= _MAX_GRPC_INT:
        raise bad("max_connection_streams", f"must be 0..{_MAX_GRPC_INT} (0 = no limit), got "
                                            f"{settings.max_connection_streams}")
    if not 0 <= settings.grace_seconds <= _MAX_SECONDS:
        raise bad("grace_seconds", f"must be 0..{_MAX_SECONDS} (a day), got {settings.grace_seconds}")
    if settings.log_level.upper() not in LOG_LEVELS:
        raise bad("log_level", f"must be one of {', '.join(LOG_LEVELS)}, got {settings.log_level!r}")
    if settings.pipeline_poll_s and not _MIN_POLL_S <= settings.pipeline_poll_s <= _MAX_SECONDS:
        # (1e-6 passed: the watcher then looked at the folder without pause, a core's worth of CPU and GIL)
        raise bad("pipeline_poll_s", f"must be 0 (load at start only) or {_MIN_POLL_S:g}..{_MAX_SECONDS} seconds, got "
                                     f"{settings.pipeline_poll_s:g}")
    if settings.scheduler not in SCHEDULERS:
        raise bad("scheduler", f"must be one of {', '.join(SCHEDULERS)}, got {settings.scheduler!r}")
    if settings.audit_mode not in AUDIT_MODES:
        raise bad("audit_mode", f"must be one of {', '.join(AUDIT_MODES)}, got {settings.audit_mode!r}")
    if settings.audit_checkpoint_records < 1:
        raise bad("audit_checkpoint_records", f"must be >= 1, got {settings.audit_checkpoint_records}")
    if not 0 < settings.audit_checkpoint_ms <= _MAX_SECONDS * 1000:
        raise bad("audit_checkpoint_ms", f"must be > 0 and <= {_MAX_SECONDS * 1000} (a day), got {settings.audit_checkpoint_ms}")
    if settings.audit_key and Path(settings.audit_key).is_dir():
        raise bad("audit_key", f"{settings.audit_key} is a directory, not the signing key's PEM file")
    if settings.audit_segment_bytes < 4096:
        raise bad("audit_segment_bytes", f"must be >= 4096, got {settings.audit_segment_bytes}")
    if not 0 <= settings.audit_preallocate_bytes <= _MAX_PREALLOCATE_BYTES:
        # Each chunk of zeros is one buffer in memory, kept for reuse: with a segment as large, 10**12 ended the
        # start in a MemoryError traceback (and 8 GiB would have held 8 GiB of RAM for the kernel's life).
        raise bad("audit_preallocate_bytes", f"must be 0..{_MAX_PREALLOCATE_BYTES} (64 MiB; 0 = append), got "
                                             f"{settings.audit_preallocate_bytes}")
    if settings.store_retention_days and not 1 <= settings.store_retention_days <= _MAX_RETENTION_DAYS:
        # (Under a day, a finished task could go while its caller may still retry StartTask with its key.)
        raise bad("store_retention_days", f"must be 0 (keep for good) or 1..{_MAX_RETENTION_DAYS} days, got "
                  f"{settings.store_retention_days:g}")
    _validate_task_retries(settings, bad)


_MAX_PREALLOCATE_BYTES = 64 << 20  # zeros written ahead at a time: far past the 256 KiB default gains nothing
_MAX_RETENTION_DAYS = 36_500  # a hundred years: more is a typo for 0


# More runs than this is a typo (or a wish for "forever", which a task that cannot succeed must not get).
_MAX_TASK_ATTEMPTS = 1000
# Each task worker is a thread; far more than this is a typo, not a wish for throughput (the lanes'
# batches, not these threads, bound how fast tasks run).
_MAX_TASK_WORKERS = 256


def _validate_task_retries(settings: Settings, bad) -> None:
    if not 1 <= settings.task_workers <= _MAX_TASK_WORKERS:
        raise bad("task_workers", f"must be 1..{_MAX_TASK_WORKERS} (threads running tasks), got {settings.task_workers}")
    if not 1 <= settings.task_max_attempts <= _MAX_TASK_ATTEMPTS:
        raise bad("task_max_attempts", f"must be 1..{_MAX_TASK_ATTEMPTS} (1 = no retry), got {settings.task_max_attempts}")
    if not 0 <= settings.task_backoff_s <= _MAX_SECONDS:
        raise bad("task_backoff_s", f"must be 0..{_MAX_SECONDS} (a day), got {settings.task_backoff_s}")
    if not 0 <= settings.task_max_backoff_s <= _MAX_SECONDS:
        raise bad("task_max_backoff_s", f"must be 0..{_MAX_SECONDS} (a day), got {settings.task_max_backoff_s}")
    if settings.task_max_backoff_s < settings.task_backoff_s:
        # The first wait would already be cut to the cap: one of the two is a typo.
        raise bad("task_max_backoff_s", f"must be >= task_backoff_s ({settings.task_backoff_s:g}), "
                  f"got {settings.task_max_backoff_s:g}; raise it or lower task_backoff_s")


def _line_of(path: Path, key: str) -> str:
    """``:LINE`` where ``key = ...`` is first set in ``path`` ("" when not found as written: a quoted key)."""
    pattern = re.compile(rf"^\s*{re.escape(key)}\s*=")
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if pattern.match(line):
            return f":{number}"
    return ""


def _file_settings(path: Path) -> dict[str, Any]:
    """The settings table of a kernel.toml: its [kernel] table, or its top-level keys when it has none."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SettingsError(f"config file {path} does not exist") from None
    except OSError as exc:  # a directory, no permission, an I/O error
        raise SettingsError(f"cannot read config {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise SettingsError(f"cannot read config {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"config file {path} is not valid TOML: {exc}") from None
    if "kernel" not in raw:
        return raw  # top-level keys: each must be a setting (load_settings refuses the others)
    table = raw["kernel"]
    if not isinstance(table, dict):
        raise SettingsError(f"{path}: [kernel] must be a table, got kernel = {table!r}")
    # Beside a [kernel] table nothing else is read: refuse it rather than ignore a typo ([server], [kernal]).
    others = [f"[{key}]" if isinstance(value, dict) else repr(key) for key, value in raw.items() if key != "kernel"]
    if others:
        raise SettingsError(f"{path}: unknown top-level {', '.join(others)} beside [kernel] (settings go inside [kernel])")
    return table


# AIOS_* variables that are not settings: the client commands' address, the tests' and benchmarks' switches.
OTHER_VARIABLES = frozenset({"AIOS_ADDRESS", "AIOS_PURE_PYTHON", "AIOS_CYTHON_DEBUG", "AIOS_FUZZ_SCALE",
                             "AIOS_PERF_ANALYZER_BIN", "AIOS_PERF_ANALYZER_CACHE", "AIOS_DEBIAN_MIRROR"})


def _warn_unknown_variables(env) -> None:
    """Say which AIOS_* variables are neither a setting nor one of OTHER_VARIABLES: a typo there
    (AIOS_AUDIT_MOD=off) was ignored without a word, where the same typo in kernel.toml is refused (an upgrade
    audit). A warning, not a refusal: an environment may carry variables of other tools under the prefix."""
    known = {f"AIOS_{key.upper()}" for key in _FIELDS}
    for name in sorted(v for v in env if v.startswith("AIOS_") and v not in known and v not in OTHER_VARIABLES):
        close = difflib.get_close_matches(name, sorted(known | OTHER_VARIABLES), n=1)
        logging.getLogger("aios.config").warning(
            "environment variable %s is not a setting and is ignored%s", name,
            f" (did you mean {close[0]}?)" if close else " (README, Settings: each key is also AIOS_<KEY>)")


def load_settings(
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
) -> Settings:
    """Merge the layers; ``overrides`` are command-line flags (None values are ignored)."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if config_file is not None:
        path = Path(config_file)
        for key, value in _file_settings(path).items():
            if key not in _FIELDS:
                close = difflib.get_close_matches(key, list(_FIELDS), n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(_FIELDS)}"
                raise SettingsError(f"{path}{_line_of(path, key)}: unknown setting {key!r}; {hint}")
            # The file and the line that set it, in every message about it ("workers (from /etc/aios/kernel.toml:7)").
            sources[key] = f"{path}{_line_of(path, key)}"
            values[key] = _coerce(key, value, sources[key], typed=True)
    env = os.environ if environ is None else environ
    _warn_unknown_variables(env)
    for key in _FIELDS:
        var = f"AIOS_{key.upper()}"
        if var in env:
            values[key] = _coerce(key, env[var], f"${var}")
            sources[key] = f"${var}"
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = _coerce(key, value, f"--{key.replace('_', '-')}")
            sources[key] = f"--{key.replace('_', '-')}"
    if values.get("audit_key"):
        values["audit_key"] = OperatorPath(values["audit_key"], sources["audit_key"])
    settings = Settings(**values)
    if settings.log_level != settings.log_level.upper():
        settings = dataclasses.replace(settings, log_level=settings.log_level.upper())
    _validate(settings, sources)
    return settings
