"""What a policy decides, on real Decide calls: values at the edges of what the policy compares, and the records
of decisions the hit policy could not make alone.

One kernel serves the claims model with pipelines written here (each a copy of the claims pipeline with its
own policy), so every answer has gone through the pipeline's field reading, the model, the compiled policy
and the audit log as a caller's does.
"""

from __future__ import annotations

import grpc
import pytest

from claims_support import CLAIMS
from conftest import module_claims_kernel
from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
from kernel._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc
from kernel.decision_client import make_request

# prior_claims with no upper bound, read by the policy as an integer: values past 2**53 reach it.
CAP_POLICY = f"""
[policy]
name = "claims_cap"
version = "1"
hit_policy = "FIRST"
[inputs]
prior_claims = "integer"
[outputs]
actions = ["deny", "review", "approve"]
[[rule]]
id = "OVER"
description = "more prior claims than the cap"
when = "prior_claims > {2**53}"
action = "deny"
[[rule]]
id = "AT"
description = "exactly at the cap"
when = "prior_claims == {2**53}"
action = "review"
[[rule]]
id = "D"
default = true
action = "approve"
"""

# UNIQUE, with rules the load-time analysis cannot prove disjoint (a field-to-field comparison in a band one
# ten-millionth wide): it warns, and a row matching both is an error row at run time.
CONFLICT_POLICY = """
[policy]
name = "claims_conflict"
version = "1"
hit_policy = "UNIQUE"
[inputs]
claim_amount = "number"
fraud_score = "number"
[outputs]
actions = ["deny", "review", "approve"]
[[rule]]
id = "A"
description = "amount just above the fraud score"
when = "claim_amount > fraud_score and claim_amount < 0.5000001 and fraud_score > 0.5"
action = "deny"
adjust = 0.5
[[rule]]
id = "B"
description = "tiny claim, high fraud score"
when = "fraud_score > 0.5 and claim_amount < 1"
action = "approve"
adjust = 0.25
[[rule]]
id = "D"
default = true
action = "review"
"""

# The claims pipeline's customer_tier defaults to '' (no tier: every one-hot column 0), a value no request may send.
NO_TIER_POLICY = """
[policy]
name = "claims_no_tier"
version = "1"
hit_policy = "FIRST"
[inputs]
customer_tier = "string"
[outputs]
actions = ["review", "approve"]
[[rule]]
id = "NO_TIER"
description = "no tier sent: the pipeline's default applies"
when = "customer_tier == ''"
action = "review"
[[rule]]
id = "D"
default = true
action = "approve"
"""


def _add_pipeline(folder, name: str, policy: str, edit=lambda text: text) -> None:
    text = (CLAIMS / "claims_triage.toml").read_text(encoding="utf-8")
    text = text.replace('name = "claims_triage"', f'name = "{name}"', 1)
    text = text.replace('file = "policy.toml"', f'file = "{name}_policy.toml"', 1)
    (folder / f"{name}.toml").write_text(edit(text), encoding="utf-8")
    (folder / f"{name}_policy.toml").write_text(policy, encoding="utf-8")


def _pipelines(folder) -> None:
    _add_pipeline(folder, "claims_cap", CAP_POLICY,
                  lambda text: text.replace("min = 0\nmax = 1000\n", "min = 0\n", 1))
    _add_pipeline(folder, "claims_conflict", CONFLICT_POLICY)
    _add_pipeline(folder, "claims_no_tier", NO_TIER_POLICY)


server, channel = module_claims_kernel("policy_decisions", edit_pipelines=_pipelines)


@pytest.fixture
def decide(channel):
    stub = kgrpc.DecisionServiceStub(channel)
    return lambda pipeline, fields: stub.Decide(make_request(pipeline, fields, tenant="acme"), timeout=10)


def test_an_integer_no_float_holds_is_refused_naming_the_field_not_decided_as_its_neighbour(decide):
    """`prior_claims = 2**53 + 1` was decided by rule AT ("exactly at the cap", `== 2**53`), and its record
    showed 9007199254740993: numbers are compared as 64-bit floats, and no float holds that one."""
    assert [r.rule_id for r in decide("claims_cap", {"prior_claims": 2**53}).reasons] == ["AT"]
    assert [r.rule_id for r in decide("claims_cap", {"prior_claims": 2**53 + 2}).reasons] == ["OVER"]
    with pytest.raises(grpc.RpcError) as info:
        decide("claims_cap", {"prior_claims": 2**53 + 1})
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'prior_claims'" in info.value.details() and "9007199254740993" in info.value.details()
    assert decide("claims_cap", {"prior_claims": 3}).action == "approve"  # the kernel goes on deciding



def test_a_unique_conflict_says_it_escalated_because_of_the_conflict_not_that_its_rules_asked(decide):
    """A row matching two rules of a UNIQUE table gets the default's action, escalated; its escalation reasons
    also said "a policy rule asked for review: A, B", though neither rule asks for review."""
    decision = decide("claims_conflict", {"claim_amount": 0.50000005, "fraud_score": 0.50000001})
    assert decision.action == "review" and decision.outcome == kpb.ESCALATED and decision.review_id
    assert [r.rule_id for r in decision.reasons] == ["A", "B"]  # every rule that matched (kernel/policy docs)
    assert decision.score_adjustment == 0.0
    assert [why for why in decision.escalation_reasons if "confidence" not in why] == [
        "the policy could not decide: hit policy UNIQUE but 2 rules match: A, B"]
    assert decide("claims_conflict", {"claim_amount": 0.25, "fraud_score": 0.75}).action == "approve"  # B alone


def test_a_rule_on_a_string_fields_default_is_served_and_fires_when_the_field_is_left_out(decide):
    """`customer_tier == ''` was refused at load as comparing the field "with '', which is not one of the field's
    values: the rule could never match on it", though every request leaving the field out has that value."""
    assert [r.rule_id for r in decide("claims_no_tier", {"claim_amount": 900.0}).reasons] == ["NO_TIER"]
    assert [r.rule_id for r in decide("claims_no_tier", {"customer_tier": "gold"}).reasons] == ["D"]
