"""Policies: decision tables over request fields and model outputs, checked at load, evaluated per batch.

    policy = load_policy("examples/claims/pipelines/policy.toml")      # or parse_policy(text, source=...)
    policy.name, policy.version, policy.hash, policy.inputs, policy.rules, policy.warnings
    policy.analysis_complete                                 # False: the table analysis stopped at its work limit
    policy.text                                              # the file as loaded: sha256(text.encode()) == hash
    result = policy.evaluate(columns, n)                     # compiled, the whole batch at once
    result = policy.evaluate_rows(rows, outputs=None)        # same, from request dicts (+ model output columns)
    result = policy.evaluate_reference(rows)                 # same outcome, row by row in plain Python
    result.action, result.fired, result.escalate, result.adjust, result.error
    slot = PolicySlot(policy); slot.replace_text(upload)     # hot reload: a refused upload changes nothing

The compiled evaluator runs a flat instruction program (``program.py``)
either in the Cython kernel ``ext/rules.pyx`` (default when built; it also
reads request dicts in one pass) or with numpy (``vectorized.py``);
``policy.using("numpy")`` picks one. Errors: ``PolicyError`` for a file
(every problem as ``FILE:LINE: subject: reason``), ``PolicyInputError`` for a
batch that does not fit the declared inputs; both are INVALID_ARGUMENT.

File format (TOML; ``examples/claims/pipelines/policy.toml`` is a commented example)::

    [policy]
    name = "claims_triage"            # letters, digits, _ . -
    version = "2026-11-25.1"          # free text, goes into provenance with the file's sha256
    hit_policy = "FIRST"              # UNIQUE | FIRST | PRIORITY | COLLECT (DMN)
    description = "..."               # optional

    [inputs]                          # request fields the conditions read: number | integer | string | bool
    claim_amount = "number"

    [model]                           # optional: the model's classes; then `label` must be one of them
    classes = ["approve", "review", "deny"]   # and score.<class> must name one

    [outputs]
    actions = ["review", "deny", "approve"]   # every action a rule may take, highest priority first

    [[rule]]                          # rules in order; ids unique
    id = "R1"
    description = "Very high fraud score"     # optional, shown as the reason
    when = "fraud_score >= 0.9 and claim_amount > 1000"
    action = "deny"
    escalate = false                  # optional: send the case to a human
    adjust = 0.0                      # optional: added to the score adjustment when the rule fires

    [[rule]]                          # exactly one default, last: applies when no other rule matches
    id = "DEFAULT"
    default = true
    action = "review"

Conditions (``parser.py`` has the grammar): comparisons ``== != < <= > >=``,
intervals ``x in [1000, 5000)`` or ``1000 <= x < 5000``, sets ``x in {"a", "b"}``
/ ``not in``, ``is null`` / ``is not null``, ``and`` ``or`` ``not``, parentheses;
fields are the declared inputs plus the model outputs ``label``, ``confidence``
and ``score.<class>`` (or ``score["class"]``).

Hit policies (DMN): FIRST, the first matching rule in file order; UNIQUE, at
most one rule may match (overlaps are refused at load; a row that still
matches several, possible only where the analysis cannot decide and says so
in a warning, i.e. field-to-field comparisons or tables past its work limit,
is an error row: default action, escalated, ``error`` says which rules);
PRIORITY, the matching rule whose action comes first in ``outputs.actions``;
COLLECT, all matching rules: the highest-priority action, escalate if any
rule escalates, adjust summed. ``fired`` names the deciding rules (the default's id when
none matched).

Missing values: an input may be missing (None, or NaN in a float column).
Logic is three-valued, as in DMN: a test on a missing value is unknown,
``not unknown`` is unknown, and a rule fires only when its condition is
true; ``x is null`` is the way to match a missing value. Model outputs are
never missing. Served by a pipeline, no input is missing either (each field
is required or takes its default), so there ``x is null`` never holds; the
kernel warns about such a rule when it activates the pipeline. It matters
for rows a policy is tested with (``aios-kernel policy test``).
"""

from .errors import Diagnostic, PolicyError, PolicyInputError
from .loader import HIT_POLICIES, load_policy, parse_policy
from .policy import Policy, Rule
from .result import PolicyResult
from .slot import PolicySlot

__all__ = [
    "Diagnostic", "HIT_POLICIES", "Policy", "PolicyError", "PolicyInputError", "PolicyResult", "PolicySlot", "Rule",
    "load_policy", "parse_policy",
]
