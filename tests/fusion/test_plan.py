from __future__ import annotations

import json

import numpy as np
import pytest

from fusion_rl.errors import IllegalPlanError, PlanMismatchError
from fusion_rl.fusion.legality import check_plan, convexity_test, is_convex, require_legal
from fusion_rl.fusion.plan import FusionPlan
from fusion_rl.fusion.random_plans import mutate_plan, random_plan

from _tiny import crossed_groups, diamond


def test_canonical_form_and_hash_ignore_order_and_name():
    a = FusionPlan.from_groups([[3, 1], [0], [2]], 4, name="x")
    b = FusionPlan.from_groups([[2], [1, 3], [0]], 4, name="y")
    assert a.groups == ((0,), (1, 3), (2,))
    assert a == b.with_name("x") and a.hash == b.hash
    assert a.hash != FusionPlan.from_groups([[0, 1], [2], [3]], 4).hash


def test_json_round_trip(tmp_path):
    plan = FusionPlan.from_groups([[0, 1], [2, 3]], 4, fingerprint="abc", name="mine")
    path = plan.save(tmp_path / "p.json")
    again = FusionPlan.load(path)
    assert again == plan and again.fingerprint == "abc" and again.name == "mine"


@pytest.mark.parametrize(
    "groups, n, err, words",
    [
        ([[0, 1], [1, 2]], 3, IllegalPlanError, "two groups"),
        ([[0, 1]], 3, IllegalPlanError, "in no group"),
        ([[0, 7]], 3, PlanMismatchError, "node 7"),
        ([[-1, 0, 1, 2]], 3, PlanMismatchError, "node -1"),
    ],
)
def test_not_a_partition(groups, n, err, words):
    with pytest.raises(err, match=words):
        FusionPlan.from_groups(groups, n)


@pytest.mark.parametrize(
    "text, words",
    [
        ("{not json", "not valid JSON"),
        ('["a list"]', "JSON object"),
        ('{"groups": [["x"]], "num_nodes": 1}', "integer node ids"),
        ('{"groups": [[0]], "num_nodes": "1"}', "non-negative integer"),
    ],
)
def test_malformed_plan_files(tmp_path, text, words):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(IllegalPlanError, match=words):
        FusionPlan.load(path)


def test_non_convex_group_is_rejected_with_its_path():
    g = diamond()
    report = check_plan(g, FusionPlan.from_groups([[0, 3], [1], [2]], 4))
    assert not report.legal
    assert report.errors[0].rule == "non_convex" and report.errors[0].group == 0
    assert "0 -> 1 -> 3" in report.errors[0].message or "0 -> 2 -> 3" in report.errors[0].message
    assert not is_convex({0, 3}, g) and is_convex({0, 1, 2, 3}, g) and is_convex({0, 1}, g)


def test_cycle_between_groups_is_rejected():
    # 0 -> 1 -> 3 and 0 -> 2 -> 3, groups {0, 1} and {2, 3} are each convex and acyclic; with
    # an extra edge 1 -> 2 and groups {0, 2}, {1, 3}: 0->1 (A->B), 1->2 (B->A): a cycle.
    from fusion_rl.graph.opgraph import OpEdge, OpGraph

    d = diamond()
    g = OpGraph(d.nodes, [*d.edges, OpEdge(1, 2, 0, 16)], d.outputs, d.name)
    report = check_plan(g, FusionPlan.from_groups([[0, 2], [1, 3]], 4))
    assert not report.legal
    assert {v.rule for v in report.errors} & {"non_convex", "cycle"}


def test_cycle_with_a_group_downstream_of_it_is_named_not_raised():
    """Groups A={1,4} and B={2,3} depend on each other; C={0} only hangs below A. After Kahn's
    algorithm all three remain, and C (group 0) has no remaining successor: a walk along
    successors from it found nothing to follow (StopIteration, issue 16)."""
    from fusion_rl.graph.opgraph import OpEdge, OpGraph, OpNode

    nodes = [OpNode(i, f"v{i}", "add", "add", 0, ((1, 4),), "float32", 4.0, 32, 16, 0)
             for i in range(5)]
    edges = [OpEdge(1, 2, 0, 16), OpEdge(3, 4, 0, 16), OpEdge(4, 0, 0, 16)]
    g = OpGraph(nodes, edges, outputs=[0], name="cycle_above_a_sink")
    plan = FusionPlan.from_groups([[0], [1, 4], [2, 3]], 5)
    report = check_plan(g, plan)
    assert [v.rule for v in report.errors] == ["cycle"]
    cycle = report.errors[0]
    assert cycle.group in (1, 2) and "groups 1 -> 2 -> 1" in cycle.message \
        or "groups 2 -> 1 -> 2" in cycle.message, cycle.message
    with pytest.raises(IllegalPlanError, match="depend on each other"):
        require_legal(g, plan)


def test_multi_anchor_groups_are_legal_but_flagged():
    report = require_legal(diamond(), FusionPlan.from_groups([[0, 1, 2, 3]], 4))
    assert report.legal
    assert [v.rule for v in report.warnings] == ["multi_anchor"]


def test_plan_for_another_model_is_rejected():
    g = diamond()
    with pytest.raises(PlanMismatchError, match="plan is for model"):
        require_legal(g, FusionPlan.from_groups([[0], [1], [2], [3]], 4, fingerprint="other"))
    with pytest.raises(PlanMismatchError, match="plan has 3 nodes"):
        require_legal(g, FusionPlan.from_groups([[0], [1], [2]], 3))


def test_random_and_mutated_plans_are_legal():
    g = diamond()
    rng = np.random.default_rng(0)
    sizes = set()
    for _ in range(200):
        plan = random_plan(g, rng)
        assert check_plan(g, plan).legal
        sizes.add(plan.num_groups)
        assert check_plan(g, mutate_plan(g, plan, rng)).legal
    assert sizes == {1, 2, 3, 4}  # from fully fused to unfused
    capped = random_plan(g, rng, merge_prob=1.0, max_anchors=1)
    assert all(sum(g.nodes[i].is_mac_anchor for i in grp) <= 1 for grp in capped.groups)


def test_plan_json_is_plain(tmp_path):
    plan = FusionPlan.from_groups([[0, 1], [2]], 3)
    data = json.loads(plan.save(tmp_path / "p.json").read_text())
    assert data["groups"] == [[0, 1], [2]] and data["hash"] == plan.hash


def test_convexity_test_agrees_with_the_walk_of_check_plan(model_cache):
    """The reachability-mask predicate and check_plan's walk (its ``non_convex`` rule) give one
    answer: on every subset of two small graphs, and on groups grown along edges of a residual
    CNN (mostly convex) or drawn at random (mostly not)."""

    def walk(group, g) -> bool:
        rest = [[n] for n in range(len(g)) if n not in group]
        plan = FusionPlan.from_groups([sorted(group), *rest], len(g))
        return "non_convex" not in [v.rule for v in check_plan(g, plan).errors]

    import itertools

    import numpy as np

    for g in (diamond(), crossed_groups()):
        convex = convexity_test(g)
        for k in range(1, len(g) + 1):
            for group in itertools.combinations(range(len(g)), k):
                assert convex(group) == walk(set(group), g), group
    graph = model_cache("resnet_tiny").graph
    convex, succ = convexity_test(graph), graph.successor_lists()
    rng = np.random.default_rng(0)
    verdicts = []
    for _ in range(200):
        group = {int(rng.integers(len(graph)))}
        for _ in range(int(rng.integers(1, 6))):
            frontier = [v for u in group for v in succ[u] if v not in group]
            if frontier:
                group.add(frontier[int(rng.integers(len(frontier)))])
        loose = set(rng.choice(len(graph), size=int(rng.integers(2, 6)), replace=False).tolist())
        for g in (group, loose):
            verdicts.append(convex(g))
            assert verdicts[-1] == walk(g, graph), sorted(g)
    assert any(verdicts) and not all(verdicts)


def test_convex_groups_can_still_form_a_cycle():
    g = crossed_groups()
    plan = FusionPlan.from_groups([[0, 4], [1, 2, 3]], 5)
    assert is_convex({0, 4}, g) and is_convex({1, 2, 3}, g)
    report = check_plan(g, plan)
    assert [v.rule for v in report.errors] == ["cycle"]


def test_random_and_aggressive_plans_never_form_cycles():
    from fusion_rl.fusion.rules import aggressive

    g = crossed_groups()
    rng = np.random.default_rng(0)
    for _ in range(300):
        assert check_plan(g, random_plan(g, rng)).legal
    assert check_plan(g, aggressive(None, g)).legal
