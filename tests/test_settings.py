"""Settings layers (defaults < kernel.toml < AIOS_* < flags) and their errors."""

from __future__ import annotations

import gc

import pytest

from kernel.config import Settings, SettingsError, load_settings

from conftest import start_kernel


def test_defaults():
    settings = load_settings(environ={})
    assert settings == Settings()
    assert settings.port == 8001 and settings.front_end == "auto"
    assert settings.slots >= 1


def test_layers_override_in_order(tmp_path):
    config = tmp_path / "kernel.toml"
    config.write_text('[kernel]\nport = 9000\nworkers = 8\nfront_end = "aio"\n')
    settings = load_settings(config, {"workers": 3, "port": None}, environ={"AIOS_PORT": "9100", "AIOS_LOG_LEVEL": "debug"})
    assert settings.port == 9100  # env beats file
    assert settings.workers == 3  # flag beats file
    assert settings.front_end == "aio"  # file beats default
    assert settings.log_level == "DEBUG"


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        ({"environ": {"AIOS_PORT": "http"}}, "port (from $AIOS_PORT) must be int"),
        ({"overrides": {"front_end": "gevent"}}, "front_end (from --front-end) must be one of auto, sync, aio"),
        ({"overrides": {"port": 70000}}, "port (from --port) must be 0..65535"),
        ({"overrides": {"workers": 0}}, "workers (from --workers) must be >= 2"),
        ({"environ": {"AIOS_WORKERS": "1"}}, "workers (from $AIOS_WORKERS) must be >= 2 (at least one call slot is kept for priority-1"),
        ({"environ": {"AIOS_GIL_SWITCH_INTERVAL_US": "-5"}}, "gil_switch_interval_us (from $AIOS_GIL_SWITCH_INTERVAL_US) must be 0..1000000"),
        ({"environ": {"AIOS_BATCH_NICE": "20"}}, "batch_nice (from $AIOS_BATCH_NICE) must be 0..19"),
        ({"environ": {"AIOS_LANE_SLOTS": "5000"}}, "lane_slots (from $AIOS_LANE_SLOTS) must be 0..1024 (0 = one per core)"),
        ({"environ": {"AIOS_GC_THRESHOLD": "-1"}}, "gc_threshold (from $AIOS_GC_THRESHOLD) must be 0..10000000 (0 = Python's default)"),
        ({"environ": {"AIOS_LOG_LEVEL": "LOUD"}}, "log_level (from $AIOS_LOG_LEVEL)"),
    ],
)
def test_bad_values_name_setting_and_source(kwargs, fragment):
    kwargs.setdefault("environ", {})
    with pytest.raises(SettingsError) as info:
        load_settings(**kwargs)
    assert fragment in str(info.value)


@pytest.mark.parametrize("threshold", [25_000, 0])
def test_a_started_kernel_sets_the_collectors_young_threshold_or_leaves_it(model_repo, threshold):
    before = gc.get_threshold()
    gc.set_threshold(700, *before[1:])
    server = start_kernel(model_repo, gc_threshold=threshold)
    try:
        assert gc.get_threshold() == ((threshold or 700), *before[1:])  # the older generations' stay
    finally:
        server.stop(grace=0)
        gc.set_threshold(*before)


def test_unknown_key_in_file(tmp_path):
    config = tmp_path / "kernel.toml"
    config.write_text("prot = 1\n")
    with pytest.raises(SettingsError) as info:
        load_settings(config, environ={})
    assert "unknown setting 'prot'" in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(SettingsError) as info:
        load_settings(tmp_path / "nope.toml", environ={})
    assert "does not exist" in str(info.value)


def test_gpu_models_on_the_threaded_front_end_get_a_hint_in_the_log():
    from kernel.server import front_end_hint

    hint = front_end_hint("sync", ["cpu", "cuda:0"])
    assert hint and "cuda:0" in hint and "--front-end aio" in hint
    assert front_end_hint("aio", ["cpu", "cuda:0"]) is None
    assert front_end_hint("sync", ["cpu"]) is None


def test_auto_front_end_is_asyncio_only_when_a_model_runs_on_a_gpu():
    from kernel.server import choose_front_end

    assert choose_front_end("auto", ["cpu"], "event engine") == ("sync", "auto: no model on a GPU")
    assert choose_front_end("auto", [], "event engine")[0] == "sync"  # nothing loaded yet: models may come later
    assert choose_front_end("auto", ["cpu", "cuda:0", "cuda:1"], "event engine") == ("aio", "auto: models on cuda:0, cuda:1")
    front_end, why = choose_front_end("auto", ["cuda:0"], "iomgr")  # the operator asked for the threaded-only I/O path
    assert front_end == "sync" and "grpc_iomgr" in why
    for asked in ("sync", "aio"):  # an explicit choice is kept, with nothing to explain
        assert choose_front_end(asked, ["cuda:0"], "event engine") == (asked, "")


def test_an_aios_variable_that_is_no_setting_is_warned_about_with_the_closest_name(caplog):
    """(Upgrade audit) AIOS_AUDIT_MOD=off was ignored without a word, where `audit_mod` in kernel.toml is refused."""
    with caplog.at_level("WARNING", logger="aios.config"):
        settings = load_settings(None, None, environ={"AIOS_AUDIT_MOD": "off", "AIOS_ADDRESS": "h:1", "AIOS_PORT": "9"})
    assert settings.audit_mode == "fsync" and settings.port == 9
    assert [r.getMessage() for r in caplog.records] == [
        "environment variable AIOS_AUDIT_MOD is not a setting and is ignored (did you mean AIOS_AUDIT_MODE?)"]
