"""Field types and the schema a policy's conditions are checked against.

Inputs are declared in the file (``[inputs] name = "number"``); the model's
outputs are implicit: ``label`` (a string, one of ``[model] classes`` when
declared), ``confidence`` (number) and ``score.<class>`` (number). Model
outputs are never missing; an input may be (see the missing-value rules in
``kernel/policy/__init__.py``).
"""

from __future__ import annotations

import difflib
import re

from .parser import KEYWORDS, NONFINITE, NONFINITE_HINT, case_hint

NUMBER, INTEGER, STRING, BOOL = "number", "integer", "string", "bool"
INPUT_TYPES = (NUMBER, INTEGER, STRING, BOOL)
NUMERIC = (NUMBER, INTEGER)
LABEL, CONFIDENCE, SCORE = "label", "confidence", "score"
RESERVED = frozenset({LABEL, CONFIDENCE, SCORE}) | KEYWORDS
NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# The reason ids the kernel gives decisions no rule made: a model fault's fallback, a reviewer's resolution, a
# withdrawn review. A rule with one of them would be told from those on the audit log by nothing.
KERNEL_REASON_IDS = ("FALLBACK", "REVIEW", "WITHDRAWN")
# Names an error message lists (the model's classes, the declared inputs): a policy may declare 100,000 classes,
# and every condition that names a wrong one got a message listing them all (a 400 KB upload built 6.8 GB of
# them). The first few say what was meant; the count says the rest exist.
MAX_NAMES_SHOWN = 20


# "Did you mean" is searched for among at most this many names: difflib compares the word with each (0.15 s for
# 100,000 actions), and a file may have a hundred such errors. Past it the error says what is wrong, without a guess.
MAX_SUGGESTION_NAMES = 2_000


def close_match(word: str, names) -> str | None:
    """The name in ``names`` closest to ``word`` (difflib), or None; None too when there are too many to search."""
    names = list(names)
    if len(names) > MAX_SUGGESTION_NAMES:
        return None
    close = difflib.get_close_matches(word, names, n=1)
    return close[0] if close else None


def shown(names) -> str:
    """``names`` joined with ", ", at most ``MAX_NAMES_SHOWN`` of them, then how many more there are."""
    names = list(names)
    listed = ", ".join(names[:MAX_NAMES_SHOWN])
    more = len(names) - MAX_NAMES_SHOWN
    return f"{listed}, … ({more:,} more)" if more > 0 else listed


class Schema:
    """What conditions may read: declared inputs plus the model outputs."""

    __slots__ = ("inputs", "classes", "class_set", "broken")

    def __init__(self, inputs: dict[str, str], classes: tuple[str, ...] | None, broken=frozenset()):
        self.inputs = inputs      # name -> one of INPUT_TYPES, in file order
        self.classes = classes    # the model's classes when declared; None accepts any label / score.<class>
        # (looked up once per score.<class> and label literal: a tuple of 100,000 classes made that quadratic)
        self.class_set = frozenset(classes) if classes is not None else None
        self.broken = broken      # inputs declared with an invalid type (already reported): no further errors

    def type_of(self, name: str) -> str | None:
        """The type of a field, or None when the policy cannot read it."""
        if name in self.inputs:
            return self.inputs[name]
        if name == LABEL:
            return STRING
        if name == CONFIDENCE:
            return NUMBER
        if name.startswith(SCORE + "."):
            cls = name[len(SCORE) + 1:]
            if cls and (self.class_set is None or cls in self.class_set):
                return NUMBER
        return None

    @staticmethod
    def is_model_output(name: str) -> bool:
        return name in (LABEL, CONFIDENCE) or name.startswith(SCORE + ".")

    def is_integer(self, name: str) -> bool:
        return self.inputs.get(name) == INTEGER

    def unknown_field_message(self, name: str) -> str:
        """Why ``name`` is not a field, with the closest known names."""
        if name == SCORE:
            example = self.classes[0] if self.classes else "deny"
            return f"'score' needs a class, as in score.{example} or score[\"{example}\"]"
        if name.startswith(SCORE + ".") and self.classes is not None:
            return (f"'{name[len(SCORE) + 1:]}' is not one of the model's classes "
                    f"({shown(self.classes)})")
        known = list(self.inputs) + [LABEL, CONFIDENCE]
        if self.classes:
            known += [f"{SCORE}.{c}" for c in self.classes]
        if case_hint(name):  # `flag == TRUE`: a keyword in capitals reads as a field name
            return f"unknown field '{name}' ({case_hint(name)})"
        if name.lower() in NONFINITE:  # `x == nan`, `x < inf`: read as a field name
            return f"unknown field '{name}' ({NONFINITE_HINT})"
        close = close_match(name, known)
        hint = f"; did you mean '{close}'?" if close else ""
        inputs = shown(self.inputs) or "none"
        return (f"unknown field '{name}'{hint} (declared inputs: {inputs}; "
                f"model outputs: label, confidence, score.<class>)")
