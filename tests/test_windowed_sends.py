"""windowed_sends.py: every message a handler yielded goes out, in order, before the call's status.

A handler yields messages a client is not reading yet (gRPC's flow control holds them in the sender's queue) and
then ends: normally, with an error, or aborting as a drain ends a StreamAudit follow with UNAVAILABLE. grpc's
standard path sends every message yielded before the status (it cannot even get to the end before the client
reads: its handler waits on each send); the windowed path must too (a review audit: it sent 1 of 200 and then
the status, dropping what was queued).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from concurrent import futures

import grpc
import pytest

from kernel.api import rpc, windowed_sends
from kernel.testing.settle import settled

MESSAGES, SIZE = 200, 8 * 1024  # 1.6 MB: beyond what flow control lets out before the client reads, within the window


def serve(handler):
    pool = futures.ThreadPoolExecutor(4)
    handler.experimental_thread_pool = windowed_sends.WindowedSends(pool)
    generic = grpc.method_handlers_generic_handler("t.S", {"M": grpc.unary_stream_rpc_method_handler(handler)})
    server = grpc.server(pool, handlers=[generic])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, pool, port


@pytest.mark.parametrize("ending", ["abort", "raise", "end"])
def test_every_message_yielded_goes_out_before_the_status(ending):
    ended = threading.Event()

    def handler(request, context):
        for i in range(MESSAGES):
            yield i.to_bytes(4, "big") + b"x" * SIZE
        ended.set()  # every message is yielded; the client has read none of them yet
        if ending == "abort":
            context.abort(grpc.StatusCode.UNAVAILABLE, "the kernel is shutting down")
        if ending == "raise":
            raise RuntimeError("the handler failed")

    server, pool, port = serve(handler)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_stream("/t.S/M")(b"", timeout=30)
            assert ended.wait(30), "the handler never got to its end"
            got, code = [], grpc.StatusCode.OK
            try:
                for message in call:
                    got.append(int.from_bytes(message[:4], "big"))
            except grpc.RpcError as exc:
                code = exc.code()
    finally:
        server.stop(0)
        pool.shutdown()
    assert got == list(range(MESSAGES))
    assert code == {"abort": grpc.StatusCode.UNAVAILABLE, "raise": grpc.StatusCode.UNKNOWN,
                    "end": grpc.StatusCode.OK}[ending]


@contextlib.contextmanager
def served_threaded(handler):
    server, pool, port = serve(handler)
    try:
        yield port
    finally:
        server.stop(0)
        pool.shutdown()


@contextlib.contextmanager
def served_aio(handler):
    """``handler`` as the kernel serves a server stream on grpc.aio (rpc.aio_handler), on its own loop thread."""
    call_handler = rpc.aio_handler("M", lambda request, ctx: handler(request, None), client_streaming=False,
                                   server_streaming=True)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start():
        server = grpc.aio.server(handlers=[grpc.method_handlers_generic_handler(
            "t.S", {"M": grpc.unary_stream_rpc_method_handler(call_handler)})])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    try:
        yield port
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(1), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


@pytest.mark.parametrize("front_end", ["threaded", "aio"])
def test_a_client_that_stops_reading_holds_a_bounded_number_of_bytes(front_end):
    """Regression: the window counted messages only (256), so a StreamAuditBatches follower that stopped reading
    had its handler queue 256 messages of up to 4,096 records each (~1 GB per call; a raw campaign measured
    +1.2 GB of server memory for 100 such callers on a 35,000-record log). Repro: 200 messages of 256 KB (50 MB),
    a client that reads none: the handler yielded all 200. Now it waits once ``WINDOW_BYTES`` are queued.
    On grpc.aio (rpc.aio_handler) the same: its window counted 64 messages, so a StreamAudit follower of a log of
    large records (up to max_message_bytes, 64 MiB each) held 4 GiB; now ``AIO_STREAM_WINDOW_BYTES``."""
    size, count = 256 * 1024, 200
    yielded = [0]
    serving, window = {"threaded": (served_threaded, windowed_sends.WINDOW_BYTES),
                       "aio": (served_aio, rpc.AIO_STREAM_WINDOW_BYTES)}[front_end]

    def handler(request, context):
        for i in range(count):
            yielded[0] = i + 1
            yield i.to_bytes(4, "big") + b"x" * size

    with serving(handler) as port:
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_receive_message_length", 1 << 20)]) as channel:
            call = channel.unary_stream("/t.S/M")(b"", timeout=60)
            stalled = settled(lambda: yielded[0])
            assert stalled < count, "the handler yielded every message to a client that reads none"
            # gRPC's own buffers and the sockets' (HTTP/2 flow control, loopback TCP buffers the OS grows: 10.25 MB
            # seen once in a fresh-clone make test, 8 MB being the allowance then) take some before the sender's
            # queue holds any; without the window all 50 MB are yielded.
            assert stalled * size <= window + (16 << 20), f"{stalled} of {count} messages yielded"
            got = [int.from_bytes(message[:4], "big") for message in call]  # reading at last: every message comes
    assert got == list(range(count))
