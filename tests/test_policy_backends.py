"""The two executors of compiled policies: the Cython kernel (ext/rules.pyx) and numpy (vectorized.py).

Their semantics are covered by test_policy_semantics.py and the hypothesis
test; here: the shared opcode numbering, large batches that span many of the
kernel's blocks, the single-pass row encoder's value rules against the
Python codecs, and the kernel refusing malformed programs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kernel.policy import PolicyInputError, load_policy
from kernel.policy import program as prog
from kernel.policy.backends import available

ROOT = Path(__file__).resolve().parent.parent
CLAIMS = ROOT / "examples" / "claims" / "pipelines"
needs_cython = pytest.mark.skipif("cython" not in available(), reason="ext/rules.pyx not built (run `make build`)")


def claims_rows(n: int, seed: int) -> list[dict]:
    from examples.claims.data import LABELS, generate_cases

    rng = np.random.default_rng(seed)
    rows = generate_cases(n, seed)
    probs = rng.dirichlet([1.0, 1.0, 1.0], n)
    for i, (row, p) in enumerate(zip(rows, probs)):
        k = int(p.argmax())
        row.update(label=LABELS[k], confidence=float(p[k]), **{f"score.{c}": float(p[j]) for j, c in enumerate(LABELS)})
        if i % 7 == 0:
            row["fraud_score"] = None          # missing
        if i % 11 == 0:
            del row["has_police_report"]       # absent
    return rows


@needs_cython
def test_opcodes_agree_with_the_extension():
    from kernel._ext import rules

    assert rules.OPCODES == prog.OPCODES
    assert set(rules.FLAGS) == {"CODED", "INTEGER", "REQUIRED", "OTHER_OK"}


@pytest.mark.parametrize("backend", available())
@pytest.mark.parametrize("n", [0, 1, 255, 256, 257, 3001])
def test_batches_across_block_boundaries_match_the_reference(backend, n):
    policy = load_policy(CLAIMS / "policy.toml")
    rows = claims_rows(n, seed=n)
    expected = policy.evaluate_reference(rows)
    got = policy.using(backend).evaluate_rows(rows)
    assert got.action.tolist() == expected.action.tolist()
    assert got.fired == expected.fired
    assert got.escalate.tolist() == expected.escalate.tolist() and got.adjust.tolist() == expected.adjust.tolist()
    for hit in ("PRIORITY", "COLLECT", "UNIQUE"):  # same rules under the other hit policies (non-strict: overlaps)
        from kernel.policy import parse_policy

        text = (CLAIMS / "policy.toml").read_text().replace('hit_policy = "FIRST"', f'hit_policy = "{hit}"')
        other = parse_policy(text, strict=False)
        want, have = other.evaluate_reference(rows), other.using(backend).evaluate_rows(rows)
        assert have.fired == want.fired and have.action.tolist() == want.action.tolist()
        assert have.error.tolist() == want.error.tolist() and have.adjust.tolist() == want.adjust.tolist()


ODD_VALUES = [
    ("claim_amount", 5), ("claim_amount", True), ("claim_amount", np.float32(2.5)), ("claim_amount", np.int64(7)),
    ("claim_amount", 10**400), ("claim_amount", float("nan")), ("claim_amount", float("-inf")),
    ("claim_amount", "12"), ("claim_amount", b"1"), ("claim_amount", None), ("claim_amount", [1.0]),
    ("prior_claims", 3.0), ("prior_claims", 3.5), ("prior_claims", float("inf")), ("prior_claims", np.int8(2)),
    ("customer_tier", "gold"), ("customer_tier", "unknown"), ("customer_tier", 7), ("customer_tier", None),
    ("customer_tier", np.str_("gold")), ("customer_tier", {"a": 1}),
    ("has_police_report", True), ("has_police_report", 0), ("has_police_report", 1.0), ("has_police_report", 2),
    ("has_police_report", "true"), ("has_police_report", np.bool_(False)), ("has_police_report", None),
    ("label", "deny"), ("label", "nope"), ("label", None), ("label", 1),
    ("confidence", None), ("confidence", float("nan")), ("confidence", 0.5),
]


@needs_cython
@pytest.mark.parametrize("field, value", ODD_VALUES, ids=[f"{f}={v!r:.20}" for f, v in ODD_VALUES])
def test_row_encoder_reads_values_like_the_python_codecs(field, value):
    policy = load_policy(CLAIMS / "policy.toml")
    row = claims_rows(1, seed=3)[0]
    row["fraud_score"] = 0.2
    row[field] = value
    outcomes = {}
    for backend in ("numpy", "cython"):
        try:
            result = policy.using(backend).evaluate_rows([row, dict(row)])
            outcomes[backend] = ("ok", result.rows())
        except PolicyInputError as exc:
            outcomes[backend] = ("refused", exc.field)
    try:
        outcomes["reference"] = ("ok", policy.evaluate_reference([row, dict(row)]).rows())
    except PolicyInputError as exc:
        outcomes["reference"] = ("refused", exc.field)
    assert outcomes["numpy"] == outcomes["cython"] == outcomes["reference"]
    if outcomes["numpy"][0] == "refused":
        assert outcomes["numpy"][1] == field


@needs_cython
def test_kernel_refuses_malformed_programs():
    from kernel._ext.rules import Kernel

    luts = np.zeros(1, dtype=np.uint8)
    with pytest.raises(ValueError, match="bad opcode"):
        Kernel([(99, 0, 0, 0, 0.0)], luts, [0], [0])
    with pytest.raises(ValueError, match="not yet written"):
        Kernel([(prog.AND, 0, 0, 1, 0.0)], luts, [0], [0])
    with pytest.raises(ValueError, match="out of range"):
        Kernel([(prog.CONST, 0, 0, 0, 1.0)], luts, [1], [0])
    kernel = Kernel([(prog.NUM_GT, 0, 0, 0, 1.0)], luts, [0], [0])
    with pytest.raises(ValueError, match="has 2 rows, expected 3"):
        kernel.run([np.zeros(2)], [], 3, False)
    winner, masks = kernel.run([np.array([0.0, 2.0, np.nan])], [], 3, True)
    assert winner.tolist() == [1, 0, 1] and masks.tolist() == [[False, True, False]]
