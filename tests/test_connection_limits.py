"""Limits at the connection and HTTP/2 level, below the kernel's own: what gRPC core is told to refuse.

A client speaks raw HTTP/2 here where a gRPC client would not do what a hostile or broken one does (open streams
past the server's limit). docs/operations.md ("Connection and HTTP/2 limits") says what each costs unbounded.
"""

from __future__ import annotations

import socket
import struct
import time

import grpc
import numpy as np
import pytest

from conftest import start_kernel
from kernel._proto.inference import grpc_service_pb2 as pb
from kernel._proto.inference import grpc_service_pb2_grpc as pb_grpc
from kernel.config import SettingsError, load_settings

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0x0, 0x1, 0x3, 0x4, 0x6, 0x7, 0x8
END_HEADERS, ACK = 0x4, 0x1
MAX_CONCURRENT_STREAMS, INITIAL_WINDOW_SIZE = 0x3, 0x4  # SETTINGS parameters
# RST_STREAM error codes of a stream refused at the HTTP/2 level: gRPC core sends ENHANCE_YOUR_CALM past the limit
REFUSED = {0x7, 0xB}  # (REFUSED_STREAM, ENHANCE_YOUR_CALM)
WORKERS = 4  # a small kernel...
STREAM_LIMIT = 8  # ...with a small max_connection_streams: reached with few streams


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def literal(name: bytes, value: bytes) -> bytes:
    """An HPACK header field, literal and not indexed, no Huffman coding (short names and values only)."""
    assert len(name) < 127 and len(value) < 127
    return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value


def call_headers(method: bytes) -> bytes:
    return b"".join(literal(name, value) for name, value in (
        (b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"localhost"),
        (b":path", b"/inference.GRPCInferenceService/" + method),
        (b"content-type", b"application/grpc"), (b"te", b"trailers")))


CALL_HEADERS = call_headers(b"ServerLive")


class RawConnection:
    """One HTTP/2 connection to the kernel, frames read and written as they are."""

    def __init__(self, port: int, settings: dict[int, int] | None = None):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        ours = b"".join(struct.pack(">HI", key, value) for key, value in (settings or {}).items())
        self.sock.sendall(PREFACE + frame(SETTINGS, 0, 0, ours))
        self._buffer = b""

    def read_frame(self) -> tuple[int, int, int, bytes]:
        while True:
            if len(self._buffer) >= 9:
                length = int.from_bytes(self._buffer[:3], "big")
                if len(self._buffer) >= 9 + length:
                    head, self._buffer = self._buffer[:9 + length], self._buffer[9 + length:]
                    return head[3], head[4], int.from_bytes(head[5:9], "big") & 0x7FFFFFFF, head[9:]
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("the kernel closed the connection")
            self._buffer += data

    def server_settings(self) -> dict[int, int]:
        while True:
            kind, flags, _, payload = self.read_frame()
            if kind == SETTINGS and not flags & ACK:
                self.sock.sendall(frame(SETTINGS, ACK, 0))
                return {int.from_bytes(payload[i:i + 2], "big"): int.from_bytes(payload[i + 2:i + 6], "big")
                        for i in range(0, len(payload), 6)}

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module", params=["sync", "aio"])
def small_kernel(request, model_repo):
    server = start_kernel(model_repo, request.param, workers=WORKERS, max_connection_streams=STREAM_LIMIT)
    yield server
    server.stop(grace=1)


def test_a_connection_is_told_how_many_streams_it_may_open(small_kernel):
    """gRPC's own default (max_connection_streams = 0) is no limit at all: no SETTINGS_MAX_CONCURRENT_STREAMS."""
    connection = RawConnection(small_kernel.port)
    try:
        assert connection.server_settings().get(MAX_CONCURRENT_STREAMS) == STREAM_LIMIT
    finally:
        connection.close()


def test_streams_past_the_limit_on_one_connection_are_refused_and_the_kernel_serves_on(small_kernel):
    """A client that ignores the limit (a rapid-reset loop does): the streams beyond it are refused at the HTTP/2
    level (RST_STREAM), not taken in as calls; the ones within it, opened and never sent a message, stay open."""
    limit = STREAM_LIMIT
    opened = limit + 6
    connection = RawConnection(small_kernel.port)
    try:
        connection.sock.sendall(b"".join(frame(HEADERS, END_HEADERS, 2 * k + 1, CALL_HEADERS) for k in range(opened)))
        beyond = {2 * k + 1 for k in range(limit, opened)}
        resets: dict[int, int] = {}  # stream -> RST_STREAM error code
        while not beyond <= resets.keys():
            kind, _, stream, payload = connection.read_frame()
            assert kind != GOAWAY, payload
            if kind == RST_STREAM:
                resets[stream] = int.from_bytes(payload, "big")
        # (within the limit, the threaded front end answers the calls past `workers` itself: RESOURCE_EXHAUSTED)
        assert {stream for stream, code in resets.items() if code in REFUSED} == beyond, resets
    finally:
        connection.close()
    # The calls it held end with its connection. (Until they do, on the threaded front end they hold slots of
    # `workers`, within bounds: calls whose request has not arrived count there, test_waiting_calls.py.)
    assert serves_again(small_kernel.port)


def serves_again(port: int, limit_s: float = 10.0) -> bool:
    """Whether a ServerLive call succeeds within ``limit_s``, RESOURCE_EXHAUSTED tried again (calls still ending)."""
    deadline = time.monotonic() + limit_s
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        while time.monotonic() < deadline:
            try:
                return stub.ServerLive(pb.ServerLiveRequest(), timeout=limit_s).live
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise
    return False


def big_compressible_request() -> pb.ModelInferRequest:
    """A ModelInfer request of 1 MiB of zeros: gzip makes it ~1 KB."""
    request = pb.ModelInferRequest(model_name="tiny", model_version="1")
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[16384, 16])
    request.raw_input_contents.append(np.zeros((16384, 16), np.float32).tobytes())
    return request


def test_a_compressed_request_is_refused_before_it_is_inflated(small_kernel):
    """``compressed_requests`` is off by default: a gzip request is refused by name (UNIMPLEMENTED), not inflated to
    up to max_message_bytes (a compression bomb); the same call uncompressed is served."""
    with grpc.insecure_channel(f"127.0.0.1:{small_kernel.port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(big_compressible_request(), timeout=10, compression=grpc.Compression.Gzip)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED, info.value.details()
        assert "'gzip' is disabled" in info.value.details()
        request = big_compressible_request()
        del request.raw_input_contents[:]  # (uncompressed: one row is enough to show the call itself is fine)
        request.inputs[0].shape[:] = [1, 16]
        request.raw_input_contents.append(np.zeros((1, 16), np.float32).tobytes())
        assert stub.ModelInfer(request, timeout=10).raw_output_contents


def test_compressed_requests_on_accepts_gzip(model_repo):
    server = start_kernel(model_repo, "sync", compressed_requests=True)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            request = big_compressible_request()
            request.inputs[0].shape[:] = [8, 16]  # (the tiny model's max_batch_size)
            request.raw_input_contents[0] = np.zeros((8, 16), np.float32).tobytes()
            assert stub.ModelInfer(request, timeout=10, compression=grpc.Compression.Gzip).raw_output_contents
    finally:
        server.stop(grace=1)


def test_max_connection_streams_is_checked():
    with pytest.raises(SettingsError, match=r"max_connection_streams .*must be 0\.\.2147483647 \(0 = no limit\), got -1"):
        load_settings(None, {"max_connection_streams": -1}, environ={})


# What one stream that never reads its answers may make the kernel hold, in request bytes: the kernel takes
# stream_window.MAX_IN_FLIGHT (1,024) requests unanswered, then gRPC holds what the client may still send.
UNREAD_STREAM_BYTES = 1024 * 1024  # (measured with the probe off: ~136 KB; on, past 8 MiB within 2 s)


def test_a_stream_whose_answers_are_never_read_lets_in_a_bounded_number_of_requests(small_kernel):
    """A ModelStreamInfer client with a receive window of 0 (the kernel can send it no answer) sends all it may.
    gRPC's bandwidth probe kept widening the stream's window while the kernel, past its own 1,024, read nothing:
    three such DecideStreams had 25,000-114,000 requests each (9-42 MB) let in and held, grpc.aio's RSS +300 MB."""
    connection = RawConnection(small_kernel.port, {INITIAL_WINDOW_SIZE: 0})
    try:
        initial = connection.server_settings().get(INITIAL_WINDOW_SIZE, 65535)
        stream_window, connection_window = initial, 65535
        connection.sock.sendall(frame(HEADERS, END_HEADERS, 1, call_headers(b"ModelStreamInfer")))
        request = tiny_request().SerializeToString()
        message = frame(DATA, 0, 1, struct.pack(">BI", 0, len(request)) + request)
        sent = 0
        connection.sock.settimeout(0.5)
        deadline = time.monotonic() + 8
        while sent <= UNREAD_STREAM_BYTES and time.monotonic() < deadline:
            room = min(stream_window, connection_window) // (len(message) - 9)
            if room:
                connection.sock.sendall(message * room)
                sent += room * (len(message) - 9)
                stream_window -= room * (len(message) - 9)
                connection_window -= room * (len(message) - 9)
            try:
                kind, flags, stream, payload = connection.read_frame()
            except TimeoutError:
                if not room:
                    break  # no more window for a while: the kernel lets nothing more in
                continue
            assert kind != GOAWAY, payload
            if kind == WINDOW_UPDATE:
                increment = int.from_bytes(payload, "big") & 0x7FFFFFFF
                if stream == 0:
                    connection_window += increment
                else:
                    stream_window += increment
            elif kind == SETTINGS and not flags & ACK:
                for i in range(0, len(payload), 6):
                    if int.from_bytes(payload[i:i + 2], "big") == INITIAL_WINDOW_SIZE:
                        value = int.from_bytes(payload[i + 2:i + 6], "big")
                        stream_window += value - initial
                        initial = value
                connection.sock.sendall(frame(SETTINGS, ACK, 0))
            elif kind == PING and not flags & ACK:
                connection.sock.sendall(frame(PING, ACK, 0, payload))
        assert sent <= UNREAD_STREAM_BYTES, f"{sent} bytes of requests let in and not answered"
    finally:
        connection.close()
    assert serves_again(small_kernel.port)


def tiny_request() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="tiny", model_version="1")
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 16])
    request.raw_input_contents.append(np.ones((1, 16), np.float32).tobytes())
    return request
