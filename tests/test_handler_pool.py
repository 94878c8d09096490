"""HandlerPool: the sync front end's thread pool, as grpc.server uses it (submit + add_done_callback)."""

from __future__ import annotations

import threading

import grpc
import pytest

from kernel.api.handler_pool import HandlerPool


def test_runs_calls_and_callbacks_in_order_of_completion():
    pool = HandlerPool(4)
    done = threading.Event()
    seen = []

    call = pool.submit(lambda a, b: seen.append(a + b), 2, 3)
    call.add_done_callback(lambda c: (seen.append(("callback", c is call)), done.set()))
    assert done.wait(10)
    assert seen == [5, ("callback", True)]
    assert call.done()
    pool.shutdown()


def test_callback_added_after_the_call_ran_runs_at_once():
    pool = HandlerPool(1)
    ran = threading.Event()
    first = pool.submit(ran.set)
    assert ran.wait(10)
    # The worker marks the call done under the pool lock; a second call
    # queued behind it proves the first one is finished.
    second_ran = threading.Event()
    pool.submit(second_ran.set)
    assert second_ran.wait(10)
    assert first.done()
    calls = []
    first.add_done_callback(calls.append)  # on this thread, before returning
    assert calls == [first]
    pool.shutdown()


def test_threads_grow_only_when_none_is_idle_and_never_past_the_limit():
    pool = HandlerPool(3, initializer=lambda: names.append(threading.current_thread().name))
    names: list[str] = []
    gate = threading.Event()
    started = threading.Semaphore(0)

    def blocked():
        started.release()
        gate.wait(10)

    for _ in range(5):  # three run at once, two wait in the queue
        pool.submit(blocked)
    for _ in range(3):
        assert started.acquire(timeout=10)
    assert not started.acquire(timeout=0.05)  # the limit holds: no fourth thread
    gate.set()
    for _ in range(2):
        assert started.acquire(timeout=10)
    pool.shutdown()
    assert len(names) == 3  # the initializer ran once per thread


def test_a_failing_call_or_callback_does_not_kill_the_thread(caplog):
    pool = HandlerPool(1)
    done = threading.Event()

    def boom():
        raise RuntimeError("call failed")

    call = pool.submit(boom)
    call.add_done_callback(lambda c: (_ for _ in ()).throw(RuntimeError("callback failed")))
    pool.submit(done.set)
    assert done.wait(10)  # the single thread lived on
    pool.shutdown()
    assert "a handler pool call raised" in caplog.text


def test_submit_after_shutdown_is_refused():
    pool = HandlerPool(2)
    pool.shutdown()
    with pytest.raises(RuntimeError):
        pool.submit(print)


def test_a_real_grpc_server_serves_on_it():
    from tests.conftest import free_port

    def echo(request, context):
        return request

    handler = grpc.method_handlers_generic_handler(
        "t.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)})
    pool = HandlerPool(4)  # 16 callers share 4 threads: calls wait in the pool's queue
    server = grpc.server(pool, maximum_concurrent_rpcs=16)
    server.add_generic_rpc_handlers([handler])
    port = server.add_insecure_port(f"127.0.0.1:{free_port()}")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary("/t.Echo/Echo")
            results = []
            threads = [threading.Thread(target=lambda i=i: results.append(call(bytes([i]) * 8, timeout=10)))
                       for i in range(16)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            # grpc counts calls in progress through the done-callbacks: if they never
            # ran, the count would stay at 16 and these would all be refused.
            for i in range(40):
                assert call(b"x%d" % i, timeout=10) == b"x%d" % i
        assert sorted(results) == sorted(bytes([i]) * 8 for i in range(16))
    finally:
        server.stop(None).wait()
        pool.shutdown()


def test_on_overlap_flips_only_when_calls_start_to_overlap_and_when_the_pool_goes_idle():
    flips: list[bool] = []
    pool = HandlerPool(8, on_overlap=flips.append)
    gate = threading.Event()
    started = threading.Semaphore(0)

    def blocked():
        started.release()
        gate.wait(10)

    finished = threading.Semaphore(0)
    for _ in range(4):  # the third and fourth arrive with two or more in progress
        pool.submit(blocked).add_done_callback(lambda call: finished.release())
    for _ in range(4):
        assert started.acquire(timeout=10)
    assert flips == [True]  # told once, not once per call
    gate.set()
    for _ in range(4):  # done-callbacks run after the pool counted the call finished
        assert finished.acquire(timeout=10)
    done = threading.Event()
    pool.submit(done.set)  # arrives to an idle pool
    assert done.wait(10)
    assert flips == [True, False]
    pool.shutdown()


def test_a_call_run_by_its_submitter_on_an_idle_pool_also_ends_the_overlap():
    # eager_receive runs a lone call on the poller (poller_inline) without submitting it: the poller must
    # still get its own scheduling policy back, as a submit to the idle pool would give it.
    flips: list[bool] = []
    pool = HandlerPool(8, on_overlap=flips.append)
    gate = threading.Event()
    started = threading.Semaphore(0)
    finished = threading.Semaphore(0)

    def blocked():
        started.release()
        gate.wait(10)

    for _ in range(3):
        pool.submit(blocked).add_done_callback(lambda call: finished.release())
    for _ in range(3):
        assert started.acquire(timeout=10)
    assert flips == [True]
    gate.set()
    for _ in range(3):
        assert finished.acquire(timeout=10)
    assert pool.arrival_while_idle() and flips == [True, False]
    assert pool.arrival_while_idle() and flips == [True, False]  # told once
    pool.shutdown()
    assert not pool.arrival_while_idle()  # closed: the caller takes submit, which refuses
