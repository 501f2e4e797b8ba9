"""The shipped policy's card and the README's model card agree with the transfer experiment's
results files (issue 11 item 7: one source of truth for results)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from fusion_rl.errors import FusionRLError
from fusion_rl.export.artifact import read_card, set_evaluation
from fusion_rl.fusion.rules import make_plan
from fusion_rl.report import blocks, card

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "experiments" / "transfer"
POLICY = ROOT / "policies" / "default"


@pytest.fixture(scope="module")
def shipped() -> dict:
    return read_card(POLICY)[0]


def test_card_evaluation_is_computed_from_the_results_files(shipped):
    ev = shipped["evaluation"]
    assert card.policy_evaluation(RESULTS, ev["untimed_rule_plans"], ev["rules"]) == ev


def test_readme_model_card_is_generated_from_the_card(shipped):
    readme = (ROOT / "README.md").read_text()
    assert blocks.current_block(readme, card.BEGIN, card.END) == card.card_block(shipped)


def test_headline_numbers_come_from_the_head_to_head_rows(shipped):
    # The held-out-model split was re-timed head to head: its per-seed numbers are geomeans of
    # remeasured.json's learned rows, not of the store's rows in results.json.
    again = json.loads((RESULTS / "remeasured.json").read_text())
    split = shipped["evaluation"]["splits"]["heldout-model"]
    assert split["timing"].startswith("head to head")
    tvm = {r["model"]: r["latency_ms"] for r in again if r["method"] == "tvm"}
    seed0 = [tvm[r["model"]] / r["latency_ms"] for r in again if r["method"] == "learned" and r["seed"] == 0]
    geo = float(np.exp(np.mean(np.log(seed0))))
    assert split["per_seed"][0] == pytest.approx(geo, abs=1e-4)


@pytest.mark.parametrize("name", ["se_cnn", "mlp_tiny"])
def test_untimed_rule_plan_hashes_are_the_rules_plans(shipped, model_cache, name):
    # The collapse claim compares plan hashes; the hashes stored for rules without a timed row
    # must be what the rule set plans today.
    model = model_cache(name)
    for rule, h in shipped["evaluation"]["untimed_rule_plans"][name].items():
        assert make_plan(rule, model.mod, model.graph).hash == h


def test_edited_results_change_the_evaluation(tmp_path, shipped):
    # The agreement checks can fail: a results file edited after the card was written no longer
    # reproduces the card.
    for f in ("results.json", "remeasured.json", "summary.json"):
        shutil.copy(RESULTS / f, tmp_path / f)
    rows = json.loads((tmp_path / "remeasured.json").read_text())
    for r in rows:
        if r["method"] == "learned":
            r["latency_ms"] *= 0.5
    (tmp_path / "remeasured.json").write_text(json.dumps(rows))
    ev = shipped["evaluation"]
    fresh = card.policy_evaluation(tmp_path, ev["untimed_rule_plans"], ev["rules"])
    assert fresh != ev
    assert fresh["splits"]["heldout-model"]["mean"] == pytest.approx(2 * ev["splits"]["heldout-model"]["mean"], rel=1e-3)
    # The plans themselves did not change, so neither does the collapse onto a rule.
    assert fresh["collapsed_to"] == ev["collapsed_to"]


def test_set_evaluation_rehashes_and_refuses_a_damaged_card(tmp_path):
    folder = tmp_path / "policy"
    shutil.copytree(POLICY, folder)
    set_evaluation(folder, {"note": "x"})
    assert read_card(folder)[0]["evaluation"] == {"note": "x"}  # content hash still checks
    data = json.loads((folder / "card.json").read_text())
    data["decisions"] = {}
    (folder / "card.json").write_text(json.dumps(data))
    with pytest.raises(FusionRLError, match="content hash"):
        set_evaluation(folder, {"note": "y"})
