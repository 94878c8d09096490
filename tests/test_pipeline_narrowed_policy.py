"""A pipeline's field ranges, values and defaults narrow the rows its policy sees: the table's verdicts over those
rows are warned about when the pipeline binds (``kernel/policy/within.py``).

The policy's own check holds for every value its input types allow, and a policy may serve several pipelines; so
a rule like ``fraud_score > 1`` passed, and served, under a pipeline whose ``fraud_score`` has ``max = 1.0`` and
can never fire there; a rule reached only through a missing value, which a pipeline never sends, was silent too.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from claims_support import copy_pipelines

from examples.claims import build_models
from kernel.models import ModelHub
from kernel.pipelines import PipelineRegistry
from kernel.policy import load_policy, parse_policy

CLAIMS = Path(__file__).resolve().parent.parent / "examples" / "claims" / "pipelines"
PIPELINE_TEXT = (CLAIMS / "claims_triage.toml").read_text()
POLICY_TEXT = (CLAIMS / "policy.toml").read_text()


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    folder = tmp_path_factory.mktemp("narrowed_models")
    build_models.build(folder, models=build_models.MODELS[:1], log=lambda line: None)
    hub = ModelHub(folder)
    hub.load_all()
    return hub


def put(tmp_path, hub, policy: str) -> list[str]:
    registry = PipelineRegistry(copy_pipelines(tmp_path), hub, load_policy, parse_policy, poll_s=0)
    registry.reload()
    warnings: list[str] = []
    registry.put(PIPELINE_TEXT.encode(), policy.encode(), warnings=warnings)
    return warnings


def with_rules(extra: str) -> str:
    at = POLICY_TEXT.index('[[rule]]\nid = "DEFAULT"')
    return POLICY_TEXT[:at] + extra + "\n" + POLICY_TEXT[at:]


def test_the_demo_policy_gets_no_narrowed_warning(tmp_path, hub):
    assert not [w for w in put(tmp_path, hub, POLICY_TEXT) if "for the requests this pipeline sends" in w]


def test_a_rule_matching_only_values_outside_a_fields_range_is_warned_about(tmp_path, hub):
    policy = with_rules('[[rule]]\nid = "R11"\nwhen = "fraud_score > 1"\naction = "review"\n')
    parse_policy(policy)  # over every value, the rule can match (fraud_score 2): the policy itself is fine
    warnings = [w for w in put(tmp_path, hub, policy) if "rule R11" in w]
    assert len(warnings) == 1, warnings
    assert "can never match" in warnings[0] and "fraud_score 0..1" in warnings[0], warnings


def test_a_rule_reached_only_through_a_missing_value_is_warned_about(tmp_path, hub):
    """Under FIRST, `fraud_score >= 0.5` then `fraud_score < 0.5` leave only a missing fraud_score to the rules
    after them and to the default: none of them is ever reached when the pipeline (default 0.21) serves it."""
    policy = with_rules('[[rule]]\nid = "HI"\nwhen = "fraud_score >= 0.5"\naction = "review"\n\n'
                        '[[rule]]\nid = "LO"\nwhen = "fraud_score < 0.5"\naction = "approve"\n\n'
                        '[[rule]]\nid = "TAIL"\nwhen = "policy_age_months >= 0"\naction = "approve"\n')
    loaded = parse_policy(policy)
    assert not any("unreachable" in w.message or "never applies" in w.message for w in loaded.warnings)
    warnings = [w for w in put(tmp_path, hub, policy) if "for the requests this pipeline sends" in w]
    assert len(warnings) == 2, warnings
    assert "rule TAIL" in warnings[0] and "is unreachable" in warnings[0] and "no input missing" in warnings[0], \
        warnings
    assert "the default rule never applies" in warnings[1], warnings


def test_many_such_rules_are_counted_past_the_first_ten(tmp_path, hub):
    """A rate table running past a field's max: one warning per rule would be hundreds of log lines per load (B0
    matches fraud_score 1, the max: 29 rules never match)."""
    rules = "".join(f'[[rule]]\nid = "B{i}"\nwhen = "fraud_score in [{i + 1}, {i + 2})"\naction = "review"\n\n'
                    for i in range(30))
    warnings = [w for w in put(tmp_path, hub, with_rules(rules)) if "this pipeline sends" in w]
    assert len(warnings) == 11 and all("can never match" in w for w in warnings[:10]), warnings
    assert warnings[10] == ("pipeline claims_triage: and 19 more rules of policy.toml like these, for the requests "
                            "this pipeline sends"), warnings
