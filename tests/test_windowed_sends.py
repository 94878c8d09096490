"""windowed_sends.py: every message a handler yielded goes out, in order, before the call's status.

A handler yields messages a client is not reading yet (gRPC's flow control holds them in the sender's queue) and
then ends: normally, with an error, or aborting as a drain ends a StreamAudit follow with UNAVAILABLE. grpc's
standard path sends every message yielded before the status (it cannot even get to the end before the client
reads: its handler waits on each send); the windowed path must too (a review audit: it sent 1 of 200 and then
the status, dropping what was queued).
"""

from __future__ import annotations

import threading
from concurrent import futures

import grpc
import pytest

from kernel.api import windowed_sends

MESSAGES, SIZE = 200, 32 * 1024  # 6.4 MB: far beyond what flow control lets out before the client reads


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
