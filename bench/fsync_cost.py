"""What one durable write costs on this disk: a write alone vs the same write followed by fdatasync.

    python -m bench.fsync_cost [--dir bench/out] [--writes 2000] [--bytes 8192] [--rounds 2] [--cpu 0]

The audit log's ``fsync`` mode pays one ``fdatasync`` per group of decisions
(kernel/audit/writer.py); how much that is depends on the disk and, on a
virtual machine, on what the hypervisor does with a cache flush. This tool
measures it the way the audit log writes: into a file preallocated with
zeros (so the sync commits no size change), one ``pwrite`` of ``--bytes`` at
the next offset, then ``fdatasync``. Rounds alternate write-only and
write+sync. Reported per operation, median over rounds: CPU (user and the OS
kernel's share, from ``getrusage``), wall time, and the sync's extra CPU over
a write alone. The CPU a sync costs the *process* in a real server can be
higher than this (threads sleep and wake around it; bench/RESULTS.md). Pinned
to ``--cpu`` (default 0, as the benchmarks pin the kernel) when it exists.
Results: ``OUT/fsync-cost-<stamp>.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

from bench import procs
from bench.frontends import machine_facts

REPO_ROOT = Path(__file__).resolve().parents[1]
MODES = ("write", "write+fdatasync")


def _round(fd: int, mode: str, writes: int, payload: bytes) -> dict:
    offset = 0
    before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(writes):
        os.pwrite(fd, payload, offset)
        offset += len(payload)
        if mode != "write":
            os.fdatasync(fd)
    after, ended = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    per = 1e6 / writes
    return {"mode": mode, "user_us": (after.ru_utime - before.ru_utime) * per,
            "sys_us": (after.ru_stime - before.ru_stime) * per, "wall_us": (ended - started) * per}


def measure(directory: Path, writes: int, size: int, rounds: int) -> dict:
    """Alternating rounds of each mode on one preallocated file; medians per mode and the sync's extra."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"fsync-cost-{os.getpid()}.dat"
    fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_TRUNC, 0o600)
    try:
        total = writes * size
        os.pwrite(fd, bytes(total), 0)  # zeros written and synced ahead, as the audit log's segments are
        os.fsync(fd)
        payload = os.urandom(size)
        runs = [_round(fd, mode, writes, payload) for _ in range(rounds) for mode in MODES]
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
    summary = {}
    for mode in MODES:
        mine = [r for r in runs if r["mode"] == mode]
        summary[mode] = {key: statistics.median(r[key] for r in mine) for key in ("user_us", "sys_us", "wall_us")}
        summary[mode]["cpu_us"] = summary[mode]["user_us"] + summary[mode]["sys_us"]
    summary["sync_extra_cpu_us"] = summary["write+fdatasync"]["cpu_us"] - summary["write"]["cpu_us"]
    return {"runs": runs, "summary": summary}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fsync_cost", description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=REPO_ROOT / "bench" / "out",
                        help="where the scratch file goes: the disk to measure (default bench/out)")
    parser.add_argument("--writes", type=int, default=2000, help="operations per round (default 2000)")
    parser.add_argument("--bytes", dest="size", type=int, default=8192, help="bytes per write (default 8192)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per mode, alternating (default 2)")
    parser.add_argument("--cpu", type=int, default=0, help="core to pin to (-1: no pinning)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "out")
    args = parser.parse_args(argv)
    if args.writes < 1 or args.size < 1 or args.rounds < 1:
        parser.error("--writes, --bytes and --rounds must be >= 1")
    if args.cpu >= 0 and args.cpu in os.sched_getaffinity(0):
        os.sched_setaffinity(0, {args.cpu})
    command = "python -m bench.fsync_cost " + " ".join(argv if argv is not None else sys.argv[1:])
    result = measure(args.dir, args.writes, args.size, args.rounds)
    for run in result["runs"]:
        print(f"{run['mode']:16s} user {run['user_us']:6.1f}  sys {run['sys_us']:6.1f}  wall {run['wall_us']:7.1f} µs/op",
              flush=True)
    s = result["summary"]
    print(f"medians over {args.rounds} rounds of {args.writes} x {args.size} bytes: write {s['write']['cpu_us']:.1f} µs CPU "
          f"/ {s['write']['wall_us']:.1f} µs wall; write+fdatasync {s['write+fdatasync']['cpu_us']:.1f} µs CPU "
          f"/ {s['write+fdatasync']['wall_us']:.1f} µs wall; the sync adds {s['sync_extra_cpu_us']:.1f} µs of CPU")
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    (args.out / f"fsync-cost-{stamp}.json").write_text(json.dumps(
        {"command": command, "machine": machine_facts(command), "directory": str(args.dir), **result}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(procs.run_main("fsync_cost", main))
