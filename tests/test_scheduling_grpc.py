"""Scheduling seen through real gRPC clients: deadlines, cancellation, priorities, splitting, poison.

The kernel runs with one lane slot. A train of long priority-1 batches of the
`slow` model holds the lane while a test queues priority-2 (or lower)
requests for other models behind it; strict priority keeps them queued until
the train has passed.
"""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from kernel._proto.aios.kernel.v1 import kernel_pb2, kernel_pb2_grpc
from kernel._proto.inference import grpc_service_pb2_grpc as pb_grpc
from kernel.testing import onnx_models
from conftest import start_kernel
from lane_support import SLOW_ROWS, request_for, save_slow_model



@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("sched")
    # provider = "cpu" throughout: these tests time the CPU lane; tests/test_gpu.py covers the GPU lane.
    save_slow_model(root)
    onnx_models.save_mlp_version(root, "tiny", [16, 64, 4], seed=2, max_batch_size=8, max_tenant_queue=50,
                                 provider="cpu")
    # Two queued a priority level, three a tenant across the three levels (it was refused at load: "must be less
    # than max_queue (2)", though a tenant can queue six).
    onnx_models.save_mlp_version(root, "tenants", [16, 64, 4], seed=2, max_batch_size=8, max_queue=2,
                                 max_tenant_queue=3, provider="cpu")
    # About a millisecond per single-row call: responses overtake each other far less than that.
    onnx_models.save_mlp_version(root, "one", [64, 2048, 2048, 8], seed=3, max_batch_size=1, provider="cpu")
    onnx_models.save(onnx_models.lookup(), root / "lookup" / "1" / "model.onnx")
    (root / "lookup" / "1" / "model.toml").write_text(
        'provider = "cpu"\n[[input]]\nname = "x"\ndatatype = "FP32"\ndims = [1]\n'
        '[[output]]\nname = "y"\ndatatype = "FP32"\ndims = [2]\n')
    onnx_models.save(onnx_models.first_row(), root / "first_row" / "1" / "model.onnx")
    (root / "first_row" / "1" / "model.toml").write_text(
        'provider = "cpu"\nmax_batch_size = 8\n[[input]]\nname = "x"\ndatatype = "FP32"\ndims = [2]\n'
        '[[output]]\nname = "y"\ndatatype = "FP32"\ndims = [2]\n')
    return root


@pytest.fixture(scope="module", params=["sync", "aio"])
def kernel(request, repo):
    server = start_kernel(repo, request.param, lane_slots=1)
    yield server
    server.stop(grace=2)


@pytest.fixture
def stub(channel):
    return pb_grpc.GRPCInferenceServiceStub(channel)


def output(response) -> np.ndarray:
    return np.frombuffer(response.raw_output_contents[0], np.float32).reshape(tuple(response.outputs[0].shape))


def summaries(channel) -> dict:
    stub = kernel_pb2_grpc.AdminServiceStub(channel)
    return {m.name: m for m in stub.ListModels(kernel_pb2.ListModelsRequest()).models}


def wait_until(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
    raise AssertionError("condition not reached in time")


class LaneTrain:
    """Several long `slow` batches at priority 1, one after another on the lane's only slot."""

    def __init__(self, stub, channel, batches: int = 8):
        self.calls = [
            stub.ModelInfer.future(request_for("slow", np.ones((SLOW_ROWS, 64)), priority=1), timeout=120)
            for _ in range(batches)
        ]
        wait_until(lambda: summaries(channel)["slow"].running_batches == 1 or self.done())
        assert not self.done(), "the slow batches finished before the test could queue behind them"

    def done(self) -> bool:
        return all(call.done() for call in self.calls)

    def result(self) -> None:
        for call in self.calls:
            call.result()


def occupy_lane(stub, channel) -> LaneTrain:
    return LaneTrain(stub, channel)


def executions(kernel, model: str) -> int:
    return kernel.hub.get(model).stats.execution_count


def test_deadline_passing_in_queue_is_deadline_exceeded_and_never_runs(kernel, stub, channel):
    before = executions(kernel, "tiny")
    counters = summaries(channel)["tiny"].scheduler
    expired_before = counters.expired + counters.expired_before_queue
    blocker = occupy_lane(stub, channel)
    # Admission sees tiny's own queue empty, so it admits; the lane is busy far longer than 200 ms. (With 20 ms,
    # a loaded machine's handler thread once took 82 ms to reach the call: expired before it was queued.)
    late = request_for("tiny", np.ones((1, 16)), timeout=200_000, priority=2)
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(late, timeout=60)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "never ran" in info.value.details() or "before the kernel could start it" in info.value.details()
    assert not blocker.done()  # answered at its deadline, not when the lane came free
    blocker.result()
    assert executions(kernel, "tiny") == before  # the model never ran it
    counters = summaries(channel)["tiny"].scheduler
    assert counters.expired + counters.expired_before_queue == expired_before + 1


def test_client_cancellation_removes_the_queued_item(kernel, stub, channel):
    before = executions(kernel, "tiny")
    cancelled_before = summaries(channel)["tiny"].scheduler.cancelled
    blocker = occupy_lane(stub, channel)
    call = stub.ModelInfer.future(request_for("tiny", np.ones((1, 16)), priority=2), timeout=60)
    wait_until(lambda: summaries(channel)["tiny"].queued_requests == 1)
    call.cancel()
    wait_until(lambda: summaries(channel)["tiny"].scheduler.cancelled == cancelled_before + 1)
    assert summaries(channel)["tiny"].queued_requests == 0
    blocker.result()
    assert executions(kernel, "tiny") == before


def test_priority_one_overtakes_a_full_low_priority_queue(kernel, stub, channel, monkeypatch):
    from kernel.models.runtime import OnnxModel

    ran: list[float] = []  # the first value of each batch `one` runs: the order the lane ran them in
    run = OnnxModel.run

    def recording_run(self, feeds, options=None):
        if self.config.name == "one":
            ran.append(float(next(iter(feeds.values())).flat[0]))
        return run(self, feeds, options)

    monkeypatch.setattr(OnnxModel, "run", recording_run)
    blocker = occupy_lane(stub, channel)
    low = [stub.ModelInfer.future(request_for("one", np.full((1, 64), i + 1), priority=3), timeout=60) for i in range(20)]
    wait_until(lambda: summaries(channel)["one"].queued_requests == 20)
    urgent = stub.ModelInfer.future(request_for("one", np.zeros((1, 64)), priority=2), timeout=60)
    wait_until(lambda: summaries(channel)["one"].queued_requests == 21)
    blocker.result()
    urgent.result()
    for call in low:
        call.result()
    # One request per batch, one lane slot: the urgent one (level 2) runs before the 20 (level 3) queued
    # earlier; first-come-first-served would run all 20 first. (Judged by the lane's order, not by when
    # answers reach the client: handler threads wake in no particular order under load.)
    assert ran.index(0.0) == 0, f"the lane ran {ran.index(0.0)} low-priority requests before the urgent one: {ran}"


def test_random_row_counts_come_back_exactly_split(kernel, stub, channel, repo):
    """48 requests of 1-8 rows queue behind a long batch, then share batches of up to 8 rows.

    (48 plus the train's 8 stay far below the sync front end's handler threads, so all are held at once.)"""
    session = ort.InferenceSession(str(repo / "tiny" / "1" / "model.onnx"))
    before = executions(kernel, "tiny")
    rng = np.random.default_rng(11)
    inputs = [rng.normal(size=(int(rng.integers(1, 9)), 16)).astype(np.float32) for _ in range(48)]
    blocker = occupy_lane(stub, channel)
    calls = [stub.ModelInfer.future(request_for("tiny", x, priority=2), timeout=60) for x in inputs]
    wait_until(lambda: summaries(channel)["tiny"].queued_requests == 48)
    blocker.result()
    for x, call in zip(inputs, calls):
        np.testing.assert_allclose(output(call.result()), session.run(None, {"INPUT0": x})[0], rtol=1e-5, atol=1e-6)
    assert executions(kernel, "tiny") - before < 48  # requests shared batches, and each got its own rows


def _lookup_statistics(stub):
    from kernel._proto.inference import grpc_service_pb2 as pb

    (stats,) = stub.ModelStatistics(pb.ModelStatisticsRequest(name="lookup")).model_stats
    return stats


def test_a_poisoned_request_fails_alone(kernel, stub, channel):
    before = _lookup_statistics(stub)
    blocker = occupy_lane(stub, channel)
    good = [
        stub.ModelInfer.future(request_for("lookup", np.array([[i % 4]]), input_name="x", priority=2), timeout=60)
        for i in range(5)
    ]
    poisoned = stub.ModelInfer.future(request_for("lookup", np.array([[np.nan]]), input_name="x", priority=2), timeout=60)
    wait_until(lambda: summaries(channel)["lookup"].queued_requests == 6)
    blocker.result()
    for i, call in enumerate(good):
        np.testing.assert_array_equal(output(call.result()), [[2 * (i % 4), 2 * (i % 4) + 1]])
    with pytest.raises(grpc.RpcError) as info:
        poisoned.result()
    # Alone it still fails, with onnxruntime's INVALID_ARGUMENT: the request's own input (INTERNAL invited a retry).
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert "refused this request's input" in info.value.details() and "request id" in info.value.details()
    # The statistics count the model calls that succeeded, as Triton's do: the failed batch of six is none, the
    # five requests that then succeeded alone are five executions of one row, each charged its own run (they
    # were one execution of six charged every retry, 11x its compute, in a statistics audit).
    after = _lookup_statistics(stub)
    assert after.execution_count - before.execution_count == 5
    assert after.inference_count - before.inference_count == 5
    sizes = {b.batch_size: b.compute_infer.count for b in after.batch_stats}
    sizes_before = {b.batch_size: b.compute_infer.count for b in before.batch_stats}
    assert sizes.get(6, 0) == sizes_before.get(6, 0) and sizes.get(1, 0) - sizes_before.get(1, 0) == 5
    ran_alone = {b.batch_size: b.compute_infer.ns for b in after.batch_stats}[1] - \
        {b.batch_size: b.compute_infer.ns for b in before.batch_stats}.get(1, 0)
    charged = after.inference_stats.compute_infer.ns - before.inference_stats.compute_infer.ns
    assert charged == ran_alone  # each success its own run, nothing of the failed batch or the poisoned run
    assert after.inference_stats.fail.count - before.inference_stats.fail.count == 1


def test_requests_whose_deadline_passed_while_their_batch_failed_are_not_retried(kernel, stub, channel, monkeypatch):
    """A failed batch retries its requests one by one, but a request whose deadline passed meanwhile must not run:
    its answer would be DEADLINE_EXCEEDED whatever the run gave (each late retry ran, holding the lane, and was then
    thrown away). The injected faults: `slow`'s run is held while four `lookup` requests (one poisoned) queue behind
    it, each with a 1 s timeout; their batch's failing run is held until all four deadlines have passed."""
    from kernel.models.runtime import OnnxModel

    release, running, ran, queued_by = threading.Event(), threading.Event(), [], []
    run = OnnxModel.run

    def faulty_run(self, feeds, options=None):
        rows = len(next(iter(feeds.values())))
        if self.config.name == "slow":
            running.set()
            release.wait(30)
        elif self.config.name == "lookup":
            ran.append(rows)
            if rows == 4:  # the batch: its requests arrived before queued_by[0], their deadlines 1 s after arrival
                while time.monotonic() < queued_by[0] + 1.05:
                    threading.Event().wait(0.01)
        return run(self, feeds, options)

    monkeypatch.setattr(OnnxModel, "run", faulty_run)
    try:
        blocker = stub.ModelInfer.future(request_for("slow", np.ones((1, 64)), priority=2), timeout=60)
        assert running.wait(30)
        calls = [stub.ModelInfer.future(request_for("lookup", np.array([[np.nan if i == 2 else i]]), input_name="x",
                                                     priority=2, timeout=1_000_000), timeout=60) for i in range(4)]
        wait_until(lambda: summaries(channel)["lookup"].queued_requests == 4)
        queued_by.append(time.monotonic())
        release.set()
        assert blocker.result().raw_output_contents
        codes = []
        for call in calls:
            with pytest.raises(grpc.RpcError) as info:
                call.result()
            codes.append(info.value.code())
    finally:
        release.set()
    assert ran == [4], ran  # the failed batch alone: no retry ran after the deadlines
    assert codes == [grpc.StatusCode.DEADLINE_EXCEEDED] * 4


def test_a_batch_answered_with_the_wrong_number_of_rows_is_never_sliced_out_to_its_requests(kernel, stub, channel,
                                                                                              caplog):
    """(Test-suite audit: deleting this check left the suite green) first_row answers one row for any batch:
    sliced, the first request would get its row and the other three nothing. The batch fails as the model's fault
    and each request, run alone, gets its own row back."""
    blocker = occupy_lane(stub, channel)
    rows = [np.array([[i, 10 * i]], dtype=np.float32) for i in range(1, 5)]
    calls = [stub.ModelInfer.future(request_for("first_row", row, input_name="x", priority=2), timeout=60)
             for row in rows]
    wait_until(lambda: summaries(channel)["first_row"].queued_requests == 4)
    blocker.result()
    for row, call in zip(rows, calls):
        np.testing.assert_array_equal(output(call.result()), row)
    assert "model first_row/1 returned (1, 2) for a batch of 4 rows" in caplog.text


def _tenant_bound_refuses(stub, channel, model: str, priorities, over_priority: int) -> None:
    """Queue tenant t1's requests at ``priorities`` behind a busy lane; one more of t1's (at ``over_priority``) is
    refused for its tenant with a retry hint, while tenant t2's at that level gets in, and every queued one runs."""
    blocker = occupy_lane(stub, channel)
    queued = []
    for priority in priorities:
        request = request_for(model, np.ones((1, 16)), priority=priority)
        request.parameters["tenant"].string_param = "t1"
        queued.append(stub.ModelInfer.future(request, timeout=60))
    wait_until(lambda: summaries(channel)[model].queued_requests == len(priorities))
    over = request_for(model, np.ones((1, 16)), priority=over_priority)
    over.parameters["tenant"].string_param = "t1"
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(over, timeout=60)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "tenant t1 has too many requests queued" in info.value.details()
    assert f"max_tenant_queue {len(priorities)}, across the priority levels" in info.value.details()
    assert "retry-after-ms" in dict(info.value.trailing_metadata())
    over.parameters["tenant"].string_param = "t2"
    other = stub.ModelInfer.future(over, timeout=60)
    blocker.result()
    assert other.result().raw_output_contents
    assert all(call.result().raw_output_contents for call in queued)


def test_tenant_over_its_queue_bound_is_refused(kernel, stub, channel):
    """tiny allows 50 queued requests per named tenant: the 51st of tenant t1 is refused, t2 still gets in."""
    _tenant_bound_refuses(stub, channel, "tiny", [2] * 50, over_priority=2)
    assert summaries(channel)["tiny"].scheduler.rejected_tenant_full >= 1


def test_a_tenant_bound_above_max_queue_binds_across_the_priority_levels(kernel, stub, channel):
    """max_queue bounds each priority level and max_tenant_queue a tenant across them: with max_queue = 2 and a
    tenant bound of 3, tenant t1's fourth request is refused for its tenant although its level has room (level 3
    holds one of its two, and another tenant gets in there)."""
    _tenant_bound_refuses(stub, channel, "tenants", [2, 2, 3], over_priority=3)
    assert summaries(channel)["tenants"].scheduler.rejected_tenant_full == 1


def test_a_full_queue_is_refused_naming_the_priority_level_and_its_bound(kernel, stub, channel):
    """max_queue bounds each priority level: the refusal says which level is full and its bound (it said only
    "model tenants/1's queue is full", though the next level down still had room), and that level alone refuses."""
    blocker = occupy_lane(stub, channel)
    queued = [stub.ModelInfer.future(request_for("tenants", np.ones((1, 16)), priority=2), timeout=60)
              for _ in range(2)]
    wait_until(lambda: summaries(channel)["tenants"].queued_requests == 2)
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request_for("tenants", np.ones((1, 16)), priority=2), timeout=60)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "model tenants/1's queue for priority 2 is full (max_queue 2 a priority level)" in info.value.details()
    assert "retry-after-ms" in dict(info.value.trailing_metadata())
    queued.append(stub.ModelInfer.future(request_for("tenants", np.ones((1, 16)), priority=3), timeout=60))
    blocker.result()
    assert all(call.result().raw_output_contents for call in queued)


def test_sync_front_end_refuses_calls_beyond_its_workers_at_once(repo, monkeypatch):
    """Past `workers` calls in progress, a call is refused with RESOURCE_EXHAUSTED instead of
    waiting in gRPC's own queue, where no deadline or priority would be looked at.

    The calls that fill the workers are sent one at a time, each once the one before is in the lane: three sent
    at once may all reach the kernel before any of their request messages, and past `workers` less the
    priority-1 reserve (2 here) calls waiting for their message one of them is ended at once (eager_receive.py's
    waiting bound: 5 of 11 runs under two busy loops, "its request message had not come 0 ms after the call
    began"). Their model runs are held (the injected fault) so that none finishes before the workers are full."""
    from lane_support import hold_model_runs

    server = start_kernel(repo, "sync", lane_slots=1, workers=3)
    release, _ = hold_model_runs(monkeypatch)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            slow = server.hub.get("slow")
            # Priority 1, so they may take every thread (lower priorities leave the last one: call_budget.py).
            calls = []
            for count in range(1, 4):
                calls.append(stub.ModelInfer.future(request_for("slow", np.ones((SLOW_ROWS, 64)), priority=1),
                                                    timeout=120))
                wait_until(lambda: sum(server.lanes.load(slow)) == count or any(call.done() for call in calls))
                # (a call done here was refused before the test could fill the workers: say how, if it fails)
                assert not any(call.done() for call in calls), \
                    [(call.code(), call.details()) for call in calls if call.done()]
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(request_for("tiny", np.ones((1, 16))), timeout=60)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            release.set()
            for call in calls:
                assert call.result().raw_output_contents
    finally:
        release.set()
        server.stop(grace=2)


def test_a_deadline_the_queue_cannot_meet_is_refused_at_once_with_a_retry_hint(kernel, stub, channel):
    """Eight long `slow` batches queued ahead: a `slow` request that must finish within 50 ms is refused
    on arrival (RESOURCE_EXHAUSTED with retry-after-ms), not queued to expire."""
    train = occupy_lane(stub, channel)
    refused_before = summaries(channel)["slow"].scheduler.rejected_deadline
    failed_before = kernel.hub.get("slow").stats.fail.count
    # One row: alone it would finish well inside 50 ms, so it is the queue ahead that makes it late.
    hurried = request_for("slow", np.ones((1, 64)), timeout=50_000, priority=1)
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(hurried, timeout=60)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value.details()
    assert "cannot finish this request before its deadline" in info.value.details()
    assert int(dict(info.value.trailing_metadata())["retry-after-ms"]) > 50
    counters = summaries(channel)["slow"].scheduler
    assert counters.rejected_deadline == refused_before + 1
    assert kernel.hub.get("slow").stats.fail.count == failed_before + 1  # ModelStatistics' fail, as in Triton
    assert 1.0 <= counters.service_stretch <= 8.0  # the factor admission scales its predicted wait by
    train.result()


def test_a_deadline_an_idle_model_cannot_meet_is_deadline_exceeded_naming_its_run(kernel, stub, channel):
    """Nothing queued or running: a `slow` request whose deadline is shorter than its own batch is
    DEADLINE_EXCEEDED (no retry hint: retrying cannot help), naming its predicted run, not RESOURCE_EXHAUSTED."""
    import re

    slow = kernel.hub.get("slow")
    wait_until(lambda: sum(kernel.lanes.load(slow)) == 0)
    alone_ms = kernel.lanes.cpu.predict(slow, SLOW_ROWS) / 1e6
    assert alone_ms > 1.0, "the latency fit has not timed a full slow batch"
    hopeless = request_for("slow", np.ones((SLOW_ROWS, 64)), timeout=int(alone_ms * 1000 / 4), priority=1)
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(hopeless, timeout=60)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, info.value.details()
    named = float(re.search(r"predicted to take ([\d.]+) ms", info.value.details()).group(1))
    assert 0.5 * alone_ms <= named <= 8 * alone_ms, (named, alone_ms)  # its own run (stretched at most STRETCH_MAX)
    assert "retry-after-ms" not in dict(info.value.trailing_metadata() or ())


def test_requests_failed_outside_the_scheduler_are_counted_by_reason(kernel, stub, channel, monkeypatch):
    """A statistics audit: a deadline passed before queueing and a model that finished after the deadline
    reached the client as DEADLINE_EXCEEDED and no counter by reason (the latter only ModelStatistics' fail)."""
    from kernel.models.runtime import OnnxModel

    before = summaries(channel)["tiny"].scheduler
    with pytest.raises(grpc.RpcError) as info:  # 1 µs from arrival: passed before the kernel could queue it
        stub.ModelInfer(request_for("tiny", np.ones((1, 16)), timeout=1), timeout=60)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "before the kernel" in info.value.details()
    run = OnnxModel.run

    def slow_run(self, feeds, options=None):  # the injected fault: this run takes 300 ms, past the request's 100 ms
        outputs = run(self, feeds, options)  # (finished, then late: a run stopped at the deadline is no late finish)
        threading.Event().wait(0.3)
        return outputs

    monkeypatch.setattr(OnnxModel, "run", slow_run)
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request_for("tiny", np.ones((1, 16)), timeout=100_000), timeout=60)
    monkeypatch.undo()
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "after the request's deadline" in \
        info.value.details(), info.value.details()
    after = summaries(channel)["tiny"].scheduler
    assert after.expired_before_queue == before.expired_before_queue + 1
    assert after.finished_late == before.finished_late + 1
    assert after.expired == before.expired  # (neither ever waited in the queue)


def test_a_reload_keeps_counting_model_statistics(kernel, stub):
    from kernel._proto.inference import grpc_service_pb2 as pb

    def statistics():
        (stats,) = stub.ModelStatistics(pb.ModelStatisticsRequest(name="tiny")).model_stats
        return stats

    stub.ModelInfer(request_for("tiny", np.ones((2, 16))), timeout=60)
    before = statistics()
    assert before.inference_count >= 2
    stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="tiny"), timeout=60)  # the same files
    stub.ModelInfer(request_for("tiny", np.ones((1, 16))), timeout=60)
    after = statistics()
    # Counting on where it was (it was zeroed, and requests queued at the reload were counted nowhere).
    assert after.inference_count == before.inference_count + 1
    assert after.inference_stats.success.count == before.inference_stats.success.count + 1


def test_a_call_refused_for_the_threads_kept_for_priority_1_is_counted_for_its_model(repo):
    """The kernel's own refusal of a lower-priority call once the threads left are the ones kept for priority 1
    (call_budget.py) is counted for the model (``rejected_busy``) and as a failure (a statistics audit: this
    overload signal was in no counter). (gRPC's own "Concurrent RPC limit exceeded!" never reaches the kernel.)"""
    server = start_kernel(repo, "sync", lane_slots=1, workers=3)  # one thread kept for priority 1
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            slow = server.hub.get("slow")
            tiny = server.hub.get("tiny").stats  # (read in process: the threads are taken)
            calls = [stub.ModelInfer.future(request_for("slow", np.ones((SLOW_ROWS, 64)), priority=1), timeout=120)
                     for _ in range(2)]
            wait_until(lambda: sum(server.lanes.load(slow)) == 2 or any(call.done() for call in calls))
            # (a call done here finished or was refused before the test could fill the workers: say which, if it fails)
            assert not any(call.done() for call in calls), [(call.code(), call.details()) for call in calls if call.done()]
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(request_for("tiny", np.ones((1, 16)), priority=2), timeout=60)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "kept for priority 1" in info.value.details(), info.value.details()
            assert (tiny.rejected_busy, tiny.fail.count) == (1, 1)
            for call in calls:
                assert call.result().raw_output_contents
            assert summaries(channel)["tiny"].scheduler.rejected_busy == 1
    finally:
        server.stop(grace=2)


def test_an_answer_found_late_after_its_batch_is_a_failure_finished_late(kernel, stub, channel, monkeypatch):
    """The lane found the request in time, but its answer was ready only after the deadline (its caller
    waited, for the GIL in production; here the injected fault holds the encoding 300 ms): DEADLINE_EXCEEDED,
    and a failure in the statistics, not the success its batch counted (a statistics audit)."""
    from kernel._proto.inference import grpc_service_pb2 as pb
    from kernel.api.inference import InferenceService

    def statistics():
        (stats,) = stub.ModelStatistics(pb.ModelStatisticsRequest(name="tiny")).model_stats
        return stats

    respond = InferenceService.respond

    def slow_respond(self, request, item):  # the injected fault: encoding the answer takes 300 ms
        threading.Event().wait(0.3)
        return respond(self, request, item)

    before, late_before = statistics(), summaries(channel)["tiny"].scheduler.finished_late
    monkeypatch.setattr(InferenceService, "respond", slow_respond)
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request_for("tiny", np.ones((2, 16)), timeout=100_000), timeout=60)
    monkeypatch.undo()
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "answer was ready" in info.value.details()
    after = statistics()
    assert after.inference_count == before.inference_count
    assert after.inference_stats.success.count == before.inference_stats.success.count
    assert after.inference_stats.fail.count == before.inference_stats.fail.count + 1
    assert after.inference_stats.compute_infer.count == before.inference_stats.compute_infer.count
    assert after.execution_count == before.execution_count + 1  # the model did run
    assert summaries(channel)["tiny"].scheduler.finished_late == late_before + 1
