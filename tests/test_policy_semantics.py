"""Hit-policy semantics (DMN), three-valued logic and input handling, run against every evaluator.

The same tests run on the reference (row by row) and on the compiled
evaluator with each executor available here (numpy, and the Cython kernel
when built), as uvloop runs its suite on two loops.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kernel.policy import PolicyInputError, load_policy, parse_policy
from kernel.policy.backends import available

ROOT = Path(__file__).resolve().parent.parent
CLAIMS = ROOT / "examples" / "claims" / "pipelines"
EVALUATORS = ["reference"] + [f"compiled-{name}" for name in available()]


@pytest.fixture(params=EVALUATORS)
def run(request):
    """run(policy, rows) -> list of per-row outcome dicts, through the evaluator under test."""
    kind = request.param

    def evaluate(policy, rows, outputs=None):
        if kind == "reference":
            if outputs:
                rows = [{**row, **{k: v[i] for k, v in outputs.items()}} for i, row in enumerate(rows)]
            return policy.evaluate_reference(rows).rows()
        return policy.using(kind.split("-")[1]).evaluate_rows(rows, outputs).rows()
    evaluate.kind = kind
    return evaluate


def make(rules: str, hit: str = "FIRST", actions=("deny", "review", "approve"), strict: bool = True,
         inputs: str = 'a = "number"\nn = "integer"\ns = "string"\nb = "bool"'):
    text = (f'[policy]\nname = "t"\nversion = "1"\nhit_policy = "{hit}"\n\n[inputs]\n{inputs}\n\n'
            f'[model]\nclasses = ["approve", "review", "deny"]\n\n[outputs]\nactions = {json.dumps(list(actions))}\n'
            + rules)
    return parse_policy(text, source="test.toml", strict=strict)


def rule(rule_id, when, action, escalate=False, adjust=0.0):
    return (f'\n[[rule]]\nid = "{rule_id}"\nwhen = {json.dumps(when)}\naction = "{action}"\n'
            f"escalate = {str(escalate).lower()}\nadjust = {adjust}\n")


def default(action="review", escalate=True, adjust=0.0):
    return f'\n[[rule]]\nid = "D"\ndefault = true\naction = "{action}"\nescalate = {str(escalate).lower()}\n' \
           f"adjust = {adjust}\n"


def model(label="approve", confidence=0.9):
    return {"label": label, "confidence": confidence}


def outcome(result):
    return [(r["action"], tuple(r["fired"]), r["escalate"], r["adjust"], r["error"]) for r in result]


# -- hit policies
def test_first_takes_the_first_match_in_file_order(run):
    policy = make(rule("R1", "a > 10", "approve", adjust=1.0) + rule("R2", "a > 5", "deny", escalate=True)
                  + rule("R3", "s == 'x'", "review") + default())
    rows = [{"a": 20.0, "s": "x"}, {"a": 7.0, "s": "x"}, {"a": 1.0, "s": "x"}, {"a": 1.0, "s": "y"}]
    assert outcome(run(policy, rows)) == [
        ("approve", ("R1",), False, 1.0, None),
        ("deny", ("R2",), True, 0.0, None),
        ("review", ("R3",), False, 0.0, None),
        ("review", ("D",), True, 0.0, None),
    ]


def test_priority_takes_the_highest_ranked_action_ties_in_file_order(run):
    policy = make(rule("R1", "a > 10", "approve") + rule("R2", "a > 5", "review", adjust=0.5)
                  + rule("R3", "a > 7", "review", escalate=True) + rule("R4", "a > 50", "deny")
                  + default("approve", False), hit="PRIORITY")
    rows = [{"a": 20.0}, {"a": 8.0}, {"a": 60.0}, {"a": 1.0}]
    assert outcome(run(policy, rows)) == [
        ("review", ("R2",), False, 0.5, None),   # review outranks approve; R2 before R3
        ("review", ("R2",), False, 0.5, None),
        ("deny", ("R4",), False, 0.0, None),
        ("approve", ("D",), False, 0.0, None),
    ]


def test_collect_gathers_every_match(run):
    policy = make(rule("R1", "a > 10", "approve", adjust=0.25) + rule("R2", "b", "review", escalate=True, adjust=0.5)
                  + rule("R3", "s in {'x', 'y'}", "approve", adjust=-1.0)
                  + default("deny", False, adjust=2.0), hit="COLLECT")
    rows = [{"a": 20.0, "b": True, "s": "x"}, {"a": 20.0, "b": False, "s": "x"}, {"a": 1.0, "b": False, "s": "z"},
            {"a": 20.0, "b": None, "s": None}]
    assert outcome(run(policy, rows)) == [
        ("review", ("R1", "R2", "R3"), True, -0.25, None),
        ("approve", ("R1", "R3"), False, -0.75, None),
        ("deny", ("D",), False, 2.0, None),
        ("approve", ("R1",), False, 0.25, None),
    ]


def test_unique_single_match_and_runtime_conflict(run):
    # Loaded non-strictly, the overlap the analysis found is only a warning, and a row that
    # matches both rules is an error row: default action, escalated, every match in `fired`.
    policy = make(rule("R1", "a > n", "approve", adjust=1.0) + rule("R2", "a <= 5", "deny", escalate=True)
                  + default("review", False, adjust=3.0), hit="UNIQUE", strict=False)
    assert [w.subject for w in policy.warnings if "overlaps" in w.message] == ["rule 'R2'"]
    rows = [{"a": 9.0, "n": 7}, {"a": 2.0, "n": 7}, {"a": 9.0, "n": 10}, {"a": 3.0, "n": 1}]
    assert outcome(run(policy, rows)) == [
        ("approve", ("R1",), False, 1.0, None),
        ("deny", ("R2",), True, 0.0, None),
        ("review", ("D",), False, 3.0, None),
        ("review", ("R1", "R2"), True, 0.0, "hit policy UNIQUE but 2 rules match: R1, R2"),
    ]


def test_only_a_default(run):
    policy = make(default("approve", False, adjust=0.5), inputs="")
    for hit in ("FIRST", "UNIQUE", "PRIORITY", "COLLECT"):
        policy = make(default("approve", False, adjust=0.5), hit=hit, inputs="")
        assert outcome(run(policy, [{}, {}])) == [("approve", ("D",), False, 0.5, None)] * 2


# -- conditions
@pytest.mark.parametrize("when, rows, fires", [
    ("a in [1, 5)", [0.999, 1.0, 4.999, 5.0], [False, True, True, False]),
    ("a in (1, 5]", [1.0, 1.5, 5.0, 5.1], [False, True, True, False]),
    ("1 < a <= 5", [1.0, 1.5, 5.0, 5.1], [False, True, True, False]),
    ("a not in [1, 5)", [0.5, 1.0, 5.0], [True, False, True]),
    ("a in {1, 2.5}", [1.0, 2.5, 2.0], [True, True, False]),
    ("a not in {1, 2.5}", [1.0, 2.0], [False, True]),
    ("a != 3", [3.0, 4.0, -1e300], [False, True, True]),
    ("a == -0.0", [0.0, -0.0, 1.0], [True, True, False]),
    ("a > 1e308", [float("inf"), 1e308], [True, False]),
])
def test_numeric_tests(run, when, rows, fires):
    policy = make(rule("R", when, "approve") + default(), strict=False)
    got = [r["fired"] == ["R"] for r in run(policy, [{"a": v} for v in rows])]
    assert got == fires


@pytest.mark.parametrize("when, rows, fires", [
    ("s == 'gold'", ["gold", "silver", "Gold"], [True, False, False]),
    ("s != 'gold'", ["gold", "silver"], [False, True]),
    ("s in {'gold', 'platinum'}", ["platinum", "silver"], [True, False]),
    ("s not in {'gold', 'platinum'}", ["platinum", "silver", "other"], [False, True, True]),
    ("b", [True, False], [True, False]),
    ("not b", [True, False], [False, True]),
    ("b == false", [True, False], [False, True]),
    ("b != true", [True, False], [False, True]),
    ("b in {true, false}", [True, False], [True, True]),
    ("n >= 3", [2, 3, 10**6], [False, True, True]),
    ("label == 'deny'", ["deny", "approve"], [True, False]),
    ("label != 'deny'", ["deny", "approve"], [False, True]),
])
def test_string_bool_integer_and_label_tests(run, when, rows, fires):
    policy = make(rule("R", when, "approve") + default(), strict=False)
    field = {"s": "s", "b": "b", "n": "n", "l": "label"}[when.split()[0][0] if not when.startswith("not") else "b"]
    got = [r["fired"] == ["R"] for r in run(policy, [{field: v} if field != "label" else model(v) for v in rows])]
    assert got == fires


def test_scores_and_field_to_field(run):
    policy = make(rule("R1", "score.deny > score.approve and confidence >= 0.5", "deny")
                  + rule("R2", 'score["approve"] >= 0.7', "approve") + default(), strict=False)
    rows = [{"score.deny": 0.6, "score.approve": 0.3, "confidence": 0.6},
            {"score.deny": 0.2, "score.approve": 0.8, "confidence": 0.8},
            {"score.deny": 0.5, "score.approve": 0.5, "confidence": 0.5}]
    assert [r["fired"] for r in run(policy, rows)] == [["R1"], ["R2"], ["D"]]


def test_three_valued_logic_on_missing_values(run):
    cases = [
        ("a > 5", None, False),
        ("not (a > 5)", None, False),       # not unknown is unknown: the rule does not fire
        ("a <= 5", None, False),
        ("a != 5", None, False),
        ("a not in {1, 2}", None, False),
        ("a is null", None, True),
        ("a is not null", None, False),
        ("a is null", 1.0, False),
        ("a > 5 or s == 'x'", None, True),  # true or unknown is true
        ("a > 5 and s == 'x'", None, False),
        ("not (a > 5 and s == 'y')", None, True),  # not (unknown and false) = true
        ("not (a > 5 or s == 'y')", None, False),  # not (unknown or false) = unknown
        ("s != 'x'", None, None),           # string missing, below
        ("not b", None, None),
    ]
    for when, value, fires in cases:
        policy = make(rule("R", when, "approve") + default(), strict=False)
        if fires is None:
            row = {"s": None} if "s" in when else {"b": None}
            fires = False
        else:
            row = {"a": value, "s": "x"}
        got = run(policy, [row])[0]["fired"] == ["R"]
        assert got == fires, (when, value)
    absent = make(rule("R", "a is null and b is null and s is null", "approve") + default())
    assert run(absent, [{}, {"a": float("nan"), "b": None, "s": None}, {"a": 1.0}]) [0]["fired"] == ["R"]
    assert [r["fired"] for r in run(absent, [{}, {"a": float("nan"), "b": None, "s": None}, {"a": 1.0}])] == [
        ["R"], ["R"], ["D"]]


def test_values_the_policy_never_mentions(run):
    policy = make(rule("R1", "s in {'a'}", "deny") + rule("R2", "s != 'a'", "approve") + default())
    rows = [{"s": "zzz"}, {"s": 5}, {"s": ("a",)}, {"s": "a"}]  # any hashable value; non-strings equal no string
    assert [r["fired"] for r in run(policy, rows)] == [["R2"], ["R2"], ["R2"], ["R1"]]


# -- inputs that do not fit
@pytest.mark.parametrize("row, field, message", [
    ({"n": 2.5}, "n", "is an integer field"),
    ({"n": float("inf")}, "n", "is an integer field"),
    ({"a": "5"}, "a", "is a number field"),
    ({"a": [1]}, "a", "is a number field"),
    ({"b": "yes"}, "b", "is a bool field"),
    ({"b": 2}, "b", "is a bool field"),
    ({"s": ["unhashable"]}, "s", "string field"),
    ({"n": 2**53 + 1}, "n", "compared as 64-bit floats"),  # (it was compared as 2**53, and matched `n == 2**53`)
    ({"n": -(2**53) - 1}, "n", "compared as 64-bit floats"),
    ({"n": np.int64(2**62 + 1)}, "n", "compared as 64-bit floats"),
    ({"a": 10**30}, "a", "compared as 64-bit floats"),
    ({"label": "maybe"}, "label", "not one of the model's classes"),
    ({"label": None}, "label", "model output"),
    ({"confidence": None}, "confidence", "model output"),
    ({"confidence": float("nan")}, "confidence", "model output"),
])
def test_bad_values_are_refused_naming_the_field(run, row, field, message):
    policy = make(rule("R1", "a > 1 or n > 1 or b or s == 'x'", "deny")
                  + rule("R2", "label == 'deny' and confidence > 0.5", "deny") + default())
    full = {"a": 1.0, "n": 1, "b": False, "s": "y", **model(), **row}
    with pytest.raises(PolicyInputError) as info:
        run(policy, [{"a": 0.0, "n": 0, "b": False, "s": "q", **model()}, full])
    assert info.value.field == field and message in str(info.value) and info.value.code == "INVALID_ARGUMENT"


def test_lenient_values_are_read_the_same_everywhere(run):
    policy = make(rule("R1", "a >= 1 and n == 3 and b", "deny") + default())
    rows = [{"a": True, "n": 3.0, "b": 1}, {"a": np.float32(1.5), "n": np.int64(3), "b": np.bool_(True)},
            {"a": 2**100, "n": 3, "b": True}, {"a": 0.5, "n": 3, "b": True}]
    assert [r["fired"] for r in run(policy, rows)] == [["R1"], ["R1"], ["R1"], ["D"]]


def test_whole_numbers_past_2_53_are_read_only_when_a_float_holds_them(run):
    """Numbers are compared as 64-bit floats, and the parser refuses a literal no float holds: an input no float
    holds was compared as its neighbour (`n > 2**53` did not fire for 2**53 + 1, `n == 2**53` did, and the
    record showed 2**53 + 1). Such a value is refused by name, also beside floats in one batch (a float array
    built from the batch rounded it before any check); one a float holds is read as it is."""
    policy = make(rule("OVER", f"n > {2**53}", "deny") + rule("AT", f"n == {2**53}", "review") + default("approve"))
    held = [{"n": 2**53, **model()}, {"n": 2**53 + 2, **model()}, {"n": 2**63, **model()}, {"n": 1.0, **model()}]
    assert [r["fired"] for r in run(policy, held)] == [["AT"], ["OVER"], ["OVER"], ["D"]]
    for batch in ([{"n": 2**53 + 1, **model()}], [{"n": 1.5 - 0.5, **model()}, {"n": 2**53 + 1, **model()}]):
        with pytest.raises(PolicyInputError, match=r"got 9007199254740993: .* would be compared as 9007199254740992"):
            run(policy, batch)
    mixed = make(rule("BIG", f"a >= {2**53}", "deny") + default("approve"))
    with pytest.raises(PolicyInputError, match="field 'a'"):
        run(mixed, [{"a": 0.5, **model()}, {"a": 2**53 + 1, **model()}])


def test_model_outputs_given_as_columns(run):
    policy = make(rule("R1", "label == 'deny' and confidence > 0.8", "deny") + rule("R2", "a > 1", "approve")
                  + default())
    rows = [{"a": 5.0}, {"a": 5.0}, {"a": 0.0}]
    outputs = {"label": np.array(["deny", "approve", "deny"], dtype=object), "confidence": np.array([0.9, 0.9, 0.5])}
    assert [r["fired"] for r in run(policy, rows, outputs)] == [["R1"], ["R2"], ["D"]]


# -- the claims demo policy and its sample cases
def test_claims_policy_sample_cases(run):
    policy = load_policy(CLAIMS / "policy.toml")
    cases = [json.loads(line) for line in (CLAIMS / "policy_cases.jsonl").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    got = run(policy, [c["row"] for c in cases])
    for case, result in zip(cases, got):
        assert result["action"] == case["expect"]["action"], case["name"]
        assert result["fired"] == case["expect"]["fired"], case["name"]
        assert result["escalate"] == case["expect"]["escalate"], case["name"]
    fired = {rule_id for result in got for rule_id in result["fired"]}
    assert fired == {r.id for r in policy.rules}  # the sample cases reach every rule


def test_claims_policy_reads_the_demo_fields():
    from examples.claims import data, features

    policy = load_policy(CLAIMS / "policy.toml")
    demo_fields = {f["name"] for f in features.FEATURES}
    assert set(policy.inputs) <= demo_fields
    assert policy.classes == data.LABELS
    case = data.generate_cases(1, seed=5)[0]
    case.update(label="approve", confidence=0.9, **{"score.deny": 0.05})
    assert policy.evaluate_rows([case]).action[0] in policy.actions


# -- the columnar entry point
def test_evaluate_columns_in_every_form():
    policy = make(rule("R1", "s in {'x', 'y'} and b and label == 'deny'", "deny") + rule("R2", "a > n", "approve")
                  + default(), strict=False)
    expected = ["deny", "approve", "review"]
    base = {"a": [1.0, 5.0, 1.0], "n": [0, 3, 4], "s": ["x", "q", None], "b": [True, False, None],
            "label": ["deny", "approve", "deny"], "confidence": [0.9, 0.9, 0.9]}
    for backend in available():
        p = policy.using(backend)
        assert p.evaluate(base, 3).action.tolist() == expected  # plain lists
        arrays = {"a": np.array([1.0, 5.0, 1.0]), "n": np.array([0, 3, 4]), "s": np.array(["x", "q", None], object),
                  "b": np.array([True, False, None], object), "label": np.array(["deny", "approve", "deny"]),
                  "confidence": np.array([0.9, 0.9, 0.9])}
        assert p.evaluate(arrays).action.tolist() == expected
        arrays.update(s=np.array(["x", "q", "z"]), b=np.array([True, False, False]), label=np.array([2, 0, 2]))
        assert p.evaluate(arrays).action.tolist() == expected  # str arrays, bool arrays, class indices
        assert p.evaluate(policy.columns([dict(zip(base, v)) for v in zip(*base.values())])).action.tolist() == \
            expected
        with pytest.raises(PolicyInputError, match="column is missing"):
            p.evaluate({k: v for k, v in arrays.items() if k != "a"}, 3)
        with pytest.raises(PolicyInputError, match="shape"):
            p.evaluate({**arrays, "a": np.zeros(2)}, 3)
        with pytest.raises(PolicyInputError, match="class index out of range"):
            p.evaluate({**arrays, "label": np.array([0, 1, 3])}, 3)
        with pytest.raises(PolicyInputError, match="rows"):
            p.evaluate_rows([("not", "a", "dict")])
        empty = p.evaluate_rows([])
        assert len(empty) == 0 and empty.fired == []
