"""How long opening an audit log takes: the open's frame walk compiled (ext/auditscan.pyx) vs its reference.

    python -m bench.audit_open [--records 1000000] [--rounds 3] [--data-parent /work]

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
    args = parser.parse_args(argv)
    directory = tempfile.mkdtemp(prefix="aios-open-", dir=args.data_parent)
    try:
        log = AuditLog.open(directory, mode="async", checkpoint_records=100_000)
        for i in range(args.records - 1):
            log.append(pb.AuditRecord(kind=pb.DECISION, request_id=f"r{i}", payload=b"x" * 300))
        log.append_and_wait(pb.AuditRecord(kind=pb.DECISION), 120)
        log.close()
        times: dict[str, list[float]] = {"compiled": [], "reference": []}
        for number in range(args.rounds):
            for arm, times_of in times.items():
                env = {k: v for k, v in os.environ.items() if k != "AIOS_PURE_PYTHON"}
                if arm == "reference":
                    env["AIOS_PURE_PYTHON"] = "1"
                done = subprocess.run([sys.executable, "-c", PROBE, directory], env=env, cwd=REPO_ROOT,
                                      capture_output=True, text=True, check=True)
                times_of.append(float(done.stdout.split()[-1]))
                print(f"round {number} {arm:9}: open {times_of[-1]:.2f} s")
        medians = {arm: statistics.median(v) for arm, v in times.items()}
        compiled, reference = medians["compiled"], medians["reference"]
        print(f"{args.records:,} records: compiled {compiled:.2f} s, reference {reference:.2f} s; "
              f"reference / compiled {reference / compiled:.2f}x")
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
