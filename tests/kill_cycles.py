"""Random SIGKILLs of a real kernel under a mixed load, and the promises checked against what the clients saw.

A cycle: start ``aios-kernel serve`` on the data dir (the same one each cycle), send again every keyed call no
answer came back for (keyed Decide, keyed StartTask, a resolution), check what the restart must have rebuilt
(reviews), drive a mixed load from a few threads (keyed and unkeyed Decide, DecideStream, StartTask, a reviewer
claiming and resolving), and SIGKILL the kernel after a seeded random delay. Once the kernel is dead the log is read
and every answer a client got OK is looked for on it. After the last cycle the kernel starts once more, every task is
driven to its end (its review resolved), and the kernel stops cleanly; then the whole log: one decision per key and
per task, each resolution once and linked to its decision, ``audit verify --strict``.

Small audit segments and frequent checkpoints put rollovers and checkpoint signing among the instants a kill can hit.
``run(seed, cycles)``; a failure names the seed, and the same seed draws the same kill delays and load (the instants
the kill lands on still depend on the host's timing).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from claims_support import UNSURE_CASE, claim_request
from examples.claims import data
from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
from kernel._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc
from kernel.audit import RecordFilter, iter_directory, verify_directory
from kernel.testing.processes import ServeProcess

ROOT = Path(__file__).resolve().parent.parent
# Codes a keyed retry waits out (the kernel still starting, a key still in flight, a busy queue).
_TRANSIENT = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED, grpc.StatusCode.RESOURCE_EXHAUSTED,
              grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
_ENDED = (kpb.SUCCEEDED, kpb.FAILED, kpb.CANCELLED)

# Small segments and frequent checkpoints: a kill lands in a rollover or a checkpoint's signing often.
ENV = {"AIOS_AUDIT_SEGMENT_BYTES": "8192", "AIOS_AUDIT_PREALLOCATE_BYTES": "4096",
       "AIOS_AUDIT_CHECKPOINT_RECORDS": "7", "AIOS_AUDIT_CHECKPOINT_MS": "20", "AIOS_TASK_BACKOFF_S": "0.2",
       "AIOS_TASK_MAX_BACKOFF_S": "1"}


@dataclass
class Seen:
    """What the clients were told, across every cycle."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    acked: dict[int, tuple[str, str, bool]] = field(default_factory=dict)  # seq -> (request_id, hash, replayed)
    keyed: dict[str, kpb.DecisionRequest] = field(default_factory=dict)  # idempotency key -> its request
    answers: dict[str, set[tuple[int, str]]] = field(default_factory=dict)  # key -> {(seq, hash)} answered OK
    escalated: dict[str, int] = field(default_factory=dict)  # review id -> its decision's audit sequence
    task_keys: dict[str, kpb.DecisionRequest] = field(default_factory=dict)  # StartTask key -> request
    task_ids: dict[str, set[str]] = field(default_factory=dict)  # StartTask key -> task ids answered
    to_resolve: dict[str, tuple[str, str]] = field(default_factory=dict)  # review id -> (action, comment) sent
    resolved: dict[str, kpb.Review] = field(default_factory=dict)  # review id -> the resolved review answered
    cancelled: dict[str, kpb.Task] = field(default_factory=dict)  # task id -> CancelTask's OK answer
    errors: list[str] = field(default_factory=list)  # answers other than the kill's

    def decision(self, key: str, d: kpb.Decision) -> None:
        with self.lock:
            self.acked.setdefault(d.audit_sequence, (d.request_id, d.audit_hash, d.replayed))
            if key:
                self.answers.setdefault(key, set()).add((d.audit_sequence, d.audit_hash))
            if d.review_id:
                self.escalated[d.review_id] = d.audit_sequence

    def unexpected(self, what: str, exc: grpc.RpcError) -> None:
        if exc.code() not in _TRANSIENT:
            with self.lock:
                self.errors.append(f"{what}: {exc.code().name}: {exc.details()}")


def _request(rng: random.Random, cases: list[dict], request_id: str, key: str = "") -> kpb.DecisionRequest:
    draw = rng.random()
    case = UNSURE_CASE if draw < 0.25 else dict(rng.choice(cases), claim_amount=90000.0) if draw < 0.35 else \
        rng.choice(cases)  # a quarter unsure (R02), a tenth too large (R04): reviews to open and resolve
    return claim_request(case, request_id=request_id, idempotency_key=key)


class Load:
    """The client threads of one cycle, until ``stop``."""

    def __init__(self, address: str, seen: Seen, seed: int, cycle: int, cases: list[dict]):
        self.address, self.seen, self.cycle, self.cases = address, seen, cycle, cases
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._guard, args=(work, random.Random(f"{seed}/{cycle}/{n}")),
                                         name=f"load{cycle}-{n}")  # (its name tags its keys: unique)
                        for n, work in enumerate((self._decide, self._decide, self._stream, self._tasks,
                                                  self._reviewer))]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def join(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)
            assert not thread.is_alive(), f"{thread.name} hangs"

    def _guard(self, work, rng: random.Random) -> None:
        with grpc.insecure_channel(self.address) as channel:
            try:
                work(channel, rng)
            except grpc.RpcError as exc:  # the kill (or an answer the checks list)
                self.seen.unexpected(f"{threading.current_thread().name} ({work.__name__})", exc)

    def _decide(self, channel, rng: random.Random) -> None:
        stub = kgrpc.DecisionServiceStub(channel)
        tag = threading.current_thread().name
        for i in range(100_000):
            if self.stop.is_set():
                return
            key = f"d{tag}-{i}" if rng.random() < 0.6 else ""
            request = _request(rng, self.cases, f"r{tag}-{i}", key)
            if key:
                with self.seen.lock:
                    self.seen.keyed[key] = request
            self.seen.decision(key, stub.Decide(request, timeout=10))

    def _stream(self, channel, rng: random.Random) -> None:
        stub = kgrpc.DecisionServiceStub(channel)
        for batch in range(100_000):
            if self.stop.is_set():
                return
            requests = []
            for i in range(rng.randint(1, 12)):
                tag = f"{threading.current_thread().name}-{batch}-{i}"
                key = f"s{tag}" if rng.random() < 0.5 else ""
                requests.append(_request(rng, self.cases, f"q{tag}", key))
                if key:
                    with self.seen.lock:
                        self.seen.keyed[key] = requests[-1]
            by_id = {r.request_id: r for r in requests}
            for answer in stub.DecideStream(iter(requests), timeout=10):
                if answer.error_code:
                    if answer.error_code not in {c.name for c in _TRANSIENT}:
                        with self.seen.lock:
                            self.seen.errors.append(f"stream {answer.request_id}: {answer.error_code} "
                                                    f"{answer.error_message}")
                    continue
                self.seen.decision(by_id[answer.request_id].idempotency_key, answer)

    def _tasks(self, channel, rng: random.Random) -> None:
        stub = kgrpc.TaskServiceStub(channel)
        started: list[str] = []
        for i in range(100_000):
            if self.stop.is_set():
                return
            key = f"t{threading.current_thread().name}-{i}"
            request = _request(rng, self.cases, f"task-{key}", key)
            with self.seen.lock:
                if rng.random() < 0.1 and self.seen.answers:  # a task for a keyed Decide's case: it adopts that answer
                    key = rng.choice(sorted(self.seen.answers))
                    request = self.seen.keyed[key]
                self.seen.task_keys[key] = request
            task = stub.StartTask(kpb.StartTaskRequest(request=request), timeout=10)
            with self.seen.lock:
                self.seen.task_ids.setdefault(key, set()).add(task.task_id)
            started.append(task.task_id)
            if rng.random() < 0.15:  # a cancel, of a task queued, running, waiting for its review or ended
                victim = rng.choice(started[-20:])
                try:
                    cancelled = stub.CancelTask(kpb.TaskRef(task_id=victim), timeout=10)
                except grpc.RpcError as exc:
                    if exc.code() != grpc.StatusCode.FAILED_PRECONDITION:  # (already ended)
                        raise
                else:
                    with self.seen.lock:
                        self.seen.cancelled[victim] = cancelled

    def _reviewer(self, channel, rng: random.Random) -> None:
        stub = kgrpc.ReviewServiceStub(channel)
        while not self.stop.is_set():
            try:
                review = stub.ClaimNextReview(kpb.ClaimNextReviewRequest(reviewer="kim", lease_seconds=600), timeout=10)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    raise
                self.stop.wait(0.02)
                continue
            resolve(stub, self.seen, review.review_id, review.actions[rng.randrange(len(review.actions))])


def resolve(stub, seen: Seen, review_id: str, action: str, **kwargs) -> kpb.Review | None:
    """ResolveReview by kim; None when its task's cancel withdrew the review first."""
    comment = f"checked {review_id}"
    with seen.lock:
        seen.to_resolve[review_id] = (action, comment)
    try:
        answer = stub.ResolveReview(kpb.ResolveReviewRequest(review_id=review_id, reviewer="kim", action=action,
                                                             comment=comment), timeout=10)
    except grpc.RpcError as exc:
        details = exc.details() or ""
        if exc.code() != grpc.StatusCode.FAILED_PRECONDITION or ("withdrawn" not in details
                                                                  and "was cancelled" not in details):
            raise
        with seen.lock:
            seen.to_resolve.pop(review_id)
        return None
    with seen.lock:
        seen.resolved[review_id] = answer
    return answer


def patiently(call, *args, what: str, limit_s: float = 60.0):
    """``call(*args)``, sent again while the kernel answers a code a retry waits out."""
    end = time.monotonic() + limit_s
    while True:
        try:
            return call(*args, timeout=10)
        except grpc.RpcError as exc:
            if exc.code() not in _TRANSIENT or time.monotonic() > end:
                raise AssertionError(f"{what}: {exc.code().name}: {exc.details()}") from exc
            time.sleep(0.05)


class KillCycles:
    def __init__(self, models: Path, pipelines: Path, data_dir: Path, seed: int, audit_mode: str = "fsync"):
        self.models, self.data_dir, self.seed = models, data_dir, seed
        self.serve = ("--pipelines", str(pipelines), "--log-level", "WARNING", "--audit-mode", audit_mode)
        self.rng = random.Random(seed)
        self.seen = Seen()
        self.cases = data.generate_cases(200, seed=seed)
        self.env = dict(os.environ, **ENV)
        self.log: list[str] = []  # what each cycle did, for a failure's message
        self.kill_in_drain = False  # also kill some kernels in their SIGTERM drain
        self.drain_kills = 0
        self.start_s = 1.5  # how long the last start took to be ready
        self.slow_steps = False  # run the kernel whose durable steps pause (kills land between steps more often)

    def fail(self, message: str) -> None:
        raise AssertionError(f"seed {self.seed}: {message}\n" + "\n".join(self.log[-30:]))

    @property
    def cli(self) -> list[str]:
        """``aios-kernel``, or the kernel whose durable steps pause (tests/_slow_steps_kernel.py)."""
        return [sys.executable, str(ROOT / "tests" / "_slow_steps_kernel.py")] if self.slow_steps else \
            [sys.executable, "-m", "kernel"]

    def start(self) -> ServeProcess:
        began = time.monotonic()
        server = ServeProcess(self.models, *self.serve, data_dir=self.data_dir, env=self.env, cli=self.cli)
        self.start_s = time.monotonic() - began
        return server

    def killed_while_starting(self, delay_s: float) -> None:
        """A start killed ``delay_s`` in, ready or not (recovery, reopening, the start's records and checkpoint)."""
        proc = subprocess.Popen([*self.cli, "serve", "--models", str(self.models), "--port", "0",
                                 "--data-dir", str(self.data_dir), *self.serve], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, cwd=ROOT, env=self.env)
        try:
            time.sleep(delay_s)
        finally:
            proc.kill()
            proc.wait(timeout=30)
        self.log.append(f"a start killed after {delay_s:.3f} s")

    def cycle(self, n: int, delay_s: float) -> None:
        if self.rng.random() < 0.25:  # (in the last third of a start as long as the last one: recovery, reopening)
            self.killed_while_starting(self.start_s * self.rng.uniform(0.6, 1.1))
        server = self.start()
        drain = self.kill_in_drain and self.rng.random() < 0.3
        try:
            with grpc.insecure_channel(server.address) as channel:
                self.retry_keyed(channel)
                self.check_reviews(channel)
            load = Load(server.address, self.seen, self.seed, n, self.cases)
            load.start()
            time.sleep(delay_s)
            if drain:  # (SIGTERM, then a SIGKILL while it drains: a supervisor that did not wait for the stop)
                self.drain_kills += 1
                server.proc.send_signal(signal.SIGTERM)
                time.sleep(self.rng.uniform(0.0, 0.8))
            if server.proc.poll() is not None:
                self.fail(f"the kernel exited by itself ({server.proc.returncode}): "
                          f"{server.proc.stderr.read()[-2000:]}")
        finally:
            server.kill()
        load.join()
        self.log.append(f"cycle {n}: killed after {delay_s:.3f} s{' (draining)' if drain else ''}; "
                        f"{len(self.seen.acked)} decisions answered")
        self.check_acked()

    def retry_keyed(self, channel) -> None:
        """Every keyed call without an OK answer, sent again: it must be answered now."""
        decisions, tasks = kgrpc.DecisionServiceStub(channel), kgrpc.TaskServiceStub(channel)
        reviews = kgrpc.ReviewServiceStub(channel)
        with self.seen.lock:
            keys = [k for k in self.seen.keyed if k not in self.seen.answers]
            task_keys = [k for k in self.seen.task_keys if k not in self.seen.task_ids]
            resolutions = [(r, a) for r, a in self.seen.to_resolve.items() if r not in self.seen.resolved]
        for key in keys:
            request = kpb.DecisionRequest()
            request.CopyFrom(self.seen.keyed[key])
            request.request_id += "-again"
            self.seen.decision(key, patiently(decisions.Decide, request, what=f"keyed Decide {key} again"))
        for key in task_keys:
            task = patiently(tasks.StartTask, kpb.StartTaskRequest(request=self.seen.task_keys[key]),
                             what=f"StartTask {key} again")
            self.seen.task_ids.setdefault(key, set()).add(task.task_id)
        for review_id, (action, _) in resolutions:
            review = patiently(reviews.GetReview, kpb.ReviewRef(review_id=review_id), what=f"GetReview {review_id}")
            if review.state == "RESOLVED" and not review.resolved_action:  # withdrawn (its task cancelled)
                with self.seen.lock:
                    self.seen.to_resolve.pop(review_id)
                continue
            if review.state != "RESOLVED":  # (the kill came before the resolution's commit: claim it again)
                claim = kpb.ClaimReviewRequest(review_id=review_id, reviewer="kim", lease_seconds=600)
                patiently(reviews.ClaimReview, claim, what=f"claim {review_id} again")
            patiently(lambda rid, timeout: resolve(reviews, self.seen, rid, action), review_id,
                      what=f"resolve {review_id} again")
        self.log.append(f"  retried {len(keys)} keyed decisions, {len(task_keys)} tasks, {len(resolutions)} "
                        f"resolutions")

    def records(self) -> dict[int, kpb.AuditRecord]:
        return {r.sequence: r for r in iter_directory(self.data_dir / "audit", 0, RecordFilter())}

    def check_acked(self) -> None:
        """(The kernel dead.) Every decision answered OK is on the log, as answered."""
        records = self.records()
        with self.seen.lock:
            acked = dict(self.seen.acked)
        for sequence, (request_id, digest, replayed) in acked.items():
            record = records.get(sequence)
            if record is None:
                self.fail(f"decision {request_id} answered OK as #{sequence} is not on the log")
            if record.hash.hex() != digest or (not replayed and record.request_id != request_id):
                self.fail(f"#{sequence} answered to {request_id} is {record.request_id}'s record on the log")

    def check_reviews(self, channel, tasks: bool = False) -> None:
        """(Just restarted.) Every escalated decision on the log has its review, the answered ones among them;
        ``tasks``: those of tasks too (a task opens its review when it runs again after a restart)."""
        stub = kgrpc.ReviewServiceStub(channel)
        reviews, token = {}, ""
        while True:
            page = patiently(stub.ListReviews, kpb.ListReviewsRequest(page_size=1000, page_token=token),
                             what="ListReviews")
            reviews.update((r.review_id, r) for r in page.reviews)
            token = page.next_page_token
            if not token:
                break
        # (Read after the reviews: every review listed has its record on it. The start's own records are there; only
        # tasks, running again, decide meanwhile, and their reviews are checked once they ended.)
        records = self.records()
        resolving: dict[int, list[int]] = {}
        for record in records.values():
            if record.kind == kpb.REVIEW_RESOLUTION:
                resolving.setdefault(record.links_to, []).append(record.sequence)
        with self.seen.lock:
            escalated = dict(self.seen.escalated)
        for review in reviews.values():
            record = records.get(review.proposed.audit_sequence)
            if record is None or record.hash.hex() != review.proposed.audit_hash:
                self.fail(f"review {review.review_id} proposes #{review.proposed.audit_sequence}, not on the log")
            if tasks and review.state == "RESOLVED":
                linked = resolving.get(review.proposed.audit_sequence, [])
                if len(linked) != 1:
                    self.fail(f"review {review.review_id} ({review.resolved_action or 'withdrawn'}) has "
                              f"{len(linked)} resolution records: {linked}")
            if tasks and review.state == "RESOLVED" and review.resolved_action:
                resolution = records.get(review.resolution.audit_sequence)
                if (resolution is None or resolution.kind != kpb.REVIEW_RESOLUTION
                        or resolution.hash.hex() != review.resolution.audit_hash
                        or resolution.links_to != review.proposed.audit_sequence):
                    self.fail(f"review {review.review_id} resolved as #{review.resolution.audit_sequence}, which is "
                              f"not its resolution's record on the log")
        self.reviews = reviews
        for review_id, sequence in escalated.items():
            if review_id not in reviews and (tasks or not records[sequence].task_id):
                self.fail(f"review {review_id} of decision #{sequence}, answered OK, is gone after a restart")
        for record in records.values():
            if record.kind == kpb.DECISION and record.decision.review_id and (tasks or not record.task_id):
                review = reviews.get(record.decision.review_id)
                if review is None:
                    self.fail(f"escalated decision #{record.sequence} on the log ({record.request_id}, key "
                              f"{record.idempotency_key!r}, task {record.task_id!r}, review "
                              f"{record.decision.review_id}) has no review after a restart")
                if review.proposed.audit_sequence != record.sequence:
                    self.fail(f"review {review.review_id} proposes #{review.proposed.audit_sequence}, its record is "
                              f"#{record.sequence}")

    def finish(self) -> None:
        """Start once more, take every task to its end, stop cleanly, and check the whole log."""
        server = self.start()
        try:
            with grpc.insecure_channel(server.address) as channel:
                self.retry_keyed(channel)
                self.check_reviews(channel)
                self.finish_tasks(channel)
                self.check_reviews(channel, tasks=True)
        finally:
            code, err = server.stop()
        if code != 0:
            self.fail(f"the last stop exited {code}: {err[-2000:]}")
        self.check_acked()
        self.check_once()
        result = verify_directory(self.data_dir / "audit", strict=True)
        strict = ["--strict"]
        if not result.ok and self.drain_kills and "crashed while stopping" in result.reason:
            # A kill in a drain that landed between the "kernel stopping" record and the final checkpoint: --strict
            # fails on it by design (an operator checks those records; `audit archive --accept-adopted`).
            self.log.append(f"a kill landed between a clean stop's record and its checkpoint: {result.describe()}")
            result = verify_directory(self.data_dir / "audit", strict=True, accept_adopted=True)
            strict = []
        if not result.ok:
            self.fail(f"verify --strict: {result.describe()}")
        cli = subprocess.run([sys.executable, "-m", "kernel", "audit", "verify", str(self.data_dir / "audit"),
                              *strict], capture_output=True, text=True, cwd=ROOT, timeout=120)
        if cli.returncode != 0:
            self.fail(f"aios-kernel audit verify --strict exited {cli.returncode}: {cli.stdout} {cli.stderr}")
        if self.seen.errors:
            self.fail("answers other than a kill's: " + "; ".join(self.seen.errors[:10]))

    def finish_tasks(self, channel) -> None:
        tasks, reviews = kgrpc.TaskServiceStub(channel), kgrpc.ReviewServiceStub(channel)
        end = time.monotonic() + 60
        ids = {task_id for found in self.seen.task_ids.values() for task_id in found}
        self.tasks: dict[str, kpb.Task] = {}
        while ids - self.tasks.keys():
            if time.monotonic() > end:
                stuck = {i: kpb.TaskState.Name(patiently(tasks.GetTask, kpb.TaskRef(task_id=i), what="GetTask").state)
                         for i in ids - self.tasks.keys()}
                self.fail(f"tasks never ended: {stuck}")
            for task_id in sorted(ids - self.tasks.keys()):
                task = patiently(tasks.GetTask, kpb.TaskRef(task_id=task_id), what=f"GetTask {task_id}")
                if task.state in _ENDED:
                    self.tasks[task_id] = task
                elif task.state == kpb.WAITING_FOR_REVIEW:
                    review = patiently(reviews.GetReview, kpb.ReviewRef(review_id=task.review_id), what="GetReview")
                    if review.state != "RESOLVED":
                        patiently(reviews.ClaimReview, kpb.ClaimReviewRequest(
                            review_id=review.review_id, reviewer="kim", lease_seconds=600), what="claim")
                        patiently(lambda rid, timeout: resolve(reviews, self.seen, rid, review.actions[0]),
                                  review.review_id, what="resolve")
            time.sleep(0.05)
        ended: dict[str, int] = {}
        for task in self.tasks.values():
            ended[kpb.TaskState.Name(task.state)] = ended.get(kpb.TaskState.Name(task.state), 0) + 1
        self.log.append(f"tasks ended: {ended}")
        for key, found in self.seen.task_ids.items():
            if len(found) != 1:
                self.fail(f"StartTask key {key} started {len(found)} tasks: {sorted(found)}")

    def check_once(self) -> None:
        """(The kernel stopped.) One decision record per key and per task, each resolution once and linked."""
        records = self.records()
        by_key: dict[tuple[str, str], list[int]] = {}
        by_task: dict[str, list[int]] = {}
        resolutions: dict[int, list[int]] = {}
        for record in records.values():
            if record.kind == kpb.DECISION:
                if record.idempotency_key:  # (a keyed Decide's, or a keyed task's: a task adopting a Decide's
                    # answer under its key decides nothing)
                    by_key.setdefault((record.tenant, record.idempotency_key), []).append(record.sequence)
                if record.task_id:
                    by_task.setdefault(record.task_id, []).append(record.sequence)
            elif record.kind == kpb.REVIEW_RESOLUTION:
                if not record.has_link or records.get(record.links_to) is None:
                    self.fail(f"resolution #{record.sequence} links to no decision ({record.links_to})")
                resolutions.setdefault(record.links_to, []).append(record.sequence)
        for key, sequences in by_key.items():
            if len(sequences) > 1:
                self.fail(f"key {key} decided {len(sequences)} times: {sequences}")
        for task_id, sequences in by_task.items():
            if len(sequences) > 1:
                self.fail(f"task {task_id} decided {len(sequences)} times: {sequences}")
        for linked, sequences in resolutions.items():
            if len(sequences) > 1:
                self.fail(f"decision #{linked} resolved {len(sequences)} times: {sequences}")
        with self.seen.lock:
            answers = dict(self.seen.answers)
            resolved = dict(self.seen.resolved)
            keys = set(self.seen.keyed)
        for key in keys:
            got = answers.get(key, set())
            if len(got) != 1:
                self.fail(f"key {key} answered {len(got)} different decisions: {sorted(got)}")
            sequence = next(iter(got))[0]
            if by_key.get(("acme", key)) != [sequence]:
                self.fail(f"key {key} answered #{sequence}; its records: {by_key.get(('acme', key))}")
        for review_id, review in resolved.items():
            linked = review.proposed.audit_sequence
            if resolutions.get(linked) != [review.resolution.audit_sequence]:
                self.fail(f"review {review_id} resolved as #{review.resolution.audit_sequence}; the records "
                          f"resolving #{linked}: {resolutions.get(linked)}")
            if review.resolution.links_to_audit_sequence != linked:
                self.fail(f"review {review_id}'s resolution links to #{review.resolution.links_to_audit_sequence}, "
                          f"not #{linked}")
        for task_id in self.seen.cancelled:
            if self.tasks[task_id].state != kpb.CANCELLED:
                self.fail(f"task {task_id}, cancelled OK, ended {kpb.TaskState.Name(self.tasks[task_id].state)}")
        for task in self.tasks.values():
            if task.state == kpb.SUCCEEDED:
                record = records.get(task.decision.audit_sequence)
                if record is None or record.hash.hex() != task.decision.audit_hash:
                    self.fail(f"task {task.task_id}'s decision #{task.decision.audit_sequence} is not on the log")


def run(models: Path, pipelines: Path, data_dir: Path, seed: int, cycles: int, audit_mode: str = "fsync",
        max_delay_s: float = 1.5, kill_in_drain: bool = False, slow_steps: bool = False) -> KillCycles:
    harness = KillCycles(models, pipelines, data_dir, seed, audit_mode)
    harness.kill_in_drain, harness.slow_steps = kill_in_drain, slow_steps
    for n in range(cycles):
        harness.cycle(n, harness.rng.uniform(0.05, max_delay_s))
    harness.finish()
    return harness
