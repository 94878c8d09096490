"""A large DecisionRequest (or StartTask) carrying more fields than any pipeline declares is refused from its bytes,
before protobuf parses it.

Each ``fields`` or ``text_fields`` entry is a map entry in upb, ~220 bytes for the ~15 of a one-character field on
the wire: 15 MiB of them took 220 MB to parse, and only then did the pipeline refuse the first field it does not
declare; a 64 MiB request ~900 MB, four at once ~3.6 GB. Now a request over 1 MiB is counted first
(kernel/api/wire_limits.py ``decision_refusal``) and refused INVALID_ARGUMENT, on Decide, DecideStream (the stream
goes on) and StartTask, on both front ends. Real kernels in this process (its peak RSS is the kernel's and the
client's), real gRPC, the requests' bytes made by hand (the client would pay upb's price too if it built them).
"""

from __future__ import annotations

import grpc
import pytest
from claims_support import claim_request
from wire_bytes import delimited
from conftest import start_claims_kernel
from examples.claims import data as claims
from test_request_parse_memory import _peak_growth

from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb

Code = grpc.StatusCode
MIB = 1 << 20
N_FIELDS = MIB  # ~15 bytes each on the wire: ~15 MiB
BIG = [("grpc.max_send_message_length", 256 * MIB), ("grpc.max_receive_message_length", 256 * MIB)]
SERVICE = "/aios.kernel.v1.DecisionService"


def _many_fields() -> bytes:
    """A DecisionRequest for the claims pipeline with N_FIELDS fields {f0000000: true, ...}."""
    head = kpb.DecisionRequest(pipeline="claims_triage", tenant="t").SerializeToString()
    return head + b"".join(delimited(5, delimited(1, b"f%07d" % n) + delimited(2, b"\x08\x01")) for n in range(N_FIELDS))


def _baseline(size: int) -> bytes:
    """As many bytes, refused at once after parsing (a text field past its 1 MiB limit)."""
    return kpb.DecisionRequest(pipeline="claims_triage", text_fields={"notes": "x" * size}).SerializeToString()


WORDS = f"fields and text_fields: {N_FIELDS:,} sent; at most 4,096 are taken"


@pytest.fixture(scope="module", params=["sync", "aio"])
def kernel(request, claims_models, tmp_path_factory):
    server = start_claims_kernel(claims_models, tmp_path_factory.mktemp(f"decision-parse-{request.param}"),
                                 front_end=request.param)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}", options=BIG) as channel:
        yield server, channel
    server.stop(grace=1)


def _raw(channel, method: str, streaming: bool = False):
    if streaming:
        return channel.stream_stream(f"{SERVICE}/{method}", request_serializer=None,
                                     response_deserializer=kpb.Decision.FromString)
    return channel.unary_unary(f"{SERVICE}/{method}", request_serializer=None, response_deserializer=None)


def test_a_decide_with_more_fields_than_any_pipeline_is_refused_before_it_is_parsed(kernel):
    _, channel = kernel
    data = _many_fields()
    decide = _raw(channel, "Decide")
    base_growth, base_error = _peak_growth(lambda: decide(_baseline(len(data)), timeout=60))
    assert base_error.code() == Code.INVALID_ARGUMENT, base_error.details()
    growth, error = _peak_growth(lambda: decide(data, timeout=60))
    assert growth < base_growth + len(data), f"{len(data):,} bytes took {growth:,} ({base_growth:,} for the baseline)"
    assert isinstance(error, grpc.RpcError) and error.code() == Code.INVALID_ARGUMENT, error
    assert WORDS in error.details(), error.details()


def test_in_a_decide_stream_it_is_refused_and_the_stream_goes_on(kernel):
    _, channel = kernel
    good = claim_request(claims.generate_cases(1, seed=5)[0], request_id="after").SerializeToString()
    answers = list(_raw(channel, "DecideStream", streaming=True)(iter([_many_fields(), good]), timeout=60))
    assert sorted((a.request_id, a.error_code) for a in answers) == [("", "INVALID_ARGUMENT"), ("after", "")], answers
    refused = next(a for a in answers if a.error_code)
    assert WORDS in refused.error_message and refused.not_decided is False, refused.error_message


def test_a_start_task_with_more_fields_than_any_pipeline_is_refused_before_it_is_parsed(kernel):
    _, channel = kernel
    request = delimited(1, _many_fields())
    start = channel.unary_unary("/aios.kernel.v1.TaskService/StartTask", request_serializer=None,
                                response_deserializer=None)
    base_growth, base_error = _peak_growth(lambda: start(delimited(1, _baseline(len(request))), timeout=60))
    assert base_error.code() == Code.INVALID_ARGUMENT, base_error.details()
    growth, error = _peak_growth(lambda: start(request, timeout=60))
    assert growth < base_growth + len(request), f"{len(request):,} bytes took {growth:,} ({base_growth:,} for the baseline)"
    assert isinstance(error, grpc.RpcError) and error.code() == Code.INVALID_ARGUMENT, error
    assert f"request.fields and request.text_fields: {N_FIELDS:,} sent" in error.details(), error.details()
