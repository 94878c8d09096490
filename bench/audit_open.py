"""How long opening an audit log takes: the open's frame walk compiled (ext/auditscan.pyx) vs its reference,
or (``--archive-before``) the whole log vs a copy whose oldest records were archived (``audit archive``).

    python -m bench.audit_open [--records 1000000] [--rounds 3] [--data-parent /work]
    python -m bench.audit_open --archive-before 900000 [--records 1000000]

Writes one real log of ``--records`` records (~300-byte payloads), then opens it in a fresh process per try,
alternating the compiled build and ``AIOS_PURE_PYTHON=1`` (the references); each open reads every segment,
checks every frame and hashes the Merkle tree up to the last checkpoint (kernel/audit/recovery.py), as a
kernel's start does. Prints each try's wall time, the medians and their ratio.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from kernel._proto.aios.kernel.v1 import kernel_pb2 as pb
from kernel.audit import AuditLog

REPO_ROOT = Path(__file__).resolve().parents[1]
PROBE = ("import sys, time; from kernel.audit import AuditLog; started = time.perf_counter(); "
         "AuditLog.open(sys.argv[1], mode='async').close(); print(time.perf_counter() - started)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--data-parent", default=None)
    parser.add_argument("--archive-before", type=int, default=None, metavar="SEQ",
                        help="compare the whole log with a copy archived up to SEQ (both compiled)")
    args = parser.parse_args(argv)
    directory = tempfile.mkdtemp(prefix="aios-open-", dir=args.data_parent)
    try:
        log = AuditLog.open(directory, mode="async", checkpoint_records=100_000)
        for i in range(args.records - 1):
            log.append(pb.AuditRecord(kind=pb.DECISION, request_id=f"r{i}", payload=b"x" * 300))
        log.append_and_wait(pb.AuditRecord(kind=pb.DECISION), 120)
        log.close()
        arms = {"compiled": directory, "reference": directory}
        if args.archive_before is not None:
            arms = {"whole": directory, "archived": _archived_copy(directory, args.archive_before)}
        times: dict[str, list[float]] = {arm: [] for arm in arms}
        for number in range(args.rounds):
            for arm, times_of in times.items():
                env = {k: v for k, v in os.environ.items() if k != "AIOS_PURE_PYTHON"}
                if arm == "reference":
                    env["AIOS_PURE_PYTHON"] = "1"
                done = subprocess.run([sys.executable, "-c", PROBE, arms[arm]], env=env, cwd=REPO_ROOT,
                                      capture_output=True, text=True, check=True)
                times_of.append(float(done.stdout.split()[-1]))
                print(f"round {number} {arm:9}: open {times_of[-1]:.2f} s")
        medians = {arm: statistics.median(v) for arm, v in times.items()}
        (slow_arm, slow), (fast_arm, fast) = sorted(medians.items(), key=lambda item: -item[1])
        print(f"{args.records:,} records: " + ", ".join(f"{arm} {value:.2f} s" for arm, value in medians.items())
              + f"; {slow_arm} / {fast_arm} {slow / fast:.2f}x")
    finally:
        shutil.rmtree(directory, ignore_errors=True)
        shutil.rmtree(directory + "-archived", ignore_errors=True)
        shutil.rmtree(directory + "-archive", ignore_errors=True)
    return 0


def _archived_copy(directory: str, before: int) -> str:
    """A copy of the log with its records before ``before`` (rounded down to a segment) archived."""
    from kernel.audit.archive import archive

    copy = directory + "-archived"
    shutil.copytree(directory, copy)
    result = archive(Path(copy), Path(directory + "-archive"), before=before)
    print(f"archived records {result.first}..{result.end - 1} ({result.segments} segments) of the copy")
    return copy


if __name__ == "__main__":
    raise SystemExit(main())
