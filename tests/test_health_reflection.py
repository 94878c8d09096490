"""grpc.health.v1 and server reflection, checked with standard clients."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from conftest import start_kernel

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVED = [  # every service the kernel serves, by the name a probe (grpc-health-probe -service=...) gives
    "inference.GRPCInferenceService",
    "aios.kernel.v1.DecisionService",
    "aios.kernel.v1.TaskService",
    "aios.kernel.v1.ReviewService",
    "aios.kernel.v1.AuditService",
    "aios.kernel.v1.AdminService",
]


def test_reflection_lists_every_service(channel):
    database = ProtoReflectionDescriptorDatabase(channel)
    services = set(database.get_services())
    assert {*SERVED, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= services


def test_reflection_describes_messages(channel):
    """A client that knows nothing in advance can build the request type from reflection (grpcurl-style)."""
    pool = DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
    service = pool.FindServiceByName("inference.GRPCInferenceService")
    infer = service.FindMethodByName("ModelInfer")
    assert infer.input_type.full_name == "inference.ModelInferRequest"
    fields = {f.name: f.number for f in infer.input_type.fields}
    assert fields["raw_input_contents"] == 7 and fields["inputs"] == 5
    config = pool.FindMessageTypeByName("inference.ModelConfig")
    assert config.fields_by_name["max_batch_size"].number == 4


def _file_containing(channel, symbol: str):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    request = reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol)
    (answer,) = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(iter([request]), timeout=10)
    return answer


@pytest.mark.parametrize("method,file", [("inference.GRPCInferenceService.ModelInfer", "inference/grpc_service.proto"),
                                         ("aios.kernel.v1.DecisionService.Decide", "aios/kernel/v1/kernel.proto"),
                                         ("grpc.health.v1.Health.Check", "grpc_health/v1/health.proto")])
def test_reflection_finds_the_file_of_a_method(channel, method, file):
    """`grpcurl describe inference.GRPCInferenceService.ModelInfer` asks for the file containing the method, which
    the protocol allows (<package>.<service>[.<method>]): it failed "Symbol not found" (the service worked)."""
    from google.protobuf import descriptor_pb2

    answer = _file_containing(channel, method)
    assert answer.WhichOneof("message_response") == "file_descriptor_response", answer
    files = [descriptor_pb2.FileDescriptorProto.FromString(raw).name
             for raw in answer.file_descriptor_response.file_descriptor_proto]
    assert files[0] == file


def test_reflection_of_a_method_a_service_lacks_is_not_found(channel):
    answer = _file_containing(channel, "inference.GRPCInferenceService.NoSuchMethod")
    assert answer.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


def test_health_serving_with_models(channel):
    stub = health_pb2_grpc.HealthStub(channel)
    assert stub.Check(health_pb2.HealthCheckRequest(service="")).status == SERVING
    assert stub.Check(health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService")).status == SERVING


@pytest.mark.parametrize("service", SERVED)
def test_health_serving_by_service_name(channel, service):
    stub = health_pb2_grpc.HealthStub(channel)
    assert stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status == SERVING


def test_health_of_an_unknown_service_is_not_found(channel):
    stub = health_pb2_grpc.HealthStub(channel)
    for service in ("aios.kernel.v1.NoSuchService", "DecisionService", "aios.kernel.v2.DecisionService"):
        with pytest.raises(grpc.RpcError) as info:
            stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND, service
        assert service in info.value.details()


def test_health_without_an_audit_log_does_not_claim_the_audit_service(model_repo):
    """audit_mode = "off": every AuditService call is refused, so its health is NOT_FOUND; the rest serve."""
    server = start_kernel(model_repo, "sync", audit_mode="off")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            with pytest.raises(grpc.RpcError) as info:
                stub.Check(health_pb2.HealthCheckRequest(service="aios.kernel.v1.AuditService"), timeout=5)
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
            for service in ["", *(name for name in SERVED if not name.endswith("AuditService"))]:
                assert stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status == SERVING, service
    finally:
        server.stop(grace=1)


@pytest.mark.parametrize("front_end", ["sync", "aio"])
def test_health_turns_not_serving_for_every_service_when_the_drain_starts(model_repo, front_end):
    import threading

    server = start_kernel(model_repo, front_end)
    stopping = threading.Thread(target=server.stop, kwargs={"grace": 1})
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            watches = {name: stub.Watch(health_pb2.HealthCheckRequest(service=name), timeout=10) for name in ["", *SERVED]}
            for name, watch in watches.items():
                assert next(watch).status == SERVING, name
            stopping.start()
            for name, watch in watches.items():
                assert next(watch).status == NOT_SERVING, name
            for name, watch in watches.items():  # then the watch ends, rather than holding the drain
                with pytest.raises(grpc.RpcError) as info:
                    next(watch)
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE, name
                assert "shutting down" in info.value.details(), name
    finally:
        if stopping.ident is None:  # failed before the drain began
            server.stop(grace=1)
        else:
            stopping.join(timeout=15)


@pytest.mark.parametrize("front_end", ["sync", "aio"])
def test_health_not_serving_without_models(tmp_path, model_repo, front_end):
    """An empty repository: live, but NOT_SERVING until a model is loaded, then SERVING."""
    import shutil

    repo = tmp_path / "repo"
    repo.mkdir()
    server = start_kernel(repo, front_end)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            assert stub.Check(health_pb2.HealthCheckRequest(service="")).status == NOT_SERVING
            shutil.copytree(model_repo / "tiny", repo / "tiny")
            from kernel._proto.inference import grpc_service_pb2 as pb
            from kernel._proto.inference import grpc_service_pb2_grpc as pb_grpc

            pb_grpc.GRPCInferenceServiceStub(channel).RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="tiny"))
            # The health update of the asyncio server is applied on its loop: poll until it lands.
            responses = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
            for response in responses:
                if response.status == SERVING:
                    break
            responses.cancel()
            assert stub.Check(health_pb2.HealthCheckRequest(service="")).status == SERVING
    finally:
        server.stop(grace=1)


def test_every_kernel_api_rpc_is_implemented(channel):
    """No aios.kernel.v1 RPC falls back to UNIMPLEMENTED; empty requests get a specific status."""
    from kernel._proto.aios.kernel.v1 import kernel_pb2

    for service in kernel_pb2.DESCRIPTOR.services_by_name.values():
        for method in service.methods:
            path = f"/{service.full_name}/{method.name}"
            request = getattr(kernel_pb2, method.input_type.name)()
            parse = getattr(kernel_pb2, method.output_type.name).FromString
            if method.client_streaming and method.server_streaming:
                call = channel.stream_stream(path, request_serializer=lambda m: m.SerializeToString(), response_deserializer=parse)
                answer = lambda: list(call(iter([request]), timeout=5))  # noqa: E731
            elif method.server_streaming:
                call = channel.unary_stream(path, request_serializer=lambda m: m.SerializeToString(), response_deserializer=parse)
                answer = lambda: next(iter(call(request, timeout=0.5)), None)  # noqa: E731
            else:
                call = channel.unary_unary(path, request_serializer=lambda m: m.SerializeToString(), response_deserializer=parse)
                answer = lambda: call(request, timeout=5)  # noqa: E731
            try:
                answer()
            except grpc.RpcError as exc:
                assert exc.code() not in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.UNKNOWN), (path, exc.details())
                assert exc.code() != grpc.StatusCode.INTERNAL, (path, exc.details())


def test_every_inference_rpc_is_answered_by_the_kernel(channel):
    """No inference RPC gets gRPC's bare "Method not found!" (Triton's shared-memory, trace and log RPCs did):
    those the kernel does not offer are UNIMPLEMENTED saying what to do instead, the rest are implemented."""
    from kernel._proto.inference import grpc_service_pb2 as pb
    from kernel.api.inference import NOT_OFFERED

    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert set(NOT_OFFERED) < {method.name for method in service.methods}
    for method in service.methods:
        path = f"/{service.full_name}/{method.name}"
        request = getattr(pb, method.input_type.name)()  # (an empty one: no model is loaded or unloaded)
        parse = getattr(pb, method.output_type.name).FromString
        try:
            if method.client_streaming:
                call = channel.stream_stream(path, request_serializer=lambda m: m.SerializeToString(),
                                             response_deserializer=parse)
                list(call(iter([request]), timeout=5))
            else:
                call = channel.unary_unary(path, request_serializer=lambda m: m.SerializeToString(),
                                           response_deserializer=parse)
                call(request, timeout=5)
        except grpc.RpcError as exc:
            assert exc.code() not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), (path, exc.details())
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                assert method.name in NOT_OFFERED, (path, exc.details())
                assert exc.details() == f"{method.name}: {NOT_OFFERED[method.name]}", (path, exc.details())
                continue
        assert method.name not in NOT_OFFERED, f"{path} answered, but NOT_OFFERED lists it"


def test_stream_audit_is_refused_until_enabled(kernel, channel):
    import threading

    from kernel._proto.aios.kernel.v1 import kernel_pb2, kernel_pb2_grpc

    audit = kernel_pb2_grpc.AuditServiceStub(channel)
    with pytest.raises(grpc.RpcError) as info:
        list(audit.StreamAudit(kernel_pb2.StreamAuditRequest(), timeout=5))
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "audit_stream_enabled" in info.value.details()
    # The refusal itself is on the record.
    gave_up = threading.Timer(10, lambda: None)
    gave_up.start()
    denied = next(kernel.decisions.audit.read(kind=kernel_pb2.PERMISSION_DENIED, follow=True,
                                              stop=lambda: not gave_up.is_alive()), None)
    gave_up.cancel()
    assert denied is not None and b"StreamAudit" in denied.payload


def test_admin_list_models(channel, kernel):
    from kernel._proto.aios.kernel.v1 import kernel_pb2, kernel_pb2_grpc

    models = kernel_pb2_grpc.AdminServiceStub(channel).ListModels(kernel_pb2.ListModelsRequest()).models
    by_name = {m.name: m for m in models}
    assert list(by_name["tiny"].versions) == ["1", "2"]
    assert by_name["tiny"].provider == kernel.hub.get("tiny").runtime.provider  # the GPU's where there is one


@pytest.mark.parametrize("front_end", ["sync", "aio"])
def test_health_turns_not_serving_when_the_audit_log_fails(model_repo, front_end):
    """A full disk fail-stops the audit log; no decision can be completed after that, so a load balancer must
    be told to drain this kernel. The fault is injected on purpose: the log's own fail-stop, called as a
    failed write would call it."""
    import errno

    server = start_kernel(model_repo, front_end)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            watch = stub.Watch(health_pb2.HealthCheckRequest(service="aios.kernel.v1.DecisionService"), timeout=10)
            assert next(watch).status == SERVING
            assert _server_ready(channel)
            server.decisions.audit._fail(OSError(errno.ENOSPC, "No space left on device"))  # injected fault
            assert next(watch).status == NOT_SERVING
            watch.cancel()
            for service in ["", *SERVED]:
                assert stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status == NOT_SERVING
            assert not _server_ready(channel)  # Triton's readiness probe hears what gRPC health says
    finally:
        server.stop(grace=1)


def _server_ready(channel) -> bool:
    from kernel._proto.inference import grpc_service_pb2 as pb
    from kernel._proto.inference import grpc_service_pb2_grpc

    return grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel).ServerReady(pb.ServerReadyRequest(), timeout=5).ready


@pytest.mark.parametrize("front_end", ["sync", "aio"])
def test_server_ready_turns_false_when_the_store_fails(model_repo, front_end):
    """The store fail-stops on damage (its file deleted or replaced): health says NOT_SERVING, and so must
    ServerReady. The fault is injected on purpose: the store's own fail-stop, called as a damaged page would."""
    server = start_kernel(model_repo, front_end)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            assert _server_ready(channel)
            server.decisions.db._fail_stop("kernel.sqlite3 was replaced (injected)")  # injected fault
            stub = health_pb2_grpc.HealthStub(channel)
            assert stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status == NOT_SERVING
            assert not _server_ready(channel)
    finally:
        server.stop(grace=1)


class _SlowWriteContext:
    """A grpc.aio context whose ``write`` is held open until the test lets it finish: the injected fault
    is a slow client connection, during which the status changes."""

    def __init__(self):
        import asyncio
        self.sent = []
        self.release = asyncio.Event()

    async def write(self, response):
        self.sent.append(response.status)
        await self.release.wait()

    async def abort(self, code, details):  # pragma: no cover - the test never drains
        raise AssertionError(f"aborted with {code}: {details}")


def test_an_async_watch_sees_a_change_made_while_its_previous_answer_was_being_written():
    """The asyncio watch must not miss a change made during its own ``write`` (it used to wait on the
    event that replaced the one the change set, and the NOT_SERVING never went out)."""
    import asyncio

    from kernel.api.health import AsyncHealth

    async def scenario():
        health, context = AsyncHealth(), _SlowWriteContext()
        watch = asyncio.ensure_future(health.Watch(health_pb2.HealthCheckRequest(service=""), context))
        while not context.sent:  # the first answer (SERVING) is being written
            await asyncio.sleep(0)
        await health.set("", NOT_SERVING)  # ...and the status changes before that write completes
        context.release.set()
        for _ in range(100):
            if len(context.sent) == 2:
                break
            await asyncio.sleep(0)
        watch.cancel()
        return context.sent

    assert asyncio.run(scenario()) == [SERVING, NOT_SERVING]


def test_a_threaded_watch_hears_of_changes_only():
    """(Operator audit) unloading an unrelated model re-sent an unchanged SERVING to every watch; grpc.health.v1
    sends a watch a message when the status changes."""
    from kernel.api.health import ThreadedHealth

    health, sent = ThreadedHealth(), []

    class Context:  # a live call whose callback list the servicer may add to
        def is_active(self):
            return True

        def add_callback(self, callback):
            return True

    health.Watch(health_pb2.HealthCheckRequest(service=""), Context(), lambda r: sent.append(r.status))  # (returns at once)
    health.set("", SERVING)  # unchanged
    health.set("", NOT_SERVING)
    health.set("", NOT_SERVING)  # unchanged
    assert sent == [SERVING, NOT_SERVING]


def test_list_answers_every_service_it_checks(kernel, channel):
    """grpc.health.v1 List (reflection listed it; it answered UNIMPLEMENTED, cross-language audit)."""
    stub = health_pb2_grpc.HealthStub(channel)
    listing = stub.List(health_pb2.HealthListRequest(), timeout=10).statuses
    assert "" in listing and len(listing) > 1
    for service, answer in listing.items():
        assert stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status == answer.status


def test_the_start_line_names_the_release_the_process_and_its_runtimes(model_repo, caplog):
    """(Incident drill) an on-call engineer reading a start's log could not tell which kernel release served, nor
    which pid to signal: the version was only on the audit log's "kernel started" record."""
    import os
    import platform

    import onnxruntime

    from kernel import __version__

    caplog.set_level("INFO", logger="aios.server")
    server = start_kernel(model_repo, "sync")
    server.stop(grace=1)
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("AIOS kernel listening on")]
    assert (f"(aios-kernel {__version__}, pid {os.getpid()}, Python {platform.python_version()}, grpcio "
            f"{grpc.__version__}, onnxruntime {onnxruntime.__version__}; front end sync") in line


def test_the_stop_line_sums_up_what_the_kernel_served(model_repo, caplog):
    """An incident review starts from the stop line: how long it served and what it answered, counted."""
    import numpy as np
    import tritonclient.grpc as tc

    caplog.set_level("INFO", logger="aios.server")
    server = start_kernel(model_repo, "sync")
    try:
        client = tc.InferenceServerClient(f"127.0.0.1:{server.port}")
        x = tc.InferInput("INPUT0", [1, 16], "FP32")
        x.set_data_from_numpy(np.zeros((1, 16), np.float32))
        for _ in range(3):
            client.infer("tiny", [x])
        with pytest.raises(tc.InferenceServerException):
            client.infer("tiny", [x], client_timeout=10, timeout=1)  # a 1 µs deadline: DEADLINE_EXCEEDED, a failure
    finally:
        server.stop(grace=1)
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("AIOS kernel stopped")]
    assert "served 0h00m" in line
    assert "4 model requests (3 succeeded, 1 failed), 0 decisions (0 automated, 0 escalated, 0 fallback, 0 failed)" in line


def test_the_stop_line_counts_every_call_the_stop_refused(model_repo, caplog, monkeypatch):
    """The refused count was logged as the gate's quiet window ended, before gRPC's stop, while the gate goes on
    refusing what gRPC hands over until then: calls arriving after it were refused but in no count. One call is
    refused inside the window and one after it, both before gRPC stops; the stop line says 2, as the clients saw."""
    from kernel._proto.inference import grpc_service_pb2 as ipb
    from kernel._proto.inference import grpc_service_pb2_grpc as igrpc
    from kernel.api.entry_gate import REFUSAL, EntryGate

    caplog.set_level("INFO", logger="aios.server")
    server = start_kernel(model_repo, "sync")
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    ready = igrpc.GRPCInferenceServiceStub(channel).ModelReady
    seen = []

    def refused_call() -> None:
        with pytest.raises(grpc.RpcError) as refused:
            ready(ipb.ModelReadyRequest(name="tiny"), timeout=10)
        seen.append(refused.value.details())

    real_close, real_refuse = EntryGate.close, type(server)._refuse_new_calls

    def close_then_call(gate) -> None:  # a call arriving inside the quiet window
        real_close(gate)
        refused_call()

    def refuse_then_call(self, limit_s) -> None:  # and one after it, before gRPC's stop
        real_refuse(self, limit_s)
        refused_call()

    monkeypatch.setattr(EntryGate, "close", close_then_call)
    monkeypatch.setattr(type(server), "_refuse_new_calls", refuse_then_call)
    try:
        assert ready(ipb.ModelReadyRequest(name="tiny"), timeout=10).ready
        server.stop(grace=1)
    finally:
        channel.close()
    assert seen == [REFUSAL, REFUSAL] and server.refused_while_stopping == 2
    counts = [r.getMessage() for r in caplog.records if "refused" in r.getMessage() and "stopping" in r.getMessage()]
    (line,) = counts
    assert line.startswith("AIOS kernel stopped") and line.endswith(
        ", 2 new calls refused while stopping (UNAVAILABLE, aios-not-decided: not run)"), line
