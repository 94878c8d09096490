"""model.toml validation and config-vs-graph checks: every error names the file and the field."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort
import pytest

from kernel.models import ModelConfigError, ModelHub
from kernel.testing import onnx_models

GOOD = """
max_batch_size = 4
[[input]]
name = "INPUT0"
datatype = "FP32"
dims = [16]
[[output]]
name = "OUTPUT0"
datatype = "FP32"
dims = [4]
"""


def make_repo(root: Path, toml: str | None, model=None) -> Path:
    folder = root / "m" / "1"
    onnx_models.save(model or onnx_models.mlp([16, 8, 4]), folder / "model.onnx")
    if toml is not None:
        (folder / "model.toml").write_text(toml)
    return root


def load_error(tmp_path, toml: str, model=None) -> ModelConfigError:
    hub = ModelHub(make_repo(tmp_path, toml, model))
    with pytest.raises(ModelConfigError) as info:
        hub.load("m")
    return info.value


def test_good_config_loads(tmp_path):
    hub = ModelHub(make_repo(tmp_path, GOOD))
    (mv,) = hub.load("m")
    assert mv.config.max_batch_size == 4 and not mv.config.derived
    # no `provider` line: "auto", i.e. CUDA where onnxruntime offers it (a GPU machine), else the CPU
    auto = "CUDAExecutionProvider" if "CUDAExecutionProvider" in ort.get_available_providers() else "CPUExecutionProvider"
    assert mv.runtime.provider == auto


def test_a_tenant_bound_above_max_queue_loads_when_the_levels_queue_more(tmp_path):
    """max_queue bounds each priority level, max_tenant_queue a tenant across them: 16 with max_queue 8 and three
    levels (24 queued at most) can bind, and was refused as "must be less than max_queue (8)"."""
    toml = GOOD.replace("max_batch_size = 4", "max_batch_size = 4\nmax_queue = 8\nmax_tenant_queue = 16")
    (mv,) = ModelHub(make_repo(tmp_path, toml)).load("m")
    schedule = mv.config.schedule()
    assert (schedule.max_queue, schedule.max_tenant_queue, schedule.priority_levels) == (8, 16, 3)


def test_config_derived_from_graph_without_toml(tmp_path):
    (mv,) = ModelHub(make_repo(tmp_path, None)).load("m")
    assert mv.config.derived and mv.config.max_batch_size == 64
    assert [(s.name, s.datatype.name, s.dims) for s in mv.config.inputs] == [("INPUT0", "FP32", (16,))]


@pytest.mark.parametrize(
    "toml,field,fragment",
    [
        (GOOD.replace('datatype = "FP32"\ndims = [16]', 'datatype = "INT32"\ndims = [16]'), "input[0].datatype", "is FP32 in the graph"),
        (GOOD.replace("dims = [16]", "dims = [15]"), "input[0].dims", "config says [15]"),
        (GOOD.replace("dims = [16]", "dims = [16, 1]"), "input[0].dims", "per-row dims"),
        (GOOD.replace('name = "INPUT0"', 'name = "X"'), "input[0].name", "'X' is not a graph input"),
        (GOOD.replace('name = "OUTPUT0"', 'name = "Y"'), "output[0].name", "'Y' is not a graph output"),
        (GOOD.replace('datatype = "FP32"\ndims = [16]', 'datatype = "FLOAT"\ndims = [16]'), "input[0].datatype", "unknown datatype 'FLOAT'"),
        (GOOD.replace("max_batch_size = 4", "max_batch_size = -1"), "max_batch_size", "must be >= 0"),
        (GOOD.replace("max_batch_size = 4", "max_batch_size = true"), "max_batch_size", "must be an integer"),
        (GOOD.replace("max_batch_size = 4", 'provider = "tpu"'), "provider", "auto, cpu, cuda"),
        (GOOD.replace("max_batch_size = 4", 'cuda_tf32 = "yes"'), "cuda_tf32", "must be true or false"),
        (GOOD.replace("max_batch_size = 4", "instances = 0"), "instances", "must be >= 1"),
        (GOOD.replace("max_batch_size = 4", "colour = 1"), "colour", "unknown key"),
        (GOOD.replace("max_batch_size = 4", 'platform = "tensorflow"'), "platform", "only 'onnxruntime_onnx'"),
        (GOOD + "\n[[input]]\nname = \"INPUT0\"\ndatatype = \"FP32\"\ndims = [16]\n", "input[1].name", "duplicate tensor name"),
        (GOOD.replace("dims = [4]", "dims = [4]\nshape = [4]"), "output[0].shape", "unknown key"),
        (GOOD.replace("max_batch_size = 4", "max_batch_size = 4\npreferred_batch_sizes = [8]"), "preferred_batch_sizes", "outside 1..max_batch_size"),
        (GOOD.replace("max_batch_size = 4", "max_batch_size = 4\nmax_queue_delay_us = 100\npreferred_batch_sizes = [2, 2]"),
         "preferred_batch_sizes", "lists a size twice"),
        (GOOD.replace("max_batch_size = 4", "max_batch_size = 4\npreferred_batch_sizes = [2]"),
         "preferred_batch_sizes", "set max_queue_delay_us > 0 too"),
        (GOOD.replace("max_batch_size = 4", "max_batch_size = 4\nmax_queue_delay_us = 1000000000000"),
         "max_queue_delay_us", "must be at most 10000000 (10 s)"),
        # (max_queue bounds each of the 3 default priority levels; a tenant's bound spans them)
        (GOOD.replace("max_batch_size = 4", "max_batch_size = 4\nmax_queue = 8\nmax_tenant_queue = 24"),
         "max_tenant_queue", "must be less than max_queue x priority_levels = 8 x 3 (24: the most the model queues), "
                             "or it would never apply"),
        (GOOD.replace("max_batch_size = 4", "max_batch_size = 4\nmax_queue = 8\npriority_levels = 1\nmax_tenant_queue = 8"),
         "max_tenant_queue", "must be less than max_queue (8: the most the model queues)"),
        (GOOD.replace("max_batch_size = 4", "max_batch_size = 0\nmax_queue_delay_us = 200000"),
         "max_queue_delay_us", "applies only to a model that batches"),
        (GOOD.replace("max_batch_size = 4", "max_batch_size = 0\nmax_queue_delay_us = 100\npreferred_batch_sizes = [1]"),
         "max_queue_delay_us", "max_batch_size is 0"),
        (GOOD.replace("max_batch_size = 4", 'max_batch_size = 4\nname = "something_else"'),
         "name", "must be the model's folder name"),
        (GOOD.replace("dims = [4]", 'dims = [4]\nlabels = ["a", "b", "c"]'), "output[0].labels", "3 labels for 4 values per row"),
    ],
)
def test_invalid_config_names_file_and_field(tmp_path, toml, field, fragment):
    error = load_error(tmp_path, toml)
    assert error.path.endswith("m/1/model.toml")
    assert error.field == field
    assert fragment in str(error)
    assert f"model.toml: {field}: " in str(error)


def test_batching_needs_dynamic_first_dim(tmp_path):
    toml = (
        'max_batch_size = 4\n'
        '[[input]]\nname = "data"\ndatatype = "FP32"\ndims = []\n'
        '[[input]]\nname = "shape"\ndatatype = "INT64"\ndims = []\n'
        '[[output]]\nname = "reshaped"\ndatatype = "FP32"\ndims = [-1]\n'
    )
    error = load_error(tmp_path, toml, onnx_models.reshape())
    assert error.field == "max_batch_size"
    assert "no dynamic first (batch) dim" in str(error) and "set max_batch_size = 0" in str(error)


def test_not_toml(tmp_path):
    error = load_error(tmp_path, "max_batch_size = = 3")
    assert "not valid TOML" in str(error)


def test_a_model_toml_saved_with_a_byte_order_mark_loads(tmp_path):
    """(Model repository audit) an editor that starts UTF-8 files with a byte order mark (Windows Notepad) made a
    valid file "not valid TOML: Invalid statement (at line 1, column 1)", nothing there to see. Its digest is still
    of the bytes as they are."""
    import hashlib

    make_repo(tmp_path, None)
    toml = tmp_path / "m" / "1" / "model.toml"
    toml.write_bytes(b"\xef\xbb\xbf" + GOOD.encode())
    (mv,) = ModelHub(tmp_path).load("m")
    assert mv.config.max_batch_size == 4
    assert mv.runtime.config_sha256 == hashlib.sha256(toml.read_bytes()).hexdigest()


def test_a_model_toml_beside_the_versions_is_refused_not_ignored(tmp_path):
    # Where Triton keeps config.pbtxt; here it would have been skipped without a word (the settings
    # silently not applied), so the model is refused with where the file belongs.
    make_repo(tmp_path, None)
    (tmp_path / "m" / "model.toml").write_text(GOOD)
    hub = ModelHub(tmp_path)
    loaded, failed = hub.load_all()
    assert not loaded
    (entry,) = hub.index()
    assert entry.state == "UNAVAILABLE"
    assert entry.reason == (f"{tmp_path / 'm' / 'model.toml'}: not read here: a model's settings go in each "
                            f"version's folder, next to its model.onnx ({tmp_path / 'm'}/<version>/model.toml)")
    (tmp_path / "m" / "model.toml").rename(tmp_path / "m" / "1" / "model.toml")  # moved where it belongs: loads
    (mv,) = hub.load("m")
    assert mv.runtime.config.max_batch_size == 4


def test_broken_onnx_file(tmp_path):
    folder = tmp_path / "m" / "1"
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(b"not a model")
    with pytest.raises(ModelConfigError) as info:
        ModelHub(tmp_path).load("m")
    assert "model.onnx" in info.value.path and "onnxruntime cannot load it" in str(info.value)


def test_failed_reload_keeps_previous_version_live(tmp_path):
    hub = ModelHub(make_repo(tmp_path, GOOD))
    (first,) = hub.load("m")
    (tmp_path / "m" / "1" / "model.toml").write_text(GOOD.replace("dims = [16]", "dims = [3]"))
    with pytest.raises(ModelConfigError):
        hub.load("m")
    assert hub.get("m") is first
    assert hub.index()[0].state == "READY"


def test_index_reports_failure_reason(tmp_path):
    hub = ModelHub(make_repo(tmp_path, GOOD.replace("dims = [16]", "dims = [3]")))
    loaded, failed = hub.load_all()
    assert not loaded and "m" in failed
    (entry,) = hub.index()
    assert entry.state == "UNAVAILABLE" and "config says [3]" in entry.reason


def test_cuda_requested_without_gpu_is_a_clear_error(tmp_path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has CUDA")
    error = load_error(tmp_path, 'provider = "cuda"\n' + GOOD)
    assert error.field == "provider" and "'cuda' requested" in str(error)


def test_numeric_versions_sort_numerically(tmp_path):
    for version in ("2", "10", "9"):
        onnx_models.save(onnx_models.mlp([16, 8, 4]), tmp_path / "m" / version / "model.onnx")
    hub = ModelHub(tmp_path)
    hub.load("m")
    assert hub.versions("m") == ["2", "9", "10"]
    assert hub.get("m").version == "10"


def test_a_lowered_compute_runs_at_the_lowered_priority_and_comes_back(tmp_path):
    """OnnxModel.run lowers the thread only around onnxruntime's compute (Lane batch_nice)."""
    import os
    import threading

    import numpy as np

    from kernel.threads import can_lower_and_restore, lower_next_compute, normal_compute

    if not can_lower_and_restore(5):
        pytest.skip("this process may not restore a thread's priority (no CAP_SYS_NICE)")
    # Big enough that one run takes a while on any machine, so an observer sees it.
    onnx_models.save(onnx_models.mlp([256, 2048, 2048, 2048, 8], seed=3), tmp_path / "big" / "1" / "model.onnx")
    hub = ModelHub(tmp_path)
    mv = hub.load("big")[0]
    feeds = {mv.config.inputs[0].name: np.ones((256, 256), np.float32)}
    tid = threading.get_native_id()
    base = os.getpriority(os.PRIO_PROCESS, tid)
    seen: set[int] = set()
    running = threading.Event()
    done = threading.Event()

    def observe() -> None:
        running.wait(30)
        while not done.is_set():
            seen.add(os.getpriority(os.PRIO_PROCESS, tid))

    observer = threading.Thread(target=observe)
    observer.start()
    lower_next_compute(base + 5, base)
    try:
        running.set()
        for _ in range(3):
            mv.runtime.run(feeds)
            if base + 5 in seen:
                break
    finally:
        done.set()
        normal_compute()
        observer.join(30)
    assert base + 5 in seen, seen  # lowered while onnxruntime computed (without the GIL) ...
    assert os.getpriority(os.PRIO_PROCESS, tid) == base  # ... and back afterwards
    mv.runtime.run(feeds)  # with nothing asked, nothing changes
    assert os.getpriority(os.PRIO_PROCESS, tid) == base


def test_the_load_time_profile_stops_at_256_rows_and_16_mib(tmp_path):
    """(Scheduling audit) ``max_batch_size = 4000000`` made the profile allocate and run 4M rows of zeros at load:
    17.8 s and 3.7 GB. The fit is a line: it extrapolates past the largest batch profiled."""
    from kernel.models.config import load as load_config
    from kernel.models.runtime import OnnxModel, profile_rows

    onnx_models.save_mlp_version(tmp_path, "wide", [16, 8, 4], seed=3, provider="cpu", max_batch_size=4_000_000)
    version = tmp_path / "wide" / "1"
    model = OnnxModel.load(version / "model.onnx", load_config(version / "model.toml", "wide", "1"), "wide", "1")
    assert profile_rows(model.config) == 256
    assert [rows for rows, _ in model.profile(repeats=1)] == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    onnx_models.save_mlp_version(tmp_path, "huge_rows", [65536, 4], seed=3, provider="cpu", max_batch_size=1024)
    version = tmp_path / "huge_rows" / "1"
    config = load_config(version / "model.toml", "huge_rows", "1")
    assert profile_rows(config) == (16 << 20) // (65536 * 4 + 4 * 4)  # 63 rows of 256 KiB in and 16 bytes out


def test_a_model_that_fails_on_the_all_ones_probe_keeps_its_profile(tmp_path):
    """(A review) the probe of class-score ranges runs an all-ones row too; a model that runs on zeros but not on
    ones (an index into a one-row table) lost its whole load-time profile to it."""
    from kernel.models.config import load as load_config
    from kernel.models.runtime import OnnxModel

    version = tmp_path / "lookup" / "1"
    onnx_models.save(onnx_models.lookup(table_rows=1), version / "model.onnx")
    (version / "model.toml").write_text('provider = "cpu"\nmax_batch_size = 4\n[[input]]\nname = "x"\n'
                                        'datatype = "FP32"\ndims = [1]\n[[output]]\nname = "y"\ndatatype = "FP32"\n'
                                        'dims = [2]\n')
    model = OnnxModel.load(version / "model.onnx", load_config(version / "model.toml", "lookup", "1"), "lookup", "1")
    assert [rows for rows, _ in model.profile(repeats=1)] == [1, 2, 4]
    assert model.probed_ranges["y"] == (0.0, 1.0)  # (the zeros row's answer: table row 0, [0, 1])


def test_instances_the_lane_can_never_run_are_warned_about(tmp_path, caplog):
    """``instances = 64`` of a 34 MB model took 4.4 GB on a lane that runs 2-3 batches at once, without a word."""
    import logging

    from conftest import start_kernel

    onnx_models.save_mlp_version(tmp_path / "models", "many", [16, 8, 4], seed=3, provider="cpu", instances=16)
    with caplog.at_level(logging.WARNING, logger="aios.server"):
        server = start_kernel(tmp_path / "models")
        server.stop(grace=1)
    warned = [r.getMessage() for r in caplog.records if "instances = 16" in r.getMessage()]
    assert len(warned) == 1 and "can never run and only take memory" in warned[0], warned
