"""Shared fixtures: a model repository built in-process and a real kernel on a free port.

Every server here is the real gRPC server listening on localhost; clients are
real gRPC clients (tritonclient, our stubs, reflection). Front-end tests run
against both the threaded and the asyncio front end.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
from pathlib import Path

# Before numpy loads (through the imports below): OpenBLAS's own threads on top of the suite's two test
# processes oversubscribe a 2-core CI machine and spin — training the demo's large model took 30 s of CPU
# that way against 6 with one thread. Kernels the tests start inherit it.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import grpc  # noqa: E402
import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `bench` and `examples` are importable from a checkout
    sys.path.insert(0, str(ROOT))

from kernel.config import load_settings  # noqa: E402
from kernel.server import KernelServer  # noqa: E402
from kernel.testing import onnx_models  # noqa: E402
from kernel.testing.scratch import scratch_dir  # noqa: E402

IDENTITY_TENSORS = [
    ("f32", "FP32", 3), ("f16", "FP16", 2), ("f64", "FP64", 2), ("i32", "INT32", 2),
    ("i64", "INT64", 2), ("i8", "INT8", 2), ("u8", "UINT8", 2), ("flag", "BOOL", 2), ("text", "BYTES", 1),
]

TINY_TOML = onnx_models.mlp_toml(
    16, 4,
    extra='labels = ["a", "b", "c", "d"]\n\n[card]\nowner = "tests"\nintended_use = "exercise the serving path"\n',
    max_batch_size=8, instances=1,
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def build_repository(root: Path) -> Path:
    """The test repository: tiny MLP (with model.toml), an all-datatypes identity model, a fault model."""
    onnx_models.save(onnx_models.mlp([16, 64, 4], seed=3), root / "tiny" / "1" / "model.onnx")
    (root / "tiny" / "1" / "model.toml").write_text(TINY_TOML)
    onnx_models.save(onnx_models.mlp([16, 8, 4], seed=4), root / "tiny" / "2" / "model.onnx")
    onnx_models.save(onnx_models.identity(IDENTITY_TENSORS), root / "identity" / "1" / "model.onnx")
    onnx_models.save(onnx_models.reshape(), root / "reshape" / "1" / "model.onnx")
    return root


@pytest.fixture(scope="session")
def model_repo(tmp_path_factory) -> Path:
    return build_repository(tmp_path_factory.mktemp("models"))


def start_kernel(models: Path, front_end: str = "sync", **overrides) -> KernelServer:
    """A started kernel; its data dir (audit log, store) is a fresh scratch folder
    (removed when the test process exits) unless given."""
    overrides.setdefault("data_dir", str(scratch_dir()))
    settings = load_settings(
        None,
        {"models": str(models), "port": 0, "front_end": front_end, "log_level": "WARNING", **overrides},
        environ={},
    )
    server = KernelServer(settings)
    server.start()
    return server


def start_claims_kernel(models: Path, folder: Path, pipelines: Path | None = None, **overrides) -> KernelServer:
    """A kernel serving the claims demo's ``models`` with its data in ``folder``: a private copy of the demo's
    pipelines there (or ``pipelines``), its own data dir, the pipeline folder read once (pipeline_poll_s=0)."""
    from claims_support import copy_pipelines

    pipelines = pipelines or copy_pipelines(folder / "pipelines")
    overrides.setdefault("data_dir", str(folder / "data"))
    return start_kernel(models, pipelines=str(pipelines), pipeline_poll_s=0, **overrides)


def module_claims_kernel(folder: str = "kernel", edit_pipelines=None, front_ends: tuple[str, ...] = (), **overrides):
    """A test module's own claims kernel and a channel to it, as fixtures named ``server`` and ``channel``:
    ``server, channel = module_claims_kernel(task_workers=4)``. ``edit_pipelines(folder)`` may change the
    private copy of the pipelines before the kernel starts; ``front_ends`` (e.g. ``("sync", "aio")``): one kernel
    on each, the module's tests run against every one."""

    @pytest.fixture(scope="module", name="server", params=list(front_ends) or None)
    def server_fixture(request, claims_models, tmp_path_factory):
        from claims_support import copy_pipelines

        front_end = getattr(request, "param", None)
        root = tmp_path_factory.mktemp(f"{folder}-{front_end}" if front_end else folder)
        pipelines = copy_pipelines(root / "pipelines")
        if edit_pipelines is not None:
            edit_pipelines(pipelines)
        server = start_claims_kernel(claims_models, root, pipelines,
                                     **({"front_end": front_end} if front_end else {}), **overrides)
        yield server
        server.stop(grace=1)

    @pytest.fixture(name="channel")
    def channel_fixture(server):
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            yield ch

    return server_fixture, channel_fixture


@pytest.fixture(scope="module", params=["sync", "aio"])
def kernel(request, model_repo):
    """A running kernel (module-scoped), once per front end."""
    server = start_kernel(model_repo, request.param)
    yield server
    server.stop(grace=1)


@pytest.fixture
def address(kernel) -> str:
    return f"127.0.0.1:{kernel.port}"


@pytest.fixture
def triton(address):
    import tritonclient.grpc as tc

    client = tc.InferenceServerClient(address)
    yield client
    client.close()


@pytest.fixture
def channel(address):
    with grpc.insecure_channel(address) as ch:
        yield ch


@pytest.fixture
def stub(channel):
    from kernel._proto.inference import grpc_service_pb2_grpc

    return grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)


def pytest_report_header(config):
    from kernel import accel

    return f"aios: compiled extensions {accel.CHOSEN or 'none'}; AIOS_PURE_PYTHON={os.environ.get('AIOS_PURE_PYTHON', '')}"


@pytest.fixture(scope="session")
def demo_build(tmp_path_factory) -> tuple[Path, dict, float]:
    """Both claims demo models built once for the session, as `make models` builds them for `make demo`:
    (folder, the build's summary per model name, wall seconds). Training the large one takes seconds, so
    the tests that need the pair share this build instead of each training it again."""
    import time

    from examples.claims import build_models

    folder = tmp_path_factory.mktemp("demo_models")
    started = time.perf_counter()
    results = build_models.build(folder, log=lambda line: None)
    return folder, {r["name"]: r for r in results}, time.perf_counter() - started


@pytest.fixture(scope="module")
def claims_models(tmp_path_factory) -> Path:
    """The claims demo's small model (built in well under a second)."""
    from claims_support import build_small_model

    return build_small_model(tmp_path_factory.mktemp("claims_models"))


@pytest.fixture(scope="module", params=["sync", "aio"])
def claims_kernel(request, claims_models, tmp_path_factory):
    """A kernel serving the claims pipeline (a private copy, ``.pipelines_dir``), once per front end."""
    from claims_support import copy_pipelines

    pipelines = copy_pipelines(tmp_path_factory.mktemp("pipelines"))
    server = start_kernel(claims_models, request.param, pipelines=str(pipelines),
                          data_dir=str(tmp_path_factory.mktemp("data")), pipeline_poll_s=0, audit_stream_enabled=True)
    server.pipelines_dir = pipelines
    yield server
    server.stop(grace=1)


NODE_CLIENT = ROOT / "clients" / "node"
NODE_INSTALL = "run `make node-deps` (or `npm ci --prefix clients/node`)"


@pytest.fixture(scope="module")
def node() -> str:
    """The node executable, or a skip saying how to install what is missing (before any model is built): the
    Node client's suites (test_node_client, test_node_client_faults)."""
    node = shutil.which("node")
    if node is None:
        pytest.skip(f"node is not on PATH: install Node.js 18 or later, then {NODE_INSTALL}")
    if not (NODE_CLIENT / "node_modules" / "@grpc" / "grpc-js").is_dir():
        pytest.skip(f"clients/node/node_modules is missing: {NODE_INSTALL}")
    return node
