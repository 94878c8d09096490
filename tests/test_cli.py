"""The `aios-kernel` command: serve (with graceful SIGTERM), models list, infer, demo."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kernel._proto.aios.kernel.v1 import kernel_pb2, kernel_pb2_grpc
from kernel._proto.inference import grpc_service_pb2 as pb
from kernel._proto.inference import grpc_service_pb2_grpc as pb_grpc
from kernel.testing import onnx_models
from kernel.testing.processes import ServeProcess
from lane_support import until

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "kernel"]


def run_cli(*args, timeout=120, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT, **kwargs)


@pytest.fixture(scope="module")
def slow_repo(tmp_path_factory) -> Path:
    """A model that takes around a millisecond per call, so requests are in flight at SIGTERM."""
    root = tmp_path_factory.mktemp("slow")
    # provider = "cpu": these tests need calls still running at SIGTERM, which a GPU would finish first.
    onnx_models.save_mlp_version(root, "slow", [64, 1024, 1024, 8], seed=5, provider="cpu")
    return root


@pytest.mark.parametrize("front_end", ["sync", "aio"])
def test_serve_drains_in_flight_calls_on_sigterm(slow_repo, front_end):
    server = ServeProcess(slow_repo, "--front-end", front_end)
    outcomes: list[str] = []
    refused: list[str] = []  # each client's last call: its code, how long it took, when it was sent
    signalled = [float("inf")]
    started = threading.Barrier(5)

    def client():
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            request = pb.ModelInferRequest(model_name="slow")
            request.inputs.add(name="INPUT0", datatype="FP32", shape=[8, 64])
            request.raw_input_contents.append(np.ones((8, 64), np.float32).tobytes())
            started.wait()
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                sent = time.monotonic()
                try:
                    stub.ModelInfer(request, timeout=10)
                    outcomes.append("OK")
                except grpc.RpcError as exc:
                    outcomes.append(exc.code().name)
                    refused.append(f"{exc.code().name} after {time.monotonic() - sent:.3f} s, "
                                   f"{sent - signalled[0]:+.3f} s from SIGTERM: {exc.details()}")
                    return

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    started.wait()
    until(lambda: outcomes.count("OK") >= 20, "traffic to flow")  # (bounded: a regression fails, not hangs)
    signalled[0] = time.monotonic()
    code, err = server.stop()
    for t in threads:
        t.join(30)
    assert code == 0, err
    assert "SIGTERM received: draining" in err and "AIOS kernel stopped" in err
    # Calls racing the shutdown are refused (gRPC cancels calls it received but
    # had not handed to a handler yet: CANCELLED); nothing fails otherwise.
    refusals = {o for o in outcomes if o != "OK"}
    assert refusals <= {"UNAVAILABLE", "CANCELLED"}, (refused, err[-4000:])


@pytest.mark.parametrize("front_end", ["sync", "aio"])
def test_a_second_signal_during_a_drain_stops_at_once(slow_repo, front_end):
    """(Operator audit) an idle open stream held the drain for the whole grace period, and a second Ctrl-C was
    ignored without a word. Here the grace is 60 s; the second signal ends the drain now."""
    env = {**os.environ, "AIOS_GRACE_SECONDS": "60"}
    server = ServeProcess(slow_repo, "--front-end", front_end, env=env)
    hold = threading.Event()

    def idle_requests():  # a stream the client keeps open without sending anything
        hold.wait(60)
        return
        yield

    with grpc.insecure_channel(server.address) as channel:
        stream = pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(idle_requests(), timeout=90)
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
        server.proc.send_signal(signal.SIGTERM)
        until(lambda: _not_serving(health), "the drain to begin")
        started = time.monotonic()
        server.proc.send_signal(signal.SIGINT)
        code, err = server.stop(timeout=30)  # (it would take the 60 s grace, and the test would fail here)
        took = time.monotonic() - started
        hold.set()
        stream.cancel()
    assert code == 0, err
    assert "SIGINT received again: stopping now; calls still in progress are cancelled" in err, err[-2000:]
    assert "up to 63 s; a second signal stops at once" in err
    assert took < 20, f"stopped {took:.1f} s after the second signal"


def _not_serving(health) -> bool:
    try:
        return health.Check(health_pb2.HealthCheckRequest(), timeout=2).status != health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return True


@pytest.fixture(scope="module")
def very_slow_repo(tmp_path_factory) -> Path:
    """A model that takes tens of milliseconds per 64-row call."""
    root = tmp_path_factory.mktemp("veryslow")
    onnx_models.save_mlp_version(root, "slow", [64, 2048, 2048, 2048, 8], seed=6, provider="cpu")
    return root


def _warm_slow_calls(channel):
    """A stub and a 64-row request for the `slow` model, after one call: the connection is up."""
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    request = pb.ModelInferRequest(model_name="slow")
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[64, 64])
    request.raw_input_contents.append(np.ones((64, 64), np.float32).tobytes())
    stub.ModelInfer(request, timeout=30)
    return stub, request


@pytest.mark.parametrize("front_end", ["sync", "aio"])
def test_calls_accepted_before_sigterm_all_complete(very_slow_repo, front_end):
    """Calls the server is already working on when SIGTERM arrives are answered, not dropped."""
    server = ServeProcess(very_slow_repo, "--front-end", front_end)
    with grpc.insecure_channel(server.address) as channel:
        stub, request = _warm_slow_calls(channel)
        calls = [stub.ModelInfer.future(request, timeout=60) for _ in range(6)]
        # Wait until the kernel holds all six: finished, queued or running.
        admin = kernel_pb2_grpc.AdminServiceStub(channel)

        def held() -> bool:
            (summary,) = admin.ListModels(kernel_pb2.ListModelsRequest(), timeout=10).models
            finished = sum(call.done() for call in calls)
            return finished + summary.queued_requests + summary.running_batches >= 6  # one request per batch here

        until(held, "the kernel to hold all six calls")  # (fails at its limit instead of going on regardless)
        code, err = server.stop()
        results = [call.exception() for call in calls]
    assert code == 0, err
    assert results == [None] * 6, [r.code() if r else None for r in results]


@pytest.mark.parametrize("front_end", ["sync", "aio"])
def test_a_burst_sent_just_before_sigterm_is_answered_not_cancelled(very_slow_repo, front_end):
    """gRPC's stop cancels calls it has received but not handed to the kernel; the kernel goes on taking
    calls while it is busy, so a burst already sent when SIGTERM lands is answered (it lost most of its
    calls as CANCELLED before)."""
    server = ServeProcess(very_slow_repo, "--front-end", front_end)
    with grpc.insecure_channel(server.address) as channel:
        stub, request = _warm_slow_calls(channel)
        calls = [stub.ModelInfer.future(request, timeout=60) for _ in range(16)]
        code, err = server.stop()
        failures = [call.exception().code().name for call in calls if call.exception() is not None]
    assert code == 0, err
    assert failures == [], failures


def test_an_empty_repository_is_served_with_a_warning_that_says_why_health_is_not_serving(tmp_path):
    (tmp_path / "models").mkdir()
    server = ServeProcess(tmp_path / "models", data_dir=tmp_path / "data")
    code, err = server.stop()
    assert code == 0, err
    assert "WARNING" in err and "no model is loaded from" in err and "health answers NOT_SERVING" in err
    assert f"data dir {(tmp_path / 'data').resolve()}" in err  # where its records and reviews are


def test_serve_refuses_missing_repository(tmp_path):
    result = run_cli("serve", "--models", str(tmp_path / "nope"), "--port", "0", timeout=60)
    assert result.returncode == 2
    assert "model repository" in result.stderr and "does not exist" in result.stderr


def test_serve_reports_bad_setting(tmp_path):
    result = run_cli("serve", "--models", str(tmp_path), "--port", "99999", timeout=60)
    assert result.returncode == 2
    assert "port (from --port) must be 0..65535" in result.stderr


def test_port_in_use_is_a_clear_error_before_anything_loads(slow_repo, tmp_path):
    first = ServeProcess(slow_repo)
    try:
        port = first.address.rsplit(":", 1)[1]
        data = tmp_path / "second"
        result = run_cli("serve", "--models", str(slow_repo), "--port", port, "--data-dir", str(data), timeout=60)
        assert result.returncode == 2
        assert f"cannot listen on 127.0.0.1:{port}: something already listens there" in result.stderr
        # Refused before anything is made: no data dir, no signing key, no records from a kernel that never served.
        assert not data.exists()
    finally:
        first.stop()


def test_a_data_dir_in_use_is_a_clear_error(model_repo):
    first = ServeProcess(model_repo)
    try:
        result = run_cli("serve", "--models", str(model_repo), "--port", "0", "--data-dir", str(first.data_dir), timeout=60)
        assert result.returncode == 2, result.stderr
        assert f"data_dir {first.data_dir} is in use by another kernel process (pid {first.proc.pid})" in result.stderr
        assert "Traceback" not in result.stderr
    finally:
        code, err = first.stop()
    assert code == 0, err


def test_a_data_dir_that_cannot_be_created_is_a_clear_error(model_repo, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = run_cli("serve", "--models", str(model_repo), "--port", "0", "--data-dir", str(blocker / "var"), timeout=60)
    assert result.returncode == 2, result.stderr
    assert f"data_dir {blocker / 'var'} cannot be created: Not a directory" in result.stderr
    assert "Traceback" not in result.stderr


def test_models_list_reads_the_repository(model_repo):
    result = run_cli("models", "list", "--models", str(model_repo), timeout=60)
    assert result.returncode == 0, result.stderr
    assert "tiny" in result.stdout and "INPUT0:FP32[-1, 16] -> OUTPUT0:FP32[-1, 4]" in result.stdout
    assert "identity" in result.stdout and "derived from the graph" in result.stdout


def test_models_list_reads_the_folder_serve_would(model_repo, tmp_path):
    """Without --models it reads what serve reads: AIOS_MODELS, or the models of --config's kernel.toml."""
    by_env = run_cli("models", "list", timeout=60, env={**os.environ, "AIOS_MODELS": str(model_repo)})
    assert by_env.returncode == 0 and "tiny" in by_env.stdout, by_env.stderr
    config = tmp_path / "kernel.toml"
    config.write_text(f"models = {json.dumps(str(model_repo))}\n")
    by_config = run_cli("models", "list", "--config", str(config), timeout=60)
    assert by_config.returncode == 0 and "tiny" in by_config.stdout, by_config.stderr


def test_models_list_flags_a_model_toml_beside_the_versions(tmp_path):
    onnx_models.save_mlp_version(tmp_path, "m", [4, 8, 2], seed=1, provider="cpu")
    (tmp_path / "m" / "model.toml").write_text("max_batch_size = 8\n")
    result = run_cli("models", "list", "--models", str(tmp_path), timeout=60)
    assert result.returncode == 1, result.stdout
    assert f"invalid: {tmp_path / 'm' / 'model.toml'} is not read: settings go in each version's folder" in result.stdout


def test_models_list_and_infer_against_a_running_kernel(model_repo):
    server = ServeProcess(model_repo)
    try:
        listing = run_cli("models", "list", "--address", server.address, timeout=60)
        assert listing.returncode == 0, listing.stderr
        assert "tiny" in listing.stdout and "READY" in listing.stdout
        x = (np.arange(16, dtype=np.float32) / 16).reshape(1, 16)
        result = run_cli("infer", "tiny", "--version", "1", "--address", server.address, "--input", json.dumps(x.tolist()), timeout=60)
        assert result.returncode == 0, result.stderr
        got = np.array(json.loads(result.stdout)["OUTPUT0"], np.float32)
        session = ort.InferenceSession(str(model_repo / "tiny" / "1" / "model.onnx"))
        np.testing.assert_allclose(got, session.run(None, {"INPUT0": x})[0], rtol=1e-6)
        bad = run_cli("infer", "tiny", "--address", server.address, "--input", "[[1, 2]]", timeout=60)
        assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr and "'INPUT0'" in bad.stderr
        ragged = run_cli("infer", "tiny", "--address", server.address, "--input", "[[1, 2], [1]]", timeout=60)
        assert ragged.returncode == 2 and "--input INPUT0: not a FP32 array" in ragged.stderr, ragged.stderr
        unloaded = run_cli("models", "unload", "tiny", "--address", server.address, timeout=60)
        assert unloaded.returncode == 0 and "UNAVAILABLE" in unloaded.stdout, unloaded.stderr
        gone = run_cli("infer", "tiny", "--address", server.address, "--input", json.dumps(x.tolist()), timeout=60)
        assert gone.returncode == 1 and gone.stderr.startswith("NOT_FOUND:"), gone.stderr
        loaded = run_cli("models", "load", "tiny", "--address", server.address, timeout=60)
        assert loaded.returncode == 0 and "READY" in loaded.stdout, loaded.stderr
        missing = run_cli("models", "load", "nope", "--address", server.address, timeout=60)
        assert missing.returncode == 1 and missing.stderr.startswith("NOT_FOUND:"), missing.stderr
    finally:
        code, err = server.stop()
    assert code == 0, err


def test_demo_prints_a_summary(demo_build, tmp_path):
    """`make demo` as it runs it: on the models `make models` built. Run from a folder that has a ./pipelines
    of its own, it still shows the bundled claims pipelines, as --help says (a CLI audit: it served the
    folder's, which held another pipeline)."""
    (tmp_path / "pipelines").mkdir()
    (tmp_path / "pipelines" / "claims_triage.toml").write_text("not = [a pipeline\n")
    models = os.path.relpath(demo_build[0], tmp_path)  # (as `make demo` names them: relative to where it runs)
    result = subprocess.run([*CLI, "demo", "--models", models, "--requests", "200", "--concurrency", "4"],
                            capture_output=True, text=True, timeout=240, cwd=tmp_path,
                            env={**os.environ, "TMPDIR": str(tmp_path)})  # the demo keeps its data dir: here
    assert result.returncode == 0, result.stdout + result.stderr
    # The closing hint to serve the demo's data works from any folder: every path in it absolute.
    assert f"--models {Path(demo_build[0]).resolve()} --pipelines {ROOT / 'examples' / 'claims' / 'pipelines'}" \
        in result.stdout, result.stdout
    out = result.stdout
    assert "sent 200, answered 200, errors 0" in out
    assert "automated" in out and "escalated" in out and "rules that decided" in out
    assert "review queue:" in out and "audit log" in out and "verified" in out.lower()


def test_console_script_is_installed():
    script = shutil.which("aios-kernel", path=os.path.dirname(sys.executable))
    assert script, "the aios-kernel console script is not installed in this environment"
    result = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "aios-kernel 0.1.0" in result.stdout


def test_decide_prints_the_decision_and_names_bad_fields(tmp_path):
    from examples.claims import build_models

    models = tmp_path / "models"
    build_models.build(models, models=build_models.MODELS[:1], log=lambda line: None)
    server = ServeProcess(models, "--pipelines", str(ROOT / "examples" / "claims" / "pipelines"))
    try:
        fields = ["--field", "claim_amount=800", "--field", "customer_tier=gold", "--field", "fraud_score=0.05",
                  "--field", "has_police_report=true", "--field", "policy_age_months=40"]
        result = run_cli("decide", "claims_triage", *fields, "--text", "description=hail on the roof",
                         "--address", server.address, timeout=60)
        assert result.returncode == 0, result.stderr
        first = result.stdout.splitlines()[0]
        assert "AUTOMATED" in first and "claims_triage/1" in first and "rule R" in result.stdout
        assert "audit #" in result.stdout
        as_json = run_cli("decide", "claims_triage", "--field", "claim_amount=90000", "--json",
                          "--address", server.address, timeout=60)
        decision = json.loads(as_json.stdout)
        assert decision["outcome"] == "ESCALATED" and decision["review_id"]
        bad = run_cli("decide", "claims_triage", "--field", "claim_amount=lots", "--address", server.address, timeout=60)
        assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr and "claim_amount" in bad.stderr
        unknown = run_cli("decide", "nope", "--address", server.address, timeout=60)
        assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stderr
    finally:
        code, err = server.stop()
    assert code == 0, err


def test_a_sigterm_delivered_to_another_thread_still_stops_the_kernel(tmp_path_factory):
    """The OS may hand a process's signal to any of its threads; the kernel must still drain and stop
    (its main thread once slept through such a signal: a SIGTERM that never ended the process)."""
    import ctypes
    import signal

    if os.uname().machine != "x86_64":
        pytest.skip("the tgkill syscall number used here is x86-64's")
    sys_tgkill = 234  # (x86-64) a signal to one thread of a process, as the OS may pick it
    root = tmp_path_factory.mktemp("signals")
    onnx_models.save_mlp_version(root, "m", [4, 8, 2], seed=1, provider="cpu")
    server = ServeProcess(root, "--front-end", "sync")
    pid = server.proc.pid
    others = [int(tid) for tid in os.listdir(f"/proc/{pid}/task") if int(tid) != pid]
    assert others, "the kernel runs more than one thread"
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.syscall(sys_tgkill, pid, others[-1], signal.SIGTERM) == 0, ctypes.get_errno()
    _, err = server.proc.communicate(timeout=20)
    assert server.proc.returncode == 0, err
    assert "SIGTERM received: draining" in err and "AIOS kernel stopped" in err


def test_a_hang_up_drains_and_stops_the_kernel_like_sigterm(model_repo):
    import signal

    server = ServeProcess(model_repo)
    server.proc.send_signal(signal.SIGHUP)
    _, err = server.proc.communicate(timeout=20)
    assert server.proc.returncode == 0, err
    assert "SIGHUP received: draining" in err and "AIOS kernel stopped" in err


def test_client_commands_refuse_an_address_that_is_not_host_port():
    for bad in ("nonsense", "http://127.0.0.1:8001", "127.0.0.1:99999", ""):
        result = run_cli("decide", "claims_triage", "--address", bad, timeout=60)
        assert result.returncode == 2 and "is not HOST:PORT" in result.stderr, (bad, result.stderr)
        assert "Traceback" not in result.stderr


def test_a_bad_port_in_the_environment_is_blamed_on_the_environment(monkeypatch):
    """(Operator walk-through) AIOS_PORT=abc was reported as a bad --address, a flag the user never typed."""
    import argparse

    from kernel.cli_support import address, default_address

    monkeypatch.setenv("AIOS_PORT", "abc")
    with pytest.raises(argparse.ArgumentTypeError, match=r"'127\.0\.0\.1:abc' \(from \$AIOS_PORT\) is not HOST:PORT"):
        address(default_address())
    with pytest.raises(argparse.ArgumentTypeError) as typed:  # typed by the user: no variable named
        address("h:xyz")
    assert "from $" not in str(typed.value)


def test_a_client_command_stopped_with_ctrl_c_exits_130_without_a_traceback(tmp_path):
    import signal
    import socket

    # A Unix socket: only this command can connect to it (a TCP port may be one a stopped kernel of an earlier
    # test had, which its old clients still try, and their connection would be taken for the command's).
    with socket.socket(socket.AF_UNIX) as silent:  # takes the connection and never answers
        silent.bind(str(tmp_path / "silent.sock"))
        silent.listen(8)
        silent.settimeout(60)
        address = f"unix:{tmp_path / 'silent.sock'}"
        # As from a terminal, Ctrl-C raises KeyboardInterrupt in the command. A child inherits an ignored SIGINT,
        # and a test run started in the background (`make test &` in a script) ignores it.
        as_from_a_terminal = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                              "sys.argv[0] = 'aios-kernel'; runpy.run_module('kernel', run_name='__main__')")
        proc = subprocess.Popen([sys.executable, "-c", as_from_a_terminal, "decide", "claims_triage", "--address",
                                 address, "--timeout", "60"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        connection, _ = silent.accept()  # the command is inside its call, waiting for the server's first frame
        with connection:
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err, err


def test_models_list_of_a_kernel_that_is_not_running_is_one_line(tmp_path):
    import socket

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = run_cli("models", "list", "--address", f"127.0.0.1:{port}", "--timeout", "5", timeout=60)
    assert result.returncode == 1 and result.stderr.startswith("UNAVAILABLE:") and "Traceback" not in result.stderr


def test_infer_output_that_is_not_a_finite_number_still_prints_json():
    from kernel.cli import _json_safe

    text = json.dumps(_json_safe([[float("nan"), float("inf"), -float("inf"), 0.5]]), allow_nan=False)
    assert json.loads(text) == [["NaN", "Infinity", "-Infinity", 0.5]]


def test_output_piped_into_a_reader_that_leaves_early_is_no_traceback(tmp_path):
    """`aios-kernel policy test ... | head -1`: the reader closes the pipe; the command stops quietly."""
    example = ROOT / "examples" / "claims" / "pipelines"
    case = json.loads((example / "policy_cases.jsonl").read_text().splitlines()[-1])
    case["expect"] = {"action": "deny" if case["expect"].get("action") != "deny" else "approve"}
    cases = tmp_path / "failing.jsonl"
    cases.write_text((json.dumps(case) + "\n") * 3000)  # a failure line each: far more than a pipe holds
    reader = subprocess.Popen([*CLI, "policy", "test", str(example / "policy.toml"), "--cases", str(cases)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    reader.stdout.readline()
    reader.stdout.close()  # as `head -1` does after its line
    _, err = reader.communicate(timeout=120)
    assert reader.returncode in (0, 141), err
    assert b"Traceback" not in err and b"BrokenPipeError" not in err, err


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full, a device every write to fails ENOSPC")
@pytest.mark.parametrize("command", [("policy", "check"), ("policy", "test")])
def test_output_onto_a_full_disk_is_one_line_not_a_traceback(command):
    """(Docs audit) `aios-kernel policy check FILE > out.txt` on a full disk ended in a traceback ("OSError: [Errno
    28] No space left on device", from inside print or from Python's flush at exit). Now one line says the answer
    was not written, exit 74 (EX_IOERR: told apart from the command's own codes, as 141 is for a closed pipe)."""
    example = ROOT / "examples" / "claims" / "pipelines"
    args = [str(example / "policy.toml")] + (["--cases", str(example / "policy_cases.jsonl")] if command[1] == "test"
                                              else [])
    with open("/dev/full", "w") as full:
        result = subprocess.run([*CLI, *command, *args], stdout=full, stderr=subprocess.PIPE, text=True, timeout=120,
                                cwd=ROOT)
    assert result.returncode == 74, result.stderr
    assert result.stderr.splitlines() == [
        "aios-kernel: cannot write the answer to standard output: No space left on device"], result.stderr


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full, a device every write to fails ENOSPC")
def test_help_onto_a_full_disk_is_one_line_not_exit_0():
    """(Docs audit) `aios-kernel --help > out.txt` on a full disk lost the help and exited 0 (argparse's exit, then
    Python's own flush failing at exit): as any other answer, one line and exit 74."""
    with open("/dev/full", "w") as full:
        result = subprocess.run([*CLI, "review", "--help"], stdout=full, stderr=subprocess.PIPE, text=True,
                                timeout=120, cwd=ROOT)
    assert result.returncode == 74, result.stderr
    assert result.stderr.splitlines() == [
        "aios-kernel: cannot write the answer to standard output: No space left on device"], result.stderr


@pytest.mark.parametrize("environ, expected", [
    ({}, "127.0.0.1:8001"),
    ({"AIOS_PORT": "8551"}, "127.0.0.1:8551"),  # AIOS_PORT=8551 make serve, then the client commands
    ({"AIOS_HOST": "0.0.0.0", "AIOS_PORT": "9000"}, "127.0.0.1:9000"),  # a wildcard is reached on the loopback
    ({"AIOS_HOST": "::", "AIOS_PORT": "9000"}, "[::1]:9000"),
    ({"AIOS_HOST": "fd00::5"}, "[fd00::5]:8001"),
    ({"AIOS_ADDRESS": "kernel.internal:7000", "AIOS_PORT": "8551"}, "kernel.internal:7000"),
])
def test_client_commands_call_where_serve_listens_with_the_same_environment(environ, expected):
    from kernel.cli_support import default_address

    assert default_address(environ) == expected


def test_a_client_command_follows_aios_port(tmp_path):
    """With AIOS_PORT set, `decide` calls that port (nothing listens there: the refusal names it)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        free = sock.getsockname()[1]
    result = run_cli("decide", "claims_triage", "--field", "claim_amount=800", "--timeout", "5",
                     env={**os.environ, "AIOS_PORT": str(free)})
    assert result.returncode == 1 and result.stderr.startswith("UNAVAILABLE") and f":{free}" in result.stderr, \
        result.stderr


def test_serve_names_a_models_path_that_is_a_file(tmp_path):
    """(Operator audit) a file where the repository should be was reported as "does not exist"."""
    path = tmp_path / "models"
    path.write_text("not a folder")
    result = run_cli("serve", "--models", str(path), "--port", "0", "--data-dir", str(tmp_path / "data"), timeout=60)
    assert result.returncode == 2
    assert f"model repository {path} is a file, not a folder" in result.stderr, result.stderr


@pytest.mark.parametrize("serving,refused,line", [
    (0, 1, "0 pipelines serving, 1 file refused"),  # nothing served before them: nothing "keeps serving"
    (2, 3, "2 pipelines serving, 3 files refused (the versions before them, if any, keep serving)"),
    (1, 0, "1 pipeline serving"),
])
def test_pipelines_list_sums_up_in_words_that_fit(serving, refused, line):
    from kernel.pipelines_cli import _summary

    assert _summary(serving, refused) == line


def test_sigterm_during_the_start_stops_cleanly_once_started(slow_repo, tmp_path):
    """(Crash audit) the handlers came after the start: a SIGTERM during a slow start (an orchestrator's) ended
    the process with the default action, exit 143 and no log line, and the log looked like a crash's
    (``verify --strict`` failed until the next start). Now the start finishes, then the kernel stops."""
    data_dir = tmp_path / "data"
    proc = subprocess.Popen([*CLI, "serve", "--models", str(slow_repo), "--port", "0", "--data-dir", str(data_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        for line in proc.stderr:  # the model's profile is measured early in the start, before the audit log opens
            if "on lane cpu; profile" in line:
                proc.send_signal(signal.SIGTERM)
                break
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    if "ready on" not in out:  # (the usual case: the signal came while it was starting)
        assert "SIGTERM received while starting: stopping without serving" in err, err
    verified = run_cli("audit", "verify", str(data_dir / "audit"), "--strict")
    assert verified.returncode == 0, verified.stdout + verified.stderr


@pytest.mark.parametrize("command", [
    ("review", "list"), ("pipelines", "list"),
    # (docs audit: upload printed gRPC's "failed to connect" alone, its own error path skipping the hint)
    ("pipelines", "upload", str(ROOT / "examples" / "claims" / "pipelines" / "claims_triage.toml")),
], ids=lambda command: " ".join(command[:2]))
def test_a_client_command_that_reaches_no_kernel_says_where_it_looked_for_one(command):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = run_cli(*command, "--address", f"127.0.0.1:{port}", "--timeout", "5")
    assert result.returncode == 1
    assert result.stderr.startswith("UNAVAILABLE: failed to connect"), result.stderr
    assert "is the kernel running there?" in result.stderr and "AIOS_PORT" in result.stderr, result.stderr


def test_a_stop_whose_audit_record_cannot_be_written_exits_1(model_repo, tmp_path):
    """(Crash audit) a stop that could not write its "kernel stopping" record or final checkpoint (a full disk; here
    the log removed under the kernel) exited 0, which a supervisor reads as a clean stop."""
    import shutil

    server = ServeProcess(model_repo, data_dir=tmp_path / "data")
    shutil.rmtree(tmp_path / "data" / "audit")  # the operator's mistake: the kernel's log is gone
    code, err = server.stop()
    assert code == 1, err
    assert "AIOS kernel stopped, but not cleanly" in err and "Traceback" not in err


def test_models_list_refuses_address_and_models_together(model_repo):
    """(Operator walk-through) with --address, --models was ignored without a word."""
    result = run_cli("models", "list", "--address", "127.0.0.1:1", "--models", str(model_repo), timeout=60)
    assert result.returncode == 2 and "not both" in result.stderr and result.stdout == ""


def test_instants_shown_in_local_time_name_their_zone(monkeypatch):
    """The CLI shows local time, the kernel's own messages UTC ('…Z'): without the zone a reviewer in Berlin read a
    lease message and `review show` an hour apart (review desk audit L3)."""
    import time as time_module

    from kernel.cli_support import when
    monkeypatch.setenv("TZ", "Europe/Berlin")
    time_module.tzset()
    try:
        shown = when(1_764_288_000 * 10**9, now_ns=1_764_288_060 * 10**9)  # 2025-11-28 00:00 UTC, a minute later
        assert shown.startswith("2025-11-28 01:00:00 CET (") and shown.endswith("ago)"), shown
    finally:
        monkeypatch.undo()  # (the zone as it was, then read again)
        time_module.tzset()


@pytest.mark.parametrize("flag, value", [("--requests", "-5"), ("--requests", "0"), ("--concurrency", "0")])
def test_demo_refuses_a_burst_of_no_requests_or_streams_naming_the_flag(tmp_path, flag, value):
    """(Docs audit) --requests -5 built the demo's models, started the kernel and ended in numpy's "negative
    dimensions are not allowed" traceback; --concurrency 0 opened no stream, sent nothing and exited 0 with an
    empty summary. Now both are refused as the other count flags are, before anything is built or started."""
    models, data = tmp_path / "models", tmp_path / "data"
    result = run_cli("demo", "--models", str(models), "--data-dir", str(data), flag, value, timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert f"argument {flag}: '{value}': must be 1 or more" in result.stderr.splitlines()[-1], result.stderr
    assert not models.exists() and not data.exists()
