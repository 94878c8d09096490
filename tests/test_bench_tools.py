"""Tests of the benchmark tools: the naive baseline server, the models, perf_analyzer.

The whole file runs in about 10 s (server start ~1 s, perf_analyzer ~3 s); every
subprocess has a hard timeout so a hang fails the test instead of stalling CI.
perf_analyzer tests are skipped (with the reason) only when the binary cannot be
made to start on this machine (see bench/perf_analyzer.py for how it is set up).
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest

tritonclient_grpc = pytest.importorskip("tritonclient.grpc")
from tritonclient.grpc import service_pb2 as pb  # noqa: E402
from tritonclient.grpc import service_pb2_grpc as pb_grpc  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from bench import tiny_models  # noqa: E402
from bench.perf_analyzer import (  # noqa: E402
    PerfAnalyzerError,
    PerfAnalyzerUnavailable,
    ensure_perf_analyzer,
    run_perf_analyzer,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL_NAME = "tiny_mlp"
START_TIMEOUT_S = 30


@pytest.fixture(scope="module")
def tiny_model_path(tmp_path_factory) -> Path:
    return tiny_models.write_tiny_mlp(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def naive_server(tiny_model_path):
    """The naive server on a free localhost port (``--port 0``); yields ``host:port``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.naive_server", "--model", str(tiny_model_path), "--name", MODEL_NAME,
         "--port", "0"],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    address = None
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while address is None and time.monotonic() < deadline:
            try:
                line = lines.get(timeout=0.2)
            except queue.Empty:
                if proc.poll() is not None:
                    break
                continue
            if line.startswith("listening on "):
                address = line.split()[-1]
        if address is None:
            proc.kill()
            _, err = proc.communicate(timeout=10)
            pytest.fail(f"naive server did not start within {START_TIMEOUT_S} s: {err[-2000:]}")
        yield address
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                pytest.fail("naive server did not stop within 15 s of SIGTERM")
    assert proc.returncode == 0, f"naive server exited with {proc.returncode} on SIGTERM"


@pytest.fixture(scope="module")
def reference_session(tiny_model_path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(tiny_model_path), sess_options=options, providers=["CPUExecutionProvider"])


def test_tiny_models_written(tmp_path):
    paths = tiny_models.write_models(tmp_path)
    assert set(paths) == {"tiny_mlp", "large_mlp"}
    for name, (in_dim, out_dim) in {"tiny_mlp": (16, 4), "large_mlp": (64, 8)}.items():
        session = ort.InferenceSession(str(paths[name]), providers=["CPUExecutionProvider"])
        (inp,), (out,) = session.get_inputs(), session.get_outputs()
        assert (inp.name, inp.shape[1], out.name, out.shape[1]) == ("INPUT0", in_dim, "OUTPUT0", out_dim)
    before = paths["tiny_mlp"].read_bytes()
    assert tiny_models.write_tiny_mlp(tmp_path, overwrite=True).read_bytes() == before  # deterministic


def test_health_metadata_and_config(naive_server):
    client = tritonclient_grpc.InferenceServerClient(naive_server)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL_NAME)
    assert not client.is_model_ready("no_such_model")
    assert client.get_server_metadata().name
    meta = client.get_model_metadata(MODEL_NAME)
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("INPUT0", "FP32", [-1, 16])]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [("OUTPUT0", "FP32", [-1, 4])]
    config = client.get_model_config(MODEL_NAME).config
    assert config.max_batch_size == 64
    assert [(i.name, list(i.dims)) for i in config.input] == [("INPUT0", [16])]
    assert [(o.name, list(o.dims)) for o in config.output] == [("OUTPUT0", [4])]
    stats = client.get_inference_statistics(MODEL_NAME).model_stats
    assert stats and stats[0].name == MODEL_NAME
    with pytest.raises(InferenceServerException):
        client.get_model_config("no_such_model")


@pytest.mark.parametrize("batch", [1, 7])
def test_infer_matches_onnxruntime(naive_server, reference_session, batch):
    client = tritonclient_grpc.InferenceServerClient(naive_server)
    x = np.random.default_rng(batch).standard_normal((batch, 16)).astype(np.float32)
    inp = tritonclient_grpc.InferInput("INPUT0", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)  # raw_input_contents
    result = client.infer(MODEL_NAME, [inp], outputs=[tritonclient_grpc.InferRequestedOutput("OUTPUT0")])
    got = result.as_numpy("OUTPUT0")
    (want,) = reference_session.run(["OUTPUT0"], {"INPUT0": x})
    assert got.shape == (batch, 4)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    stats = client.get_inference_statistics(MODEL_NAME).model_stats[0]
    assert stats.inference_stats.success.count >= 1


def test_infer_typed_contents_and_errors(naive_server, reference_session):
    x = np.random.default_rng(3).standard_normal((2, 16)).astype(np.float32)
    with grpc.insecure_channel(naive_server) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        request = pb.ModelInferRequest(model_name=MODEL_NAME, id="typed")
        tensor = request.inputs.add(name="INPUT0", datatype="FP32", shape=[2, 16])
        tensor.contents.fp32_contents.extend(x.ravel().tolist())
        response = stub.ModelInfer(request, timeout=10)
        assert response.id == "typed" and response.outputs[0].name == "OUTPUT0"
        got = np.frombuffer(response.raw_output_contents[0], np.float32).reshape(list(response.outputs[0].shape))
        (want,) = reference_session.run(["OUTPUT0"], {"INPUT0": x})
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

        bad_shape = pb.ModelInferRequest(model_name=MODEL_NAME)
        bad_shape.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 16])
        bad_shape.raw_input_contents.append(b"\0" * 8)
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(bad_shape, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(pb.ModelInferRequest(model_name="no_such_model"), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_perf_analyzer_against_naive_server(naive_server):
    try:
        ensure_perf_analyzer()
    except PerfAnalyzerUnavailable as exc:
        pytest.skip(f"perf_analyzer cannot start here: {exc.reason}")
    # 3 windows of 700 ms (stability needs 3) ~ 2.3 s; max 6 trials bounds a noisy run to ~5 s. On a loaded
    # machine no 3 windows may agree (a stressed run: "Failed to obtain stable measurement"): once more,
    # longer; what is tested is that the wrapper runs it and reads its report.
    try:
        result = run_perf_analyzer(naive_server, MODEL_NAME, concurrency=1, measurement_ms=700,
                                   max_trials=6, timeout_s=60)
    except PerfAnalyzerError as exc:
        if "stable measurement" not in str(exc):
            raise
        result = run_perf_analyzer(naive_server, MODEL_NAME, concurrency=1, measurement_ms=1500,
                                   max_trials=20, timeout_s=120)
    assert result["concurrency"] == 1
    assert result["throughput"] > 0
    assert 0 < result["p50_us"] <= result["p90_us"] <= result["p95_us"] <= result["p99_us"]
    assert result["request_count"] and result["request_count"] > 0
    assert "Inferences/Second" in result["csv_row"]


def test_the_bound_tool_answers_help_and_a_missing_file_in_words(capsys, tmp_path):
    """(An operations walk-through: `python -m bench.openloop.bound --help` read --help as a file: a traceback.)"""
    from bench.openloop.bound import main

    assert main(["--help"]) == 0 and "python -m bench.openloop.bound" in capsys.readouterr().out
    assert main([str(tmp_path / "none.json")]) == 2 and "no such file" in capsys.readouterr().out


def test_fluid_bound_serves_in_arrival_order_and_skips_what_cannot_finish_in_time():
    from bench.openloop.bound import fluid_bound

    # Capacity 10/s (0.1 s each), SLO 0.25 s: of four requests at t=0 only two can finish by 0.25 s;
    # a fifth at t=1 is alone and finishes in time.
    sched = np.array([0.0, 0.0, 0.0, 0.0, 1.0])
    assert fluid_bound(sched, 10.0, 0.25, (0.0, 2.0)) == 3 / 2.0
    # Ample capacity serves everything; the window counts only requests released inside it.
    assert fluid_bound(sched, 1e6, 0.25, (0.5, 1.5)) == 1.0


def test_fsync_cost_measures_both_modes_and_leaves_no_scratch_file(tmp_path):
    from bench import fsync_cost

    scratch, out = tmp_path / "disk", tmp_path / "out"
    assert fsync_cost.main(["--dir", str(scratch), "--writes", "20", "--bytes", "4096", "--rounds", "2",
                            "--cpu", "-1", "--out", str(out)]) == 0
    (result_file,) = out.glob("fsync-cost-*.json")
    result = json.loads(result_file.read_text())
    assert [run["mode"] for run in result["runs"]] == ["write", "write+fdatasync"] * 2
    summary = result["summary"]
    for mode in fsync_cost.MODES:
        assert summary[mode]["wall_us"] > 0 and summary[mode]["cpu_us"] >= 0
    assert summary["sync_extra_cpu_us"] == summary["write+fdatasync"]["cpu_us"] - summary["write"]["cpu_us"]
    assert list(scratch.iterdir()) == []  # the scratch file is removed
    with pytest.raises(SystemExit):
        fsync_cost.main(["--writes", "0", "--out", str(out)])


def test_policy_check_cost_times_each_shape_in_a_process_of_its_own(tmp_path, capsys):
    from bench import policy_check_cost

    out = tmp_path / "out"
    assert policy_check_cost.main(["--rounds", "1", "--shapes", "many-actions,error-flood", "--out", str(out)]) == 0
    (result_file,) = out.glob("policy-check-cost-*.json")
    runs = json.loads(result_file.read_text())["results"]["now"]
    assert runs["many-actions"][0]["outcome"] == "served" and runs["many-actions"][0]["seconds"] > 0
    assert runs["error-flood"][0]["outcome"] == "refused: PolicyError"  # (every test names a class the model lacks)
    assert all(run[0]["peak_mib"] > 0 for run in runs.values())
    assert "many-actions" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        policy_check_cost.main(["--shapes", "no-such-shape", "--out", str(out)])


def test_openloop_drives_a_closed_neighbour_from_its_own_process(naive_server):
    """``--neighbour-process``: the closed load's requests come from a child process that starts with the
    open load, and both loads' records come back, in the same run's time frame."""
    from bench.openloop.driver import drive
    from bench.openloop.streams import ClosedLoad, OpenLoad, make_stream

    tiny = make_stream("tiny", MODEL_NAME)
    neighbour = make_stream("neighbour", MODEL_NAME)
    times = np.linspace(0.0, 1.0, 20)
    run = drive(naive_server, [OpenLoad(tiny, times)], [ClosedLoad(neighbour, 2)], warmup_s=0.2, window_s=0.8,
                closed_process=True)
    by_name = {r.stream: r for r in run.records}
    assert set(by_name) == {"tiny", "neighbour[closed]"}
    assert run.extra["closed_process"] is True and run.drained
    open_rec, closed_rec = by_name["tiny"], by_name["neighbour[closed]"]
    assert len(open_rec.code) == 20 and (open_rec.code == 0).all()
    assert len(closed_rec.code) > 2 and (closed_rec.code == 0).all()
    # The child's clock starts at the same instant: its sends fall inside the run, not seconds off.
    assert closed_rec.sent.min() >= -0.05 and closed_rec.sent.max() <= 1.0 + 0.5


def test_the_median_interval_brackets_the_median_and_narrows_with_agreeing_rounds():
    from bench.intervals import median_interval

    assert median_interval([1.2, 1.3]) is None  # two rounds bound nothing
    scattered = median_interval([0.8, 1.5, 1.1, 0.9, 1.4])
    agreeing = median_interval([1.19, 1.21, 1.2, 1.22, 1.18])
    assert scattered[0] <= 1.1 <= scattered[1] and agreeing[0] <= 1.2 <= agreeing[1]
    assert agreeing[1] - agreeing[0] < scattered[1] - scattered[0]
    assert agreeing[0] > 1.0 and scattered[0] < 1.0  # one claim holds, the other could be on either side
    assert median_interval([0.8, 1.5, 1.1, 0.9, 1.4]) == scattered  # the same seed, the same interval
