"""The durable tasks' settings: task_max_attempts, task_backoff_s, task_max_backoff_s, task_workers.

Their defaults keep a task retrying a failure that may pass (a model reload, a
full queue) for minutes, not the ~0.3 s the runner's own defaults give; a bad
value is refused naming the setting and where it came from, as every other
setting is. (tests/test_task_retries.py shows a running kernel using them.)
"""

from __future__ import annotations

import pytest

from kernel.config import Settings, SettingsError, load_settings


def retry_window_s(settings: Settings) -> float:
    """How long a task that keeps failing transiently is retried: the sum of its backoff delays."""
    return sum(min(settings.task_backoff_s * 2 ** n, settings.task_max_backoff_s)
               for n in range(settings.task_max_attempts - 1))


def test_the_defaults_retry_for_minutes():
    settings = load_settings(environ={})
    assert (settings.task_max_attempts, settings.task_backoff_s, settings.task_max_backoff_s) == (10, 1.0, 60.0)
    assert 180 <= retry_window_s(settings) <= 600  # 1 + 2 + 4 + ... + 32 + 60 + 60 + 60 = 243 s


def test_the_settings_come_from_every_layer(tmp_path):
    config = tmp_path / "kernel.toml"
    config.write_text("[kernel]\ntask_max_attempts = 20\ntask_backoff_s = 0.5\n")
    settings = load_settings(config, {"task_max_backoff_s": 120}, environ={"AIOS_TASK_BACKOFF_S": "2"})
    assert (settings.task_max_attempts, settings.task_backoff_s, settings.task_max_backoff_s) == (20, 2.0, 120.0)


@pytest.mark.parametrize("kwargs, message", [
    ({"environ": {"AIOS_TASK_MAX_ATTEMPTS": "0"}},
     "task_max_attempts (from $AIOS_TASK_MAX_ATTEMPTS) must be 1..1000 (1 = no retry), got 0"),
    ({"overrides": {"task_max_attempts": 5000}},
     "task_max_attempts (from --task-max-attempts) must be 1..1000 (1 = no retry), got 5000"),
    ({"environ": {"AIOS_TASK_MAX_ATTEMPTS": "2.5"}},
     "task_max_attempts (from $AIOS_TASK_MAX_ATTEMPTS) must be int, got '2.5'"),
    ({"environ": {"AIOS_TASK_BACKOFF_S": "-1"}},
     "task_backoff_s (from $AIOS_TASK_BACKOFF_S) must be 0..86400 (a day), got -1.0"),
    ({"environ": {"AIOS_TASK_BACKOFF_S": "nan"}},
     "task_backoff_s (from $AIOS_TASK_BACKOFF_S) must be a finite number, got 'nan'"),
    ({"environ": {"AIOS_TASK_MAX_BACKOFF_S": "1e300"}},
     "task_max_backoff_s (from $AIOS_TASK_MAX_BACKOFF_S) must be 0..86400 (a day), got 1e+300"),
    ({"environ": {"AIOS_TASK_WORKERS": "0"}},
     "task_workers (from $AIOS_TASK_WORKERS) must be 1..256 (threads running tasks), got 0"),
    ({"overrides": {"task_workers": 257}},
     "task_workers (from --task-workers) must be 1..256 (threads running tasks), got 257"),
    ({"environ": {"AIOS_TASK_WORKERS": "two"}},
     "task_workers (from $AIOS_TASK_WORKERS) must be int, got 'two'"),
    ({"environ": {"AIOS_TASK_BACKOFF_S": "30", "AIOS_TASK_MAX_BACKOFF_S": "10"}},
     "task_max_backoff_s (from $AIOS_TASK_MAX_BACKOFF_S) must be >= task_backoff_s (30), got 10; raise it or "
     "lower task_backoff_s"),
])
def test_bad_values_are_refused_naming_the_setting_and_its_source(kwargs, message):
    kwargs.setdefault("environ", {})
    with pytest.raises(SettingsError) as info:
        load_settings(**kwargs)
    assert str(info.value) == message


def test_no_retry_at_all_is_a_valid_choice():
    settings = load_settings(environ={"AIOS_TASK_MAX_ATTEMPTS": "1", "AIOS_TASK_BACKOFF_S": "0",
                                      "AIOS_TASK_MAX_BACKOFF_S": "0"})
    assert retry_window_s(settings) == 0


def test_task_workers_come_from_every_layer(tmp_path):
    assert load_settings(environ={}).task_workers == 2
    config = tmp_path / "kernel.toml"
    config.write_text("[kernel]\ntask_workers = 8\n")
    assert load_settings(config, environ={}).task_workers == 8
    assert load_settings(config, environ={"AIOS_TASK_WORKERS": "16"}).task_workers == 16
    assert load_settings(config, {"task_workers": 1}, environ={"AIOS_TASK_WORKERS": "16"}).task_workers == 1


def test_a_kernel_runs_tasks_on_task_workers_threads(model_repo, tmp_path):
    import threading

    from conftest import start_kernel

    def task_threads() -> int:
        return sum(1 for thread in threading.enumerate() if thread.name.startswith("aios-task-"))

    before = task_threads()  # (another kernel of this process, if any)
    server = start_kernel(model_repo, pipelines=str(tmp_path / "pipelines"), task_workers=5)
    try:
        assert server.decisions.tasks.workers == 5
        assert task_threads() - before == 5
    finally:
        server.stop(grace=1)
