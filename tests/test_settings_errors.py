"""Settings that used to end in a traceback or be taken silently: each is now one line naming the setting."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kernel.audit.writer import AuditLog
from kernel.config import SettingsError, load_settings
from kernel.errors import FailedPrecondition

ROOT = Path(__file__).resolve().parent.parent


def refused(config=None, **kwargs) -> str:
    kwargs.setdefault("environ", {})
    with pytest.raises(SettingsError) as info:
        load_settings(config, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def toml(tmp_path, text: str) -> Path:
    path = tmp_path / "kernel.toml"
    path.write_text(text)
    return path


# ---------------------------------------------------------------- the file itself


def test_config_that_is_a_directory(tmp_path):
    assert refused(tmp_path) == f"cannot read config {tmp_path}: Is a directory"


def test_config_that_is_not_utf8(tmp_path):
    config = tmp_path / "kernel.toml"
    config.write_bytes(b"port = 9000\nhost = \"caf\xe9\"\n")
    message = refused(config)
    assert message.startswith(f"cannot read config {config}: not UTF-8 text")


def test_config_that_cannot_be_read(tmp_path, monkeypatch):
    config = toml(tmp_path, "port = 9000\n")

    def denied(self, *args, **kwargs):  # (tests run as root here, where chmod 000 does not stop a read)
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_text", denied)
    assert refused(config) == f"cannot read config {config}: Permission denied"


# ---------------------------------------------------------------- its shape


@pytest.mark.parametrize("value", ["5", '"x"', "[1, 2]", "true"])
def test_kernel_that_is_not_a_table(tmp_path, value):
    config = toml(tmp_path, f"kernel = {value}\n")
    assert refused(config).startswith(f"{config}: [kernel] must be a table, got kernel = ")


@pytest.mark.parametrize(
    "text,named",
    [
        ("[kernel]\nport = 9000\n[server]\nworkers = 3\n", "[server]"),
        ("workers = 3\n[kernel]\nport = 9000\n", "'workers'"),  # a setting outside [kernel] is not merged either
        ("[kernal]\nworkers = 3\n[kernel]\nport = 9000\n", "[kernal]"),
    ],
)
def test_nothing_beside_the_kernel_table_is_ignored(tmp_path, text, named):
    message = refused(toml(tmp_path, text))
    assert f"unknown top-level {named} beside [kernel]" in message


def test_top_level_keys_without_a_kernel_table_still_work(tmp_path):
    assert load_settings(toml(tmp_path, "port = 9000\nworkers = 3\n"), environ={}).workers == 3
    assert "unknown setting 'server'" in refused(toml(tmp_path, "port = 9000\n[server]\nworkers = 3\n"))
    assert "unknown setting 'prot'" in refused(toml(tmp_path, "[kernel]\nprot = 1\n"))


def test_an_unknown_key_in_the_file_names_its_line_and_the_likely_setting(tmp_path):
    # (Operator walk-through) the environment's typos got "did you mean"; the file's got a list of 34 keys.
    path = toml(tmp_path, 'port = 9000\n\naudit_mod = "async"\n')
    assert refused(path).endswith(f"{path}:3: unknown setting 'audit_mod'; did you mean 'audit_mode'?")


# ---------------------------------------------------------------- numbers


@pytest.mark.parametrize("name", ["grace_seconds", "pipeline_poll_s", "audit_checkpoint_ms"])
@pytest.mark.parametrize("literal", ["nan", "inf", "-inf", "+nan"])
def test_float_settings_refuse_nan_and_infinity_from_the_file(tmp_path, name, literal):
    config = toml(tmp_path, f"[kernel]\n{name} = {literal}\n")
    assert f"{name} (from {config}:2) must be a finite number" in refused(config)


@pytest.mark.parametrize("name", ["grace_seconds", "pipeline_poll_s", "audit_checkpoint_ms"])
@pytest.mark.parametrize("text", ["nan", "NaN", "inf", "Infinity", "-inf"])
def test_float_settings_refuse_nan_and_infinity_from_the_environment(name, text):
    var = f"AIOS_{name.upper()}"
    assert refused(environ={var: text}) == f"{name} (from ${var}) must be a finite number, got {text!r}"


@pytest.mark.parametrize(
    "name,value,fragment",
    [
        ("grace_seconds", "-1", "must be 0..86400"),
        ("grace_seconds", "1e300", "must be 0..86400"),
        ("pipeline_poll_s", "-0.5", "must be 0 (load at start only) or 0.1..86400 seconds"),
        ("pipeline_poll_s", "1e300", "must be 0 (load at start only) or 0.1..86400 seconds"),
        # (the watcher looked at the folder without pause: a core's worth of CPU, and the GIL, taken from calls)
        ("pipeline_poll_s", "0.000001", "must be 0 (load at start only) or 0.1..86400 seconds, got 1e-06"),
        ("pipeline_poll_s", "0.05", "must be 0 (load at start only) or 0.1..86400 seconds, got 0.05"),
        ("audit_checkpoint_ms", "0", "must be > 0 and <= 86400000"),
        ("audit_checkpoint_ms", "-5", "must be > 0 and <= 86400000"),
        ("audit_checkpoint_ms", "1e300", "must be > 0 and <= 86400000"),  # past threading.TIMEOUT_MAX
    ],
)
def test_float_settings_out_of_range(name, value, fragment):
    var = f"AIOS_{name.upper()}"
    assert f"{name} (from ${var}) {fragment}" in refused(environ={var: value})


def test_float_settings_in_range_are_taken(tmp_path):
    config = toml(tmp_path, "[kernel]\ngrace_seconds = 0\naudit_checkpoint_ms = 2.5\n")
    settings = load_settings(config, environ={"AIOS_PIPELINE_POLL_S": "0.25"})
    assert (settings.grace_seconds, settings.audit_checkpoint_ms, settings.pipeline_poll_s) == (0.0, 2.5, 0.25)


@pytest.mark.parametrize("literal", ["8302.9", "true", "false", "inf", "nan", "1e400"])
def test_int_settings_refuse_fractions_and_booleans_in_the_file(tmp_path, literal):
    config = toml(tmp_path, f"[kernel]\nport = {literal}\n")
    assert f"port (from {config}:2) must be int, got " in refused(config)


def test_int_settings_from_flags_and_environment(tmp_path):
    assert refused(overrides={"workers": 3.5}) == "workers (from --workers) must be int, got 3.5"
    assert refused(overrides={"workers": True}) == "workers (from --workers) must be int, got True"
    assert refused(environ={"AIOS_PORT": "8302.9"}) == "port (from $AIOS_PORT) must be int, got '8302.9'"
    config = toml(tmp_path, "[kernel]\nport = 8302.0\n")  # a whole number written as a float loses nothing
    assert load_settings(config, environ={}).port == 8302
    assert isinstance(load_settings(config, environ={}).port, int)


# ---------------------------------------------------------------- audit_key


def test_audit_key_that_is_a_directory(tmp_path):
    assert refused(environ={"AIOS_AUDIT_KEY": str(tmp_path)}) == (
        f"audit_key (from $AIOS_AUDIT_KEY) {tmp_path} is a directory, not the signing key's PEM file")


@pytest.mark.parametrize("source", ["file", "env", "flag"])
def test_an_explicit_audit_key_that_is_missing_stops_the_start(tmp_path, source):
    key = tmp_path / "secrets" / "audit.pem"  # a secret mount that failed
    config = toml(tmp_path, f'[kernel]\naudit_key = "{key}"\n')
    settings, named = {
        "file": (lambda: load_settings(config, environ={}), f"{config}:2"),
        "env": (lambda: load_settings(environ={"AIOS_AUDIT_KEY": str(key)}), "$AIOS_AUDIT_KEY"),
        "flag": (lambda: load_settings(overrides={"audit_key": str(key)}, environ={}), "--audit-key"),
    }[source]
    settings = settings()
    assert settings.audit_key == str(key)  # (loading the settings alone does not need the file)
    with pytest.raises(FailedPrecondition) as info:  # what DecisionSide does at start (kernel/decisions.py)
        AuditLog.open(tmp_path / "audit", key_path=settings.audit_key or None)
    # It says where to look and how to make a new key, not to drop the setting (a docs audit: it advised
    # signing with a key kept in the data dir, the set-up docs/operations.md warns against).
    assert info.value.message.startswith(
        f"audit_key (from {named}) {key} does not exist: check the path and the secret's mount. ")
    assert "openssl genpkey -algorithm ed25519" in info.value.message
    assert "for development only" in info.value.message
    assert not key.exists() and not key.parent.exists()


def test_an_explicit_audit_key_that_exists_is_used_and_the_default_is_created(tmp_path):
    with AuditLog.open(tmp_path / "first") as log:  # the default: created in the audit directory
        first = log.public_key
    assert (tmp_path / "first" / "signing-key.pem").exists()
    settings = load_settings(environ={"AIOS_AUDIT_KEY": str(tmp_path / "first" / "signing-key.pem")})
    with AuditLog.open(tmp_path / "second", key_path=settings.audit_key) as log:
        assert log.public_key == first


def test_an_unreadable_audit_key_names_the_setting(tmp_path, monkeypatch):
    key = tmp_path / "audit.pem"
    key.write_bytes(b"")
    settings = load_settings(environ={"AIOS_AUDIT_KEY": str(key)})

    def denied(self, *args, **kwargs):  # (tests run as root here, where chmod 000 does not stop a read)
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(FailedPrecondition) as info:
        AuditLog.open(tmp_path / "audit", key_path=settings.audit_key)
    assert info.value.message == f"audit_key (from $AIOS_AUDIT_KEY) {key} cannot be read: Permission denied"


def test_serve_with_a_missing_audit_key_exits_with_one_line(tmp_path):
    key = tmp_path / "secrets" / "audit.pem"
    (tmp_path / "models").mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "kernel", "serve", "--models", str(tmp_path / "models"), "--port", "0",
         "--data-dir", str(tmp_path / "data")],
        capture_output=True, text=True, timeout=30, cwd=ROOT,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("AIOS_")}, "AIOS_AUDIT_KEY": str(key)},
    )
    assert result.returncode == 2, result.stderr
    assert f"audit_key (from $AIOS_AUDIT_KEY) {key} does not exist" in result.stderr
    assert "Traceback" not in result.stderr and not key.exists()


# ---------------------------------------------------------------- folders


@pytest.mark.parametrize("name", ["data_dir", "models", "pipelines"])
@pytest.mark.parametrize("value", ["", "  "])
def test_a_folder_setting_that_is_empty_is_refused(name, value):
    """AIOS_DATA_DIR=${DATA_DIR} with DATA_DIR unset: the kernel started on the current directory, its audit log
    and store written there (and AIOS_PIPELINES= served any *.toml in it), without a word (a settings audit)."""
    message = refused(environ={f"AIOS_{name.upper()}": value})
    assert message.startswith(f"{name} (from $AIOS_{name.upper()}) is empty: name a folder"), message


@pytest.mark.parametrize("name", ["data_dir", "pipelines", "host"])
def test_a_nul_character_in_a_setting_is_refused(tmp_path, name):
    """TOML's "\\u0000" in a path ended the start in a traceback (ValueError: embedded null byte)."""
    config = toml(tmp_path, f'[kernel]\n{name} = "a\\u0000b"\n')
    assert refused(config).startswith(f"{name} (from {config}"), refused(config)
    assert "must not hold a NUL character" in refused(config)


@pytest.mark.parametrize("value", ["2147483648", "99999999999"])
def test_a_message_limit_past_what_grpc_takes_is_refused(value):
    """gRPC takes max_message_bytes as a C int: 99999999999 passed the settings and ended the start, after the models
    loaded and the audit log opened, in an OverflowError traceback."""
    message = refused(environ={"AIOS_MAX_MESSAGE_BYTES": value})
    assert message == f"max_message_bytes (from $AIOS_MAX_MESSAGE_BYTES) must be 1024..2147483647 (2 GiB - 1, gRPC's limit), got {value}"
    assert load_settings(environ={"AIOS_MAX_MESSAGE_BYTES": "2147483647"}).max_message_bytes == 2**31 - 1


def test_preallocation_past_64_mib_is_refused():
    """Each chunk of zeros is one buffer in memory: audit_preallocate_bytes = 10**12 (with a segment as large) ended
    the start in a MemoryError traceback, after the models had loaded."""
    environ = {"AIOS_AUDIT_PREALLOCATE_BYTES": str(10**12), "AIOS_AUDIT_SEGMENT_BYTES": str(10**12)}
    assert refused(environ=environ) == ("audit_preallocate_bytes (from $AIOS_AUDIT_PREALLOCATE_BYTES) must be "
                                        f"0..{64 << 20} (64 MiB; 0 = append), got {10**12}")
    assert load_settings(environ={"AIOS_AUDIT_PREALLOCATE_BYTES": str(64 << 20)}).audit_preallocate_bytes == 64 << 20


def test_a_refused_value_from_the_file_names_its_line(tmp_path):
    """A bank's kernel.toml runs to dozens of lines: the unknown-key error named its line, a bad value only the file."""
    config = toml(tmp_path, "# production\n[kernel]\nhost = \"0.0.0.0\"\n\nworkers = 4\nmax_watches = 9\n")
    assert refused(config) == (f"max_watches (from {config}:6) must be below workers (4): each open watch holds a "
                               "handler thread of the sync front end, and calls beyond workers are refused; got 9")
    config = toml(tmp_path, "[kernel]\nport = 8001\nworkers = 'many'\n")
    assert refused(config) == f"workers (from {config}:3) must be int, got 'many'"


# ---------------------------------------------------------------- TOML's own types


@pytest.mark.parametrize("name,literal,written", [
    ("workers", '"5"', "workers = 5"),
    ("port", "'8302'", "port = 8302"),
    ("grace_seconds", '"0.5"', "grace_seconds = 0.5"),
    ("audit_stream_enabled", '"true"', "audit_stream_enabled = true"),
    ("answer_later", "\"Off\"", "answer_later = false"),
])
def test_a_number_or_boolean_in_quotes_in_the_file_is_refused_naming_its_line(tmp_path, name, literal, written):
    """(Settings audit) kernel.toml's `workers = "5"` was read as 5 without a word, where `workers = 5.5` and
    `port = true` are refused: TOML says what type a value is, and a quoted one is text. The message names the line
    and says how to write it."""
    config = toml(tmp_path, f"# production\n[kernel]\n{name} = {literal}\n")
    message = refused(config)
    assert message.startswith(f"{name} (from {config}:3) must be ") and "the string" in message, message
    assert f"without quotes ({written})" in message


def test_a_number_where_a_string_goes_in_the_file_is_refused(tmp_path):
    config = toml(tmp_path, "[kernel]\nhost = 127\n")
    assert refused(config) == (f"host (from {config}:2) must be a string, got 127: in kernel.toml write it in quotes "
                               '(host = "127")')


def test_environment_variables_are_text_by_nature_and_read_as_the_setting_type():
    settings = load_settings(environ={"AIOS_WORKERS": "5", "AIOS_GRACE_SECONDS": "0.5",
                                      "AIOS_AUDIT_STREAM_ENABLED": "true"})
    assert (settings.workers, settings.grace_seconds, settings.audit_stream_enabled) == (5, 0.5, True)
