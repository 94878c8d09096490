"""The README and docs/ tell the truth about what can be checked mechanically: the settings table names every
setting with its real default, the metrics table every family /metrics exports, every `aios-kernel ...` command
line shown names commands and flags that exist, and every AIOS_* variable the kernel knows is documented.

After a thousand commits the text had been kept right by hand (each audit re-read it); these tests fail at the
commit that makes it drift instead. The metrics check scrapes a real claims kernel; the rest read the files and
the CLI's own argparse parsers.
"""

from __future__ import annotations

import argparse
import re
import shlex
import urllib.request
from dataclasses import MISSING, fields
from pathlib import Path

from conftest import free_port, start_claims_kernel
from prometheus_client.parser import text_string_to_metric_families

from kernel.audit.cli import build_parser as audit_parser
from kernel.cli import build_parser
from kernel.config import OTHER_VARIABLES, Settings

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def section(text: str, heading: str) -> str:
    """The text under ``heading`` (a markdown heading line) up to the next heading of its level or above."""
    level = heading.split(" ", 1)[0]
    start = text.index(f"\n{heading}\n") + len(heading) + 2
    ends = [m.start() for m in re.finditer(r"^(#+) ", text[start:], re.MULTILINE) if len(m.group(1)) <= len(level)]
    return text[start:start + ends[0]] if ends else text[start:]


def table_rows(text: str) -> list[list[str]]:
    """The cells of each markdown table row in ``text`` (each table's header and separator rows left out)."""
    lines = text.splitlines()
    return [[cell.strip() for cell in line.strip().strip("|").split(" | ")]
            for line, after in zip(lines, lines[1:] + [""])
            if line.startswith("|") and not line.startswith("|---") and not after.startswith("|---")]


# -- settings ----------------------------------------------------------------------------------------------------

def _documented_settings() -> dict[str, str]:
    rows = table_rows(section(README, "## Settings"))
    return {re.fullmatch(r"`(\w+)`", row[0]).group(1): row[1] for row in rows}


def _as_documented(field) -> str:
    """How the table writes a default: `true`, `8001`, `1.0`, or "empty"."""
    default = field.default
    if isinstance(default, bool):
        return "true" if default else "false"
    return "empty" if default == "" else str(default)


def test_the_settings_table_holds_every_setting_and_nothing_else():
    documented = _documented_settings()
    settings = [f.name for f in fields(Settings)]
    assert sorted(documented) == sorted(settings), (
        f"in the README but no setting: {sorted(set(documented) - set(settings))}; "
        f"settings missing from the README: {sorted(set(settings) - set(documented))}")


def test_each_setting_is_documented_with_its_real_default():
    documented = _documented_settings()
    wrong = {}
    for field in fields(Settings):
        assert field.default is not MISSING, field.name
        cell = documented[field.name]
        shown = re.match(r"`([^`]*)`|empty", cell)
        assert shown, f"{field.name}: no default in {cell!r}"
        text = shown.group(1) if shown.group(1) is not None else "empty"
        expected = _as_documented(field)
        same = (float(text) == float(expected)) if field.type in ("int", "float") else text == expected
        if not same:
            wrong[field.name] = (text, expected)
    assert not wrong, f"README default != code default: {wrong}"


def test_the_serve_flags_the_settings_section_lists_are_the_flags_serve_takes():
    said = re.search(r"`serve` and `demo` take flags for (.*?)\. ", section(README, "## Settings"), re.DOTALL).group(1)
    listed = set(re.findall(r"`(--[\w-]+)`", said))
    commands = _subcommands(build_parser())
    for name in ("serve", "demo"):
        flags = {o for a in commands[name]._actions for o in a.option_strings if o.startswith("--")}
        settings_flags = flags - {"--help", "--config", "--requests", "--concurrency"}
        assert listed == settings_flags, name


# -- metrics -----------------------------------------------------------------------------------------------------

def _documented_metrics() -> set[str]:
    names = set()
    for row in table_rows(section(README, "### Metrics")):
        names.update(re.sub(r"\{.*", "", name) for name in re.findall(r"`([a-z_*]+(?:\{[^`]*\})?)`", row[0]))
    return names


def test_the_metrics_table_names_every_family_the_endpoint_exports_and_no_other(claims_models, tmp_path):
    documented = _documented_metrics()
    server = start_claims_kernel(claims_models, tmp_path, metrics_port=free_port())
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as response:
            exported = {family.name for family in text_string_to_metric_families(response.read().decode())}
    finally:
        server.stop(grace=0)
    patterns = {name for name in documented if name.endswith("*")}
    named = {name for name in documented - patterns if name.startswith("aios_")}
    ours = {name for name in exported if name.startswith("aios_")}
    # (the parser names a counter's family without its _total)
    ours = {name + "_total" if f"{name}_total" in named else name for name in ours}
    assert ours == named, (f"exported but not in the README: {sorted(ours - named)}; "
                           f"in the README but not exported: {sorted(named - ours)}")
    others = exported - {name for name in exported if name.startswith("aios_")}
    assert {name for name in others if not any(name.startswith(p.rstrip("*")) for p in patterns)} <= documented
    assert documented - named - patterns <= others  # (python_info)


# -- command lines -----------------------------------------------------------------------------------------------

def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _command_lines():
    """(file:line, the words after `aios-kernel`) of each command line the docs show, continued lines joined."""
    for path in DOCS:
        text = path.read_text(encoding="utf-8").replace("\\\n", " ")
        for match in re.finditer(r"aios-kernel ((?:[^`\n#|;)\[]|\[(?!-))*)", text):
            line = text.count("\n", 0, match.start()) + 1
            try:
                words = shlex.split(match.group(1))
            except ValueError:
                words = match.group(1).split()
            yield f"{path.name}:{line}", words


def test_every_command_line_in_the_docs_names_a_command_and_flags_that_exist():
    wrong = []
    for where, words in _command_lines():
        parser, path = build_parser(), []
        for word in words:
            commands = _subcommands(parser)
            if word not in commands:
                break
            # (audit's words are handed to kernel/audit/cli.py's own parser)
            parser = audit_parser() if word == "audit" and not path else commands[word]
            path.append(word)
        if not path:
            if words and re.fullmatch(r"[a-z]+", words[0]):
                wrong.append(f"{where}: aios-kernel {' '.join(words)}: no such command")
            continue  # else not a command: "aios-kernel 0.1.0" in the start line
        flags = {o for a in parser._actions for o in a.option_strings}
        unknown = [w.split("=")[0] for w in words if w.startswith("--") and w.split("=")[0] not in flags]
        rest = [w for w in words[len(path):] if w not in ("...", "…")]
        if unknown or (_subcommands(parser) and rest and not rest[0].startswith("-")):
            wrong.append(f"{where}: aios-kernel {' '.join(words)}: {unknown or 'no such subcommand'}")
    assert not wrong, "\n".join(wrong)


# -- environment variables ---------------------------------------------------------------------------------------

def test_every_aios_variable_is_a_setting_or_one_the_readme_lists_and_each_listed_one_is_known():
    setting_variables = {f"AIOS_{f.name.upper()}" for f in fields(Settings)}
    listed = set(re.findall(r"`(AIOS_[A-Z_]+)", section(README, "## Settings").split("Other environment variables")[1]))
    assert OTHER_VARIABLES <= listed, f"not in the README's 'Other environment variables': {OTHER_VARIABLES - listed}"
    mentioned = {name for path in DOCS for name in re.findall(r"\bAIOS_[A-Z][A-Z_]*[A-Z]", path.read_text())}
    # (AIOS_AUDIT_MOD is the README's example of a typo the kernel warns about)
    unknown = mentioned - setting_variables - OTHER_VARIABLES - {"AIOS_AUDIT_MOD"}
    assert not unknown, f"the docs name variables the kernel does not read: {sorted(unknown)}"


# -- file references: model.toml, pipeline files, policy files -----------------------------------------------------

def _documented_keys(docstring: str, after: str) -> dict[str, dict[str, str]]:
    """{table: {key: value as written}} of the TOML example in ``docstring`` from the line ``after`` on ("" is
    the top level; ``[[input]]`` is "input")."""
    tables: dict[str, dict[str, str]] = {"": {}}
    table = ""
    for line in docstring[docstring.index(after):].splitlines()[1:]:
        code = line.strip().split("#", 1)[0].strip()
        if not line.startswith("    ") and line.strip():
            break  # the end of the indented block
        if header := re.fullmatch(r"\[\[?([\w.]+)\]\]?", code):
            table = header.group(1)
            tables.setdefault(table, {})
        elif key := re.fullmatch(r"(\w+) = (.+)", code):
            tables[table][key.group(1)] = key.group(2)
    return tables


def test_the_model_toml_schema_names_every_key_a_load_takes_with_its_default():
    import tomllib

    from kernel.models import config

    documented = _documented_keys(config.__doc__, "Schema")
    top = set(documented[""]) | {name for name in documented if name and "." not in name}
    assert top == config._TOP_KEYS, (top ^ config._TOP_KEYS)
    tensor = set(documented["input"]) | set(documented["output"]) | {"optional"}  # (optional: said refused)
    assert tensor == config._TENSOR_KEYS and "optional = true" in config.__doc__
    defaults = {f.name: f.default for f in fields(config.ModelConfig) if f.default is not MISSING}
    wrong = {}
    for key, written in documented[""].items():
        if key in defaults and key != "max_batch_size":  # (64 there is the example, not the default for a graph
            value = tomllib.loads(f"v = {written}")["v"]     # without a batch dimension: README, Model repository)
            expected = defaults[key]
            if (tuple(value) if isinstance(value, list) else value) != expected:
                wrong[key] = (value, expected)
    assert not wrong, f"documented default != ModelConfig's: {wrong}"


def test_the_pipeline_file_format_names_every_key_a_load_takes():
    from kernel.pipelines import spec

    documented = _documented_keys(spec.__doc__, "Format")
    assert {table: set(keys) for table, keys in documented.items() if table} == spec._SECTIONS


def test_the_policy_file_format_names_every_key_a_load_takes():
    import kernel.policy
    from kernel.policy import loader

    documented = _documented_keys(kernel.policy.__doc__, "File format")
    expected = {table: set(keys) for table, keys in loader.SECTIONS.items() if keys is not None}
    assert {table: set(keys) for table, keys in documented.items() if table in expected} == expected
    assert set(documented) - {""} == set(loader.SECTIONS)


def test_every_kernel_toml_the_docs_show_is_one_the_kernel_loads(tmp_path):
    from kernel.config import load_settings

    blocks = [(path.name, block) for path in DOCS
              for block in re.findall(r"```toml\n(.*?)```", path.read_text(encoding="utf-8"), re.DOTALL)]
    assert blocks
    for name, block in blocks:
        config = tmp_path / "kernel.toml"
        config.write_text(block)
        load_settings(config, environ={})  # (raises naming the line of a key or value the kernel refuses)


def test_the_upgrade_notes_list_every_schema_version_of_the_store():
    from kernel.store.schema import MIGRATIONS, latest_version

    upgrades = section((ROOT / "docs" / "operations.md").read_text(encoding="utf-8"), "## Upgrades and rollbacks")
    listed = upgrades.split("Schema versions so far:", 1)[1].split(". ", 1)[0]
    assert {int(n) for n in re.findall(r"(?:^|;\s+)(\d+) ", listed.strip())} == {v for v, _, _ in MIGRATIONS}, listed
    assert f"upgraded from schema version 6 to {latest_version()} " in upgrades  # (the example of the log's line)


def test_the_rpc_tables_name_every_rpc_the_kernel_serves_and_no_other():
    from kernel._proto.aios.kernel.v1 import kernel_pb2
    from kernel._proto.inference import grpc_service_pb2

    served = {(service.full_name.rsplit(".", 1)[1], method.name)
              for module in (kernel_pb2, grpc_service_pb2) for service in module.DESCRIPTOR.services_by_name.values()
              for method in service.methods}
    named = set()
    tables = section(README, "## What the kernel answers").split("\n### ", 1)[0]  # (not the retry table's codes)
    for row in table_rows(tables):
        first = row[0]
        service = re.match(r"`(\w+)\.", first)
        for name in re.findall(r"`(?:\w+\.)?(\w+\*?)`", first):
            named.add(name)
            if service:  # (the aios.kernel.v1 table writes Service.Method first, then Method)
                named.add(f"{service.group(1)}.{name}")
    missing = {f"{s}.{m}" for s, m in served
               if m not in named and f"{s}.{m}" not in named and not any(
                   p.endswith("*") and m.startswith(p[:-1]) for p in named)}
    assert not missing, f"RPCs missing from the README's tables: {sorted(missing)}"
    methods = {m for _, m in served}
    unknown = {n for n in named if "." not in n and not n.endswith("*") and n not in methods}
    assert not unknown, f"the README's tables name RPCs the kernel does not serve: {sorted(unknown)}"


def test_every_command_is_shown_in_the_docs():
    def paths(parser, path):
        for name, command in _subcommands(parser).items():
            command = audit_parser() if name == "audit" and not path else command
            yield [*path, name]
            yield from paths(command, [*path, name])

    shown = {" ".join(words) for _, words in _command_lines()}
    missing = [" ".join(p) for p in paths(build_parser(), [])
               if not any(line == " ".join(p) or line.startswith(" ".join(p) + " ") for line in shown)]
    assert not missing, f"commands no `aios-kernel ...` line of the docs shows: {missing}"
