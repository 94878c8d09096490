"""Deterministic synthetic insurance claims for the claims-triage demo.

Every case is a plain dict shaped like a request a triage pipeline would get:
structured fields, a free-text ``description`` (with fake names, e-mails and
phone numbers, so PII scrubbing has something to find) and a ground-truth
``label`` (approve / review / deny).

The label comes from a hidden rule with interactions (fraud score matters only
without a police report, late filing matters only for some claim types, the
amount threshold depends on the tier, ...) plus label noise.  A linear model
over the encoded features gets most of it; a non-linear model gets clearly
more.  Nothing here is real data and no field means anything outside the demo.
"""

from __future__ import annotations

import numpy as np

LABELS = ("approve", "review", "deny")
# The structured fields of a claim as a decision request carries them (the claims pipeline's fields).
REQUEST_FIELDS = ("claim_amount", "policy_age_months", "customer_tier", "claim_type", "prior_claims",
                  "fraud_score", "days_since_incident", "has_police_report")
TIERS = ("bronze", "silver", "gold", "platinum")
CLAIM_TYPES = ("auto", "home", "health", "travel")

_TIER_P = (0.45, 0.30, 0.17, 0.08)
_TYPE_P = (0.35, 0.25, 0.25, 0.15)
# Median claim amount per type; the amount is this times a log-normal factor.
_TYPICAL_AMOUNT = {"auto": 3500.0, "home": 9000.0, "health": 2500.0, "travel": 900.0}
_POLICE_P = {"auto": 0.55, "home": 0.35, "health": 0.05, "travel": 0.15}
# How many "typical amounts" a tier may claim before a human looks at it.
_TIER_LIMIT = {"bronze": 1.5, "silver": 2.0, "gold": 3.0, "platinum": 5.0}
LABEL_NOISE = 0.06

_FIRST = ("Maria", "James", "Aiko", "Omar", "Elena", "Kwame", "Lucia", "Piotr", "Sofia", "Daniel")
_LAST = ("Lopez", "Smith", "Tanaka", "Haddad", "Petrova", "Mensah", "Rossi", "Nowak", "Berg", "Cohen")
_EVENTS = {
    "auto": ("a rear-end collision on the highway", "a scraped door in a parking garage",
             "hail damage to the windshield"),
    "home": ("water damage from a burst pipe", "a kitchen fire", "a break-in through the back door"),
    "health": ("an emergency room visit", "a broken wrist after a fall", "physiotherapy sessions"),
    "travel": ("a cancelled flight", "lost luggage at the airport", "a missed connection"),
}


def _description(first: str, last: str, event: str, contact: str, police: bool, days: int) -> str:
    police_text = "; a police report was filed" if police else ""
    return f"{first} {last}{contact} reports {event} {days} days ago{police_text}."


def _label(c: dict) -> str:
    """The hidden triage policy (noise-free). Deliberately non-linear."""
    ratio = c["claim_amount"] / _TYPICAL_AMOUNT[c["claim_type"]]
    late = c["days_since_incident"] > 60 and c["claim_type"] in ("health", "travel")
    if (
        (c["fraud_score"] > 0.55 and not c["has_police_report"])
        or (c["policy_age_months"] < 6 and ratio > 1.5)
        or late
    ):
        return "deny"
    if (
        ratio > _TIER_LIMIT[c["customer_tier"]]
        or c["prior_claims"] >= 3
        or (c["fraud_score"] > 0.4 and c["prior_claims"] >= 1)
        or (c["claim_type"] == "home" and not c["has_police_report"] and ratio > 1.0)
    ):
        return "review"
    return "approve"


def generate_cases(n: int, seed: int = 0) -> list[dict]:
    """``n`` synthetic claims; the same ``(n, seed)`` always gives the same list."""
    rng = np.random.default_rng(seed)
    # Draw every random column at once (fast), then assemble the dicts.
    types = rng.choice(4, size=n, p=_TYPE_P)
    tiers = rng.choice(4, size=n, p=_TIER_P)
    # A latent "suspicious" minority drives fraud scores up and police reports down,
    # so the upstream fraud score is informative but not decisive.
    suspicious = rng.random(n) < 0.15
    ages = np.minimum(rng.gamma(1.5, 24.0, n), 360).astype(int)
    days = rng.exponential(40.0, n).astype(int) + 1
    police_u = rng.random(n)
    fraud = np.where(suspicious, rng.beta(5.0, 3.0, n), rng.beta(1.5, 6.0, n))
    amount_factor = rng.lognormal(0.0, 0.8, n)
    priors = rng.poisson(0.3 + 0.4 * ages / 60.0)
    names = rng.integers(0, len(_FIRST), (n, 2))
    events = rng.integers(0, 3, n)
    contact_roll, phone = rng.random(n), rng.integers(0, 100, n)
    noise_roll, noise_label = rng.random(n), rng.integers(0, 3, n)

    cases = []
    for i in range(n):
        claim_type, tier = CLAIM_TYPES[types[i]], TIERS[tiers[i]]
        police = bool(police_u[i] < _POLICE_P[claim_type] * (0.4 if suspicious[i] else 1.0))
        first, last = _FIRST[names[i, 0]], _LAST[names[i, 1]]
        contact = ""  # about a third each: e-mail, phone (555-01xx: reserved fictional), none
        if contact_roll[i] < 0.35:
            contact = f" ({first.lower()}.{last.lower()}@example.com)"
        elif contact_roll[i] < 0.7:
            contact = f" (phone +1-202-555-01{phone[i]:02d})"
        case = {
            "claim_id": f"CLM-{seed:03d}-{i:06d}",
            "claim_amount": round(_TYPICAL_AMOUNT[claim_type] * float(amount_factor[i]), 2),
            "policy_age_months": int(ages[i]),
            "customer_tier": tier,
            "claim_type": claim_type,
            "prior_claims": int(priors[i]),
            "fraud_score": round(float(fraud[i]), 3),
            "days_since_incident": int(days[i]),
            "has_police_report": police,
            "description": _description(
                first, last, _EVENTS[claim_type][events[i]], contact, police, int(days[i])
            ),
        }
        label = _label(case)
        if noise_roll[i] < LABEL_NOISE:  # human reviewers disagree sometimes
            label = LABELS[noise_label[i]]
        case["label"] = label
        cases.append(case)
    return cases


def labels_array(cases: list[dict]) -> np.ndarray:
    """Class indices (into ``LABELS``) of ``cases``, int64."""
    return np.array([LABELS.index(c["label"]) for c in cases], dtype=np.int64)
