"""Search baselines: legality, budgets, measurement accounting, the exhaustive oracle, the CLI."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from fusion_rl.baselines.search import (
    annealing,
    exhaustive,
    greedy,
    random_search,
    run_search,
)
from fusion_rl.cli import main
from fusion_rl.compiler.measure import Measurer
from fusion_rl.compiler.store import MeasurementStore
from fusion_rl.compiler.timing import TimingProtocol
from fusion_rl.errors import ConfigError
from fusion_rl.fusion.legality import check_plan
from fusion_rl.fusion.plan import FusionPlan
from fusion_rl.fusion.plan_space import merge_candidates
from fusion_rl.graph.model import model_from_torch

from conftest import one_line_error, run_cli

QUICK = TimingProtocol.quick()
SEARCHES = {"random": random_search, "greedy": greedy, "annealing": annealing}


@pytest.fixture(scope="module")
def mlp2():
    """matmul -> add -> relu -> matmul -> add: 16 legal plans, so the oracle runs in seconds."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    return model_from_torch(module, (torch.randn(1, 16),), name="mlp2")


@pytest.fixture()
def store(tmp_path):
    with MeasurementStore(tmp_path / "m.sqlite") as s:
        yield s


def measurer(store) -> Measurer:
    return Measurer("host", "naive", store=store, protocol=QUICK, isolate=False)


def test_too_many_plans_is_refused_before_measuring(model_cache, store):
    model = model_cache("cnn_plain")
    m = measurer(store)
    with pytest.raises(ConfigError, match="more than 100 connected partitions"):
        exhaustive(model, m, budget=10_000, max_plans=100)
    assert m.stats.misses == 0


# ---- budgets and accounting -------------------------------------------------------------------


@pytest.mark.parametrize("budget", [0, -3, 1.5, True])
@pytest.mark.parametrize("algo", ["random", "greedy", "annealing", "exhaustive"])
def test_bad_budgets_are_rejected(mlp2, store, algo, budget):
    m = measurer(store)
    with pytest.raises(ConfigError, match="budget"):
        run_search(algo, mlp2, m, budget)
    assert m.stats.misses == 0


@pytest.mark.parametrize("algo", ["random", "greedy", "annealing"])
def test_search_returns_a_legal_plan_within_budget(model_cache, store, algo):
    model = model_cache("mlp_tiny")
    m = measurer(store)
    result = SEARCHES[algo](model, m, budget=4, seed=1)
    assert result.best_plan is not None and check_plan(model.graph, result.best_plan).legal
    assert result.best_plan.fingerprint == model.fingerprint
    assert result.evaluations <= 4 and result.measurements_spent <= 4
    assert result.measurements_spent == m.stats.misses  # a fresh store: every evaluation is a miss
    assert result.measurements_spent == result.evaluations
    assert len(result.history) == result.evaluations
    bests = [b for _, b in result.history]
    assert bests == sorted(bests, reverse=True) and bests[-1] == result.best_ms
    assert store.get(m.key(model, result.best_plan)).median_ms == result.best_ms
    assert json.loads(json.dumps(result.to_dict()))["algo"] == algo


@pytest.mark.parametrize("algo", ["random", "greedy", "annealing", "exhaustive"])
def test_identical_search_on_the_same_store_spends_nothing(mlp2, store, algo):
    first = run_search(algo, mlp2, measurer(store), budget=16 if algo == "exhaustive" else 5, seed=3)
    m = measurer(store)
    again = run_search(algo, mlp2, m, budget=16 if algo == "exhaustive" else 5, seed=3)
    assert first.measurements_spent > 0
    assert again.measurements_spent == 0 and m.stats.misses == 0
    assert again.best_plan.hash == first.best_plan.hash and again.best_ms == first.best_ms
    assert again.evaluations == first.evaluations


def test_greedy_takes_the_best_measured_merge(mlp2, store):
    m = measurer(store)
    result = greedy(mlp2, m, budget=100)
    assert result.info["stop"] == "no improving merge"
    # The result is a local optimum: no single legal merge of it measures faster.
    for cand in merge_candidates(mlp2.graph, result.best_plan):
        record = m.measure(mlp2, cand)
        assert record.status != "ok" or record.median_ms >= result.best_ms


def test_seeded_searches_start_from_the_fastest_seed(mlp2, store):
    g = mlp2.graph
    unfused = FusionPlan.singletons(len(g), g.fingerprint, "unfused")
    whole = FusionPlan.from_groups([range(len(g))], len(g), g.fingerprint, "one group")
    seeds = [p for p in (unfused, merge_candidates(g, unfused)[0], whole) if check_plan(g, p).legal]
    m = measurer(store)
    seed_ms = {p.hash: m.measure(mlp2, p).median_ms for p in seeds}
    fastest = min(seeds, key=lambda p: seed_ms[p.hash])
    for algo, fn in SEARCHES.items():
        # A budget of exactly the seeds: the search spends it on them and returns the fastest.
        res = fn(mlp2, measurer(store), budget=len(seeds), seeds=seeds)
        assert res.evaluations == len(seeds) and res.best_plan.hash == fastest.hash, algo
    # Greedy only merges, so from a seed every group of the seed stays inside one group.
    res = greedy(mlp2, measurer(store), budget=100, seeds=seeds)
    assert res.best_ms <= seed_ms[fastest.hash]
    owner = {n: i for i, grp in enumerate(res.best_plan.groups) for n in grp}
    assert all(len({owner[n] for n in grp}) == 1 for grp in fastest.groups)


def test_exhaustive_is_an_oracle(mlp2, store):
    others = [
        random_search(mlp2, measurer(store), budget=6, seed=0),
        greedy(mlp2, measurer(store), budget=8),
        annealing(mlp2, measurer(store), budget=6, seed=0),
    ]
    already = len(store)
    m = measurer(store)
    with pytest.raises(ConfigError, match=r"--budget 16"):
        exhaustive(mlp2, m, budget=16 - already - 1)  # one short of the plans not yet measured
    assert m.stats.misses == 0
    oracle = exhaustive(mlp2, m, budget=16 - already)
    assert oracle.info["legal_plans"] == 16 and oracle.evaluations == 16
    assert oracle.measurements_spent == 16 - already == m.stats.misses
    for other in others:
        assert oracle.best_ms <= other.best_ms, other.algo
    # ... and it is the minimum over every stored median of this model.
    medians = [r.median_ms for r in store.records(model_fingerprint=mlp2.fingerprint, status="ok")]
    assert math.isclose(oracle.best_ms, min(medians))


# ---- CLI ----------------------------------------------------------------------------------------


def test_cli_search_json_and_saved_plan(capsys, tmp_path):
    argv = ["search", "mlp_tiny", "--algo", "random", "--budget", "2", "--json", "--repeat", "3",
            "--min-repeat-ms", "5", "--store", str(tmp_path / "m.sqlite"), "-o", str(tmp_path / "best.json")]
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 0, err
    data = json.loads(out)
    assert data["measurements_spent"] <= 2 and data["best_ms"] > 0 and data["tvm_ms"] > 0
    assert data["speedup_vs_tvm"] == pytest.approx(data["tvm_ms"] / data["best_ms"])
    assert FusionPlan.load(tmp_path / "best.json").hash == data["best_plan_hash"]


@pytest.mark.parametrize("budget", ["0", "-1"])
def test_cli_rejects_non_positive_budget(capsys, budget):
    with pytest.raises(SystemExit) as exc:
        main(["search", "mlp_tiny", "--algo", "greedy", "--budget", budget])
    assert exc.value.code == 2 and "must be > 0" in capsys.readouterr().err


def test_cli_exhaustive_refusal_is_one_line(capsys, tmp_path):
    line = one_line_error(*run_cli(capsys, "search", "se_cnn", "--algo", "exhaustive", "--budget", "5",
                                   "--store", str(tmp_path / "m.sqlite"))[::2], "connected partitions")
    assert line.startswith("error: exhaustive search")


class _Recording:
    """A measurer without TVM: fewer groups is faster, so searches drive towards big groups."""

    def __init__(self) -> None:
        self.stats, self.plans = SimpleNamespace(misses=0), []

    def measure(self, model, plan, per_kernel=False):
        self.stats.misses += 1
        self.plans.append(plan)
        return SimpleNamespace(status="ok", median_ms=float(len(plan.groups)))


@pytest.mark.parametrize("algo", ["random", "greedy", "annealing"])
def test_anchor_cap_bounds_every_evaluated_plan(model_cache, algo):
    """With ``max_anchors=1`` no evaluated plan has a group with two conv/matmul anchors (the
    training env's mask); without it, some search plans do (the cap is what restricts them)."""
    from fusion_rl.baselines.search import run_search, within_anchor_cap

    model = model_cache("cnn_plain")
    capped, free = _Recording(), _Recording()
    run_search(algo, model, capped, 40, seed=0, max_anchors=1)
    run_search(algo, model, free, 40, seed=0)
    assert capped.plans and all(within_anchor_cap(model.graph, p, 1) for p in capped.plans)
    assert not all(within_anchor_cap(model.graph, p, 1) for p in free.plans)


@pytest.mark.parametrize("algo", ["random", "greedy", "annealing"])
def test_declared_shapes_pass_the_anchor_cap_and_nothing_else(model_cache, algo):
    """A search bounded as the training mask is (one anchor per group, except a declared
    shape) reaches the pointwise -> depthwise pair and no other multi-anchor group: search
    demonstrations stay plans that behaviour cloning can replay. The seeds include
    ``aggressive`` (outside the mask), which must not become the start."""
    from fusion_rl.baselines.search import run_search, within_anchor_cap
    from fusion_rl.fusion.group_shapes import pointwise_depthwise
    from fusion_rl.fusion.rules import make_plan

    model = model_cache("mobilenet_tiny")
    graph, shapes = model.graph, ("pointwise_depthwise",)
    seeds = [make_plan(r, model.mod, graph) for r in ("tvm", "aggressive")]
    rec = _Recording()
    run_search(algo, model, rec, 60, seed=0, seeds=seeds, max_anchors=1, shapes=shapes)
    assert rec.plans and all(within_anchor_cap(graph, p, 1, shapes) for p in rec.plans)
    multi = [g for p in rec.plans for g in p.groups if sum(graph.nodes[n].is_mac_anchor for n in g) > 1]
    assert multi and all(pointwise_depthwise(graph, g) for g in multi)


class _PairPays(_Recording):
    """Fewer groups is faster, and a group with two anchors (the declared pair) saves more."""

    def __init__(self, graph) -> None:
        super().__init__()
        self.graph = graph

    def measure(self, model, plan, per_kernel=False):
        record = super().measure(model, plan, per_kernel)
        pairs = sum(sum(self.graph.nodes[n].is_mac_anchor for n in g) == 2 for g in plan.groups)
        return SimpleNamespace(status="ok", median_ms=record.median_ms - 1.5 * pairs)


@pytest.mark.parametrize("algo", ["greedy", "annealing"])
def test_searches_form_a_shape_that_no_merge_reaches(algo):
    """From EfficientNet's one-anchor plan of an MBConv block, where the depthwise conv's group
    holds the squeeze-excite pooling, the pair is one shape move away and no merge away: both
    local searches form it (the policy's mask allows it, so the searches it is compared with
    must reach it too)."""
    from fusion_rl.baselines.search import run_search

    from _tiny import mbconv_with_pooling

    graph, start = mbconv_with_pooling()
    model = SimpleNamespace(graph=graph, fingerprint=graph.fingerprint, name="mbconv")
    res = run_search(algo, model, _PairPays(graph), 30, seed=0, seeds=[start], max_anchors=1,
                     shapes=("pointwise_depthwise",))
    assert (1, 2, 3, 4, 5) in res.best_plan.groups
    # Without the shape declared, the cap keeps both anchors apart.
    res = run_search(algo, model, _PairPays(graph), 30, seed=0, seeds=[start], max_anchors=1)
    assert not any(sum(graph.nodes[n].is_mac_anchor for n in g) == 2 for g in res.best_plan.groups)
