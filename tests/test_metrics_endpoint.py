"""The Prometheus endpoint (metrics_port): what it counts is what the clients saw, by reason, across reloads.

Real kernels on free ports, real tritonclient and DecisionClient calls, the
endpoint scraped over HTTP and parsed with prometheus_client's own parser.
"""

from __future__ import annotations

import logging
import shutil
import socket
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from conftest import free_port, start_claims_kernel, start_kernel
from prometheus_client.parser import text_string_to_metric_families

from kernel.testing import onnx_models

# A model that holds its first request in a 1-second batching window, with room for one queued request per level:
# a second request meanwhile is refused (queue_full), and one whose deadline is shorter than the window expires in
# the queue. Both are decided by the scheduler, deterministically, whatever the machine's speed.
WINDOWED_TOML = onnx_models.mlp_toml(16, 4, max_batch_size=8, max_queue=1, max_queue_delay_us=1_000_000)


def scrape(port: int) -> dict:
    """{(sample name, frozenset of labels): value} and the families, from one GET /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    families = list(text_string_to_metric_families(text))
    samples = {(s.name, frozenset(s.labels.items())): s.value for f in families for s in f.samples}
    return {"samples": samples, "families": families}


def value(scraped: dict, name: str, **labels) -> float:
    return scraped["samples"].get((name, frozenset(labels.items())), 0.0)


def _row(width: int = 16) -> tc.InferInput:
    x = tc.InferInput("INPUT0", [1, width], "FP32")
    x.set_data_from_numpy(np.random.rand(1, width).astype(np.float32))
    return x


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("metrics-models")
    onnx_models.save_mlp_version(root, "tiny", [16, 8, 4], seed=1, max_batch_size=8)
    onnx_models.save(onnx_models.mlp([16, 8, 4], seed=2), root / "windowed" / "1" / "model.onnx")
    (root / "windowed" / "1" / "model.toml").write_text(WINDOWED_TOML)
    onnx_models.save(onnx_models.lookup(), root / "lookup" / "1" / "model.onnx")
    return root


@pytest.fixture
def kernel(repo):
    server = start_kernel(repo, metrics_port=free_port())
    yield server
    server.stop(grace=0)


def _hold_window_and_refuse(client: tc.InferenceServerClient, metrics_port: int) -> tuple[str, str]:
    """One request held in the window (it succeeds when the window closes) and one refused meanwhile because the
    queue is full; returns their outcomes as the clients saw them."""
    done = threading.Event()
    outcome = {}

    def held(result, error):
        outcome["held"] = "OK" if error is None else error.status()
        done.set()

    client.async_infer("windowed", [_row()], held)
    deadline = time.monotonic() + 10  # (the second request is sent once the first is queued, not before it)
    while not value(scrape(metrics_port), "aios_model_queued_requests", model="windowed", version="1"):
        assert time.monotonic() < deadline and not done.is_set(), outcome
    try:
        client.infer("windowed", [_row()])
        refused = "OK"
    except tc.InferenceServerException as exc:
        refused = exc.status()
    assert done.wait(10)
    return outcome["held"], refused


def test_model_counters_match_what_the_clients_saw(kernel):
    client = tc.InferenceServerClient(f"127.0.0.1:{kernel.port}")
    seen = {"ok": 0, "refused_input": 0}
    for _ in range(25):
        client.infer("tiny", [_row()])
        seen["ok"] += 1
    bad = tc.InferInput("x", [1, 1], "FP32")
    bad.set_data_from_numpy(np.array([[100.0]], np.float32))  # outside lookup's 4-row table: onnxruntime refuses it
    for _ in range(3):
        with pytest.raises(tc.InferenceServerException) as refused:
            client.infer("lookup", [bad])
        assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
        seen["refused_input"] += 1
    held, refused = _hold_window_and_refuse(client, kernel.metrics_port)
    assert (held, refused) == ("OK", "StatusCode.RESOURCE_EXHAUSTED")
    # A deadline shorter than the window: it expires in the queue, never runs (DEADLINE_EXCEEDED).
    with pytest.raises(tc.InferenceServerException) as expired:
        client.infer("windowed", [_row()], client_timeout=0.3)
    assert expired.value.status() == "StatusCode.DEADLINE_EXCEEDED"

    got = scrape(kernel.metrics_port)
    assert value(got, "aios_model_requests_total", model="tiny", version="1", result="success") == seen["ok"]
    assert value(got, "aios_model_inferences_total", model="tiny", version="1") == seen["ok"]
    assert value(got, "aios_model_requests_total", model="lookup", version="1", result="failure") == 3
    assert value(got, "aios_model_errors_total", model="lookup", version="1", kind="refused_input") == 3
    windowed = {"model": "windowed", "version": "1"}
    assert value(got, "aios_model_requests_total", **windowed, result="success") == 1
    assert value(got, "aios_model_rejected_total", **windowed, reason="queue_full") == 1
    # (The expiry is counted once the kernel sees the deadline pass: the client gave up at the same moment.)
    deadline = time.monotonic() + 10
    while value(got, "aios_model_requests_total", **windowed, result="failure") < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
        got = scrape(kernel.metrics_port)
    assert value(got, "aios_model_requests_total", **windowed, result="failure") == 2
    # Once, under one reason: expired "queued" as a rule; on a loaded machine "before_queue" (the call delayed past
    # 0.3 s), or cancelled (the client's end of the deadline heard before the kernel's own).
    assert sum(value(got, "aios_model_expired_total", **windowed, where=where)
               for where in ("before_queue", "queued", "batch_predicted", "finished_late")) \
        + value(got, "aios_model_cancelled_total", **windowed) == 1
    # Every failure has its reason: refusals, expiries, model errors and cancellations add up to the failures.
    for model in ("tiny", "lookup", "windowed"):
        labels = {"model": model, "version": "1"}
        reasons = sum(v for (name, lbl), v in got["samples"].items()
                      if name in ("aios_model_rejected_total", "aios_model_expired_total", "aios_model_errors_total",
                                  "aios_model_cancelled_total") and {"model": model, "version": "1"}.items() <= dict(lbl).items())
        assert reasons == value(got, "aios_model_requests_total", **labels, result="failure"), model
    assert value(got, "aios_ready") == 1
    assert value(got, "aios_model_ready", model="tiny", version="1") == 1
    assert value(got, "process_resident_memory_bytes") > 0


def test_counters_keep_counting_across_a_reload(kernel):
    """A reload makes a new copy of the version with scheduler counters of its own; the old copy's must not vanish
    (Prometheus reads a counter that goes back as a reset, and counts what follows twice)."""
    client = tc.InferenceServerClient(f"127.0.0.1:{kernel.port}")
    windowed = {"model": "windowed", "version": "1"}
    assert _hold_window_and_refuse(client, kernel.metrics_port) == ("OK", "StatusCode.RESOURCE_EXHAUSTED")
    assert value(scrape(kernel.metrics_port), "aios_model_rejected_total", **windowed, reason="queue_full") == 1
    client.load_model("windowed")  # a reload: a new copy of version 1
    after_reload = scrape(kernel.metrics_port)
    assert value(after_reload, "aios_model_rejected_total", **windowed, reason="queue_full") == 1
    assert value(after_reload, "aios_model_requests_total", **windowed, result="success") == 1
    assert _hold_window_and_refuse(client, kernel.metrics_port) == ("OK", "StatusCode.RESOURCE_EXHAUSTED")
    got = scrape(kernel.metrics_port)
    assert value(got, "aios_model_rejected_total", **windowed, reason="queue_full") == 2
    assert value(got, "aios_model_requests_total", **windowed, result="failure") == 2


def test_names_units_and_labels_are_conventional_and_bounded(kernel):
    client = tc.InferenceServerClient(f"127.0.0.1:{kernel.port}")
    for tenant in range(5):  # distinct tenants and request ids must not make series
        client.infer("tiny", [_row()], request_id=f"request-{tenant}", parameters={"tenant": f"tenant-{tenant}"})
    first = scrape(kernel.metrics_port)
    for tenant in range(5, 40):
        client.infer("tiny", [_row()], request_id=f"request-{tenant}", parameters={"tenant": f"tenant-{tenant}"})
    second = scrape(kernel.metrics_port)
    assert set(first["samples"]) == set(second["samples"])  # the same series, only their values moved
    for family in second["families"]:
        if not family.name.startswith("aios_"):
            continue
        assert family.documentation, family.name
        for sample in family.samples:
            assert not {"tenant", "request_id", "error", "message"} & set(sample.labels), sample
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples), family.name
        if family.type in ("summary", "histogram"):
            assert family.name.endswith("_seconds"), family.name


def test_decisions_reviews_and_audit_are_counted(claims_models, tmp_path):
    from claims_support import UNSURE_CASE, claim_request

    from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
    from kernel._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc

    server = start_claims_kernel(claims_models, tmp_path, metrics_port=free_port())
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            decide = kgrpc.DecisionServiceStub(channel).Decide
            reviews = kgrpc.ReviewServiceStub(channel)
            sure = dict(UNSURE_CASE, fraud_score=0.95, has_police_report=False)  # R01: deny, automated
            outcomes = [decide(claim_request(case)).outcome for case in (UNSURE_CASE, UNSURE_CASE, sure)]
            assert outcomes == [kpb.ESCALATED, kpb.ESCALATED, kpb.AUTOMATED]
            got = scrape(server.metrics_port)
            assert value(got, "aios_decisions_total", pipeline="claims_triage", outcome="escalated") == 2
            assert value(got, "aios_decisions_total", pipeline="claims_triage", outcome="automated") == 1
            assert value(got, "aios_audit_fsync_duration_seconds_count") >= 1
            assert value(got, "aios_audit_records") >= 3
            # Reviews are stored in the background: wait for both rows, then claim one.
            deadline = time.monotonic() + 10
            while value(got, "aios_reviews", pipeline="claims_triage", state="open") < 2 and time.monotonic() < deadline:
                got = scrape(server.metrics_port)
            assert value(got, "aios_reviews", pipeline="claims_triage", state="open") == 2
            reviews.ClaimNextReview(kpb.ClaimNextReviewRequest(reviewer="ann", lease_seconds=60))
            got = scrape(server.metrics_port)
            assert value(got, "aios_reviews", pipeline="claims_triage", state="open") == 1
            assert value(got, "aios_reviews", pipeline="claims_triage", state="claimed") == 1
            assert value(got, "aios_reviews_overdue", pipeline="claims_triage") == 0
            assert value(got, "aios_tasks", state="queued") == 0
    finally:
        server.stop(grace=0)


def test_ready_turns_0_and_decisions_count_failed_when_the_audit_log_fails(claims_models, tmp_path):
    from claims_support import claim_request

    from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
    from kernel._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc

    data = tmp_path / "data"
    server = start_claims_kernel(claims_models, tmp_path, data_dir=str(data), metrics_port=free_port())
    try:
        assert value(scrape(server.metrics_port), "aios_ready") == 1
        shutil.move(data / "audit", tmp_path / "audit-moved")  # the operator's mistake the log fail-stops on
        deadline = time.monotonic() + 10  # (the log looks for its files at least every 250 ms)
        while not value(scrape(server.metrics_port), "aios_failed", part="audit_log") and time.monotonic() < deadline:
            time.sleep(0.05)
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            with pytest.raises(grpc.RpcError) as refused:
                kgrpc.DecisionServiceStub(channel).Decide(claim_request({
                    "claim_amount": 100.0, "policy_age_months": 5, "customer_tier": "gold", "claim_type": "auto",
                    "prior_claims": 0, "fraud_score": 0.1, "days_since_incident": 3, "has_police_report": True}))
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            # A decision the audit log refused is a failed one, in ListPipelines as on the endpoint (both said 0).
            listed = kgrpc.AdminServiceStub(channel).ListPipelines(kpb.ListPipelinesRequest())
            assert [p.decisions.failed for p in listed.pipelines if p.name == "claims_triage"] == [1]
        got = scrape(server.metrics_port)
        assert value(got, "aios_ready") == 0
        assert value(got, "aios_failed", part="audit_log") == 1
        assert value(got, "aios_decisions_total", pipeline="claims_triage", outcome="failed") == 1
    finally:
        server.stop(grace=0)


def test_a_metrics_port_in_use_stops_the_start(repo):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match="metrics_port"):
            start_kernel(repo, metrics_port=port)
    server = start_kernel(repo, metrics_port=port)  # what the failed start held was released: the same port serves
    server.stop(grace=0)


def test_a_decide_whose_deadline_passed_before_it_started_is_counted(claims_models, tmp_path, monkeypatch):
    """A statistics audit: Decides answered DEADLINE_EXCEEDED before their pipeline started were in no counter
    (ModelInfer's are its model's expired_before_queue); now they are counted there too."""
    from claims_support import UNSURE_CASE, claim_request

    from kernel._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc
    from kernel.pipelines import flow

    server = start_claims_kernel(claims_models, tmp_path, metrics_port=free_port())
    real_check = flow.check_decision_request

    def slow_check(request):  # the injected fault: reading the request takes 5 ms, past its 1 ms timeout
        threading.Event().wait(0.005)
        return real_check(request)

    monkeypatch.setattr(flow, "check_decision_request", slow_check)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            for _ in range(3):
                with pytest.raises(grpc.RpcError) as expired:
                    kgrpc.DecisionServiceStub(channel).Decide(claim_request(UNSURE_CASE, timeout_ms=1), timeout=30)
                assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                assert "before the kernel could start it" in expired.value.details()
        got = scrape(server.metrics_port)
        labels = {"model": "claims_triage", "version": "1"}
        assert value(got, "aios_model_expired_total", **labels, where="before_queue") == 3
        assert value(got, "aios_model_requests_total", **labels, result="failure") == 3
    finally:
        server.stop(grace=0)


def _scrape_threads() -> int:
    """The endpoint's threads answering a connection (socketserver names them after process_request_thread)."""
    return sum("process_request_thread" in thread.name for thread in threading.enumerate())


def test_idle_connections_neither_pile_up_threads_nor_starve_the_kernel_of_descriptors(repo, monkeypatch):
    """Regression (a review of the endpoint): each connection got a thread that waited for its request without
    end, so 1,007 idle connections to the metrics port held 1,007 threads and descriptors, and with a 1,024
    open-file limit gRPC could no longer accept a client (Decide DEADLINE_EXCEEDED). Now at most
    MAX_CONNECTIONS are served at once (the rest closed at once) and each must send its request within
    SCRAPE_TIMEOUT_S (shortened here)."""
    from kernel.observability import endpoint

    monkeypatch.setattr(endpoint, "SCRAPE_TIMEOUT_S", 1.0)
    server = start_kernel(repo, metrics_port=free_port())
    idle = []
    try:
        before = _scrape_threads()
        for _ in range(endpoint.MAX_CONNECTIONS + 40):
            sock = socket.create_connection(("127.0.0.1", server.metrics_port), timeout=10)
            sock.sendall(b"GET /metrics HTTP/1.1\r\n")  # a request line, and then nothing
            idle.append(sock)
        # Past the limit, the server closes a connection at once (the client reads its end, not a timeout).
        assert idle[-1].recv(1) == b""
        assert _scrape_threads() - before <= endpoint.MAX_CONNECTIONS
        # Those it took are closed once their request is late, which frees their places for a real scrape.
        for sock in idle[: endpoint.MAX_CONNECTIONS]:
            # Read to its end (well within the socket's 10 s): the server gives a place back before it closes the
            # connection, so then it is free. (Its error page alone came before that: a scrape sent then could
            # still find every place taken — a flake in a fresh clone's `make test`.)
            while sock.recv(65536):
                pass
        assert value(scrape(server.metrics_port), "aios_ready") == 1.0
    finally:
        for sock in idle:
            sock.close()
        server.stop(grace=0)


def test_a_scrape_that_ends_after_the_stop_reads_nothing_closed(claims_models, tmp_path, caplog):
    """Regression (a review of the endpoint): the endpoint was closed last, after the store and the audit log, and a
    scrape answered meanwhile (or taken just before and finished after) read the closed store: an ERROR line at a
    clean stop, 'reading reviews and tasks for the metrics endpoint failed: the database ... is closed'. A scrape
    of a stopped kernel now says only that it does not serve."""
    server = start_claims_kernel(claims_models, tmp_path, metrics_port=free_port())
    port = server.metrics_port
    with socket.create_connection(("127.0.0.1", port), timeout=10) as taken:
        taken.sendall(b"GET /metrics HTTP/1.0\r\n")  # taken before the stop; its request ends after it
        with caplog.at_level(logging.INFO, logger="aios.metrics"):
            server.stop(grace=0)
            taken.sendall(b"\r\n")
            answer = b""
            while chunk := taken.recv(65536):
                answer += chunk
    assert answer.startswith(b"HTTP/1.0 200"), answer[:200]
    assert b"\naios_ready 0.0\n" in answer
    assert b"aios_reviews" not in answer and b"aios_audit_records" not in answer
    assert not [r.getMessage() for r in caplog.records if r.name == "aios.metrics"]


def test_a_metrics_port_in_use_is_refused_before_anything_loads(repo, tmp_path):
    """Regression (a review of the endpoint): a metrics_port in use failed the start only once every model had
    loaded and the audit log had recorded a start, its deployments and a stop of a kernel that never served; the
    gRPC port is probed before anything loads, and now so is this one."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port} \\(metrics_port\\): something "
                                          "already listens there"):
            start_kernel(repo, metrics_port=port, data_dir=str(tmp_path / "data"))
    assert not (tmp_path / "data").exists()  # no data dir, no signing key, no audit log


def test_an_ipv6_host_in_brackets_serves_metrics_too(repo):
    """Regression (a review of the endpoint): host = "[::1]", the form gRPC listens on, stopped the start with
    "cannot serve metrics on [::1]:PORT (metrics_port): Name or service not known"."""
    try:
        socket.socket(socket.AF_INET6).close()
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    server = start_kernel(repo, host="[::1]", metrics_port=free_port())
    try:
        with urllib.request.urlopen(f"http://[::1]:{server.metrics_port}/metrics", timeout=10) as response:
            assert b"\naios_ready 1.0\n" in response.read()
    finally:
        server.stop(grace=0)


def test_scrapes_taken_while_a_model_reloads_all_answer_and_no_counter_goes_back(kernel):
    """An SRE's Prometheus scrapes whenever it likes: scrapes taken back to back while a version is reloaded again
    and again (and called between reloads) each answer, parse, and never see a counter lower than before."""
    client = tc.InferenceServerClient(f"127.0.0.1:{kernel.port}")
    tiny = {"model": "tiny", "version": "1", "result": "success"}
    reloading = threading.Event()
    reloading.set()
    seen, errors = [], []

    def scraper() -> None:
        while reloading.is_set():
            try:
                got = scrape(kernel.metrics_port)
            except Exception as exc:  # (a failed scrape is the finding: kept, not raised on this thread)
                errors.append(exc)
                return
            seen.append((value(got, "aios_model_requests_total", **tiny),
                         value(got, "aios_model_ready", model="tiny", version="1")))

    thread = threading.Thread(target=scraper)
    thread.start()
    try:
        for _ in range(5):
            client.infer("tiny", [_row()])
            client.load_model("tiny")  # a reload: a new copy of version 1
    finally:
        reloading.clear()
        thread.join(30)
    assert not errors and len(seen) >= 2, errors
    counts = [count for count, _ in seen]
    assert counts == sorted(counts) and value(scrape(kernel.metrics_port), "aios_model_requests_total", **tiny) == 5
    assert {ready for _, ready in seen} == {1.0}  # (a reload keeps the version served throughout)


def test_requests_waiting_on_a_reloaded_versions_old_copy_are_counted_by_listmodels_and_the_scrape_alike(repo,
                                                                                                       monkeypatch):
    """A reload's old copy of a version keeps the requests queued on it until they have run there: the queued and
    running gauges of the scrape and of ListModels count them (both read only the new copy: 0 queued while 3
    waited). One lane slot; the injected fault holds the model run whose input starts 7.0 (the load-time profile
    runs zeros) so that the others wait behind it."""
    from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
    from kernel._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc
    from kernel.models.runtime import OnnxModel

    release, running = threading.Event(), threading.Event()
    run = OnnxModel.run

    def held_run(self, feeds, options=None):
        if next(iter(feeds.values())).flat[0] == 7.0:
            running.set()
            release.wait(30)
        return run(self, feeds, options)

    monkeypatch.setattr(OnnxModel, "run", held_run)
    # (poller_inline off: the held run, alone on an idle lane, would hold gRPC's poller and no other call would come)
    server = start_kernel(repo, metrics_port=free_port(), lane_slots=1, poller_inline=False)
    try:
        client = tc.InferenceServerClient(f"127.0.0.1:{server.port}")
        tiny = {"model": "tiny", "version": "1"}
        done, outcomes = threading.Semaphore(0), []

        def answered(result, error):
            outcomes.append(error)
            done.release()

        held = tc.InferInput("INPUT0", [1, 16], "FP32")
        held.set_data_from_numpy(np.full((1, 16), 7.0, np.float32))
        client.async_infer("tiny", [held], answered)
        assert running.wait(30)
        for _ in range(3):
            client.async_infer("tiny", [_row()], answered)
        deadline = time.monotonic() + 30
        while value(scrape(server.metrics_port), "aios_model_queued_requests", **tiny) < 3:
            assert time.monotonic() < deadline, "the three requests were never queued"

        def listed():
            with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                models = kgrpc.AdminServiceStub(channel).ListModels(kpb.ListModelsRequest()).models
            return {m.name: m for m in models}["tiny"]

        client.load_model("tiny")  # a reload: a new copy of version 1; the four stay on the old one
        got, summary = scrape(server.metrics_port), listed()
        assert value(got, "aios_model_queued_requests", **tiny) == 3
        assert value(got, "aios_model_running_batches", **tiny) == 1
        assert (summary.queued_requests, summary.running_batches) == (3, 1)
        release.set()
        for _ in range(4):
            assert done.acquire(timeout=30)
        assert outcomes == [None] * 4
        got, summary = scrape(server.metrics_port), listed()
        assert value(got, "aios_model_queued_requests", **tiny) == 0 and summary.queued_requests == 0
        assert value(got, "aios_model_running_batches", **tiny) == 0 and summary.running_batches == 0
    finally:
        release.set()
        server.stop(grace=0)
