"""The claims-triage policy (examples/claims/pipelines/policy.toml) written for the peer engines of bench/policy_bench.py.

* zen-engine (GoRules JDM): one decision table, hit policy "first", the same
  rules in the same order; R06 (an ``or`` across two fields) is two table rows
  with the same outputs, as decision tables spell a disjunction. Outputs:
  action, rule id, escalate, adjust. ``score.deny`` is read as the nested
  field ``score.deny``, so each row's context gets ``score: {deny: ...}``.
* cedarpy (Cedar): one ``permit`` per rule; Cedar has no rule order and no
  outputs, so each request asks which policies are satisfied (all of them are
  evaluated, as Cedar always does) and the adapter takes the first satisfied
  rule in file order, then looks up action/escalate/adjust. Cedar has no
  floating point: numbers are ``decimal`` (at most 4 decimal places), so the
  benchmark rounds confidences and scores to 4 places for every contender.

Both adapters time their own input conversion from the same list of request
dicts the kernel gets.
"""

from __future__ import annotations

import json

RULES = {  # rule id -> (action, escalate, adjust), as in policy.toml
    "R01": ("deny", False, 0.3), "R02": ("review", True, 0.0), "R03": ("deny", False, 0.0),
    "R04": ("review", True, 0.0), "R05": ("review", True, 0.1), "R06": ("review", True, 0.0),
    "R07": ("review", True, 0.0), "R08": ("fast_track", False, -0.1), "R09": ("approve", False, 0.0),
    "R10": ("approve", False, 0.0), "DEFAULT": ("review", True, 0.0),
}

# -- zen-engine
_COLUMNS = ["fraud_score", "has_police_report", "confidence", "label", "claim_amount", "prior_claims", "score.deny",
            "policy_age_months", "customer_tier"]
_ZEN_ROWS = [  # (rule id, {column: unary test})
    ("R01", {"fraud_score": ">= 0.8", "has_police_report": "false"}),
    ("R02", {"confidence": "< 0.6"}),
    ("R03", {"label": '"deny"', "confidence": ">= 0.9", "claim_amount": "< 50000"}),
    ("R04", {"claim_amount": ">= 50000"}),
    ("R05", {"fraud_score": ">= 0.5", "prior_claims": ">= 1"}),
    ("R06", {"label": '"review", "deny"'}),
    ("R06", {"score.deny": ">= 0.4"}),
    ("R07", {"policy_age_months": "< 6", "claim_amount": ">= 5000"}),
    ("R08", {"customer_tier": '"gold", "platinum"', "claim_amount": "< 10000", "fraud_score": "< 0.3",
             "confidence": ">= 0.8"}),
    ("R09", {"claim_amount": "[0..5000)", "fraud_score": "< 0.4"}),
    ("R10", {"claim_amount": "[5000..20000)", "customer_tier": '"silver", "gold", "platinum"', "fraud_score": "< 0.4"}),
    ("DEFAULT", {}),
]


def zen_table() -> str:
    """The JDM graph: input -> decision table -> output."""
    inputs = [{"id": f"i{k}", "name": name, "field": name} for k, name in enumerate(_COLUMNS)]
    outputs = [{"id": "o_action", "name": "action", "field": "action"},
               {"id": "o_rule", "name": "rule", "field": "rule"},
               {"id": "o_escalate", "name": "escalate", "field": "escalate"},
               {"id": "o_adjust", "name": "adjust", "field": "adjust"}]
    rules = []
    for index, (rule_id, tests) in enumerate(_ZEN_ROWS):
        action, escalate, adjust = RULES[rule_id]
        row = {"_id": f"r{index}", "o_action": json.dumps(action), "o_rule": json.dumps(rule_id),
               "o_escalate": "true" if escalate else "false", "o_adjust": repr(adjust)}
        row.update({f"i{k}": tests.get(name, "") for k, name in enumerate(_COLUMNS)})
        rules.append(row)
    graph = {
        "nodes": [
            {"id": "in", "type": "inputNode", "name": "request", "position": {"x": 0, "y": 0}},
            {"id": "table", "type": "decisionTableNode", "name": "claims_triage", "position": {"x": 200, "y": 0},
             "content": {"hitPolicy": "first", "inputs": inputs, "outputs": outputs, "rules": rules}},
            {"id": "out", "type": "outputNode", "name": "decision", "position": {"x": 400, "y": 0}},
        ],
        "edges": [{"id": "e1", "sourceId": "in", "targetId": "table", "type": "edge"},
                  {"id": "e2", "sourceId": "table", "targetId": "out", "type": "edge"}],
    }
    return json.dumps(graph)


def zen_context(row: dict) -> dict:
    context = dict(row)
    context["score"] = {"deny": row["score.deny"]}
    return context


class Zen:
    """zen-engine, one ``decision.evaluate`` per row."""

    name = "zen-engine (per row)"

    def __init__(self):
        import zen

        self.decision = zen.ZenEngine().create_decision(zen_table())

    def run(self, rows: list[dict]) -> tuple[list, list]:
        evaluate = self.decision.evaluate
        results = [evaluate(zen_context(row))["result"] for row in rows]
        return [r["action"] for r in results], [r["rule"] for r in results]


class ZenBatch:
    """zen-engine, ``ZenEngine.evaluate_batch`` over the whole batch."""

    name = "zen-engine (evaluate_batch)"

    def __init__(self):
        import zen

        table = zen_table()
        self.engine = zen.ZenEngine({"loader": lambda key: table})

    def run(self, rows: list[dict]) -> tuple[list, list]:
        answers = self.engine.evaluate_batch([{"key": "claims", "context": zen_context(row)} for row in rows])
        results = [a["data"]["result"] for a in answers]
        return [r["action"] for r in results], [r["rule"] for r in results]


# -- cedarpy
def _dec(value: str) -> str:
    return f'decimal("{value}")'


_CEDAR_RULES = [
    ("R01", f"context.fraud_score.greaterThanOrEqual({_dec('0.8')}) && !context.has_police_report"),
    ("R02", f"context.confidence.lessThan({_dec('0.6')})"),
    ("R03", f'context.label == "deny" && context.confidence.greaterThanOrEqual({_dec("0.9")}) && '
            f"context.claim_amount.lessThan({_dec('50000.0')})"),
    ("R04", f"context.claim_amount.greaterThanOrEqual({_dec('50000.0')})"),
    ("R05", f"context.fraud_score.greaterThanOrEqual({_dec('0.5')}) && context.prior_claims >= 1"),
    ("R06", f'["review", "deny"].contains(context.label) || context["score.deny"].greaterThanOrEqual({_dec("0.4")})'),
    ("R07", f"context.policy_age_months < 6 && context.claim_amount.greaterThanOrEqual({_dec('5000.0')})"),
    ("R08", f'["gold", "platinum"].contains(context.customer_tier) && context.claim_amount.lessThan({_dec("10000.0")})'
            f" && context.fraud_score.lessThan({_dec('0.3')}) && context.confidence.greaterThanOrEqual({_dec('0.8')})"),
    ("R09", f"context.claim_amount.greaterThanOrEqual({_dec('0.0')}) && context.claim_amount.lessThan({_dec('5000.0')})"
            f" && context.fraud_score.lessThan({_dec('0.4')})"),
    ("R10", f"context.claim_amount.greaterThanOrEqual({_dec('5000.0')}) && "
            f"context.claim_amount.lessThan({_dec('20000.0')}) && "
            f'["silver", "gold", "platinum"].contains(context.customer_tier) && '
            f"context.fraud_score.lessThan({_dec('0.4')})"),
]


def cedar_policies() -> str:
    return "\n".join(f'@id("{rule_id}")\npermit(principal, action, resource) when {{ {when} }};'
                     for rule_id, when in _CEDAR_RULES)


_DECIMAL_FIELDS = ("claim_amount", "fraud_score", "confidence", "score.deny")
_PLAIN_FIELDS = ("policy_age_months", "prior_claims", "customer_tier", "has_police_report", "label")


class Cedar:
    """cedarpy, ``is_authorized_batch`` over the whole batch; first satisfied policy in file order decides."""

    name = "cedarpy (is_authorized_batch)"

    def __init__(self):
        import cedarpy

        self.cedarpy = cedarpy
        self.policies = cedarpy.PolicySet.from_str(cedar_policies())
        self.entities = cedarpy.Entities.from_json_str("[]")
        # PolicySet names policies policy0, policy1, ... in file order.
        self.rule_of = {f"policy{k}": (k, rule_id) for k, (rule_id, _) in enumerate(_CEDAR_RULES)}

    def request(self, row: dict) -> dict:
        context = {name: {"__extn": {"fn": "decimal", "arg": f"{row[name]:.4f}"}} for name in _DECIMAL_FIELDS}
        for name in _PLAIN_FIELDS:
            context[name] = row[name]
        return {"principal": 'Claim::"c"', "action": 'Action::"triage"', "resource": 'Queue::"claims"',
                "context": context}

    def run(self, rows: list[dict]) -> tuple[list, list]:
        answers = self.cedarpy.is_authorized_batch([self.request(r) for r in rows], self.policies, self.entities)
        fired = []
        rule_of = self.rule_of
        for answer in answers:
            matched = [rule_of[p] for p in answer.diagnostics.reasons]
            fired.append(min(matched)[1] if matched else "DEFAULT")
        return [RULES[r][0] for r in fired], fired

    def errors(self, rows: list[dict]) -> list[str]:
        answers = self.cedarpy.is_authorized_batch([self.request(r) for r in rows], self.policies, self.entities)
        return [e for a in answers for e in a.diagnostics.errors]
