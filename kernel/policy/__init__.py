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
is an error row: default action, escalated, adjust 0, ``error`` says which
rules and ``fired`` lists them all); PRIORITY, the matching rule whose action
comes first in ``outputs.actions``, and of several with that action the first
in file order, whose escalate and adjust apply (DMN ranks by output values
only; escalate and adjust have no priority list); COLLECT, all matching rules:
the highest-priority action, escalate if any of them escalates, adjust their
sum, added in file order. That aggregation is fixed: DMN's COLLECT returns
the list of outputs or one aggregate of one output (SUM, MIN, MAX, COUNT);
there is no such option here. Under every hit policy the default rule decides,
with its own escalate and adjust, when no other rule matches (under COLLECT too:
DMN would return an empty list). ``fired`` names the deciding rules (the
default's id when none matched).

The score adjustment is an output and nothing more: the pipeline puts it on
the answer and the audit record (``Decision.score_adjustment``); it changes
neither the model's label, confidence or scores, nor the action, nor the
pipeline's ``min_confidence`` test. Each rule's ``adjust`` is within ±1e6;
the sum is not clamped.

Values are compared as they are, with no conversion: numbers as 64-bit floats
(``-0.0 == 0``; a whole number no float holds is refused, see ``encode.py``;
a model's float32 outputs are widened exactly, so a score of float32 0.4 is
0.4000000059604645, which ``score.deny <= 0.4`` does not match),
strings code point by code point, as FEEL does: case, Unicode normalization
(a composed and a decomposed "é") and spaces all count (a pipeline field's
``values`` refuse other spellings at the request); nothing on the way
normalizes a string (the request's field reading, both evaluators, the table
analysis, ``policy test``), so all of them tell the two "é" apart alike;
bools only as true/false (a policy read from request dicts also takes 1/0; a
pipeline refuses them).

The load-time analysis treats each field as free of the others, model outputs
included: it does not know that ``label`` is the class with the largest score,
that ``confidence`` is that score, or that scores sum to 1. Its verdicts hold
for any values (never a false "disjoint" or "unreachable"), but a UNIQUE table
may be refused for an overlap no model could produce (``label == 'deny'`` and
``score.deny < 0.3`` with three classes; the witness row shows it), and a rule
unreachable only through such a relation is not reported. Numbers are the
floats the evaluators compare (±inf included), not reals: ``x > 0.5`` and
``x < 0.5000000000000001`` share no row. A pipeline narrows the rows: when it
binds the policy, the table is checked again over the rows it sends (within
its fields' ``min``/``max`` and ``values``, no input missing), and what holds
only there (a rule that can never fire or is never reached there, a default
never needed there) is a warning then (``within.py``); the model's scores keep
every value there too.

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
