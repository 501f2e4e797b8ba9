"""The shipped policy's card and the README's model card agree with the learn_bench experiment's
results (issue 11 item 7: one source of truth for results), and the shipped policy is that
experiment's best seed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import load_script
from fusion_rl.errors import ConfigError, FusionRLError
from fusion_rl.export.artifact import read_card, set_evaluation
from fusion_rl.report import blocks, card

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "experiments" / "learn_bench_v20"
POLICY = ROOT / "policies" / "default"


@pytest.fixture(scope="module")
def shipped() -> dict:
    return read_card(POLICY)[0]


def test_card_evaluation_is_computed_from_the_results_file(shipped):
    assert card.policy_evaluation(RESULTS) == shipped["evaluation"]


def test_readme_model_card_is_generated_from_the_card(shipped):
    readme = (ROOT / "README.md").read_text()
    assert blocks.current_block(readme, card.BEGIN, card.END) == card.card_block(shipped)


def test_the_shipped_policy_is_the_best_seed_of_the_run(shipped):
    ev = shipped["evaluation"]
    split = ev["splits"]["heldout-model"]
    best = max(zip(split["per_seed"], split["seeds"]))[1]
    assert ev["best_seed"] == best == shipped["training"]["seed"]
    run = next(t["run"] for t in ev["training"] if t["seed"] == best)
    assert shipped["training"]["run"] == run


def test_the_model_card_says_when_the_policy_was_fine_tuned(shipped):
    seed = shipped["training"]["seed"]

    def with_stats(**extra) -> str:
        ev = json.loads(json.dumps(shipped["evaluation"]))
        ev["training"] = [{**{k: v for k, v in t.items() if k != "fine_tuned"}, **extra}
                          if t["seed"] == seed else t for t in ev["training"]]
        return card.card_block({**shipped, "evaluation": ev})

    tuned = with_stats(fine_tuned="credit (5 formed)")
    assert "then PPO, then behaviour cloning on the credit plans of the training models with a declared " \
        "group shape (credit (5 formed)); final rolling estimate" in tuned and "(PPO's episodes) |" in tuned
    plain = with_stats()
    assert "credit plans" not in plain and "then PPO; final rolling estimate" in plain


def test_headline_numbers_are_geomeans_of_the_head_to_head_rows(shipped):
    rows = json.loads((RESULTS / "results.json").read_text())["rows"]
    split = shipped["evaluation"]["splits"]["heldout-model"]
    for seed, value in zip(split["seeds"], split["per_seed"]):
        own = [r["vs"]["tvm"][0] for r in rows if r["label"] == f"seed {seed}"]
        assert len(own) == len(split["models"])
        assert value == pytest.approx(float(np.exp(np.mean(np.log(own)))), abs=1e-4)


def test_the_card_counts_the_host_regime_of_the_repeats(shipped):
    # Every held-out model's repeats were probed (one probe per paired repeat); the card counts them.
    rows = json.loads((RESULTS / "results.json").read_text())["rows"]
    regimes = shipped["evaluation"]["splits"]["heldout-model"]["regimes"]
    per_model = {r["model"]: len(r["fork_join_us"]) for r in rows}
    assert regimes["near"] + regimes["far"] == sum(per_model.values()) > 0
    assert f"{regimes['near']} near, {regimes['far']} far" in card.card_block(shipped)


def test_edited_results_change_the_evaluation(tmp_path, shipped):
    # The agreement checks can fail: a results file edited after the card was written no longer
    # reproduces the card.
    for f in ("results.json", "config.yaml"):
        shutil.copy(RESULTS / f, tmp_path / f)
    data = json.loads((tmp_path / "results.json").read_text())
    for s in data["summary"]["per_seed"]:
        s["vs_tvm"] *= 2
    (tmp_path / "results.json").write_text(json.dumps(data))
    fresh = card.policy_evaluation(tmp_path)
    assert fresh != shipped["evaluation"]
    ev = shipped["evaluation"]["splits"]["heldout-model"]
    assert fresh["splits"]["heldout-model"]["per_seed"] == pytest.approx([2 * v for v in ev["per_seed"]], rel=1e-3)


def test_card_refuses_a_policy_that_is_not_the_best_seed(tmp_path, shipped):
    folder = tmp_path / "policy"
    shutil.copytree(POLICY, folder)
    data = json.loads((folder / "card.json").read_text())
    other = next(t["run"] for t in shipped["evaluation"]["training"] if t["seed"] != shipped["evaluation"]["best_seed"])
    data["training"]["run"] = other
    from fusion_rl.export.artifact import content_hash

    data["content_hash"] = content_hash(data, (folder / "weights.safetensors").read_bytes())
    (folder / "card.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="export that one first"):
        load_script("learn_bench").write_card(folder, RESULTS / "config.yaml")


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
