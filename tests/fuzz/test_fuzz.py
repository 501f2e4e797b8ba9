"""Plan fuzzing (CI's reduced version of scripts/fuzz_plans.py) and its building blocks."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from fusion_rl import fuzz
from fusion_rl.fusion.legality import check_plan
from fusion_rl.fusion.plan import FusionPlan
from fusion_rl.fusion.rules import RULE_SETS, make_plan

from conftest import REPO_ROOT


def _rule_plans(model) -> dict[str, FusionPlan]:
    return {r: make_plan(r, model.mod, model.graph) for r in RULE_SETS}


def test_generated_plans_are_legal_distinct_and_cover_every_source(model_cache):
    model = model_cache("resnet_tiny")
    plans = fuzz.generate_plans(model.graph, _rule_plans(model), 30, np.random.default_rng(0))
    assert len(plans) == 30 and len({p.hash for p, _ in plans}) == 30
    assert all(check_plan(model.graph, p).legal for p, _ in plans)
    sources = {s.split(":")[0] for _, s in plans}
    assert {"sweep", "mutant"} <= sources and any(s.startswith("boundary") for s in sources)
    sizes = [max(len(g) for g in p.groups) for p, _ in plans]
    assert min(sizes) <= 2 and max(sizes) >= 6  # small and large groups both present
    mutated_from = {s for _, s in plans if s.startswith("mutant:")}
    assert mutated_from == {f"mutant:{r}" for r in fuzz.RULE_NAMES}


def test_generation_is_seeded(model_cache):
    model = model_cache("cnn_plain")
    rules = _rule_plans(model)
    a = fuzz.generate_plans(model.graph, rules, 10, np.random.default_rng(3))
    b = fuzz.generate_plans(model.graph, rules, 10, np.random.default_rng(3))
    assert [p.hash for p, _ in a] == [p.hash for p, _ in b]


def test_boundary_plan_is_maximal(model_cache):
    model = model_cache("transformer_encoder")
    graph = model.graph
    plan = fuzz.boundary_plan(graph, np.random.default_rng(1))
    assert check_plan(graph, plan).legal
    owner = plan.group_of()
    crossing = {tuple(sorted((owner[e.src], owner[e.dst]))) for e in graph.edges if owner[e.src] != owner[e.dst]}
    # Every contraction of a crossing edge is illegal: the plan sits on the legality boundary.
    assert len(fuzz.illegal_extensions(graph, plan)) == len(crossing) > 0


def test_arbitrary_partitions_include_both_verdicts(model_cache):
    model = model_cache("resnet_tiny")
    parts = fuzz.arbitrary_partitions(model.graph, [make_plan("tvm", model.mod, model.graph)], 40,
                                      np.random.default_rng(0))
    verdicts = [check_plan(model.graph, p).legal for p, _ in parts]
    assert len(parts) == 40 and any(verdicts) and not all(verdicts)
    assert {s for _, s in parts} == {"labels", "runs", "pair", "boundary+1", "cross"}
    # ResNet's shortcut branches also yield two convex groups that depend on each other.
    rules = [[v.rule for v in check_plan(model.graph, p).errors] for p, s in parts if s == "cross"]
    assert ["cycle"] in rules  # the cycle rule is exercised on its own, without non_convex


def test_forced_cycle_fails(model_cache):
    """Two convex groups that depend on each other cannot be ordered: TVM rejects the program."""
    model = model_cache("resnet_tiny")
    rng = np.random.default_rng(0)
    plan = next(p for p in (fuzz.cross_plan(model.graph, rng) for _ in range(50))
                if p is not None and [v.rule for v in check_plan(model.graph, p).errors] == ["cycle"])
    out = fuzz.force_plans([("resnet_tiny", plan)], "naive", timeout_s=120)
    assert out[0]["outcome"] == "well_formed", out[0]


def test_forced_rejected_plans_fail_where_expected(model_cache):
    """Non-convex groups really are illegal (TVM's well-formed check rejects the program);
    fusing an opaque ``take`` is not (it builds and verifies): that rule is conservative."""
    model = model_cache("transformer_encoder")
    graph = model.graph
    take = next(n.id for n in graph.nodes if n.pattern == 8)
    user = graph.successor_lists()[take][0]
    opaque = FusionPlan.from_groups([[take, user]] + [[i] for i in range(len(graph)) if i not in (take, user)],
                                    len(graph), graph.fingerprint)
    assert [v.rule for v in check_plan(graph, opaque).errors] == ["opaque"]
    # 0 -> ... -> 2 in mlp-like chains: {a, c} with b between is non-convex.
    chain = next((e.src, e.dst) for e in graph.edges if len(graph.successor_lists()[e.dst]) == 1
                 and graph.nodes[e.src].pattern != 8 and graph.nodes[e.dst].pattern != 8)
    a, b = chain
    c = graph.successor_lists()[b][0]
    nonconvex = FusionPlan.from_groups([[a, c]] + [[i] for i in range(len(graph)) if i not in (a, c)],
                                       len(graph), graph.fingerprint)
    assert "non_convex" in [v.rule for v in check_plan(graph, nonconvex).errors]
    out = fuzz.force_plans([("transformer_encoder", opaque), ("transformer_encoder", nonconvex)], "naive",
                           timeout_s=120)
    assert out[0]["outcome"] == "ok", out[0]
    assert out[1]["outcome"] == "well_formed" and "not defined" in out[1]["error"], out[1]


@pytest.mark.slow
def test_reproducer_folder_reproduces_a_mismatch(model_cache, tmp_path, monkeypatch):
    """A mismatch (here: a tampered reference) leaves a folder whose repro.sh shows it again."""
    from fusion_rl.compiler.verify import reference_outputs

    model = model_cache("mlp_tiny")
    expected, ref = reference_outputs(model)
    monkeypatch.setattr(model, "reference", ([e + 1.0 for e in expected], ref), raising=False)
    plan = make_plan("tvm", model.mod, model.graph)
    folder = fuzz.save_reproducer(tmp_path / "reproducers", model, plan, "naive", "wrong_output",
                                  "injected", "test")
    assert folder.name == f"mlp_tiny-{plan.hash}-naive"
    for name in ("model.onnx", "plan.json", "inputs.npz", "expected.npz", "actual.npz", "meta.json",
                 "repro.sh", "README.md"):
        assert (folder / name).is_file(), name
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["reproduce_exit"] == 1 and meta["reproduce_verdict"].startswith("REPRODUCED: wrong output")
    with np.load(folder / "actual.npz") as actual:
        np.testing.assert_allclose(actual["arr_0"], expected[0], rtol=1e-3, atol=1e-4)
    proc = subprocess.run(["sh", str(folder / "repro.sh")], cwd=REPO_ROOT, capture_output=True, text=True,
                          env={**fuzz.child_env(), "PYTHON": sys.executable})
    assert proc.returncode == 1 and "REPRODUCED" in proc.stdout
    # The untampered expectation: the same folder no longer reproduces.
    np.savez(folder / "expected.npz", *expected)
    assert fuzz.reproduce(folder)[0] is False


@pytest.mark.parametrize("name", [*fuzz.default_models(),
                                  # deployment sizes: exported and imported once (~8 s each)
                                  *(pytest.param(n, marks=pytest.mark.slow) for n in fuzz.bench_models())])
def test_check_plan_reports_on_every_arbitrary_partition(model_cache, name):
    """Any partition of any zoo graph gets a report, never an exception (issue 16: a cycle's
    walk raised StopIteration on about 13% of hf_bert's partitions); every cycle is named."""
    model = model_cache(name)
    graph = model.graph
    seeds = [make_plan(r, model.mod, graph) for r in fuzz.RULE_NAMES]
    cycles = 0
    for plan, source in fuzz.arbitrary_partitions(graph, seeds, 150, np.random.default_rng(1)):
        report = check_plan(graph, plan)
        for v in report.errors:
            assert isinstance(v.message, str) and v.rule in {"non_convex", "cycle", "opaque"}, v
            if v.rule == "cycle":
                cycles += 1
                groups = [int(g) for g in v.message.split("groups ")[1].split(" depend")[0].split(" -> ")]
                assert groups[0] == groups[-1] and len(groups) >= 3, v.message
                # consecutive groups really are joined by an edge (the named cycle is real)
                owner = plan.group_of()
                edges = {(owner[e.src], owner[e.dst]) for e in graph.edges}
                assert all((a, b) in edges for a, b in zip(groups, groups[1:])), v.message


@pytest.mark.slow
def test_ci_fuzz_covers_every_zoo_model(tmp_path):
    """CI's reduced fuzz: one arbitrary partition per zoo model through the legality checker (the
    rejected ones forced through the compiler), and one legal plan under naive + rules on each of
    two families (a residual CNN, a `transformers` decoder); no mismatch, no legality hole. Every
    rule set of every zoo model is compiled and verified by tests/fusion/test_apply.py; the full
    fuzz is experiments/fuzz/."""
    built = ("resnet_tiny", "hf_gpt2")
    models = [*built, *(m for m in fuzz.default_models() if m not in built)]
    report = fuzz.fuzz_plans(models, len(built), seed=0, schedules=("naive", "rules"),
                             out=tmp_path, n_partitions=len(models), timeout_s=300,
                             command="pytest")
    c = report.counts()
    assert not report.skipped_models and {r.model for r in report.results} == set(built)
    assert c["plans"] == len(built) and c["compiles"] == 2 * len(built)
    assert c["by_status"] == {"ok": 2 * len(built)}, report.findings
    assert c["mismatches"] == 0 and not report.legality_holes
    assert c["legality"]["partitions"] == len(models) and c["legality"]["rejected"] >= 1
    assert {r.model for r in report.legality} == set(models)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["counts"]["plans"] == len(built)
    assert (tmp_path / "summary.md").read_text().startswith("# Plan fuzzing")
    assert not (tmp_path / "reproducers").exists()


def test_cli_names_the_cycle_of_a_cyclic_plan(model_cache, tmp_path):
    """`fusion-rl plan hf_bert --plan <cyclic>`: one `error:` line naming the cycle, exit 2."""
    model = model_cache("hf_bert")
    rng = np.random.default_rng(0)
    plan = next(p for p in (fuzz.cross_plan(model.graph, rng) for _ in range(200))
                if p is not None and [v.rule for v in check_plan(model.graph, p).errors] == ["cycle"])
    path = plan.save(tmp_path / "cyclic.json")
    proc = subprocess.run([sys.executable, "-m", "fusion_rl.cli", "plan", "hf_bert", "--plan", str(path)],
                          capture_output=True, text=True, cwd=REPO_ROOT)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, proc.stderr
    assert len(errors) == 1 and "cycle" in errors[0] and "depend on each other" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr


def test_script_help():
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "fuzz_plans.py"), "--help"],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and "--plans" in proc.stdout and "--schedules" in proc.stdout
