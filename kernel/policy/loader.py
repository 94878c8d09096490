"""Read a policy file (TOML), check everything, and build the ``Policy``.

Every problem is collected (not just the first) and reported as
``FILE:LINE: subject: reason``; any error refuses the whole file with a
``PolicyError``. Checks, in order: TOML syntax; sections and keys (unknown
ones are refused, with a suggestion); declared types; each rule's fields;
each condition's syntax and types; then, once all of that is clean, the
table analysis (``analysis.py``): rules that can never match, overlaps
under UNIQUE, unreachable rules under FIRST, a missing or misplaced default.
"""

from __future__ import annotations

import difflib
import hashlib
import math
import re
from collections import Counter
from pathlib import Path

from . import tomlsafe
from .analysis import Analyzer
from .checker import check_condition
from .errors import ERROR, WARNING, Diagnostic, PolicyError
from .normal import normalize
from .parser import ParseError, parse_condition
from .policy import Policy, Rule
from .sourcemap import SourceMap
from .syntax import fields_of
from .types import INPUT_TYPES, KERNEL_REASON_IDS, NAME_RE, RESERVED, Schema, close_match, shown
from ..limits import FileTooLarge, authored_text_problem, read_bounded

HIT_POLICIES = ("UNIQUE", "FIRST", "PRIORITY", "COLLECT")
SECTIONS = {"policy": ("name", "version", "hit_policy", "description"), "inputs": None, "model": ("classes",),
            "outputs": ("actions",), "rule": ("id", "description", "when", "action", "escalate", "adjust", "default")}
# Sizes past which a policy file is refused before anything else is done with it: far beyond any table people
# write (the largest tested are rate tables of a few thousand rules), near enough that parsing, checking and
# compiling one stays a few seconds at most and the table analysis (bounded by its own work limit) means something.
MAX_FILE_BYTES = 1 << 20  # 1 MiB
MAX_RULES = 10_000
MAX_INPUTS = 1_000
# COLLECT sums the adjustments of the rules that fire: bounded so that the sum of every rule's (at most MAX_RULES)
# stays finite and does not depend on the order rules fire in (two 1e308s made inf, or 0 in another order).
MAX_ADJUST = 1e6
# Errors listed before the check of a file stops: each costs memory and time (a message, a difflib search over the
# declared names), and a hostile file can make one per token (a 400 KB upload made 12,000, and 6.8 GB of them).
# An upload's answer shows a few anyway (its details are bounded, kernel.errors.clamp); a person fixes the first.
MAX_LISTED_ERRORS = 100
_KIND = {"number": "number", "integer": "number", "string": "string", "bool": "bool"}
_NAME = re.compile(r"[A-Za-z0-9_.-]+\Z")


def load_policy(path: str | Path, *, strict: bool = True) -> Policy:
    """Load and check a policy file; raises ``PolicyError`` (``FILE:LINE: ...``) when it is not usable.

    ``strict=False`` downgrades the table analysis' errors (overlaps under
    UNIQUE, unreachable rules, rules that can never match) to warnings, for
    tests and tools that must evaluate imperfect tables; the kernel never
    serves a policy loaded that way.
    """
    path = Path(path)
    try:
        data = read_bounded(path, MAX_FILE_BYTES)
    except FileTooLarge as exc:
        raise PolicyError([Diagnostic(str(path), 0, "file", f"is {exc.size:,} bytes; a policy file may have at "
                                                            f"most {MAX_FILE_BYTES:,} (it was not read)")]) from None
    except OSError as exc:
        raise PolicyError([Diagnostic(str(path), 0, "file", f"cannot read: {exc.strerror or exc}")]) from None
    return parse_policy(data, source=str(path), strict=strict)


def parse_policy(text: str | bytes, source: str = "<policy>", *, strict: bool = True) -> Policy:
    """Check and build a policy from its text (an upload, a hot reload); same errors as ``load_policy``."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return _Loader(data, source, strict).load()


class _TooManyErrors(Exception):
    """``MAX_LISTED_ERRORS`` errors are listed: the check of the file stops."""


class _Loader:
    def __init__(self, data: bytes, source: str, strict: bool = True):
        self.data = data
        self.source = source
        self.strict = strict
        self.diagnostics: list[Diagnostic] = []
        self.error_count = 0
        self.map: SourceMap | None = None
        self.file_text = ""  # the decoded file, kept on the Policy (its hash is of exactly these bytes)

    def add(self, line: int, subject: str, message: str, *, column: int = 0, severity: str = ERROR,
            excerpt: str = "") -> None:
        self.diagnostics.append(Diagnostic(self.source, line, subject, message, column=column, severity=severity,
                                           excerpt=excerpt))
        if severity == ERROR:
            self.error_count += 1
            if self.error_count >= MAX_LISTED_ERRORS:
                raise _TooManyErrors

    def line(self, table, key: str | None = None) -> int:
        if not self.map:
            return 0
        found = self.map.line_of(table, key)
        if not found and isinstance(table, str):
            # Written another way than the loader expects: `[[policy]]` (an array of tables, header
            # (name, 0)) or `[outputs.actions]` (a sub-table, header "outputs.actions"). Point there.
            found = (self.map.line_of(f"{table}.{key}") if key is not None else 0) or self.map.line_of((table, 0))
            found = found or (self.map.line_of(table) if key is not None else 0)
        return found

    def fail(self) -> PolicyError:
        found = sorted(self.diagnostics, key=lambda d: (d.severity != ERROR, d.line))
        if self.error_count >= MAX_LISTED_ERRORS:  # (last: the first error stays the one a caller reads first)
            found.insert(self.error_count, Diagnostic(
                self.source, 0, "file", f"the check stopped after {MAX_LISTED_ERRORS} errors; fix these and check "
                                        "again"))
        return PolicyError(found)

    def load(self) -> Policy:
        if len(self.data) > MAX_FILE_BYTES:
            self.add(0, "file", f"is {len(self.data):,} bytes; a policy file may have at most {MAX_FILE_BYTES:,} "
                                "(split the table, or key it by fewer, wider rules)")
            raise self.fail()
        try:
            text = self.data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = self.data.count(b"\n", 0, exc.start) + 1
            self.add(line, "file", f"is not UTF-8 text (byte {exc.start})")
            raise self.fail() from None
        self.file_text = text
        self.map = SourceMap(text)
        try:
            doc = tomlsafe.loads(text)
        except tomlsafe.TomlError as exc:
            # (No line from the parser: the error is at the end of the document, so its last line.)
            last = max(1, text.count("\n") + (0 if text.endswith("\n") else 1))
            self.add(exc.line or last, "TOML", exc.message, column=exc.column)
            raise self.fail() from None
        try:
            policy = self.build(doc)
        except _TooManyErrors:
            raise self.fail() from None
        if any(d.severity == ERROR for d in self.diagnostics):
            raise self.fail()
        return policy

    # -- sections
    def build(self, doc: dict) -> Policy | None:
        for section in doc:
            if section not in SECTIONS:
                self.unknown(None, section, SECTIONS, "section")
        head = self.table(doc, "policy", required=True)
        name = self.text(head, "policy", "name", required=True)
        if name and not _NAME.match(name):
            self.add(self.line("policy", "name"), "policy.name", f"{name!r} may use only letters, digits, _ . -")
        version = self.text(head, "policy", "version", required=True)
        description = self.text(head, "policy", "description") or ""
        hit_policy = self.text(head, "policy", "hit_policy", required=True)
        if hit_policy is not None:
            if hit_policy.upper() in HIT_POLICIES:
                hit_policy = hit_policy.upper()
            else:
                self.add(self.line("policy", "hit_policy"), "policy.hit_policy",
                         f"{hit_policy!r} is not a hit policy; use one of {', '.join(HIT_POLICIES)}")
                hit_policy = None
        inputs = self.inputs(doc)
        classes = self.names_list(self.table(doc, "model"), "model", "classes", required=False)
        actions = self.names_list(self.table(doc, "outputs", required=True), "outputs", "actions", required=True)
        rules = self.rules(doc, actions)
        declared = doc.get("inputs") if isinstance(doc.get("inputs"), dict) else {}
        schema = Schema(inputs, tuple(classes) if classes is not None else None,
                        frozenset(name for name in declared if name not in inputs))
        self.conditions(rules, schema)  # conditions are checked even when other parts have errors
        if any(d.severity == ERROR for d in self.diagnostics) or hit_policy is None or not rules:
            return None
        self.unused_inputs(inputs, rules)
        ranks = {a: i for i, a in enumerate(actions)}
        analyzer = Analyzer([r for r in rules if not r.default], hit_policy, ranks, schema)
        for finding in analyzer.run():
            rule = finding.rule
            line = self.rule_line(rule) if rule is not None else self.rule_line(rules[-1])
            subject = f"rule '{rule.id}'" if rule is not None else f"rule '{rules[-1].id}' (default)"
            self.add(line, subject, finding.message, severity=finding.severity if self.strict else WARNING)
        if any(d.severity == ERROR for d in self.diagnostics):
            return None
        return Policy(name=name, version=version, digest=hashlib.sha256(self.data).hexdigest(),
                      hit_policy=hit_policy, description=description, inputs=inputs,
                      classes=tuple(classes) if classes is not None else None, actions=tuple(actions),
                      rules=tuple(rules), warnings=tuple(d for d in self.diagnostics if d.severity == WARNING),
                      source=self.source, analysis_complete=analyzer.complete, text=self.file_text)

    def table(self, doc: dict, name: str, required: bool = False) -> dict:
        value = doc.get(name)
        if value is None:
            if required:
                self.add(1, f"[{name}]", "section is missing")
            return {}
        if not isinstance(value, dict):
            self.add(self.line(name), name, f"must be a table ([{name}]), not {type(value).__name__}")
            return {}
        allowed = SECTIONS[name]
        if allowed is not None:
            for key in value:
                if key not in allowed:
                    self.unknown(name, key, allowed, f"key in [{name}]")
        return value

    def unknown(self, table, key: str, allowed, what: str, owner: str = "") -> None:
        close = difflib.get_close_matches(key, list(allowed), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; allowed: {', '.join(allowed)}"
        line = self.line(table, key) if table is not None else (self.line(key) or self.line(None, key))
        where = f"{owner} {key}" if owner else (f"{table}.{key}" if table else key)
        self.add(line, where, f"unknown {what}{hint}")

    def text(self, table: dict, section, key: str, required: bool = False) -> str | None:
        value = table.get(key)
        subject = f"{section}.{key}" if isinstance(section, str) else f"rule #{section[1] + 1} {key}"
        if value is None:
            if required:
                self.add(self.line(section), subject, "is required")
            return None
        if not isinstance(value, str) or not value.strip():
            self.add(self.line(section, key), subject, "must be a non-empty string")
            return None
        if not self.printable(value, section, key, subject, multiline=key == "description"):
            return None
        return value

    def printable(self, value: str, section, key: str, subject: str, multiline: bool = False) -> bool:
        """Refuse control characters: versions and descriptions reach logs, listings and audit records,
        where a newline or an escape sequence could forge a line or rewrite a terminal. A description may
        span lines (newline and tab only)."""
        problem = authored_text_problem(value, multiline)
        if problem is None:
            return True
        self.add(self.line(section, key), subject, problem)
        return False

    def names_list(self, table: dict, section: str, key: str, required: bool) -> list[str] | None:
        value = table.get(key)
        subject = f"{section}.{key}"
        if value is None:
            if required:
                self.add(self.line(section), subject, "is required")
            return None
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
            self.add(self.line(section, key), subject, "must be a non-empty list of non-empty strings")
            return None
        # (counted once: list.count per name took 168 s for the 100,000 actions a 1 MiB file holds)
        duplicates = sorted(v for v, n in Counter(value).items() if n > 1)
        if duplicates:
            self.add(self.line(section, key), subject, f"lists {', '.join(map(repr, duplicates))} more than once")
        return value

    def inputs(self, doc: dict) -> dict[str, str]:
        table = doc.get("inputs", {})
        out: dict[str, str] = {}
        if not isinstance(table, dict):
            self.add(self.line("inputs"), "inputs", "must be a table ([inputs])")
            return out
        if len(table) > MAX_INPUTS:
            self.add(self.line("inputs"), "inputs", f"declares {len(table):,} inputs; at most {MAX_INPUTS:,} are "
                                                    "allowed")
            return out
        for name, ftype in table.items():
            line = self.line("inputs", name)
            if isinstance(ftype, dict):
                self.add(line, f"inputs.{name}", "input names cannot contain dots")
            elif not NAME_RE.match(name):
                self.add(line, f"inputs.{name}", "an input name is ASCII letters, digits and _, not starting with a digit")
            elif name in RESERVED:
                self.add(line, f"inputs.{name}", f"'{name}' is reserved (model outputs and keywords)")
            elif ftype not in INPUT_TYPES:
                close = difflib.get_close_matches(str(ftype), INPUT_TYPES, n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                self.add(line, f"inputs.{name}", f"type {ftype!r} is not one of {', '.join(INPUT_TYPES)}{hint}")
            else:
                out[name] = ftype
        return out

    # -- rules
    def rules(self, doc: dict, actions: list[str] | None) -> list[Rule]:
        entries = doc.get("rule")
        if entries is None:
            self.add(1, "[[rule]]", "the policy has no rules (each rule is a [[rule]] table)")
            return []
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            self.add(self.line("rule"), "rule", "write each rule as a [[rule]] table")
            return []
        if len(entries) > MAX_RULES:
            self.add(self.line(("rule", MAX_RULES)), "[[rule]]", f"the policy has {len(entries):,} rules; at most "
                                                                 f"{MAX_RULES:,} are allowed")
            return []
        rules, seen = [], {}
        known_actions = frozenset(actions) if actions is not None else None
        for index, entry in enumerate(entries):
            key = ("rule", index)
            rule_id = self.text(entry, key, "id", required=True) or f"#{index + 1}"
            label = f"rule '{rule_id}'"
            for k in entry:
                if k not in SECTIONS["rule"]:
                    self.unknown(key, k, SECTIONS["rule"], "key in [[rule]]", label)
            if rule_id in seen:
                self.add(self.line(key, "id"), f"{label} id", f"is used twice (first at line {seen[rule_id]})")
            seen.setdefault(rule_id, self.line(key, "id"))
            if rule_id in KERNEL_REASON_IDS:  # (a warning: a policy that served before an upgrade serves after it)
                self.add(self.line(key, "id"), f"{label} id", f"is an id the kernel gives reasons of its own "
                                                              f"({', '.join(KERNEL_REASON_IDS)}): choose another",
                         severity=WARNING)
            is_default = entry.get("default", False)
            if not isinstance(is_default, bool):
                self.add(self.line(key, "default"), f"{label} default", "must be true or false")
                is_default = False
            when = entry.get("when")
            if is_default and when is not None:
                self.add(self.line(key, "when"), f"{label} when", "the default rule has no condition: it applies "
                                                                  "when no other rule matches")
            elif not is_default:
                if when is None:
                    self.add(self.line(key), f"{label} when", "is required (or mark the rule `default = true`)")
                elif not isinstance(when, str) or not when.strip():
                    self.add(self.line(key, "when"), f"{label} when", "must be a non-empty string")
                    when = None
            action = entry.get("action")
            if action is None:
                self.add(self.line(key), f"{label} action", "is required")
            elif not isinstance(action, str):
                self.add(self.line(key, "action"), f"{label} action", "must be a string")
            elif known_actions is not None and action not in known_actions:
                close = close_match(action, actions)
                hint = f"; did you mean '{close}'?" if close else ""
                self.add(self.line(key, "action"), f"{label} action",
                         f"{action!r} is not one of outputs.actions ({shown(actions)}){hint}")
            escalate = entry.get("escalate", False)
            if not isinstance(escalate, bool):
                self.add(self.line(key, "escalate"), f"{label} escalate", "must be true or false")
            adjust = _finite(entry.get("adjust", 0.0))
            if adjust is None or abs(adjust) > MAX_ADJUST:
                self.add(self.line(key, "adjust"), f"{label} adjust",
                         f"must be a finite number from -{MAX_ADJUST:g} to {MAX_ADJUST:g}")
                adjust = 0.0
            description = entry.get("description", "")
            if not isinstance(description, str):
                self.add(self.line(key, "description"), f"{label} description", "must be a string")
                description = ""
            elif not self.printable(description, key, "description", f"{label} description", multiline=True):
                description = ""
            rule = Rule(rule_id, description, when if isinstance(when, str) else None, str(action), escalate is True,
                        float(adjust), is_default, self.line(key))
            rule.index = index
            rules.append(rule)
        defaults = [r for r in rules if r.default]
        if not defaults:
            self.add(self.line(("rule", len(entries) - 1)), "default rule",
                     "missing: add a last [[rule]] with `default = true` (it applies when no other rule matches)")
        elif len(defaults) > 1:
            self.add(defaults[1].line, f"rule '{defaults[1].id}' default",
                     f"a second default rule (the first is '{defaults[0].id}' at line {defaults[0].line})")
        elif not rules[-1].default:
            self.add(defaults[0].line, f"rule '{defaults[0].id}' default", "the default rule must be the last rule")
        return rules

    def rule_line(self, rule: Rule) -> int:
        return self.line(("rule", rule.index), "when") or rule.line

    def conditions(self, rules: list[Rule], schema: Schema) -> None:
        kinds = {}
        for rule in rules:
            if rule.default or rule.when is None:
                continue
            key = ("rule", rule.index)
            try:
                node = parse_condition(rule.when)
            except ParseError as exc:
                self.condition_error(rule, key, exc.message, exc.pos)
                continue
            checked, errors = check_condition(node, schema)
            for err in errors:
                if err.pos >= 0:
                    self.condition_error(rule, key, err.message, err.pos)
            if checked is None:
                continue
            reads = list(dict.fromkeys(f.name for f in fields_of(checked)))
            for name in reads:
                kinds[name] = _KIND[schema.type_of(name)]
            rule.node, rule.reads = checked, tuple(reads)
            rule.term = normalize(checked, kinds)

    def condition_error(self, rule: Rule, key, message: str, pos: int) -> None:
        line, column = self.map.position(key, "when", rule.when, pos)
        excerpt = _excerpt(rule.when, pos)
        where = f" (column {column})" if column else f" (character {pos + 1} of the condition)"
        self.add(line or rule.line, f"rule '{rule.id}' when", message + where, column=column, excerpt=excerpt)

    def unused_inputs(self, inputs: dict[str, str], rules: list[Rule]) -> None:
        read = {name for r in rules for name in r.reads}
        for name in inputs:
            if name not in read:
                self.add(self.line("inputs", name), f"inputs.{name}", "is declared but no rule reads it",
                         severity=WARNING)


def _finite(value) -> float | None:
    """``value`` as a finite float, or None: not a number, nan, inf, or an integer beyond any float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:  # a TOML integer of hundreds of digits
        return None
    return number if math.isfinite(number) else None


def _excerpt(text: str, pos: int) -> str:
    start = text.rfind("\n", 0, pos) + 1
    end = text.find("\n", pos)
    line = text[start:end if end >= 0 else len(text)]
    return f"{line}\n{' ' * (pos - start)}^"
