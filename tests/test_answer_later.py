"""Calls answered later (kernel/api/answer_later.py): a ModelInfer whose work waits in the queue holds no
handler thread; the thread that runs its batch answers it. Counted in progress all the same, expired at its
deadline, answered on shutdown."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from conftest import start_kernel
from kernel._proto.inference import grpc_service_pb2 as pb
from kernel._proto.inference import grpc_service_pb2_grpc as pb_grpc
from kernel.api.expiry_timer import ExpiryTimer
from kernel.testing import onnx_models
from lane_support import SLOW_ROWS, occupy, request_for, save_slow_model, until



@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("later")
    save_slow_model(root)
    # ~1 ms a row: long enough that its calls are answered later (frontends.ANSWER_LATER_MIN_NS)
    onnx_models.save_mlp_version(root, "mid", [64, 2048, 2048, 8], seed=2, max_batch_size=8, provider="cpu")
    onnx_models.save_mlp_version(root, "tiny", [16, 64, 4], seed=3, max_batch_size=8, provider="cpu")
    return root


def _output(response) -> np.ndarray:
    return np.frombuffer(response.raw_output_contents[0], np.float32).reshape(tuple(response.outputs[0].shape))


@pytest.fixture
def kernel(request, repo):
    """A kernel with one lane slot (so a `slow` batch holds the lane); ``answer_later`` from indirect params."""
    server = start_kernel(repo, "sync", lane_slots=1, answer_later=getattr(request, "param", True))
    yield server
    server.stop(grace=2)  # (a no-op for a test that stopped it)


def _queue_behind(kernel, channel, model: str, inputs: list, batches: int = 4, **params) -> tuple[list, list]:
    """A train of `slow` batches on the lane, then one ``model`` call per input queued behind it:
    (train futures, queued call futures), once all the calls are in the queue."""
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    train = occupy(kernel, channel, batches)
    calls = [stub.ModelInfer.future(request_for(model, x, priority=2, **params), timeout=120) for x in inputs]
    queued = kernel.hub.get(model)
    until(lambda: kernel.lanes.load(queued)[0] == len(inputs), "the calls to queue")
    return train, calls


@pytest.mark.parametrize("kernel, model", [(True, "mid"), (False, "mid"), (True, "tiny")], indirect=["kernel"],
                         ids=["later", "blocking-by-setting", "blocking-short-batches"])
def test_a_queued_call_holds_no_handler_thread_and_is_answered_by_the_batch(kernel, channel, repo, model):
    session = ort.InferenceSession(str(repo / model / "1" / "model.onnx"))
    width = session.get_inputs()[0].shape[1]
    rng = np.random.default_rng(5)
    inputs = [rng.normal(size=(int(rng.integers(1, 5)), width)).astype(np.float32) for _ in range(20)]
    train, calls = _queue_behind(kernel, channel, model, inputs)
    in_pool, counted = kernel._pool.in_progress(), kernel._budget._in_progress()
    if kernel.settings.answer_later and model == "mid":
        # The running slow batch holds the one thread that runs it; the queued calls hold none...
        assert in_pool <= 2, f"{in_pool} handler threads busy while the calls wait in the queue"
        assert kernel._eager.outstanding.count >= 20
    else:  # ...where a blocking handler holds one thread per waiting call (the setting off, or a
        # model whose batches are too short to be worth handing the call on: ANSWER_LATER_MIN_NS)
        # (20 waiting; the thread running the slow batch may be a lane thread, not a handler thread:
        # the first slow call arrived to an idle server and ran on the poller, poller_inline)
        assert in_pool >= 20
    assert counted >= 23  # ...yet all count as in progress, as gRPC's limit counts them
    for call in train:
        call.result()
    for x, call in zip(inputs, calls):
        np.testing.assert_allclose(_output(call.result()), session.run(None, {"INPUT0": x})[0], rtol=1e-5, atol=1e-6)
    until(lambda: kernel._budget._in_progress() == 0, "every call to be counted out")
    assert kernel._eager.outstanding.count == 0


def test_a_queued_call_answered_later_expires_at_its_deadline_not_when_the_lane_frees(kernel, channel):
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    train = occupy(kernel, channel, batches=8)
    executed = kernel.hub.get("mid").stats.execution_count
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request_for("mid", np.ones((1, 64)), timeout=30_000, priority=2), timeout=60)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "never ran" in info.value.details()
    assert not all(call.done() for call in train)  # answered at its deadline, the lane still busy
    assert kernel.service.expiry.expired >= 1
    # One the queue cannot serve in time is refused at once, and leaves nothing for the timer to watch.
    refused = request_for("slow", np.ones((SLOW_ROWS, 64)), timeout=500_000, priority=1)
    refused.id = "refused"
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(refused, timeout=60)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value.details()
    watched = [cell[0].request_id for _, _, cell in list(kernel.service.expiry._heap) if cell[0] is not None]
    assert "refused" not in watched and len(watched) >= 1  # (the train's queued calls are watched)
    for call in train:
        call.result()
    assert kernel.hub.get("mid").stats.execution_count == executed
    assert kernel._eager.outstanding.count == 0


def test_calls_answered_later_are_answered_when_the_kernel_stops(kernel, channel):
    train, calls = _queue_behind(kernel, channel, "mid", [np.ones((1, 64))] * 10, batches=2)
    stopper = threading.Thread(target=kernel.stop, kwargs={"grace": 30})
    stopper.start()
    for call in [*train, *calls]:  # drained within the grace: every queued call gets its answer
        assert call.result().raw_output_contents
    stopper.join(60)


def test_queued_calls_answered_later_finish_when_their_model_is_unloaded(kernel, channel):
    """An unload lets the requests the model holds run on its old session (as Triton does); each call answered
    later gets its own answer and is counted out, none is left waiting for a lane that no longer has the model."""
    train, calls = _queue_behind(kernel, channel, "mid", [np.ones((1, 64))] * 5)
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="mid"), timeout=30)
    for call in calls:
        assert call.result(timeout=60).outputs
    for call in train:
        call.result()
    with pytest.raises(grpc.RpcError) as info:  # and nothing new reaches it
        stub.ModelInfer(request_for("mid", np.ones((1, 64), np.float32)), timeout=30)
    assert info.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE)
    until(lambda: kernel._eager.outstanding.count == 0, "every call to be counted out")


def test_under_mixed_deadlines_and_cancellations_every_call_ends_once_and_nothing_is_left_counted(kernel, channel):
    """120 calls answered later, in flight together behind a busy lane: some with deadlines that pass in the queue,
    some with Triton's ``timeout``, some cancelled by their client, the rest plain. Each ends exactly once with
    its own answer or a clear status, and afterwards nothing is left counted in progress or watched."""
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    rng = np.random.default_rng(17)
    train = occupy(kernel, channel, batches=3)
    calls = []
    for i in range(120):
        kind = ("plain", "grpc-deadline", "timeout", "cancel")[i % 4]
        x = rng.normal(size=(1, 64)).astype(np.float32)
        request = request_for("mid", x, priority=2, **({"timeout": int(rng.integers(5_000, 400_000))}
                                                       if kind == "timeout" else {}))
        request.id = f"c{i}"
        timeout = float(rng.uniform(0.02, 0.6)) if kind == "grpc-deadline" else 60
        calls.append((kind, request.id, stub.ModelInfer.future(request, timeout=timeout)))
    for kind, _, call in calls:
        if kind == "cancel":
            call.cancel()
    seen = {}
    for kind, request_id, call in calls:
        try:
            response = call.result(timeout=120)
            seen[request_id] = "OK"
            assert response.id == request_id  # its own answer
        except grpc.FutureCancelledError:
            seen[request_id] = "CANCELLED"
        except grpc.RpcError as exc:
            seen[request_id] = exc.code().name
            assert exc.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED,
                                  grpc.StatusCode.CANCELLED), (request_id, exc.code(), exc.details())
    for call in train:
        call.result()
    assert len(seen) == 120
    assert all(seen[request_id] == "OK" for kind, request_id, _ in calls if kind == "plain")
    assert {"DEADLINE_EXCEEDED", "CANCELLED"} <= set(seen.values())  # (both kinds of early end did happen)
    until(lambda: kernel._calls_in_progress() == 0, "every call to be counted out")
    assert kernel._eager.outstanding.count == 0
    until(lambda: kernel.service.expiry._live == 0, "every deadline watch to go")  # answered, or its deadline passed
    mid = kernel.hub.get("mid")
    assert kernel.lanes.load(mid) == (0, 0)


def test_a_call_whose_answer_cannot_be_sent_is_cancelled_not_left_waiting(kernel, channel, monkeypatch, caplog):
    """The injected fault: grpc's private ``_status`` raises (as it might in another grpcio). The call answered
    later must end (CANCELLED) instead of leaving its client waiting for a deadline it may not have set."""
    import grpc._server as grpc_server

    def broken_status(*args, **kwargs):
        raise RuntimeError("injected: grpc internals changed")

    train, calls = _queue_behind(kernel, channel, "mid", [np.ones((1, 64))] * 3, batches=1)
    monkeypatch.setattr(grpc_server, "_status", broken_status)
    for call in [*train, *calls]:
        with pytest.raises(grpc.RpcError) as info:
            call.result(timeout=60)
        assert info.value.code() == grpc.StatusCode.CANCELLED
    assert "the call is cancelled instead" in caplog.text
    until(lambda: kernel._calls_in_progress() == 0, "every call to be counted out")


# --------------------------------------------------------------------------- the expiry timer alone
class _Expired:
    def __init__(self):
        self.items = []
        self.event = threading.Event()

    def __call__(self, item) -> bool:
        self.items.append(item)
        if len(self.items) >= 2:
            self.event.set()
        return True


def test_the_expiry_timer_expires_in_deadline_order_and_skips_forgotten_items():
    expired = _Expired()
    timer = ExpiryTimer(expired)
    try:
        # Margins of hundreds of ms: "forgotten" must still be pending when the test forgets it, and a loaded
        # machine (a fresh-clone make test) took more than the 10 ms these steps once had.
        now = time.monotonic_ns()
        timer.watch("late", now + 900_000_000)
        forgotten = timer.watch("forgotten", now + 500_000_000)
        timer.watch("early", now + 700_000_000)  # earlier than one already waited for: the thread re-plans
        timer.forget(forgotten)
        assert time.monotonic_ns() < now + 500_000_000, "too slow to forget before the deadline: inconclusive"
        assert expired.event.wait(10)
        assert expired.items == ["early", "late"]
        assert time.monotonic_ns() >= now + 900_000_000
    finally:
        timer.close()


def test_the_expiry_timer_drops_forgotten_cells_once_they_outnumber_the_live_ones():
    timer = ExpiryTimer(lambda item: True)
    try:
        far = time.monotonic_ns() + 3600 * 10**9
        keep = [timer.watch(i, far) for i in range(300)]
        for cell in [timer.watch(i, far) for i in range(2000)]:
            timer.forget(cell)
        assert len(timer._heap) < 1300  # rebuilt without the forgotten ones along the way
        assert all(cell[0] is not None for cell in keep)
    finally:
        timer.close()


def test_a_second_answer_that_is_dropped_is_not_counted_as_a_failed_call():
    """A call answered once (here: its handler returned) and then failed by another thread (an expiry racing
    the batch) sends nothing the second time; the failed-calls counter must not count what was not sent."""
    from kernel.api.answer_later import LaterAnswer, Outstanding
    from kernel.errors import DeadlineExceeded
    from kernel.observability.refusals import CallRefusals

    refusals = CallRefusals()
    answer = LaterAnswer(None, None, None, None, Outstanding(), refusals=refusals)
    answer.method = "ModelInfer"
    assert answer.settle()
    answer.fail(DeadlineExceeded("too late"))
    assert refusals.snapshot() == {}
