"""A ModelStreamInfer whose client never reads holds its unanswered requests' decoded form within the stream's
byte bound, not only their bytes on the wire (kernel/scheduling/stream_window.py).

A stream holds at most ``MAX_HELD_BYTES`` of requests not yet answered and sent. They were counted by their
serialized size, but a BYTES element of 5 bytes on the wire is a Python object, its slots in a list and an object
array, then an output: one stream of 292 KB requests of 2-byte strings, its client reading nothing, took a kernel
from 116 MiB to 1.8 GB (64 MiB counted). Now each request counts what its decoded inputs are estimated to hold
(``tensors.held_bytes``) when that is more than its bytes.

Measured with tracemalloc on a real kernel in this process (the client's one request object is all it adds):
the Python memory the stuck stream leaves held, once the kernel stopped taking its requests.
"""

from __future__ import annotations

import struct
import threading
import tracemalloc

import grpc
import pytest

from conftest import start_kernel
from kernel._proto.inference import grpc_service_pb2 as pb
from kernel._proto.inference import grpc_service_pb2_grpc as pb_grpc
from kernel.scheduling import stream_window
from kernel.testing import onnx_models
from kernel.testing.settle import settled

HELD = 4 << 20  # MAX_HELD_BYTES for the test
ELEMENTS = 10_000  # 1-byte strings: 50 KB a request on the wire
REQUESTS = 400


@pytest.fixture(scope="module", params=["sync", "aio"])
def kernel(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("stream_strings")
    onnx_models.save(onnx_models.identity([("s", "BYTES", (None,))]), root / "strs" / "1" / "model.onnx")
    server = start_kernel(root, request.param)
    yield server
    server.stop(grace=1)


def test_a_stream_that_is_not_read_holds_its_decoded_requests_within_its_bound(kernel, monkeypatch):
    monkeypatch.setattr(stream_window, "MAX_HELD_BYTES", HELD)
    req = pb.ModelInferRequest(model_name="strs")
    req.inputs.add(name="s", datatype="BYTES", shape=[1, ELEMENTS])
    req.raw_input_contents.append((struct.pack("<I", 1) + b"x") * ELEMENTS)
    written = [0]
    done = threading.Event()

    def requests():
        for n in range(REQUESTS):
            written[0] = n + 1
            yield req
        done.wait(60)  # (the stream stays open, unread, until the test has looked)

    tracemalloc.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{kernel.port}") as channel:
            call = pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(requests(), timeout=120)
            taken = settled(lambda: written[0])
            held, _ = tracemalloc.get_traced_memory()
            done.set()
            call.cancel()
    finally:
        tracemalloc.stop()
    assert taken < REQUESTS, "the client was never pushed back"
    # The bound, one request past it (always taken), and the answers being sent.
    assert held < 2 * HELD, f"a stream of {taken} requests read, none of its answers read, held {held:,} bytes"
