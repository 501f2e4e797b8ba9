"""Fuzz shards run side by side merge into one report."""

import json
import subprocess
import sys

from conftest import REPO_ROOT
from fusion_rl.fuzz.report import FuzzReport, FuzzResult, LegalityResult


def _shard(model: str, plans: list[str], wall_s: float) -> FuzzReport:
    report = FuzzReport(command="x", seed=0, models=[model], providers=["naive", "rules"],
                        wall_s=wall_s, machine="m")
    for h in plans:
        for provider in ("naive", "rules"):
            report.results.append(FuzzResult(model, h, provider, "sweep", "ok", 2, 3))
    report.legality.append(LegalityResult(model, "p" + model, "cross", False, ["cycle"], "well_formed"))
    return report


def test_round_trip_and_merge_count_every_shard_once() -> None:
    a, b = _shard("mlp_tiny", ["1", "2"], 10.0), _shard("hf_bert", ["1", "3", "4"], 30.0)
    a.results[0].status = "wrong_output"
    back = FuzzReport.from_dict(json.loads(json.dumps(a.to_dict())))
    assert back.counts() == a.counts() and back.machine == "m"
    merged = FuzzReport.merge([a, b], "merged")
    c = merged.counts()
    # plan "1" exists in both shards but on different models: two distinct plans
    assert c["plans"] == 5 and c["compiles"] == 10 and c["models"] == 2
    assert c["mismatches"] == 1 and c["legality"]["partitions"] == 2
    assert merged.models == ["mlp_tiny", "hf_bert"] and merged.wall_s == 30.0
    assert "| hf_bert | 3 | 6 | 6 | 0 | 0 | 0 / 1 (1) |" in merged.markdown()


def test_merge_of_a_folder_without_a_summary_is_one_error_line(tmp_path) -> None:
    proc = subprocess.run([sys.executable, "scripts/fuzz_plans.py", "--merge", str(tmp_path),
                           "--out", str(tmp_path / "out")], cwd=REPO_ROOT, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "summary" in lines[0]
