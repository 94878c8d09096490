"""Threaded front end: calls opened and never sent their request do not take every call slot.

gRPC's threaded server counts a call against ``maximum_concurrent_rpcs`` (= workers) from its arrival, and nothing
ended one whose request never came while its connection stayed up: ``workers`` such calls (HEADERS only, pings
answered) made gRPC refuse every other caller ("Concurrent RPC limit exceeded!"). Now (kernel/api/eager_receive.py)
past a quarter of workers the calls that have waited a second for their request are ended, and past workers less the
priority-1 reserve one is ended whatever its age.
"""

from __future__ import annotations

import struct
import time

import grpc

from conftest import start_kernel
from kernel._proto.inference import grpc_service_pb2 as pb
from kernel._proto.inference import grpc_service_pb2_grpc as pb_grpc
from test_connection_limits import (END_HEADERS, GOAWAY, HEADERS, PING, DATA, ACK, RawConnection, call_headers,
                                    frame, literal)

WORKERS = 4
END_STREAM = 0x1
LIVE = call_headers(b"ServerLive")


def hold(connection: RawConnection, streams: range) -> None:
    """Open a ServerLive call on each stream: headers only, the request message never sent."""
    connection.sock.sendall(b"".join(frame(HEADERS, END_HEADERS, stream, LIVE) for stream in streams))


def ended_streams(connection: RawConnection, want: int, limit_s: float) -> set[int]:
    """The streams the kernel ended (a HEADERS frame with END_STREAM: trailers), read until ``want`` of them or
    ``limit_s``; pings answered meanwhile, as a client that holds its calls does."""
    ended: set[int] = set()
    connection.sock.settimeout(0.2)
    deadline = time.monotonic() + limit_s
    while len(ended) < want and time.monotonic() < deadline:
        try:
            kind, flags, stream, payload = connection.read_frame()
        except TimeoutError:
            continue
        assert kind != GOAWAY, payload
        if kind == PING and not flags & ACK:
            connection.sock.sendall(frame(PING, ACK, 0, payload))
        elif kind == HEADERS and flags & END_STREAM:
            ended.add(stream)
    return ended


def live(port: int, limit_s: float) -> tuple[bool, list[str]]:
    """Whether a well-behaved client's ServerLive succeeds within ``limit_s`` (RESOURCE_EXHAUSTED retried after its
    hint); the refusals it met on the way."""
    refusals = []
    deadline = time.monotonic() + limit_s
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        while time.monotonic() < deadline:
            try:
                return stub.ServerLive(pb.ServerLiveRequest(), timeout=limit_s).live, refusals
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise
                refusals.append(exc.details())
                hint = dict(exc.trailing_metadata() or ()).get("retry-after-ms", "20")
                time.sleep(int(hint) / 1000)  # (the client's back-off, as the hint asks: not a race)
    return False, refusals


def in_progress_settles(server, most: int, limit_s: float = 5.0) -> bool:
    """Whether gRPC's own count of calls in progress (the one it refuses by) comes down to ``most``."""
    state = server._server._state  # (grpc's _ServerState: the count behind "Concurrent RPC limit exceeded!")
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        with state.lock:
            if state.active_rpc_count <= most:
                return True
        time.sleep(0.01)
    return False


def test_calls_without_their_request_do_not_lock_out_other_callers(model_repo):
    server = start_kernel(model_repo, "sync", workers=WORKERS)
    holders = [RawConnection(server.port) for _ in range(2)]
    try:
        for connection in holders:  # twice workers' worth of held calls, on two connections
            hold(connection, range(1, 2 * WORKERS * 2, 2))
        ok, refusals = live(server.port, limit_s=5)
        # (Before: "Concurrent RPC limit exceeded!" for as long as the holders stayed. Now it may still be met for a
        # moment, here with only 4 workers: an ended call counts for gRPC until its receive has completed.)
        assert ok, refusals[-3:]
        # The held calls were ended with a status (RESOURCE_EXHAUSTED, counted), not left open.
        assert server._eager.ended_waiting > 0
        ended = set()
        for connection in holders:
            ended |= ended_streams(connection, want=1, limit_s=2)
        assert ended
        # A client that keeps opening such calls still leaves room: each new one ends the oldest.
        for round_ in range(3):
            hold(holders[0], range(101 + 40 * round_, 101 + 40 * round_ + 2 * WORKERS, 2))
            ok, refusals = live(server.port, limit_s=5)
            assert ok, refusals[-3:]
        # gRPC itself counts the ended calls as over (their receive completed, each once): what it holds in progress
        # is the calls still waiting, no more than the bound, while their connections stay up.
        assert in_progress_settles(server, server._eager.waiting_bound)
    finally:
        for connection in holders:
            connection.close()
        server.stop(grace=1)


def test_a_slow_request_is_not_cut_while_there_is_room(model_repo):
    """A call whose request comes late (headers, then the message a while after) is answered: nothing is cut for
    time alone."""
    server = start_kernel(model_repo, "sync", workers=WORKERS)
    connection = RawConnection(server.port)
    try:
        hold(connection, range(1, 2))
        assert not ended_streams(connection, want=1, limit_s=0.6)  # (pings answered meanwhile)
        request = pb.ServerLiveRequest().SerializeToString()
        connection.sock.sendall(frame(DATA, END_STREAM, 1, struct.pack(">BI", 0, len(request)) + request))
        assert ended_streams(connection, want=1, limit_s=5) == {1}
        assert getattr(server._eager, "ended_waiting", 0) == 0
        ok, refusals = live(server.port, limit_s=5)
        assert ok and not refusals
    finally:
        connection.close()
        server.stop(grace=1)


def wait_until(condition, limit_s: float = 5.0) -> bool:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.005)
    return False


def test_the_call_ended_is_from_the_connection_holding_the_most(model_repo):
    """A client that opens a new call for each one ended turns over all its own within milliseconds; ending the
    oldest of all then cut a request in transit on another connection every time (a 60 MiB ModelInfer, 0.3 s on
    the way, under such a client: 5 of 5 cut). The one ended is the oldest of the connection with the most."""
    server = start_kernel(model_repo, "sync", workers=8)  # (at most 7 wait for their request, 2 for a second)
    eager = server._eager
    hostile, slow = RawConnection(server.port), RawConnection(server.port)
    try:
        hold(hostile, range(1, 2))
        assert wait_until(lambda: eager.waiting == 1)
        hold(slow, range(1, 2))  # its request comes later: now the second-oldest call waiting
        assert wait_until(lambda: eager.waiting == 2)
        hold(hostile, range(3, 17, 2))  # seven more, the last two past the bound
        assert wait_until(lambda: eager.ended_waiting == 2)
        assert ended_streams(hostile, want=2, limit_s=5) == {1, 3}
        assert not ended_streams(slow, want=1, limit_s=0.3)
        request = pb.ServerLiveRequest().SerializeToString()
        slow.sock.sendall(frame(DATA, END_STREAM, 1, struct.pack(">BI", 0, len(request)) + request))
        assert ended_streams(slow, want=1, limit_s=5) == {1}
        assert eager.ended_waiting == 2  # (answered, not ended)
    finally:
        hostile.close()
        slow.close()
        server.stop(grace=1)


def test_calls_waiting_past_the_cap_are_ended_once_they_have_waited(model_repo):
    """Past the cap (a quarter of workers) nothing young is cut: a burst's calls wait for requests on their way (up
    to 403 at once, 25 ms, for 4,000 ServerLive calls from one channel). Once they have waited ``min_wait_ns``, the
    next call in ends them down to the cap."""
    server = start_kernel(model_repo, "sync", workers=8)  # (cap 2, bound 7)
    eager = server._eager
    eager.min_wait_ns = 200_000_000  # (a second by default: kept short here)
    hostile = RawConnection(server.port)
    try:
        began = time.monotonic()
        hold(hostile, range(1, 7, 2))  # three: past the cap, under the bound
        assert wait_until(lambda: eager.waiting == 3)
        assert eager.ended_waiting == 0
        assert wait_until(lambda: time.monotonic() - began > 0.25)
        ok, refusals = live(server.port, limit_s=5)  # its arrival ends the two oldest
        assert ok and not refusals
        assert eager.ended_waiting == 2
        assert ended_streams(hostile, want=2, limit_s=5) == {1, 3}
    finally:
        hostile.close()
        server.stop(grace=1)


def test_calls_without_their_request_beside_idle_streams_do_not_lock_out_other_callers(model_repo):
    """Idle client streams hold call slots too (up to max_streams, half of workers): beside two of them, two calls
    whose request never came, under the waiting bound (workers less the priority-1 reserve, 3 here) counted alone,
    filled all four, and gRPC then refused every other call ("Concurrent RPC limit exceeded!") before any code of
    the kernel's could end one, for as long as they stayed. Now waiting calls never take the last slot the open
    streams and watches leave."""
    server = start_kernel(model_repo, "sync", workers=WORKERS)
    streams, holder = RawConnection(server.port), RawConnection(server.port)
    try:
        decide_stream = b"".join(literal(name, value) for name, value in (
            (b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"localhost"),
            (b":path", b"/aios.kernel.v1.DecisionService/DecideStream"), (b"content-type", b"application/grpc"),
            (b"te", b"trailers")))
        streams.sock.sendall(b"".join(frame(HEADERS, END_HEADERS, stream, decide_stream) for stream in (1, 3)))
        assert wait_until(lambda: server._budget.streams_open == 2)  # admitted: within max_streams (2 here)
        hold(holder, range(1, 5, 2))
        # Both held calls taken up (waiting, or ended for the last slot) before the other caller comes: under load
        # they could still be on their way, its call then found a slot free with none ended (a loaded `make test`).
        assert wait_until(lambda: server._eager.waiting + server._eager.ended_waiting == 2)
        ok, refusals = live(server.port, limit_s=5)
        assert ok, refusals[-3:]
        assert server._eager.ended_waiting > 0 and ended_streams(holder, want=1, limit_s=2)
    finally:
        streams.close()
        holder.close()
        server.stop(grace=1)
