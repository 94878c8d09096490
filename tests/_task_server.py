"""A stand-in pipeline: durable tasks and reviews over a data directory, deciding by a fixed rule of the fields.

For the task and review service tests that need outcomes a test sets per request: a given number of
transient failures, a task held RUNNING until a file appears, a chosen confidence. ``decide`` is a plain
deterministic function of the request's fields (no model, no policy, no audit log), and ``wire_reviews``
does what kernel/decisions.py does when a review is resolved (build the human's decision and finish the
waiting task). The real claims pipeline, model and audit log are driven over the same RPCs by
test_review_desk, test_task_retries, test_task_cancel_running, test_task_decided_once and test_retention.

Run as a script it serves gRPC on a free port of 127.0.0.1 and prints
``PORT <n>``; the restart test kills it with SIGKILL and starts it again on
the same data directory::

    python tests/_task_server.py DATA_DIR

Fields the fake pipeline reads from ``DecisionRequest.fields``:

- ``amount`` (number): approve below 1000, deny from 1000;
- ``confidence`` (number, default 1.0): below 0.5 the case goes to review;
- ``transient_failures`` (int): the first N attempts raise TransientError;
- ``fail`` (string): raise InvalidArgument with this message;
- ``block_until`` (string): wait until this file exists before deciding
  (it lets a test hold a task in RUNNING, across processes).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb  # noqa: E402
from kernel.api import kernel_services  # noqa: E402
from kernel.api.review_service import review_handlers  # noqa: E402
from kernel.api.task_service import task_handlers  # noqa: E402
from kernel.errors import InvalidArgument, TransientError  # noqa: E402
from kernel.review import ReviewQueue  # noqa: E402
from kernel.store import open_database  # noqa: E402
from kernel.tasks import TaskRunner, TaskStore, WaitingForReview  # noqa: E402

ACTIONS = ["approve", "deny"]
SLA_SECONDS = 3600.0
BLOCK_POLL_S = 0.02  # how often a blocked run looks for its file (it waits on another process)


def number(request: kpb.DecisionRequest, name: str, default: float) -> float:
    value = request.fields.get(name)
    if value is None:
        return default
    return value.number_value if value.HasField("number_value") else float(value.int_value)


def proposed_decision(request: kpb.DecisionRequest) -> kpb.Decision:
    amount = number(request, "amount", 0.0)
    decision = kpb.Decision(
        request_id=request.request_id, action="approve" if amount < 1000 else "deny", outcome=kpb.AUTOMATED,
        pipeline=request.pipeline, tenant=request.tenant, idempotency_key=request.idempotency_key,
    )
    decision.model.confidence = number(request, "confidence", 1.0)
    return decision


def make_decide(queue: ReviewQueue, runs: list | None = None):
    """The fake pipeline: a run_fn for TaskRunner. ``runs`` (if given) collects (task_id, attempt)."""

    def decide(task: kpb.Task):
        request = task.request
        if runs is not None:
            runs.append((task.task_id, task.attempts))
        if "block_until" in request.fields:
            marker = Path(request.fields["block_until"].string_value)
            while not marker.exists():
                time.sleep(BLOCK_POLL_S)
        if "fail" in request.fields:
            raise InvalidArgument(request.fields["fail"].string_value)
        if task.attempts <= number(request, "transient_failures", 0):
            raise TransientError(f"model busy on attempt {task.attempts}")
        decision = proposed_decision(request)
        if decision.model.confidence < 0.5:
            decision.outcome = kpb.ESCALATED
            decision.escalation_reasons.append(f"confidence {decision.model.confidence:.2f} is below 0.5")
            review = queue.create(decision, request, ACTIONS, SLA_SECONDS, task_id=task.task_id)
            decision.review_id = review.review_id
            return WaitingForReview(review.review_id, decision)
        return decision

    return decide


def wire_reviews(queue: ReviewQueue, runner: TaskRunner) -> None:
    """What the decision layer does on a resolution: the human's decision finishes the task."""

    def on_resolved(review: kpb.Review) -> kpb.Decision:
        decision = kpb.Decision(
            request_id=review.request_id, action=review.resolved_action, outcome=kpb.REVIEWED,
            review_id=review.review_id, pipeline=review.pipeline, tenant=review.tenant,
        )
        decision.reasons.add(rule_id=f"reviewer:{review.resolved_by}", description=review.comment)
        if review.task_id:
            runner.complete_from_review(review.review_id, decision, task_id=review.task_id)
        return decision

    queue.on_resolved(on_resolved)


class TaskKernel:
    """Database, review queue, task store and runner over one data directory, wired together."""

    def __init__(self, data_dir, workers: int = 2, max_attempts: int = 3, backoff_s: float = 0.01):
        self.db = open_database(data_dir)
        self.queue = ReviewQueue(self.db)
        self.store = TaskStore(self.db)
        self.runs: list = []
        self.runner = TaskRunner(self.store, make_decide(self.queue, self.runs), workers=workers,
                                 max_attempts=max_attempts, backoff_s=backoff_s)
        wire_reviews(self.queue, self.runner)
        self.queue.redeliver()
        self.runner.start()

    def handlers(self) -> dict:
        return {**review_handlers(self.queue), **task_handlers(self.runner)}

    def close(self) -> None:
        self.runner.stop(timeout_s=2.0)
        self.queue.close()  # (its lease timer thread outlived the tests: a test-suite audit)
        self.db.close()


def serve_sync(kernel: TaskKernel) -> tuple[grpc.Server, int]:
    executor = ThreadPoolExecutor(max_workers=16)
    server = grpc.server(executor)
    kernel.executor = executor  # shut down after the server stops (grpc's stop leaves its threads running)
    server.add_generic_rpc_handlers(
        kernel_services.generic_handlers(None, None, asynchronous=False, implemented=kernel.handlers())
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


class AioServer:
    """The same handlers on a grpc.aio server, its loop on a thread of its own."""

    def __init__(self, kernel: TaskKernel):
        self.loop = asyncio.new_event_loop()
        ready: Future = Future()

        async def serve() -> None:
            server = grpc.aio.server()
            server.add_generic_rpc_handlers(
                kernel_services.generic_handlers(None, None, asynchronous=True, implemented=kernel.handlers())
            )
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            self.server = server
            self.stopped = asyncio.Event()
            ready.set_result(port)
            await self.stopped.wait()

        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(serve(),), daemon=True)
        self.thread.start()
        self.port = ready.result(timeout=30)

    def stop(self) -> None:
        async def shutdown() -> None:
            await self.server.stop(1)
            self.stopped.set()

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(timeout=30)
        self.thread.join(timeout=30)
        self.loop.close()


def serve_task_kernel(folder, front_end: str):
    """A TaskKernel on ``folder`` served by the ``sync`` or ``aio`` front end; returns (kernel, stop)."""
    kernel = TaskKernel(folder)
    if front_end == "sync":
        server, port = serve_sync(kernel)

        def stop() -> None:
            server.stop(1).wait()
            kernel.executor.shutdown(wait=True)
    else:
        server = AioServer(kernel)
        port, stop = server.port, server.stop
    kernel.port = port
    return kernel, stop


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("data_dir")
    args = parser.parse_args()
    kernel = TaskKernel(args.data_dir)
    server, port = serve_sync(kernel)
    print(f"PORT {port}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    server.stop(1).wait()
    kernel.close()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
