"""StreamAudit over real gRPC servers (threaded sync and grpc.aio): follow, filters, resume, access.

The resume test disconnects at random points while records keep arriving and
resumes from the last sequence seen + 1; the union of what arrived must be
every record exactly once, in order.
"""

from __future__ import annotations

import asyncio
import functools
import random
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from kernel._proto.aios.kernel.v1 import kernel_pb2 as pb
from kernel._proto.aios.kernel.v1 import kernel_pb2_grpc
from kernel.api import kernel_services, windowed_sends
from kernel.api.audit_service import audit_handlers
from kernel.audit import AuditLog
from kernel.testing.settle import settled


def record(i: int) -> pb.AuditRecord:
    return pb.AuditRecord(kind=pb.DECISION if i % 4 else pb.ROUTE_CHANGE, tenant=f"t{i % 3}", pipeline=f"p{i % 2}",
                          request_id=f"r{i}")


def written(log, last: int) -> None:
    """Records 0..``last`` appended, returning once the last is durable (and so every one before it)."""
    for i in range(last):
        log.append(record(i))
    log.append_and_wait(record(last), 10)


class SyncServer:
    windowed = False  # StreamAudit's messages sent by windowed_sends.py, as the kernel's threaded front end does

    def __init__(self, handlers: dict, workers: int = 8):
        pool = ThreadPoolExecutor(max_workers=workers)
        self.server = grpc.server(pool)
        services = kernel_services.generic_handlers(None, None, asynchronous=False, implemented=handlers)
        if self.windowed:
            assert windowed_sends.attach(services, pool, (("aios.kernel.v1.AuditService", "StreamAudit"),
                                                          ("aios.kernel.v1.AuditService", "StreamAuditBatches"))) == 2
        self.server.add_generic_rpc_handlers(services)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def stop(self) -> None:
        self.server.stop(grace=1).wait(10)


class WindowedServer(SyncServer):
    windowed = True


class AioServer:
    """A grpc.aio server on its own event loop thread."""

    def __init__(self, handlers: dict):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def start():
            server = grpc.aio.server()
            server.add_generic_rpc_handlers(
                kernel_services.generic_handlers(None, None, asynchronous=True, implemented=handlers))
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            return server, port

        self.server, self.port = asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(1), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


FRONT_ENDS = {"sync": SyncServer, "sync-windowed": WindowedServer, "aio": AioServer}


@pytest.fixture(params=sorted(FRONT_ENDS))
def served(request, tmp_path):
    log = AuditLog.open(tmp_path / "audit", segment_bytes=16 * 1024)
    server = FRONT_ENDS[request.param](audit_handlers(log))
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    yield log, kernel_pb2_grpc.AuditServiceStub(channel)
    channel.close()
    server.stop()
    log.close()


def test_stream_from_a_sequence_without_follow_ends_at_the_tail(served):
    log, stub = served
    written(log, 300)
    got = [r.sequence for r in stub.StreamAudit(pb.StreamAuditRequest(from_sequence=120), timeout=10)]
    assert got == list(range(120, 301))
    streamed = list(stub.StreamAudit(pb.StreamAuditRequest(from_sequence=7), timeout=10))[0]
    assert streamed == next(iter(log.read(7)))  # every field, hash included


def test_stream_filters(served):
    log, stub = served
    written(log, 200)
    request = pb.StreamAuditRequest(tenant="t1", pipeline="p0", kind=pb.DECISION)
    got = [r.sequence for r in stub.StreamAudit(request, timeout=10)]
    assert got == [i for i in range(201) if i % 3 == 1 and i % 2 == 0 and i % 4]
    times = [r.time_unix_ns for r in log.read()]
    request = pb.StreamAuditRequest(since_unix_ns=times[50], until_unix_ns=times[150], kind=pb.ROUTE_CHANGE)
    got = list(stub.StreamAudit(request, timeout=10))
    assert got and all(times[50] <= r.time_unix_ns < times[150] and r.kind == pb.ROUTE_CHANGE for r in got)


def test_a_follow_with_an_until_ends_once_that_time_has_passed(served):
    """(Streams audit) a follower whose ``until_unix_ns`` had passed never ended: no record written later can
    match, yet it held a watch slot until the client's own deadline."""
    import time

    log, stub = served
    written(log, 20)
    until = [r.time_unix_ns for r in log.read()][10]
    started = time.monotonic()
    request = pb.StreamAuditRequest(follow=True, until_unix_ns=until)
    got = [r.sequence for r in stub.StreamAudit(request, timeout=30)]  # ends by itself, OK
    assert got == list(range(10)) and time.monotonic() - started < 10


def test_resume_after_random_disconnects_has_no_gap_and_no_duplicate(served):
    log, stub = served
    total = 1200
    rng = random.Random(1234)
    progress = threading.Condition()
    state = {"received": 0, "produced": 0}

    def produce() -> None:
        """Keep a small lead over the reader, so it often waits at the live tail."""
        while state["produced"] < total:
            with progress:
                progress.wait_for(lambda: state["received"] >= state["produced"] - 5, timeout=10)
            batch = [log.append(record(state["produced"] + j)) for j in range(10)]
            batch[-1].wait(10)
            state["produced"] += 10

    producer = threading.Thread(target=produce)
    producer.start()
    received: list[int] = []
    reconnects = 0
    try:
        while len(received) < total:
            next_sequence = received[-1] + 1 if received else 0
            call = stub.StreamAudit(pb.StreamAuditRequest(from_sequence=next_sequence, follow=True), timeout=30)
            take = rng.randint(1, 60)
            for got in call:
                received.append(got.sequence)
                with progress:
                    state["received"] = len(received)
                    progress.notify_all()
                take -= 1
                if take == 0 or len(received) == total:
                    break
            call.cancel()  # disconnect mid-stream
            reconnects += 1
    finally:
        producer.join(30)
    assert received == list(range(total))
    assert reconnects > 20


def test_resume_with_a_filter(served):
    log, stub = served
    written(log, 400)
    expected = [i for i in range(401) if i % 3 == 2]
    rng = random.Random(99)
    received: list[int] = []
    while len(received) < len(expected):
        start = received[-1] + 1 if received else 0
        call = stub.StreamAudit(pb.StreamAuditRequest(from_sequence=start, tenant="t2", follow=True), timeout=30)
        take = min(rng.randint(1, 25), len(expected) - len(received))  # never wait for a record that won't come
        for _, got in zip(range(take), call):  # the count first: never ask for one more
            received.append(got.sequence)
        call.cancel()
    assert received == expected


def follow_and_leave(stub, times: int) -> None:
    """``times`` follow streams in a row, each cancelled once it read record 0: its handler is then waiting at the
    tail (or with its window full) and must end when the client leaves."""
    for _ in range(times):
        call = stub.StreamAudit(pb.StreamAuditRequest(follow=True), timeout=10)
        assert next(call).sequence == 0
        call.cancel()


@pytest.mark.parametrize("server_class", [SyncServer, WindowedServer])
def test_cancelled_follow_streams_free_their_handler_threads(tmp_path, server_class):
    """Two handler threads serve ten follow streams in a row: each must end when its client leaves."""
    log = AuditLog.open(tmp_path)
    server = server_class(audit_handlers(log), workers=2)
    try:
        log.append_and_wait(record(0), 10)
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            follow_and_leave(kernel_pb2_grpc.AuditServiceStub(channel), 10)
    finally:
        server.stop()
        log.close()


@pytest.mark.parametrize("front_end", ["sync", "aio"])
def test_stream_refused_when_disabled(tmp_path, front_end):
    log = AuditLog.open(tmp_path)
    server = FRONT_ENDS[front_end](audit_handlers(log, allow_stream=False))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = kernel_pb2_grpc.AuditServiceStub(channel)
            with pytest.raises(grpc.RpcError) as info:
                list(stub.StreamAudit(pb.StreamAuditRequest(), timeout=10))
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "audit_stream_enabled" in info.value.details()
            assert stub.GetPublicKey(pb.PublicKeyRequest(), timeout=10).key == log.public_key  # the rest still works
    finally:
        server.stop()
        log.close()


@pytest.mark.parametrize(
    "request_,fragment",
    [
        (pb.StreamAuditRequest(kind=42), "kind: 42 is not an AuditKind"),
        (pb.StreamAuditRequest(since_unix_ns=20, until_unix_ns=10), "until_unix_ns (10) must be after since_unix_ns"),
        (pb.StreamAuditRequest(since_unix_ns=-1), "since_unix_ns and until_unix_ns must be >= 0"),
        # A tenant no record can have (one read from a file with its newline) matched nothing: an empty stream,
        # and with follow one that waited for ever.
        (pb.StreamAuditRequest(tenant="t1\n", follow=True), "tenant must not contain control characters"),
        (pb.StreamAuditRequest(tenant="t" * 129), "tenant must be at most 128 characters"),
        (pb.StreamAuditRequest(pipeline="claims\n", follow=True), "pipeline 'claims\\n' cannot name a pipeline"),
    ],
)
def test_bad_stream_requests_name_the_field(served, request_, fragment):
    _, stub = served
    with pytest.raises(grpc.RpcError) as info:
        list(stub.StreamAudit(request_, timeout=10))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in info.value.details()


def test_a_reader_that_stops_reading_with_the_window_full_frees_the_thread_when_it_leaves(tmp_path):
    """Windowed sends: a client that reads one record of thousands and leaves (its flow-control window full, the
    server's queue full, the producer waiting for room) must free the handler thread: two threads, ten calls."""
    log = AuditLog.open(tmp_path)
    server = WindowedServer(audit_handlers(log), workers=2)
    try:
        big = pb.AuditRecord(kind=pb.DECISION, payload=b"x" * 4000)
        for _ in range(3 * windowed_sends.WINDOW):
            log.append(big)
        log.append_and_wait(record(0), 10)
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = kernel_pb2_grpc.AuditServiceStub(channel)
            follow_and_leave(stub, 10)
            got = [r.sequence for r in stub.StreamAudit(pb.StreamAuditRequest(from_sequence=1), timeout=10)]
            assert got == list(range(1, 3 * windowed_sends.WINDOW + 1))  # every record, in order, after the window
    finally:
        server.stop()
        log.close()


# --------------------------------------------------------------------------- StreamAuditBatches
def test_batches_carry_exactly_the_stream_s_records(served):
    log, stub = served
    written(log, 700)
    for query in (pb.StreamAuditRequest(from_sequence=5), pb.StreamAuditRequest(tenant="t1", kind=pb.DECISION)):
        one_by_one = list(stub.StreamAudit(query, timeout=10))
        batches = list(stub.StreamAuditBatches(pb.StreamAuditBatchesRequest(query=query, max_records=100), timeout=10))
        assert all(0 < len(batch.records) <= 100 for batch in batches)
        assert [r for batch in batches for r in batch.records] == one_by_one  # every field, hash included
    default = list(stub.StreamAuditBatches(pb.StreamAuditBatchesRequest(), timeout=10))
    assert [len(batch.records) for batch in default] == [256, 256, 189]


def test_a_following_batch_stream_sends_what_there_is_without_waiting_to_fill_a_batch(served):
    log, stub = served
    log.append_and_wait(record(0), 10)
    call = stub.StreamAuditBatches(pb.StreamAuditBatchesRequest(query=pb.StreamAuditRequest(follow=True)), timeout=10)
    try:
        assert [r.sequence for r in next(call).records] == [0]
        for i in (1, 2, 3):
            log.append(record(i))
        log.append_and_wait(record(4), 10)
        got = []
        while len(got) < 4:  # (one batch or several, as the writes land: never held back for 256)
            got += [r.sequence for r in next(call).records]
        assert got == [1, 2, 3, 4]
    finally:
        call.cancel()


def test_a_batch_larger_than_allowed_is_refused_naming_the_field(served):
    _, stub = served
    with pytest.raises(grpc.RpcError) as info:
        list(stub.StreamAuditBatches(pb.StreamAuditBatchesRequest(max_records=5000), timeout=10))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_records: 5000" in info.value.details()


def test_a_batch_ends_at_its_byte_budget_so_no_client_is_sent_more_than_it_takes(served):
    """Large records (a policy change's is ~170 kB): 4,096 a message would pass gRPC's 4 MiB client limit, and the
    follower, refused, would get the same batch on every resume (a review audit)."""
    from kernel.audit.reader import BATCH_BYTES

    log, stub = served
    big = pb.AuditRecord(kind=pb.POLICY_CHANGE, payload=b"p" * 200_000)
    for _ in range(30):
        log.append(big)
    log.append_and_wait(record(0), 10)
    batches = list(stub.StreamAuditBatches(pb.StreamAuditBatchesRequest(max_records=4096), timeout=10))
    assert [r.sequence for batch in batches for r in batch.records] == list(range(31))
    assert all(batch.records and batch.ByteSize() < BATCH_BYTES + 220_000 for batch in batches)
    assert len(batches) > 1


@pytest.mark.parametrize("server_class", [WindowedServer, AioServer], ids=["sync-windowed", "aio"])
def test_a_batch_follower_that_stops_reading_holds_a_few_batches_not_the_log(tmp_path, server_class):
    """Regression (a raw campaign against a kernel): 100 StreamAuditBatches followers that read nothing added
    1.2 GB (threaded) and 1.0 GB (asyncio) to a kernel with a 40 MB log: each call's handler ran ahead by its
    window's message count (256 threaded, 64 asyncio), and a batch is up to 1 MiB. Measured here by counting
    what the real handler hands on (a wrapper that keeps its attributes); then every record still comes."""
    from kernel.audit.reader import BATCH_BYTES

    log = AuditLog.open(tmp_path / "audit")
    big = pb.AuditRecord(kind=pb.DECISION, payload=b"x" * 8000)
    for _ in range(4999):
        log.append(big)
    log.append_and_wait(big, 30)  # 40 MB: 40 batches
    handlers = audit_handlers(log)
    handed = [0]
    batches = handlers[("AuditService", "StreamAuditBatches")]

    @functools.wraps(batches)
    def counted(request, ctx):
        for message in batches(request, ctx):
            handed[0] += 1
            yield message

    handlers[("AuditService", "StreamAuditBatches")] = counted
    server = server_class(handlers)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}",
                                   options=[("grpc.max_receive_message_length", 8 << 20)]) as channel:
            stub = kernel_pb2_grpc.AuditServiceStub(channel)
            call = stub.StreamAuditBatches(pb.StreamAuditBatchesRequest(max_records=4096), timeout=60)
            held = settled(lambda: handed[0])
            # a few MiB queued by the kernel, and what gRPC's flow control took before the client stopped it
            assert held * BATCH_BYTES <= (12 << 20), f"{held} of 40 batches handed on to a client that reads none"
            assert sum(len(batch.records) for batch in call) == 5000
    finally:
        server.stop()
        log.close()
