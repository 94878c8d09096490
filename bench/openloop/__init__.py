"""Open-loop load generator and three scheduler scenarios: bursty goodput, overload with deadlines, priority isolation.

Protocol (/work/shared/BENCHMARKING.md): every claim is a ratio measured in one command, the arms
alternating (A B A B ...), each server a *fresh* ``python -m kernel serve`` subprocess pinned to core 0
(``taskset -c 0``) and running a frozen snapshot of ``kernel/`` (``bench.frontends.snapshot_code``), the
generator pinned to core 1 (this process sets its own affinity). Loopback only.

The generator (``drive``) is open loop: one asyncio event loop (uvloop when installed) sends each request
of a precomputed schedule at its *scheduled* time, with as many in flight as the schedule implies, over one
grpc.aio channel with pre-serialised ``ModelInferRequest`` bytes (no protobuf work per request on the
client). Latency is measured from the scheduled send time, not the actual one, so a late client does not
hide queueing (coordinated omission). Per run it measures its own core (CPU time of this process over the
window) and its lag behind schedule, and warns when the core was > 90 % busy or when sends fell behind by
more than ``LAG_WARN_P99_MS`` (p99) / ``LAG_WARN_MAX_MS`` (max). The cyclic garbage collector is off during a
run (a collection among tens of thousands of calls stalled the loop 10-25 ms, enough to smear a burst).
Closed-loop workers (a fixed number of requests in flight) share the loop: they measure saturation
throughput and act as a saturating neighbour. Measured capacity of this client on one core: ~4k unary
calls/s (about 200-250 µs of client CPU per call), so scenarios keep the offered rate under ~3k/s.

Deadlines. A deadline is sent either as Triton's ``timeout`` parameter (µs) with a gRPC deadline
``GUARD_S`` later only as a guard, so that an OK answer arriving after the deadline is *visible* to the
client (``timeout``), or as the plain gRPC deadline (``grpc``), where a call the server did not answer in
time shows up as a *client-side* DEADLINE_EXCEEDED (details ``Deadline Exceeded``), told apart from the
kernel's own DEADLINE_EXCEEDED by its message. In ``grpc`` mode an "OK after the deadline" can only be the
client's timestamp taken late, and is reported as such. Every non-OK answer's status and message (numbers
masked) is counted per run.

Scenarios (``--scenario``):

1. ``bursty``: a Poisson trace (fixed seed) at ``--base-frac`` (0.4) of the saturation throughput C measured
   at the start, with bursts of ``--burst-factor`` (10) × base lasting ``--burst-ms`` (50) starting on
   average every ``--burst-gap-s`` (1.0) s, every request carrying the SLO (``--slo-ms``, 50) as its
   deadline (gRPC deadline by default, ``--bursty-deadline-via``), against large_mlp. Phase 1 screens
   adaptive batching (model.toml: max_batch_size 64, no window) and the static grid (max_batch_size
   {8,16,32,64} × max_queue_delay_us {500,2000,8000}) once each on the same trace; phase 2 runs adaptive and the two best static points alternately for ``--pairs``
   rounds. Goodput = OK answers within the SLO of their scheduled send time, per second. Ratio:
   adaptive / best static (median over rounds).
2. ``overload``: saturation throughput C (closed loop, ``--sat-concurrency`` in flight, no deadline), then
   Poisson at ``--overload-factor`` (2) × C with a ``--deadline-ms`` (100) deadline on every request, as the
   ``timeout`` parameter and as a gRPC deadline; rounds of [saturation, overload/timeout, overload/grpc],
   each arm on a fresh server. Requests carry ``--overload-rows`` (4) rows so that 2 × C stays within what
   the client sends on one core. Counts OK answers that arrived after their deadline (measured from the
   actual send; target 0), p99 of OK, goodput, refusals vs expiries. Ratio: overload goodput / saturation.
3. ``priority``: tiny_mlp at priority 1, Poisson ``--tiny-rps`` (200), with large_mlp on the same lane as
   neighbour: arms solo | closed-loop neighbour (``--neighbour-concurrency`` 32 in flight) at priority 2 |
   the same neighbour at priority 1 (control: what priority buys) | an open-loop neighbour at 1.5 × its
   closed-loop throughput with 1 s gRPC deadlines at priority 2. Ratio: tiny p99 with the priority-2
   neighbour / solo p99.

Output: a progress line per run, the tables, ``OUT/openloop-<UTC stamp>.json`` (per-run statistics,
machine facts, command) and ``.md``, per-run raw arrays in ``OUT/openloop-<stamp>-raw.npz``, server logs
in ``OUT/logs/openloop-<stamp>/``. Exit status 1 if a server failed, logged errors, or the kernel answered
OK after a deadline or with an unexpected status.

Layout (one concern per module; ``python -m bench.openloop`` runs ``__main__`` -> ``cli.main``):

- ``repos``: model repositories (``model.toml`` text, ``build_repo``) the servers load.
- ``streams``: what a request is: pre-serialised payloads, ``Stream`` (deadline and how it is sent),
  ``OpenLoad`` (a schedule) and ``ClosedLoad`` (a number in flight).
- ``traces``: arrival schedules (Poisson, Poisson with bursts).
- ``codes``: per-request status codes and how a gRPC error maps onto them.
- ``driver``: the open-loop sender (``drive``) and its per-request ``Record``/per-run ``RunData``.
- ``stats``: percentiles and per-stream statistics of a run; the generator's self-checks.
- ``runs``: server start/stop and ``measure`` (one run: drive, statistics, progress line, raw arrays).
- ``scenarios``: the three scenarios (bursty, overload, priority).
- ``report``: the summary (ratios) and the markdown tables.
- ``cli``: arguments, the run of the chosen scenarios, the output files and the exit status.

CLI::

    python -m bench.openloop [--quick] [--scenario bursty|overload|priority|all] [--seconds N] [--pairs 3]
"""

from __future__ import annotations

from bench.openloop.cli import main, parse_args
from bench.openloop.codes import (CANCELLED, CLIENT_DEADLINE, CODE_NAMES, EXPIRED, INTERNAL, OK, OTHER, PENDING,
                                  REFUSED, UNAVAILABLE)
from bench.openloop.driver import INFER_METHOD, LIST_MODELS_METHOD, MAX_REQUESTS_PER_RUN, Record, RunData, drive
from bench.openloop.repos import build_repo, model_toml
from bench.openloop.scenarios import STATIC_BATCH, STATIC_DELAY_US, scenario_bursty, scenario_overload, scenario_priority
from bench.openloop.stats import client_flags, latency_stats, pct, record_stats
from bench.openloop.streams import GUARD_S, NO_DEADLINE_TIMEOUT_S, ClosedLoad, OpenLoad, Stream, make_stream, payload
from bench.openloop.traces import bursty_trace, poisson

__all__ = [
    "CANCELLED", "CLIENT_DEADLINE", "CODE_NAMES", "EXPIRED", "GUARD_S", "INFER_METHOD", "INTERNAL",
    "LIST_MODELS_METHOD", "MAX_REQUESTS_PER_RUN", "NO_DEADLINE_TIMEOUT_S", "OK", "OTHER", "PENDING", "REFUSED",
    "STATIC_BATCH", "STATIC_DELAY_US", "UNAVAILABLE", "ClosedLoad", "OpenLoad", "Record", "RunData", "Stream",
    "build_repo", "bursty_trace", "client_flags", "drive", "latency_stats", "main", "make_stream", "model_toml",
    "parse_args", "payload", "pct", "poisson", "record_stats", "scenario_bursty", "scenario_overload",
    "scenario_priority",
]
