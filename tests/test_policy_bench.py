"""The policy benchmark's peer translations decide exactly as our policy does (a smoke run of the harness)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("zen")
pytest.importorskip("cedarpy")

from bench import policy_bench  # noqa: E402
from bench.policy_peers import Cedar, Zen, ZenBatch  # noqa: E402
from kernel.policy import load_policy  # noqa: E402


def test_peers_agree_with_the_reference_on_every_rule():
    policy = load_policy(policy_bench.POLICY)
    rows = policy_bench.claims(2000, seed=5)
    result = policy.evaluate_reference(rows)
    fired = {f[0] for f in result.fired}
    assert fired == {r.id for r in policy.rules}, "the sample must reach every rule"
    expected = ([str(a) for a in result.action], [f[0] for f in result.fired])
    for peer in (Zen(), ZenBatch(), Cedar()):
        actions, rules = peer.run(rows)
        assert (list(actions), list(rules)) == expected, peer.name
    assert Cedar().errors(rows[:200]) == []


def test_harness_smoke_run(tmp_path, capsys):
    out = tmp_path / "policy.json"
    assert policy_bench.main(["--rows", "2000", "--peer-rows", "500", "--batch", "250", "--rounds", "1",
                              "--small-seconds", "0.02", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["agreement_rows"] == 500
    names = set(report["rates"])
    assert {"reference (row by row)", "zen-engine (per row)", "cedarpy (is_authorized_batch)"} <= names
    assert all(r["median"] > 0 for r in report["rates"].values())
    assert "| contender | rows/s" in capsys.readouterr().out
