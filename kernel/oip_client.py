"""A small synchronous Open Inference Protocol client over our generated stubs.

Used by the CLI (`infer`, `demo`, `models list --address`). Any KServe v2 /
Triton gRPC client works too (tests/test_oip_compat.py drives the kernel with
tritonclient); ``kernel.decision_client`` is the decision API's.
"""

from __future__ import annotations

import grpc
import numpy as np

from ._proto.inference import grpc_service_pb2 as pb
from ._proto.inference import grpc_service_pb2_grpc as pb_grpc
from .accel import bytes_codec
from .channel import kernel_channel
from .models import datatypes


class OipClient:
    def __init__(self, address: str, timeout: float = 10.0):
        self.address = address
        self.timeout = timeout
        self.channel = kernel_channel(address)
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "OipClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def wait_ready(self, timeout: float = 30.0) -> None:
        grpc.channel_ready_future(self.channel).result(timeout=timeout)

    def metadata(self, model: str, version: str = "") -> pb.ModelMetadataResponse:
        return self.stub.ModelMetadata(pb.ModelMetadataRequest(name=model, version=version), timeout=self.timeout)

    def repository_index(self) -> pb.RepositoryIndexResponse:
        return self.stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=self.timeout)

    @staticmethod
    def build_request(model: str, inputs: dict[str, np.ndarray], version: str = "", request_id: str = "") -> pb.ModelInferRequest:
        request = pb.ModelInferRequest(model_name=model, model_version=version, id=request_id)
        for name, array in inputs.items():
            dt = datatypes.from_numpy(array.dtype)
            request.inputs.add(name=name, datatype=dt.name, shape=list(array.shape))
            if dt.name == "BYTES":
                request.raw_input_contents.append(bytes_codec.encode(array.reshape(-1)))
            else:
                request.raw_input_contents.append(np.ascontiguousarray(array).tobytes())
        return request

    @staticmethod
    def parse_response(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
        out = {}
        for tensor, raw in zip(response.outputs, response.raw_output_contents):
            dt = datatypes.from_name(tensor.datatype)
            shape = tuple(tensor.shape)
            if dt.name == "BYTES":
                count = int(np.prod(shape)) if shape else 1
                out[tensor.name] = np.array(bytes_codec.decode(raw, count), dtype=object).reshape(shape)
            else:
                out[tensor.name] = np.frombuffer(raw, dtype=dt.numpy).reshape(shape)
        return out

    def infer(self, model: str, inputs: dict[str, np.ndarray], version: str = "") -> dict[str, np.ndarray]:
        response = self.stub.ModelInfer(self.build_request(model, inputs, version), timeout=self.timeout)
        return self.parse_response(response)
