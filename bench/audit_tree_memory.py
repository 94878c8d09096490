"""What the audit log's Merkle tree holds in memory, and what a proof about an old record costs, both ways.

    python -m bench.audit_tree_memory [--records 400000] [--data-parent /work] [--dir bench/out]

Writes one real log of ``--records`` records (``async`` mode, ~300-byte payloads), then opens it twice, alternating:
as the kernel runs it (the newest ``KEEP_LEAVES`` leaf hashes in memory, older ones read back from the segments:
kernel/audit/merkle.py ``keep_recent``) and keeping every leaf (the behaviour before, set by raising
``KEEP_LEAVES`` past the log's size). For each: the tree's bytes (leaves held + cached subtree levels), the open's
wall time, and inclusion proofs for records spread over the log's first half (their leaves are on disk in the
first mode). Results: ``OUT/audit-tree-memory-<stamp>.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from bench.frontends import machine_facts
from kernel._proto.aios.kernel.v1 import kernel_pb2 as pb
from kernel.audit import AuditLog, merkle, verify_inclusion

REPO_ROOT = Path(__file__).resolve().parents[1]
PROOFS = 200


def _write(directory: Path, records: int) -> None:
    log = AuditLog.open(directory, mode="async", checkpoint_records=100_000)
    try:
        for i in range(records - 1):
            log.append(pb.AuditRecord(kind=pb.DECISION, request_id=f"r{i}", payload=b"x" * 300))
        log.append_and_wait(pb.AuditRecord(kind=pb.DECISION), 120)
    finally:
        log.close()


def _measure(directory: Path, keep: int) -> dict:
    default = merkle.KEEP_LEAVES
    merkle.KEEP_LEAVES = keep
    try:
        started = time.perf_counter()
        log = AuditLog.open(directory, mode="async")
        opened_s = time.perf_counter() - started
    finally:
        merkle.KEEP_LEAVES = default
    try:
        tree = log._tree
        size = log.size
        root = log.root(size)
        times = []
        for k in range(PROOFS):
            index = k * (size // 2) // PROOFS
            started = time.perf_counter()
            proof = log.inclusion_proof(index, size)
            times.append(time.perf_counter() - started)
            assert verify_inclusion(log.leaf(index), index, size, proof, root)
        return {"records": size, "leaves_held": len(tree._leaves) >> 5, "leaf_bytes": len(tree._leaves),
                "level_bytes": sum(len(level) for level in tree._levels), "open_s": opened_s,
                "old_proof_ms_median": statistics.median(times) * 1e3, "old_proof_ms_max": max(times) * 1e3}
    finally:
        log.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=400_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--data-parent", default=None, help="folder for the log (default: the system temp dir)")
    parser.add_argument("--dir", default=str(REPO_ROOT / "bench" / "out"))
    args = parser.parse_args(argv)
    directory = Path(tempfile.mkdtemp(prefix="aios-tree-memory-", dir=args.data_parent))
    try:
        started = time.perf_counter()
        _write(directory, args.records)
        print(f"wrote {args.records:,} records in {time.perf_counter() - started:.1f} s")
        arms = {"newest leaves in memory": merkle.KEEP_LEAVES, "every leaf in memory": args.records * 2}
        rounds = []
        for number in range(args.rounds):
            for arm, keep in arms.items():
                result = {"round": number, "arm": arm, **_measure(directory, keep)}
                rounds.append(result)
                print(f"round {number} {arm:24}: {result['leaf_bytes'] + result['level_bytes']:>12,} bytes "
                      f"({result['leaves_held']:,} leaves held, levels {result['level_bytes']:,}); open "
                      f"{result['open_s']:.2f} s; proof of an old record {result['old_proof_ms_median']:.2f} ms "
                      f"median, {result['old_proof_ms_max']:.2f} max")
        held = {arm: statistics.median(r["leaf_bytes"] + r["level_bytes"] for r in rounds if r["arm"] == arm)
                for arm in arms}
        ratio = held["every leaf in memory"] / held["newest leaves in memory"]
        print(f"tree memory, every leaf / newest leaves: {ratio:.1f}x")
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    path = out / f"audit-tree-memory-{stamp}.json"
    facts = machine_facts("python -m bench.audit_tree_memory")
    path.write_text(json.dumps({"args": vars(args), "machine": facts, "rounds": rounds, "memory_ratio": ratio},
                               indent=1))
    print(f"raw: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
