"""Feature encoding for the claims-triage models: request fields -> ``features`` tensor.

The spec is data, not code: ``write_spec`` stores it as ``features.toml`` next to
the models, and a serving pipeline can rebuild the exact tensor from it with
``read_spec`` + ``encode`` (or its own reader) without importing the trainer.

Column layout, in ``FEATURES`` order:

* numeric   1 column   ``(transform(x) - mean) / std``; transform is ``log1p`` or ``none``.
  mean/std come from a fixed training sample (``generate_cases(SPEC_SAMPLE, SPEC_SEED)``)
  and are rounded to 6 decimals, so the in-memory spec and the TOML file are equal.
* categorical  one column per listed category, one-hot; an unknown value is all zeros.
* boolean   1 column   1.0 for true, 0.0 for false.

Missing fields: a case without a field uses that feature's ``default``:
numeric -> the training median (a typical claim), categorical -> "" (all zeros, i.e.
"unknown"), boolean -> false.  Defaults are written to ``features.toml`` too.
"""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import numpy as np

from examples.claims.data import CLAIM_TYPES, TIERS, generate_cases

SPEC_SAMPLE, SPEC_SEED = 5000, 1234
INPUT_NAME = "features"

# (name, kind, transform or categories) in column order; statistics are filled in below.
_LAYOUT = (
    ("claim_amount", "numeric", "log1p"),  # amounts are log-normal: log makes them ~normal
    ("policy_age_months", "numeric", "none"),
    ("prior_claims", "numeric", "none"),
    ("fraud_score", "numeric", "none"),
    ("days_since_incident", "numeric", "log1p"),  # long tail: a 300-day claim is "late", not 10x
    ("customer_tier", "categorical", TIERS),
    ("claim_type", "categorical", CLAIM_TYPES),
    ("has_police_report", "boolean", None),
)


def _transform(kind: str, values: np.ndarray) -> np.ndarray:
    return np.log1p(values) if kind == "log1p" else values


def _fit(cases: list[dict]) -> list[dict]:
    spec = []
    for name, kind, extra in _LAYOUT:
        if kind == "numeric":
            raw = np.array([c[name] for c in cases], dtype=np.float64)
            values = _transform(extra, raw)
            spec.append({
                "name": name, "kind": kind, "transform": extra,
                "mean": round(float(values.mean()), 6),
                "std": round(float(values.std()), 6),
                "default": round(float(np.median(raw)), 2),
            })
        elif kind == "categorical":
            spec.append({"name": name, "kind": kind, "categories": list(extra), "default": ""})
        else:
            spec.append({"name": name, "kind": kind, "default": False})
    return spec


FEATURES: list[dict] = _fit(generate_cases(SPEC_SAMPLE, SPEC_SEED))


def width(spec: list[dict] = FEATURES) -> int:
    """Number of columns F of the encoded tensor."""
    return sum(len(f["categories"]) if f["kind"] == "categorical" else 1 for f in spec)


def encode(cases: list[dict], spec: list[dict] = FEATURES) -> np.ndarray:
    """Encode ``cases`` (dicts of request fields) as a float32 ``(n, F)`` array."""
    out = np.zeros((len(cases), width(spec)), dtype=np.float32)
    col = 0
    for f in spec:
        name, default = f["name"], f["default"]
        values = [c.get(name, default) for c in cases]
        if f["kind"] == "numeric":
            x = _transform(f["transform"], np.array(values, dtype=np.float64))
            out[:, col] = (x - f["mean"]) / f["std"]
            col += 1
        elif f["kind"] == "categorical":
            for j, category in enumerate(f["categories"]):
                out[:, col + j] = [v == category for v in values]
            col += len(f["categories"])
        else:
            out[:, col] = [bool(v) for v in values]
            col += 1
    return out


def toml_value(value) -> str:
    # Enough TOML for this spec: bool, float, str, list of str (the stdlib has no writer).
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        assert math.isfinite(value)
        return repr(value)  # shortest round-trip form, so tomllib reads the same float back
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


def spec_toml(spec: list[dict] = FEATURES) -> str:
    """The spec as TOML text (deterministic: fixed key order, round-trip floats)."""
    lines = [
        "# Encoding of claim fields into the `features` input tensor, one [[feature]] per",
        "# field, in column order. numeric: (transform(x) - mean) / std, one column;",
        "# categorical: one-hot over `categories` (unknown -> all zeros); boolean: 0/1.",
        "# A missing field takes `default`.",
        f'input = "{INPUT_NAME}"',
        f"width = {width(spec)}",
    ]
    for f in spec:
        lines += ["", "[[feature]]"]
        lines += [f"{key} = {toml_value(value)}" for key, value in f.items()]
    return "\n".join(lines) + "\n"


def write_spec(path: str | Path, spec: list[dict] = FEATURES) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(spec_toml(spec), encoding="utf-8")


def read_spec(path: str | Path) -> list[dict]:
    """The feature list from a ``features.toml``; ``encode(cases, read_spec(p))`` reproduces it."""
    with open(path, "rb") as fh:
        doc = tomllib.load(fh)
    spec = doc["feature"]
    if width(spec) != doc["width"]:
        raise ValueError(f"{path}: width {doc['width']} does not match its features")
    return spec
