"""How fast a StreamAudit follower keeps up with a busy kernel: records followed vs records written.

    python -m bench.audit_follow [--seconds 20] [--rounds 3] [--baseline-root PATH] [--front-end sync]
    python -m bench.audit_follow --batches    # StreamAudit vs StreamAuditBatches, same kernel, same run

Each round starts the kernel (``python -m kernel serve`` on the claims demo, in a fresh data dir), loads it
from one process (``--streams`` DecideStreams sending automated claims), and follows the log from record 0
from another, run at ``nice -n -15`` so the follower's own process is not what limits it (the machine has
two cores). It prints records followed and the log's size at the end. With ``--baseline-root`` (a checkout
of another commit, built) every round runs both kernels back to back and prints the ratio of records followed;
with ``--batches`` every round follows once with StreamAudit and once with StreamAuditBatches.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc

from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
from kernel._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc
from kernel.decision_client import make_request

REPO_ROOT = Path(__file__).resolve().parents[1]


def automated(request_id: str) -> kpb.DecisionRequest:
    return make_request("claims_triage", {"claim_amount": 800, "customer_tier": "gold", "fraud_score": 0.05,
                                          "has_police_report": True}, {"description": "hail"}, request_id=request_id)


def load(address: str, streams: int, seconds: float) -> None:
    """The load process: ``streams`` DecideStreams until ``seconds`` have passed."""
    stop = time.monotonic() + seconds

    def one(number: int) -> None:
        stub = kgrpc.DecisionServiceStub(grpc.insecure_channel(address))

        def requests():
            sent = 0
            while time.monotonic() < stop:
                sent += 1
                yield automated(f"load-{number}-{sent}")
                if not sent % 50:
                    time.sleep(0.01)  # (a bounded stream window on the client side)
        try:
            for _ in stub.DecideStream(requests(), timeout=seconds + 30):
                pass
        except grpc.RpcError:
            pass

    threads = [threading.Thread(target=one, args=(n,)) for n in range(streams)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def follow(address: str, seconds: float, batched: bool) -> None:
    """The follower process: StreamAudit (or StreamAuditBatches) from 0 with follow for ``seconds``; prints what
    it got as JSON."""
    stub = kgrpc.AuditServiceStub(grpc.insecure_channel(address))
    query = kpb.StreamAuditRequest(from_sequence=0, follow=True)
    count = 0
    try:
        if batched:
            for batch in stub.StreamAuditBatches(kpb.StreamAuditBatchesRequest(query=query), timeout=seconds):
                count += len(batch.records)
        for _ in () if batched else stub.StreamAudit(query, timeout=seconds):
            count += 1
    except grpc.RpcError:
        pass  # (DEADLINE_EXCEEDED: the end of the run)
    print(json.dumps({"followed": count}))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def one_round(root: Path, batched: bool, args, data_parent: str | None) -> dict:
    data = tempfile.mkdtemp(prefix="aios-follow-", dir=data_parent)
    port = free_port()
    env = {**os.environ, "AIOS_AUDIT_STREAM_ENABLED": "true", "AIOS_FRONT_END": args.front_end}
    server = subprocess.Popen(
        [sys.executable, "-m", "kernel", "serve", "--models", str(REPO_ROOT / "examples/claims/models"),
         "--pipelines", str(REPO_ROOT / "examples/claims/pipelines"), "--port", str(port), "--data-dir", data,
         "--log-level", "WARNING"], cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    address = f"127.0.0.1:{port}"
    try:
        grpc.channel_ready_future(grpc.insecure_channel(address)).result(timeout=60)
        me = [sys.executable, "-m", "bench.audit_follow"]
        loader = subprocess.Popen([*me, "--role", "load", "--address", address, "--seconds", str(args.seconds),
                                   "--streams", str(args.streams)], cwd=REPO_ROOT)
        follower = subprocess.run(["nice", "-n", "-15", *me, "--role", "follow", "--address", address, "--seconds",
                                   str(args.seconds), *(["--batches"] if batched else [])],
                                  cwd=REPO_ROOT, capture_output=True, text=True, check=True)
        loader.wait(args.seconds + 60)
        size = kgrpc.AuditServiceStub(grpc.insecure_channel(address)).GetCheckpoint(
            kpb.CheckpointRequest(), timeout=10).tree_size
        return {"followed": json.loads(follower.stdout.strip().splitlines()[-1])["followed"], "written": size}
    finally:
        server.terminate()
        server.wait(60)
        shutil.rmtree(data, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--role", choices=["bench", "load", "follow"], default="bench")
    parser.add_argument("--address")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--front-end", dest="front_end", default="sync", choices=["sync", "aio"])
    parser.add_argument("--baseline-root", dest="baseline_root", help="a built checkout of the commit to compare with")
    parser.add_argument("--data-parent", dest="data_parent")
    parser.add_argument("--batches", action="store_true",
                        help="compare StreamAudit with StreamAuditBatches (follow role: follow with the batches)")
    args = parser.parse_args(argv)
    if args.role == "load":
        load(args.address, args.streams, args.seconds)
        return 0
    if args.role == "follow":
        follow(args.address, args.seconds, args.batches)
        return 0
    arms = {"now": (REPO_ROOT, False)}
    if args.baseline_root:
        arms["baseline"] = (Path(args.baseline_root), False)
    if args.batches:
        arms = {"batches": (REPO_ROOT, True), "records": (REPO_ROOT, False)}
    first, second = list(arms) + [None] * (2 - len(arms))
    followed: dict[str, list[int]] = {arm: [] for arm in arms}
    ratios = []
    for number in range(args.rounds):
        for arm, (root, batched) in arms.items():
            result = one_round(root, batched, args, args.data_parent)
            followed[arm].append(result["followed"])
            print(f"round {number} {arm:8}: followed {result['followed']:,} of {result['written']:,} records written "
                  f"({result['followed'] / max(result['written'], 1):.0%})", flush=True)
        if second is not None:
            ratios.append(followed[first][-1] / max(followed[second][-1], 1))
    summary = ", ".join(f"{arm} median {statistics.median(v):,.0f} followed" for arm, v in followed.items())
    if ratios:
        summary += f"; {first} / {second} per round {', '.join(f'{r:.2f}x' for r in ratios)}"
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
