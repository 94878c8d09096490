"""The claims demo as test equipment: its small model, its pipeline folder, requests built from cases."""

from __future__ import annotations

import shutil
from pathlib import Path

from examples.claims import build_models
from examples.claims.data import REQUEST_FIELDS
from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
from kernel.decision_client import make_request

ROOT = Path(__file__).resolve().parent.parent
CLAIMS = ROOT / "examples" / "claims" / "pipelines"


def build_small_model(folder: Path, provider: str = "auto") -> Path:
    """``claims_triage`` (the logistic-regression model, built in well under a second) into ``folder``;
    ``provider = "cpu"`` pins it to the CPU lane (tests that queue it behind a busy CPU lane: on a GPU
    machine ``auto`` would put it on the GPU lane, which nothing occupies)."""
    build_models.build(folder, models=build_models.MODELS[:1], log=lambda line: None)
    if provider != "auto":
        toml = folder / build_models.MODELS[0].name / "1" / "model.toml"
        text = toml.read_text(encoding="utf-8")
        assert 'provider = "auto"' in text, "build_models no longer writes the provider line this replaces"
        toml.write_text(text.replace('provider = "auto"', f'provider = "{provider}"'), encoding="utf-8")
    return folder


def loaded_hub(folder: Path):
    """A ``ModelHub`` over the claims model built into ``folder``, every model loaded (registry tests)."""
    from kernel.models import ModelHub

    hub = ModelHub(build_small_model(folder))
    hub.load_all()
    return hub


def copy_pipelines(folder: Path) -> Path:
    """A private copy of the claims pipeline and policy (tests upload and edit them)."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in CLAIMS.glob("*.toml"):
        shutil.copy(path, folder / path.name)
    return folder


def claim_request(case: dict, **options) -> kpb.DecisionRequest:
    """A DecisionRequest for the claims pipeline from a synthetic case (tenant "acme" unless given)."""
    options.setdefault("tenant", "acme")
    return make_request("claims_triage", {name: case[name] for name in REQUEST_FIELDS}, **options)


# A claim the model is unsure of (its confidence about 0.4, below the policy's 0.6): R02 sends it to a human.
UNSURE_CASE = {"claim_amount": 3612.47, "policy_age_months": 28, "customer_tier": "bronze", "claim_type": "health",
               "prior_claims": 1, "fraud_score": 0.366, "days_since_incident": 10, "has_police_report": False}
