"""Load-time checks: every refusal names the file, the line and the field or rule; hot reload keeps the old policy."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from kernel.errors import InvalidArgument
from kernel.policy import PolicyError, PolicySlot, load_policy, parse_policy

HEAD = """\
[policy]
name = "t"
version = "1"
hit_policy = "{hit}"

[inputs]
amount = "number"
count = "integer"
tier = "string"
flag = "bool"

[model]
classes = ["approve", "review", "deny"]

[outputs]
actions = ["deny", "review", "approve"]
"""
HEAD_LINES = HEAD.count("\n")


def rules(*specs: tuple[str, str], default: str = "review") -> str:
    out = ""
    for index, (when, action) in enumerate(specs, 1):
        out += f'\n[[rule]]\nid = "R{index}"\nwhen = "{when}"\naction = "{action}"\n'
    return out + f'\n[[rule]]\nid = "D"\ndefault = true\naction = "{default}"\n'


def policy_file(tmp_path: Path, body: str, hit: str = "FIRST", head: str = HEAD) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(head.format(hit=hit) + body)
    return path


def refused(path: Path) -> PolicyError:
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    return info.value


def line_of(path: Path, fragment: str, nth: int = 0) -> int:
    hits = [i for i, line in enumerate(path.read_text().splitlines(), 1) if fragment in line]
    return hits[nth]


def table_warnings(path: Path) -> list:
    """Warnings of a policy that loads, leaving out the unused-input ones these small tables produce."""
    return [w for w in load_policy(path).warnings if not w.subject.startswith("inputs.")]


def only_error(path: Path):
    exc = refused(path)
    assert len(exc.errors) == 1, [str(d) for d in exc.errors]
    return exc.errors[0]


def test_valid_policy_loads_with_identity(tmp_path):
    path = policy_file(tmp_path, rules(("amount > 10", "deny"), ("tier == 'gold'", "approve"), ("flag", "review"),
                                       ("count >= 3", "deny")))
    policy = load_policy(path)
    assert (policy.name, policy.version, policy.hit_policy) == ("t", "1", "FIRST")
    assert policy.hash == hashlib.sha256(path.read_bytes()).hexdigest()
    assert policy.inputs == {"amount": "number", "count": "integer", "tier": "string", "flag": "bool"}
    assert [r.id for r in policy.rules] == ["R1", "R2", "R3", "R4", "D"] and policy.default.id == "D"
    assert policy.rules[0].line == HEAD_LINES + 2 and policy.source == str(path)
    assert policy.warnings == ()
    same = parse_policy(path.read_text(), source="upload")
    assert same.hash == policy.hash and same.source == "upload"


def test_policy_error_is_invalid_argument_with_fields(tmp_path):
    path = policy_file(tmp_path, rules(("amout > 10", "deny")))
    exc = refused(path)
    assert isinstance(exc, InvalidArgument) and exc.code == "INVALID_ARGUMENT"
    assert (exc.path, exc.line, exc.subject) == (str(path), line_of(path, "amout"), "rule 'R1' when")
    assert str(exc).startswith(f"{path}:{exc.line}: rule 'R1' when: unknown field 'amout'; did you mean 'amount'?")


def test_toml_syntax_error_has_line_and_column(tmp_path):
    path = policy_file(tmp_path, '\n[[rule]]\nid = "R1"\nwhen = "amount > 1\naction = "deny"\n')
    d = only_error(path)
    assert d.subject == "TOML" and d.line == line_of(path, 'when = "amount > 1') and d.column > 0


def test_a_byte_order_mark_is_named(tmp_path):
    """(A pipeline author's walk-through: an editor's BOM read "TOML: Invalid statement" at line 1.)"""
    path = policy_file(tmp_path, rules(("amount > 1", "deny")))
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    d = only_error(path)
    assert d.subject == "TOML" and d.line == 1 and "byte-order mark" in d.message and "without a BOM" in d.message


def test_not_utf8(tmp_path):
    path = tmp_path / "p.toml"
    path.write_bytes(b'[policy]\nname = "\xff"\n')
    d = only_error(path)
    assert d.line == 2 and "UTF-8" in d.message


def test_unreadable_file_is_a_policy_error(tmp_path):
    exc = refused(tmp_path / "absent.toml")
    assert "cannot read" in str(exc)


@pytest.mark.parametrize("change, fragment, subject, message", [
    (('hit_policy = "{hit}"', 'hit_policy = "ANY"'), "hit_policy", "policy.hit_policy", "is not a hit policy"),
    (('name = "t"', 'name = "t t"'), 'name = "t t"', "policy.name", "may use only"),
    (('version = "1"', 'version = 1'), "version = 1", "policy.version", "non-empty string"),
    (('tier = "string"', 'tier = "strng"'), "strng", "inputs.tier", "did you mean 'string'?"),
    (('flag = "bool"', 'label = "bool"'), 'label = "bool"', "inputs.label", "reserved"),
    (('flag = "bool"', '"2x" = "bool"'), '"2x"', "inputs.2x", "an input name is"),
    (('actions = ["deny", "review", "approve"]', 'actions = ["deny", "deny", "review", "approve"]'), "actions =",
     "outputs.actions", "more than once"),
    (('actions = ["deny", "review", "approve"]', 'actions = []'), "actions =", "outputs.actions", "non-empty list"),
    (('[outputs]', '[output]'), "[output]", "output", "unknown section; did you mean 'outputs'?"),
    (('version = "1"', 'version = "1"\nhit-policy = "x"'), "hit-policy", "policy.hit-policy",
     "unknown key in [policy]"),
])
def test_section_errors(tmp_path, change, fragment, subject, message):
    old, new = change
    head = HEAD.replace(old, new)
    assert head != HEAD
    body = rules(("amount > 10", "deny"))
    path = policy_file(tmp_path, body, head=head)
    exc = refused(path)
    found = [d for d in exc.errors if d.subject == subject]
    assert found, [str(d) for d in exc.errors]
    assert message in found[0].message
    assert found[0].line == line_of(path, fragment.replace("{hit}", "FIRST"))


def test_missing_sections(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('[inputs]\na = "number"\n')
    exc = refused(path)
    subjects = {d.subject: d.line for d in exc.errors}
    assert subjects["[policy]"] == 1 and subjects["[outputs]"] == 1 and subjects["[[rule]]"] == 1


@pytest.mark.parametrize("body_rule, fragment, subject, message", [
    ('id = "R1"\nwhen = "amount > 1"\nactoin = "deny"\naction = "deny"', "actoin", "rule 'R1' actoin",
     "did you mean 'action'?"),
    ('id = "R1"\nwhen = "amount > 1"\naction = "pay"', 'action = "pay"', "rule 'R1' action", "not one of outputs"),
    ('id = "R1"\nwhen = "amount > 1"', 'id = "R1"', "rule 'R1' action", "is required"),
    ('id = "R1"\naction = "deny"', 'id = "R1"', "rule 'R1' when", "is required"),
    ('id = "R1"\nwhen = "amount > 1"\naction = "deny"\nescalate = "yes"', "escalate", "rule 'R1' escalate",
     "true or false"),
    ('id = "R1"\nwhen = "amount > 1"\naction = "deny"\nadjust = inf', "adjust", "rule 'R1' adjust", "finite"),
    ('when = "amount > 1"\naction = "deny"', 'when = "amount > 1"', "rule #1 id", "is required"),
])
def test_rule_key_errors(tmp_path, body_rule, fragment, subject, message):
    body = f"\n[[rule]]\n{body_rule}\n" + rules()
    path = policy_file(tmp_path, body)
    exc = refused(path)
    found = [d for d in exc.errors if d.subject == subject]
    assert found, [str(d) for d in exc.errors]
    assert message in found[0].message
    expected_line = line_of(path, fragment) if subject.split()[-1] not in ("action", "when", "id") or \
        "required" not in message else line_of(path, "[[rule]]")
    assert found[0].line == expected_line


@pytest.mark.parametrize("rule_id", ["FALLBACK", "REVIEW", "WITHDRAWN"])
def test_a_rule_named_as_the_kernels_own_reasons_is_warned_about(tmp_path, rule_id):
    """The ids the kernel gives reasons no rule made (a model fault's fallback, a resolution, a withdrawal): warned
    about, not refused, so a policy that served before an upgrade serves after it."""
    path = policy_file(tmp_path, rules(("amount > 1", "deny")).replace('id = "R1"', f'id = "{rule_id}"'))
    found = [w for w in load_policy(path).warnings if w.subject == f"rule '{rule_id}' id"]
    assert found and "an id the kernel gives reasons of its own" in found[0].message


def test_duplicate_rule_id(tmp_path):
    path = policy_file(tmp_path, rules(("amount > 1", "deny"), ("amount < 0", "deny")).replace('"R2"', '"R1"'))
    d = only_error(path)
    assert d.subject == "rule 'R1' id" and d.line == line_of(path, 'id = "R1"', 1)
    assert f"first at line {line_of(path, 'id = ' + chr(34) + 'R1')}" in d.message


@pytest.mark.parametrize("when, message, column_of", [
    ("amout > 1", "unknown field 'amout'; did you mean 'amount'?", "amout"),
    ("tier > 'a'", "a string can only be compared with == or !=", "tier"),
    ("tier == 5", "'tier' is a string but is compared with a number (5)", "5"),
    ("amount == 'x'", "'amount' is a number but is compared with a string ('x')", "'x'"),
    ("flag > true", "a bool can only be compared with == or !=", "flag"),
    ("amount", "'amount' is a number, not a condition", "amount"),
    ("tier in {'a', 3}", "the set holds a number", "3"),
    ("tier in [1, 2]", "intervals need a number field", "tier"),
    ("amount in [5, 1]", "empty interval", "amount"),
    ("amount in [1, 1)", "empty interval", "amount"),
    ("label == 'maybe'", "'maybe' is not one of the model's classes", "'maybe'"),
    ("score.maybe > 0.5", "'maybe' is not one of the model's classes", "score.maybe"),
    ("score > 0.5", "'score' needs a class", "score"),
    ("confidence is null", "model output and is never missing", "confidence"),
    ("tier == count", "only numbers can be compared field to field", "tier"),
    ("1 < 2", "compares two constants", "1"),
    ("(amount > 1) > 2", "only fields and values can be compared", "amount"),
    ("amount >> 1", "expected a field, a value or '('", "> 1"),
    ("amount > 5 AND count < 3", "a missing operator?), found 'AND' (keywords are lower case: and, or, not)", "AND"),
    ("flag == TRUE", "unknown field 'TRUE' (keywords are lower case: true)", "TRUE"),
])
def test_condition_errors_point_at_the_column(tmp_path, when, message, column_of):
    path = policy_file(tmp_path, rules((when.replace('"', '\\"'), "deny")))
    d = only_error(path)
    assert message in d.message, d.message
    assert d.subject == "rule 'R1' when"
    line = line_of(path, "when =")
    assert d.line == line
    source_line = path.read_text().splitlines()[line - 1]
    assert d.column == source_line.index(column_of, source_line.index('"') + 1) + 1
    assert f"(column {d.column})" in d.message and d.excerpt.splitlines()[1].endswith("^")


def test_error_inside_a_multiline_condition_points_at_its_line(tmp_path):
    body = '\n[[rule]]\nid = "R1"\nwhen = """\namount > 1 and\n    tier == 3"""\naction = "deny"\n' + rules()
    path = policy_file(tmp_path, body)
    d = only_error(path)
    assert d.line == line_of(path, "tier == 3") and d.column == 13


def test_condition_with_escapes_still_gets_the_line(tmp_path):
    body = '\n[[rule]]\nid = "R1"\nwhen = "tier == \\"a\\" and amout > 1"\naction = "deny"\n' + rules()
    path = policy_file(tmp_path, body)
    d = only_error(path)
    assert d.line == line_of(path, "amout") and d.column == 0 and "(character 17 of the condition)" in d.message


def test_every_error_is_reported_at_once(tmp_path):
    path = policy_file(tmp_path, rules(("amout > 1", "deny"), ("tier > 'x'", "pay")), hit="ANY")
    exc = refused(path)
    assert {d.subject for d in exc.errors} == {"policy.hit_policy", "rule 'R1' when", "rule 'R2' when",
                                                "rule 'R2' action"}
    assert "(and 3 more errors: " in str(exc)  # each of them in the message too (all an upload's caller sees)
    assert all(str(d) in str(exc) for d in exc.errors)
    assert [d.line for d in exc.errors] == sorted(d.line for d in exc.errors)


def test_inputs_with_bad_types_do_not_cascade(tmp_path):
    path = policy_file(tmp_path, rules(("tier == 'x'", "deny")), head=HEAD.replace('tier = "string"', 'tier = "txt"'))
    exc = refused(path)
    assert [d.subject for d in exc.errors] == ["inputs.tier"]


# -- the default rule
def test_missing_default(tmp_path):
    path = policy_file(tmp_path, '\n[[rule]]\nid = "R1"\nwhen = "amount > 1"\naction = "deny"\n')
    d = only_error(path)
    assert d.subject == "default rule" and "missing" in d.message and d.line == line_of(path, "[[rule]]")


def test_default_must_be_last_and_single_and_unconditional(tmp_path):
    body = '\n[[rule]]\nid = "D0"\ndefault = true\naction = "deny"\n[[rule]]\nid = "R1"\nwhen = "amount > 1"\n' \
           'action = "deny"\n'
    d = only_error(policy_file(tmp_path, body))
    assert d.subject == "rule 'D0' default" and "must be the last rule" in d.message
    body = rules(("amount > 1", "deny")) + '\n[[rule]]\nid = "D2"\ndefault = true\naction = "deny"\n'
    path = policy_file(tmp_path, body)
    assert "a second default rule" in only_error(path).message
    body = rules(("amount > 1", "deny")).replace('default = true', 'default = true\nwhen = "amount > 5"')
    path = policy_file(tmp_path, body)
    d = only_error(path)
    assert d.subject == "rule 'D' when" and "has no condition" in d.message and d.line == line_of(path, "amount > 5")


# -- table analysis
def test_rule_that_can_never_match(tmp_path):
    path = policy_file(tmp_path, rules(("amount > 5 and amount < 3", "deny"), ("count > 2 and count < 3", "deny")))
    exc = refused(path)
    assert [(d.subject, d.line) for d in exc.errors] == [
        ("rule 'R1'", line_of(path, "amount > 5")), ("rule 'R2'", line_of(path, "count > 2"))]
    assert all("can never match" in d.message for d in exc.errors)


def test_unique_overlap_is_refused_with_a_witness(tmp_path):
    path = policy_file(tmp_path, rules(("amount >= 10 and tier == 'gold'", "deny"),
                                       ("amount in [0, 20) and flag", "approve")), hit="UNIQUE")
    d = only_error(path)
    assert d.subject == "rule 'R2'" and d.line == line_of(path, "amount in [0, 20)")
    assert f"overlaps rule 'R1' (line {line_of(path, '[[rule]]')})" in d.message
    witness = d.message.split("e.g. ")[1]
    row = dict(part.split("=") for part in witness.split(", "))
    assert 10 <= float(row["amount"]) < 20 and row["tier"] == "'gold'" and row["flag"] == "true"


@pytest.mark.parametrize("a, b, overlap", [
    ("amount < 10", "amount >= 10", False),
    ("amount <= 10", "amount >= 10", True),
    ("count < 3", "count > 2", False),          # integers: nothing lies between 2 and 3
    ("amount < 3", "amount > 2", True),         # numbers: 2.5 does
    ("tier in {'a', 'b'}", "tier not in {'a', 'b'}", False),
    ("tier != 'a'", "tier != 'b'", True),
    ("flag", "not flag", False),
    ("flag == true", "flag != false", True),
    ("amount is null", "amount > 0", False),
    ("not (amount > 5)", "amount > 5", False),  # three-valued: neither matches a missing amount
    ("label == 'deny'", "label in {'review'}", False),
    ("score.deny > 0.5 and tier == 'a'", "score.deny <= 0.5 or tier == 'b'", False),
])
def test_unique_overlap_analysis(tmp_path, a, b, overlap):
    path = policy_file(tmp_path, rules((a, "deny"), (b, "approve")), hit="UNIQUE")
    if overlap:
        assert "overlaps rule 'R1'" in only_error(path).message
    else:
        assert table_warnings(path) == []


def test_unique_field_to_field_comparisons(tmp_path):
    # Provably overlapping (a witness is found by sampling) -> refused.
    path = policy_file(tmp_path, rules(("score.deny > score.approve", "deny"), ("score.deny > 0.5", "review")),
                       hit="UNIQUE")
    assert "overlaps rule 'R1'" in only_error(path).message
    # Disjoint through the same pair of fields -> decided exactly.
    path = policy_file(tmp_path, rules(("score.deny > score.approve", "deny"),
                                       ("score.approve >= score.deny", "review")), hit="UNIQUE")
    assert [w.message for w in table_warnings(path)] == [  # and together they cover every row
        "the default rule never applies: the rules cover every possible row"]
    # Disjoint only through arithmetic the analysis does not do -> a warning, not a refusal.
    path = policy_file(tmp_path, rules(("score.deny > score.approve and score.approve > 0.6", "deny"),
                                       ("score.deny < 0.5", "review")), hit="UNIQUE")
    warnings = table_warnings(path)
    assert len(warnings) == 1 and "could not prove it disjoint from rule 'R1'" in warnings[0].message


def test_first_unreachable_rule_covered_by_two_earlier_rules(tmp_path):
    path = policy_file(tmp_path, rules(("amount < 10", "deny"), ("amount >= 5 and tier == 'x'", "review"),
                                       ("amount < 8 and tier == 'x'", "approve"), ("amount < 8", "approve")))
    exc = refused(path)
    assert [d.subject for d in exc.errors] == ["rule 'R3'", "rule 'R4'"]
    d = exc.errors[0]
    assert d.line == line_of(path, "amount < 8 and tier") and "is unreachable" in d.message
    assert "matched first by 'R1', 'R2'" in d.message
    assert "matched first by 'R1'" in exc.errors[1].message


def test_first_reachable_rules_pass(tmp_path):
    path = policy_file(tmp_path, rules(("amount < 10", "deny"), ("amount <= 10", "review"),
                                       ("count < 3", "deny"), ("count <= 3 and count >= 3", "review")))
    assert table_warnings(path) == []
    path = policy_file(tmp_path, rules(("count <= 2", "deny"), ("count < 3", "review")))
    assert "is unreachable" in only_error(path).message  # integers: count < 3 is count <= 2


def test_priority_shadowed_rule_is_a_warning(tmp_path):
    path = policy_file(tmp_path, rules(("amount < 10", "approve"), ("amount < 5", "approve"),
                                       ("amount > 8", "deny")), hit="PRIORITY")
    warnings = table_warnings(path)
    assert [(w.subject, w.severity) for w in warnings] == [("rule 'R2'", "warning")]
    assert "never decides" in warnings[0].message and "'R1'" in warnings[0].message


def test_default_that_never_applies_and_unused_inputs_are_warnings(tmp_path):
    path = policy_file(tmp_path, rules(("amount < 10", "deny"), ("amount >= 10 or amount is null", "approve")))
    subjects = [(w.subject, w.message) for w in load_policy(path).warnings]
    assert ("rule 'D' (default)", "the default rule never applies: the rules cover every possible row") in subjects
    assert ("inputs.tier", "is declared but no rule reads it") in subjects


def test_non_strict_load_keeps_analysis_findings_as_warnings(tmp_path):
    path = policy_file(tmp_path, rules(("amount < 10", "deny"), ("amount < 5", "review")))
    refused(path)
    policy = load_policy(path, strict=False)
    assert [w.subject for w in policy.warnings if "unreachable" in w.message] == ["rule 'R2'"]


def test_complex_conditions_fall_back_to_sampling(tmp_path):
    terms = " and ".join(f"(amount > {i} or count > {i})" for i in range(10))  # 2^10 DNF terms
    path = policy_file(tmp_path, rules((terms, "deny"), ("amount < 0 and count < 0", "review")), hit="UNIQUE")
    warnings = table_warnings(path)
    assert any("too complex to analyse exactly" in w.message for w in warnings)
    path = policy_file(tmp_path, rules((terms, "deny"), ("amount > 100", "review")), hit="UNIQUE")
    assert "overlaps rule 'R1'" in only_error(path).message  # sampling finds a witness


def test_analysis_work_is_bounded_for_large_uploads():
    import random

    rng = random.Random(1)
    text = ('[policy]\nname = "big"\nversion = "1"\nhit_policy = "FIRST"\n[inputs]\na = "number"\nb = "number"\n'
            'c = "integer"\nd = "string"\n[outputs]\nactions = ["x", "y"]\n')
    for i in range(400):
        tests = [f"{f} in [{lo}, {lo + rng.randint(1, 30)})" for f, lo in ((f, rng.randint(0, 90)) for f in "abc")]
        when = " and ".join(rng.sample(tests, 2) + [f"d in {{'{rng.choice('pqrs')}', '{rng.choice('pqrs')}'}}"])
        text += f'[[rule]]\nid = "R{i}"\nwhen = "{when}"\naction = "{rng.choice("xy")}"\n'
    text += '[[rule]]\nid = "D"\ndefault = true\naction = "x"\n'
    policy = parse_policy(text, strict=False)
    stopped = [w for w in policy.warnings if "work limit" in w.message]
    assert len(stopped) == 1 and stopped[0].subject.startswith("rule 'R")
    assert policy.analysis_complete is False  # `policy check` exits 3: usable, but not fully checked
    culprits = [w.message for w in policy.warnings if "unreachable" in w.message]
    assert culprits and all(m.count("'") <= 2 * 8 or " more" in m for m in culprits)


def interval_table(hit: str, rules: list[tuple[str, str]]) -> str:
    text = (f'[policy]\nname = "rates"\nversion = "1"\nhit_policy = "{hit}"\n[inputs]\namount = "number"\n'
            'code = "string"\n[outputs]\nactions = ["a", "b"]\n')
    for rule_id, when in rules:
        text += f'[[rule]]\nid = "{rule_id}"\nwhen = "{when}"\naction = "a"\n'
    return text + '[[rule]]\nid = "D"\ndefault = true\naction = "b"\n'


RATES = [(f"R{i}", f"amount in [{i}, {i + 1})") for i in range(3000)]


@pytest.mark.parametrize("hit, extra, finding", [
    ("UNIQUE", ("X", "amount in [2999.5, 3000.5)"), "rule 'X': overlaps rule 'R2999'"),
    ("FIRST", ("X", "amount in [10.25, 10.5)"), "rule 'X': is unreachable: every row it matches is matched first by "
                                                "'R10'"),
    ("PRIORITY", ("X", "amount in [10.25, 10.5) or amount < 0"), None),  # reachable (amount < 0): no finding
])
def test_large_interval_tables_are_checked_fully(hit, extra, finding, monkeypatch):
    from kernel.policy import analysis

    # Only rules whose intervals touch are compared, so the table takes a few box operations per rule: with
    # a limit far below the 4.5 million pairs of 3,000 rules (the default limit stopped this table at its
    # 632nd rule), the analysis still runs to the end.
    monkeypatch.setattr(analysis, "WORK_LIMIT", 20_000)
    rules = RATES + [extra] if hit == "UNIQUE" else RATES[:1500] + [extra] + RATES[1500:]
    text = interval_table(hit, rules)
    policy = parse_policy(text, strict=False)
    assert policy.analysis_complete
    assert not [w for w in policy.warnings if "work limit" in w.message]
    found = [str(w) for w in policy.warnings if not w.subject.startswith("inputs.")]
    if finding is None:
        assert found == []
    else:
        assert len(found) == 1 and finding in found[0], found
        with pytest.raises(PolicyError) as info:
            parse_policy(text)
        assert [d.subject for d in info.value.errors] == ["rule 'X'"]


def test_large_tables_keyed_by_a_string_are_checked_fully(monkeypatch):
    from kernel.policy import analysis

    monkeypatch.setattr(analysis, "WORK_LIMIT", 20_000)
    rules = [(f"C{i}", f"code == 'c{i}' and amount > {i % 7}") for i in range(2000)]
    rules.append(("X", "code in {'c1999', 'zz'} and amount < 100"))
    policy = parse_policy(interval_table("UNIQUE", rules), strict=False)
    assert policy.analysis_complete
    overlaps = [w for w in policy.warnings if "overlaps" in w.message]
    assert [w.subject for w in overlaps] == ["rule 'X'"] and "overlaps rule 'C1999'" in overlaps[0].message


INLINE_RULES = '''\
rule = [
  {id = "A", when = "amount > 10", action = "deny"},
  { id = "B", description = "a [tricky] {one}, with \\"quotes\\"", when = "amount >> 1", action = "approve" },
  {id = "C", when = "amount > 20", action = "deny", escalate = "yes"},
  {id = "D", default = true, action = "approve"},
]
'''


def test_rules_written_as_an_array_of_inline_tables_get_their_lines(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text(INLINE_RULES + HEAD.format(hit="FIRST"))
    exc = refused(path)
    assert [(d.subject, d.line) for d in exc.errors] == [("rule 'B' when", 3), ("rule 'C' escalate", 4)]
    b = exc.errors[0]
    source_line = path.read_text().splitlines()[2]
    assert b.column == source_line.index(">> 1") + 2 and f"(column {b.column})" in b.message
    path.write_text(path.read_text().replace('"amount >> 1"', '"amount > 1"').replace(', escalate = "yes"', ""))
    d = only_error(path)  # from the analysis: the rule's own line
    assert (d.subject, d.line) == ("rule 'C'", 4) and "matched first by 'A'" in d.message


def test_witnesses_for_model_outputs_lie_in_their_range(tmp_path):
    pairs = [("score.deny > score.approve", "score.deny > 0.5"), ("score.deny > 0.5", "score.deny > 0.7"),
             ("score.deny < 0.3", "score.deny < 0.2"), ("confidence != 0.5", "confidence > 0.99"),
             ("score.deny > score.approve and amount > 100", "score.deny > 0.9 and amount < 1000")]
    for a, b in pairs:
        message = only_error(policy_file(tmp_path, rules((a, "deny"), (b, "approve")), hit="UNIQUE")).message
        row = dict(part.split("=") for part in message.split("e.g. ")[1].split(", "))
        scores = {k: float(v) for k, v in row.items() if k.startswith(("score.", "confidence"))}
        assert scores and all(0 <= v <= 1 for v in scores.values()), (a, b, message)
    # Rules about values no probability takes still get a witness, outside the range: the analysis itself
    # does not assume it.
    message = only_error(policy_file(tmp_path, rules(("score.deny > 2", "deny"), ("score.deny > 3", "approve")),
                                     hit="UNIQUE")).message
    assert float(message.split("score.deny=")[1]) > 3


# -- hot reload
def test_invalid_upload_is_refused_and_the_old_policy_keeps_serving(tmp_path):
    good = policy_file(tmp_path, rules(("amount > 10", "deny")))
    slot = PolicySlot(load_policy(good))
    before = slot.current
    rows = [{"amount": 50.0, "label": "approve", "confidence": 0.9}]
    assert before.evaluate_rows(rows).action.tolist() == ["deny"]
    broken = good.read_text().replace('when = "amount > 10"', 'when = "amount >> 10"')
    with pytest.raises(PolicyError) as info:
        slot.replace_text(broken, source="upload-2")
    assert str(info.value).startswith(f"upload-2:{line_of(good, 'amount > 10')}: rule 'R1' when:")
    assert slot.current is before and slot.history == [("1", before.hash)]
    assert slot.current.evaluate_rows(rows).action.tolist() == ["deny"]
    newer = good.read_text().replace('version = "1"', 'version = "2"').replace('"deny"\n\n[[rule]]\nid = "D"',
                                                                              '"approve"\n\n[[rule]]\nid = "D"')
    installed = slot.replace_text(newer)
    assert slot.current is installed and installed.version == "2"
    assert slot.current.evaluate_rows(rows).action.tolist() == ["approve"]
    assert [v for v, _ in slot.history] == ["1", "2"]
