"""Hostile or odd policy files are refused with FILE:LINE (never a traceback), the table analysis stays within
its time budget whatever the table's shape, integers past 2**53 are analysed exactly, and number literals
mean what they say."""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fuzz_budget import examples as fuzz_examples
from kernel.policy import PolicyError, PolicyInputError, analysis, parse_policy
from kernel.policy.cli import check_command, read_cases
from kernel.policy.domains import NumSet


def policy_text(rules: list[tuple[str, str]], hit: str = "FIRST", inputs: dict | None = None,
                head: str = "", rule_extra: str = "") -> str:
    inputs = inputs or {"x": "number", "n": "integer"}
    text = f'[policy]\nname = "t"\nversion = "1"\nhit_policy = "{hit}"\n{head}[inputs]\n'
    text += "".join(f'{name} = "{kind}"\n' for name, kind in inputs.items())
    text += '[outputs]\nactions = ["a", "b", "c"]\n'
    for rule_id, when in rules:
        text += f"[[rule]]\nid = \"{rule_id}\"\nwhen = '''{when}'''\naction = \"a\"\n{rule_extra}"
    return text + '[[rule]]\nid = "D"\ndefault = true\naction = "c"\n'


def _line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


def refused(text: str, source: str = "p.toml") -> PolicyError:
    with pytest.raises(PolicyError) as info:
        parse_policy(text, source=source)
    return info.value


# -- 2. malformed files: located diagnostics, not tracebacks ----------------------------------------------------

MALFORMED = {
    "adjust-of-400-digits": (policy_text([("R1", "x > 1")], rule_extra="adjust = " + "9" * 400 + "\n"),
                             "adjust = 999", "rule 'R1' adjust: must be a finite number"),
    "adjust-summing-to-infinity": (policy_text([("R1", "x > 1")], rule_extra="adjust = 1e308\n"),
                                   "adjust = 1e308", "rule 'R1' adjust: must be a finite number from -1e+06 to 1e+06"),
    "integer-of-5000-digits": (policy_text([("R1", "x > 1")], rule_extra="adjust = " + "9" * 5000 + "\n"),
                               "adjust = 999", "TOML: an integer with more than 4300 digits"),
    "deep-array": (policy_text([("R1", "x > 1")], head="description = " + "[" * 3000 + "]" * 3000 + "\n"),
                   "description = [[[", "TOML: arrays or inline tables nested too deeply"),
    "moderately-deep-array": (policy_text([("R1", "x > 1")], head="description = " + "[" * 900 + "]" * 900 + "\n"),
                              "description = [[[", "TOML: arrays or inline tables nested too deeply"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_policy_is_refused_with_its_line(case):
    text, needle, says = MALFORMED[case]
    error = refused(text)
    assert str(error).startswith(f"p.toml:{_line_of(text, needle)}: {says}"), str(error)


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_policy_check_reports_a_malformed_file_without_a_traceback(tmp_path, case):
    text, needle, says = MALFORMED[case]
    path = tmp_path / "p.toml"
    path.write_text(text)
    out = io.StringIO()
    assert check_command(path, out) == 1
    assert f"{path}:{_line_of(text, needle)}: {says}" in out.getvalue()


def test_a_pipeline_names_its_policys_own_file_and_line(tmp_path):
    from kernel.pipelines import PipelineError, parse_pipeline
    from kernel.policy import load_policy

    claims = Path(__file__).resolve().parent.parent / "examples" / "claims" / "pipelines"
    policy = (claims / "policy.toml").read_text()
    assert "adjust = 0.3\n" in policy
    bad = policy.replace("adjust = 0.3\n", "adjust = " + "7" * 400 + "\n", 1)
    (tmp_path / "policy.toml").write_text(bad)
    with pytest.raises(PipelineError) as info:
        parse_pipeline((claims / "claims_triage.toml").read_bytes(), "p.toml", lambda n: load_policy(tmp_path / n))
    assert f"{tmp_path / 'policy.toml'}:{_line_of(bad, 'adjust = 777')}: " in str(info.value), str(info.value)


# -- 3. the analysis' work limit bounds its time; size caps ------------------------------------------------------

def _wide_or_rules(rules: int, atoms: int) -> str:
    """Conditions too large to expand into boxes (checked by sampling): each sampled row evaluates them whole."""
    out = []
    for k in range(rules):
        big = " or ".join(f"x == {k * 100000 + i}" for i in range(atoms))
        out.append((f"R{k}", f"({big}) and n == {k}"))
    return policy_text(out, hit="UNIQUE")


def test_sampling_large_conditions_is_charged_by_their_size(monkeypatch):
    # 14 rules of 300 tests: 91 pairs sampled 400 times each took ten seconds, charged 400 units a pair. What the
    # sampler evaluates (condition nodes, counted) stays within what the work limit pays for: no clock needed.
    text = _wide_or_rules(14, 300)
    evaluated = [0]
    sizes: dict[int, int] = {}
    original = analysis.truth

    def counted(node, row):
        evaluated[0] += sizes.setdefault(id(node), analysis.size_of(node))
        return original(node, row)

    monkeypatch.setattr(analysis, "truth", counted)
    policy = parse_policy(text, strict=False)
    assert policy.analysis_complete is False
    assert any("work limit" in w.message for w in policy.warnings)
    assert evaluated[0] > 0  # (the sampler ran: the count is not vacuous)
    assert evaluated[0] <= analysis.WORK_LIMIT * analysis.NODES_PER_UNIT, evaluated[0]


def test_sweeping_many_fields_is_charged(monkeypatch):
    # A rule per field: finding the field that keeps rules apart tried every field over every rule
    # (5,000 fields: a minute). Charged per field, the search stops within the budget.
    fields = 1000
    rules = [(f"R{i}", f"f{i % fields} > {i // fields}") for i in range(4000)]
    text = policy_text(rules, inputs={f"f{i}": "number" for i in range(fields)})
    spent = []
    original = analysis.near_rules

    def measured(shapes, budget, spend):
        charged = []
        result = original(shapes, budget, lambda units: (charged.append(units), spend(units)))
        spent.append(sum(charged))
        return result

    monkeypatch.setattr(analysis, "near_rules", measured)
    policy = parse_policy(text, strict=False)
    assert policy.analysis_complete is False
    assert spent and analysis.WORK_LIMIT / 4 <= spent[0] <= analysis.WORK_LIMIT / 2


def test_the_work_meter_charges_set_algebra():
    # `x != 0 and x != 1 and ...`: one box whose set grows an interval per test; each meet walks all of them.
    when = " and ".join(f"x != {i}" for i in range(600))
    analyzer_work = []
    original = analysis.Analyzer.run

    def run(self):
        found = original(self)
        analyzer_work.append(self.work)
        return found

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(analysis.Analyzer, "run", run)
        parse_policy(policy_text([("R1", when)]), strict=False)
    assert analyzer_work[0] > 600 * 600 / 2 / analysis.STEPS_PER_UNIT  # the intervals walked, not 600 "boxes"


@pytest.mark.parametrize("what, text, says", [
    ("bytes", policy_text([("R1", "x > 1")]) + "#" * (1 << 20), "p.toml:0: file: is 1,048,"),
    ("rules", policy_text([(f"R{i}", f"x == {i}") for i in range(10_000)]),
     "[[rule]]: the policy has 10,001 rules; at most 10,000 are allowed"),
    ("inputs", policy_text([("R1", "x > 1")], inputs={f"f{i}": "number" for i in range(1001)} | {"x": "number"}),
     "p.toml:5: inputs: declares 1,002 inputs; at most 1,000 are allowed"),
])
def test_a_policy_past_the_size_caps_is_refused(what, text, says):
    assert says in str(refused(text))


def test_the_size_caps_leave_large_tables_alone():
    rules = [(f"R{i}", f"x >= {i} and x < {i + 1}") for i in range(9_999)]
    assert len(parse_policy(policy_text(rules, inputs={"x": "number"}), strict=False).rules) == 10_000


# -- 4. integers at and past 2**53 --------------------------------------------------------------------------------

def test_an_integer_bound_at_2_53_keeps_the_rule_after_it_reachable():
    text = policy_text([("R1", "n > 9007199254740992"), ("R2", "n == 9007199254740992")], inputs={"n": "integer"})
    policy = parse_policy(text)  # R2 was refused as unreachable: `n > 2**53` was taken to include 2**53
    row = {"n": 9007199254740992, "label": "x", "confidence": 1.0}
    assert policy.evaluate_rows([row]).fired[0] == policy.evaluate_reference([row]).fired[0] == ("R2",)


def test_overlapping_integer_rules_past_2_53_are_an_error_not_a_vague_warning():
    text = policy_text([("R1", "n > 1e20"), ("R2", "n > 1e21")], hit="UNIQUE", inputs={"n": "integer"})
    error = refused(text)
    assert [d.subject for d in error.errors] == ["rule 'R2'"] and "overlaps rule 'R1'" in str(error)
    assert "field-to-field" not in str(error)


def test_an_exact_overlap_stays_an_error_when_no_sample_confirms_it(monkeypatch):
    monkeypatch.setattr(analysis.Analyzer, "sample_witness", lambda self, rules, box: None)
    error = refused(policy_text([("R1", "x > 1"), ("R2", "x > 2")], hit="UNIQUE", inputs={"x": "number"}))
    assert "overlaps rule 'R1'" in str(error) and "both match every row with x > 2" in str(error), str(error)


@pytest.mark.parametrize("op, bound, first, last", [
    (">", 2.0**53, 2.0**53 + 2, None),
    (">=", 2.0**53, 2.0**53, None),
    ("<", 2.0**53, None, 2.0**53 - 1),
    ("<", 2.0**53 + 2, None, 2.0**53),
    ("<", -(2.0**53), None, -(2.0**53) - 2),
    (">", 1e21, 1e21 + 131072, None),
    (">", 2.5, 3.0, None),
    ("<=", 2.5, None, 2.0),
])
def test_integer_sets_have_exact_bounds_at_any_magnitude(op, bound, first, last):
    (lo, lo_closed, hi, hi_closed), = NumSet.compare(op, bound, integer=True).intervals
    assert (lo if first is not None else hi) == (first if first is not None else last)


# -- 6. control characters ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("key, value, says", [
    ("version", '"1\\n2026-11-27T05:41:00Z INFO aios.pipelines: FORGED"', "policy.version: contains the control "
                                                                          "character '\\n'"),
    ("description", '"ok\\u001b[2J"', "policy.description: contains the control character '\\x1b'"),
])
def test_control_characters_in_policy_labels_are_refused(key, value, says):
    text = policy_text([("R1", "x > 1")], head=f"{key} = {value}\n").replace('version = "1"\n', "", key == "version")
    error = refused(text)
    assert f"p.toml:{_line_of(text, f'{key} = ')}: {says}" in str(error), str(error)


def test_a_policy_description_may_span_lines():
    text = policy_text([("R1", "x > 1")], head='description = """two\n\tlines"""\n')
    assert parse_policy(text).description == "two\n\tlines"


# -- 7. number literals ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("when, says", [
    ("x > \u0661\u0662", "unexpected '\u0661'"),  # Arabic-Indic digits: float() reads them as 12
    ("x == 1e-400", "number 1e-400 is too small"),
    ("n == 9007199254740993", "number 9007199254740993 is not exactly representable"),
    # the same number spelt with a fraction, and one past 2**53 with a fraction no float there has: both were
    # taken and compared as 9007199254740992
    ("n == 9007199254740993.0", "number 9007199254740993.0 is not exactly representable"),
    ("x < 9007199254740992.5", "compared as 9007199254740992"),
    ("x > 0012345678901234567890.000", "compared as 12345678901234567168"),
])
def test_number_literals_that_are_not_what_they_say_are_refused(when, says):
    error = refused(policy_text([("R1", when)]))
    assert says in str(error) and "rule 'R1' when" in str(error), str(error)


@pytest.mark.parametrize("when", ["x == 0.0e-400", "x > 5e-324", "n == 9007199254740994", "x > 1e300",
                                  "n == 9007199254740994.000", "x > 1e23", "x < 0.1", "x == 4503599627370495.5"])
def test_number_literals_that_are_exact_are_taken(when):
    assert parse_policy(policy_text([("R1", when)]), strict=False)


# -- 8. small ones ----------------------------------------------------------------------------------------------

def test_a_case_with_an_integer_of_5000_digits_is_reported_with_its_line(tmp_path):
    path = tmp_path / "cases.jsonl"
    path.write_text('{"row": {"x": 1}, "expect": "a"}\n{"row": {"x": ' + "9" * 5000 + '}, "expect": "a"}\n')
    with pytest.raises(ValueError) as info:
        read_cases(path)
    assert f"{path}:2: not usable JSON: Exceeds the limit (4300 digits)" in str(info.value), str(info.value)


def test_an_integer_field_is_called_an_integer_field():
    policy = parse_policy(policy_text([("R1", "n > 1")], inputs={"n": "integer"}))
    with pytest.raises(PolicyInputError) as info:
        policy.evaluate_reference([{"n": "seven", "label": "x", "confidence": 1.0}])
    assert "is an integer field" in str(info.value), str(info.value)


def test_tables_written_the_wrong_way_are_reported_at_their_line():
    text = ('[[policy]]\nname = "t"\nversion = "1"\nhit_policy = "FIRST"\n[inputs]\nx = "number"\n'
            '[outputs.actions]\nx = 1\n[[rule]]\nid = "D"\ndefault = true\naction = "a"\n')
    lines = {d.subject: d.line for d in refused(text).errors}
    assert lines["policy"] == 1 and lines["outputs.actions"] == 7, lines


# -- 6. a hostile file's errors are bounded: each says little, and the check stops after a hundred ---------------

def _many_errors(classes: int, refs: int) -> str:
    """A policy whose every condition names a class it does not declare, ``refs`` times in all."""
    head = "[model]\nclasses = [" + ", ".join(f'"class_{i:06d}"' for i in range(classes)) + "]\n"
    condition = " or ".join(["label == 'zz'"] * 500)
    return policy_text([(f"R{i}", condition) for i in range(refs // 500)], head=head)


def test_a_policy_with_thousands_of_errors_lists_a_hundred_each_short():
    from kernel.policy.loader import MAX_LISTED_ERRORS

    error = refused(_many_errors(classes=2_000, refs=3_000))
    assert len(error.errors) == MAX_LISTED_ERRORS + 1, len(error.errors)
    assert error.errors[-1].message.startswith(f"the check stopped after {MAX_LISTED_ERRORS} errors")
    first = error.errors[0].message
    assert first.startswith("'zz' is not one of the model's classes (class_000000, class_000001") and \
        ", … (1,980 more))" in first, first
    assert max(len(str(d)) for d in error.diagnostics) < 1_000


def test_an_upload_with_thousands_of_errors_does_not_build_them_all(claims_models, tmp_path):
    """Over gRPC: 3,000 errors each listing 2,000 classes held ~150 MB in the kernel (a 400 KB upload, 6.8 GB);
    now INVALID_ARGUMENT after a hundred short ones."""
    import tracemalloc

    import grpc
    from conftest import start_claims_kernel

    from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
    from kernel._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc

    claims = Path(__file__).resolve().parent.parent / "examples" / "claims" / "pipelines"
    pipeline = (claims / "claims_triage.toml").read_text().replace('file = "policy.toml"', 'file = "many.toml"')
    server = start_claims_kernel(claims_models, tmp_path)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            admin = kgrpc.AdminServiceStub(channel)
            upload = kpb.UploadPipelineRequest(pipeline_toml=pipeline.encode(),
                                               policy_toml=_many_errors(classes=2_000, refs=3_000).encode())
            tracemalloc.start()
            try:
                with pytest.raises(grpc.RpcError) as info:
                    admin.UploadPipeline(upload, timeout=120)
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
    finally:
        server.stop(grace=1)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "many.toml:" in info.value.details() and "is not one of the model's classes" in info.value.details()
    assert peak < 40 << 20, f"{peak / 2**20:.0f} MiB allocated at the peak"


_BOUNDS = [-math.inf, -2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 3.0, math.inf]
_SPANS = st.lists(st.tuples(st.sampled_from(_BOUNDS), st.booleans(), st.sampled_from(_BOUNDS), st.booleans()),
                  max_size=6)


@settings(max_examples=fuzz_examples(400), deadline=None)
@given(_SPANS, _SPANS, st.booleans(), st.booleans(), st.booleans())
def test_a_meet_is_the_normalized_intersection(mine, theirs, integer, mine_missing, theirs_missing):
    """``&`` keeps its merge's pieces as they come (re-normalizing them cost more than the meet on sets of thousands
    of spans: the security review's 2,000-value `not in` sets): they must be exactly what normalizing gives, and
    contain exactly the values both sides do."""
    a, b = NumSet(mine, mine_missing, integer), NumSet(theirs, theirs_missing, integer)
    both = a & b
    assert both.intervals == NumSet(both.intervals, integer=integer).intervals
    assert both.missing == (mine_missing and theirs_missing)
    for value in [*_BOUNDS[1:-1], -1.5, 0.25, 0.75, 1.5, 2.5, 100.0]:
        if integer and value != int(value):
            continue
        def holds(s: NumSet) -> bool:
            return any((lo < value or (lo == value and lc)) and (value < hi or (value == hi and hc))
                       for lo, lc, hi, hc in s.intervals)
        assert holds(both) == (holds(a) and holds(b)), value
