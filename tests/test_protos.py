"""The committed generated code is exactly what scripts/gen_protos.py makes from proto/."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = ROOT / "kernel" / "_proto"


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


def test_regenerating_changes_nothing(tmp_path):
    out = tmp_path / "_proto"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--out", str(out)], check=True, capture_output=True)
    assert _files(out) == _files(COMMITTED), "generated file set differs: run `make protos` and commit"
    changed = [name for name in sorted(_files(out)) if not filecmp.cmp(out / name, COMMITTED / name, shallow=False)]
    assert not changed, f"regenerated files differ from the committed ones: {changed}; run `make protos` and commit"


def test_generated_code_imports_beside_tritonclient():
    """Our descriptors live in a private pool: tritonclient's copy of the same protos loads in the same process."""
    code = (
        "import tritonclient.grpc\n"
        "from kernel._proto.inference import grpc_service_pb2 as pb\n"
        "from kernel._proto import POOL\n"
        "assert pb.DESCRIPTOR.pool is POOL\n"
        "r = pb.ModelInferRequest(model_name='m'); r.parameters['p'].int64_param = 1\n"
        "assert pb.ModelInferRequest.FromString(r.SerializeToString()) == r\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_wire_compatible_with_tritonclient_messages():
    """Field numbers match Triton's: a request serialised by tritonclient parses identically here."""
    import numpy as np
    from tritonclient.grpc import service_pb2 as triton_pb

    from kernel._proto.inference import grpc_service_pb2 as pb

    theirs = triton_pb.ModelInferRequest(model_name="m", model_version="2", id="x")
    tensor = theirs.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 2])
    tensor.contents.fp32_contents.extend([1.0, 2.0])
    theirs.parameters["priority"].int64_param = 2
    theirs.raw_input_contents.append(np.ones(2, np.float32).tobytes())
    theirs.outputs.add(name="OUTPUT0")
    ours = pb.ModelInferRequest.FromString(theirs.SerializeToString())
    assert ours.model_name == "m" and ours.model_version == "2" and ours.id == "x"
    assert list(ours.inputs[0].shape) == [1, 2] and list(ours.inputs[0].contents.fp32_contents) == [1.0, 2.0]
    assert ours.parameters["priority"].int64_param == 2
    assert ours.outputs[0].name == "OUTPUT0"
    assert ours.SerializeToString(deterministic=True) == theirs.SerializeToString(deterministic=True)


def _fields(message, seen: set, out: dict) -> dict:
    """``{"pkg.Message.field": (number, type, repeated, message type)}`` for ``message`` and every message it holds."""
    if message.full_name not in seen:
        seen.add(message.full_name)
        for field in message.fields:
            kind = field.message_type.full_name if field.message_type else ""
            out[field.full_name] = (field.number, field.type, field.is_repeated, kind)
            if field.message_type is not None:
                _fields(field.message_type, seen, out)
    return out


def test_every_triton_rpc_is_declared_with_tritons_messages():
    """Each RPC of tritonclient's GRPCInferenceService is declared here, with the same request and response
    messages, so a client calling one gets the kernel's answer (the shared-memory, trace and log RPCs were left
    out, and got gRPC's bare "Method not found!"). Our model config is a subset of Triton's: not compared."""
    from tritonclient.grpc import service_pb2 as triton_pb

    from kernel._proto.inference import grpc_service_pb2 as pb

    theirs = triton_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    ours = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    shape = lambda m: (m.input_type.full_name, m.output_type.full_name, m.client_streaming, m.server_streaming)  # noqa: E731
    assert {m.name: shape(m) for m in ours.methods} == {m.name: shape(m) for m in theirs.methods}
    own = {message.full_name for message in pb.DESCRIPTOR.message_types_by_name.values()}

    def declared(service):
        seen, out = set(), {}
        for method in service.methods:
            _fields(method.input_type, seen, out)
            _fields(method.output_type, seen, out)
        return {name: value for name, value in out.items() if any(name.startswith(m + ".") for m in own)}

    assert declared(ours) == declared(theirs)
