"""Plan generation for the fuzzers: legal plans from three sources, and arbitrary partitions.

Legal plans (:func:`generate_plans`) come from ``sweep`` (:func:`~fusion_rl.fusion.random_plans.random_plan`
with ``merge_prob`` swept over [0, 1]), ``boundary`` (:func:`boundary_plan`, grown until no further
merge is legal) and ``mutant:<rules>`` (mutations of each hand-written rule set's plan).
Arbitrary partitions (:func:`arbitrary_partitions`) feed the legality fuzzer; most are illegal.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from fusion_rl.fusion.legality import check_plan
from fusion_rl.fusion.plan import FusionPlan
from fusion_rl.fusion.random_plans import mutate_plan, random_plan
from fusion_rl.graph.opgraph import OpGraph

#: The models that the fuzzer covers by default: every model of the tiny zoo (each compiles in
#: about a second). A fixed subset once hid a legality-checker crash on the ``hf_*`` graphs
#: (issue 16). ``bench_models()`` adds the deployment-size suite for the full fuzz.
def default_models() -> tuple[str, ...]:
    """Every model of the tiny zoo, in registration order."""
    from fusion_rl.graph.zoo import list_models

    return tuple(entry.name for entry in list_models("tiny"))


def bench_models() -> tuple[str, ...]:
    """Every model of the bench suite (deployment sizes; for the full fuzz, never CI's)."""
    from fusion_rl.graph.zoo import list_models

    return tuple(entry.name for entry in list_models("bench"))


#: Rule sets whose neighbourhoods are fuzzed (``mutant:<name>``).
RULE_NAMES = ("unfused", "tvm", "tensorrt", "aggressive")


def boundary_plan(graph: OpGraph, rng: np.random.Generator, max_anchors: int | None = None) -> FusionPlan:
    """A random *maximal* legal plan: grown until no edge can be contracted legally.

    One pass of :func:`random_plan` with ``merge_prob=1`` can reject a merge that becomes legal
    after later merges (a diamond closes), so passes repeat until a fixed point.
    """
    plan = random_plan(graph, rng, merge_prob=1.0, max_anchors=max_anchors)
    while True:
        grown = random_plan(graph, rng, merge_prob=1.0, start=plan, max_anchors=max_anchors)
        if grown.hash == plan.hash:
            return plan.with_name("boundary")
        plan = grown


def illegal_extensions(graph: OpGraph, plan: FusionPlan) -> list[FusionPlan]:
    """Every plan one edge-contraction past ``plan`` that legality rejects (the boundary)."""
    owner = plan.group_of()
    fingerprint = graph.fingerprint  # a hash of the whole graph: once, not once per edge
    out: dict[str, FusionPlan] = {}
    for e in graph.edges:
        a, b = owner[e.src], owner[e.dst]
        if a == b:
            continue
        labels = [a if owner[n] == b else owner[n] for n in range(len(graph))]
        cand = FusionPlan.from_assignment(labels, fingerprint, "boundary+1")
        if not check_plan(graph, cand).legal:
            out.setdefault(cand.hash, cand)
    return list(out.values())


def generate_plans(
    graph: OpGraph,
    rule_plans: dict[str, FusionPlan],
    n: int,
    rng: np.random.Generator,
) -> list[tuple[FusionPlan, str]]:
    """Up to ``n`` distinct legal plans as (plan, source); see the module docstring.

    Sources rotate sweep / boundary / mutant so that every kind is present even for small ``n``;
    duplicates are dropped (small graphs have few distinct plans), so fewer than ``n`` may come
    back after ``20 n`` attempts.
    """
    plans: dict[str, tuple[FusionPlan, str]] = {}
    rules = [r for r in RULE_NAMES if r in rule_plans]
    attempts = 0
    i = 0
    while len(plans) < n and attempts < 20 * max(n, 1):
        attempts += 1
        kind = i % 3
        i += 1
        if kind == 0:
            p = float(((i // 3) * 0.618034) % 1.0)  # low-discrepancy sweep over [0, 1)
            if (i // 3) % 7 == 6:
                p = 1.0
            plan, source = random_plan(graph, rng, merge_prob=p), f"sweep:p={p:.2f}"
        elif kind == 1:
            cap = 1 if rng.uniform() < 0.5 else None
            plan, source = boundary_plan(graph, rng, max_anchors=cap), "boundary" + ("-1anchor" if cap else "")
        else:
            if not rules:
                continue
            rule = rules[(i // 3) % len(rules)]
            plan = rule_plans[rule]
            for _ in range(int(rng.integers(1, 4))):
                plan = mutate_plan(graph, plan, rng)
            source = f"mutant:{rule}"
        if not check_plan(graph, plan).legal:  # generators promise legality: check it
            raise AssertionError(f"generator {source} made an illegal plan {plan.hash}")
        plans.setdefault(plan.hash, (plan.with_name(source.split(":")[0]), source))
    return list(plans.values())


def arbitrary_partitions(
    graph: OpGraph,
    legal_seeds: Sequence[FusionPlan],
    n: int,
    rng: np.random.Generator,
) -> list[tuple[FusionPlan, str]]:
    """``n`` distinct arbitrary (not necessarily legal) partitions, as (plan, source).

    - ``labels``: each node gets one of ``k`` random labels (mostly non-convex);
    - ``runs``: contiguous runs of program order (always convex, often *disconnected* groups,
      and the only source that puts opaque ops into groups at random);
    - ``pair``: a legal plan with two random groups merged;
    - ``boundary+1``: an illegal one-step extension of a maximal legal plan;
    - ``cross``: two edges ``u1 -> v1`` and ``u2 -> v2`` on parallel branches grouped as
      ``{u1, v2}`` and ``{u2, v1}``: each group is convex, but they depend on each other (the
      ``cycle`` rule, which the other sources almost never reach without ``non_convex``).
    """
    N = len(graph)
    out: dict[str, tuple[FusionPlan, str]] = {}
    attempts = 0
    while len(out) < n and attempts < 20 * max(n, 1):
        attempts += 1
        kind = attempts % 5
        if kind == 4:
            plan = cross_plan(graph, rng)
            if plan is None:
                continue
            source = "cross"
        elif kind == 0:
            k = int(rng.integers(1, max(2, N)))
            plan = FusionPlan.from_assignment(rng.integers(0, k, size=N).tolist(), graph.fingerprint)
            source = "labels"
        elif kind == 1:
            cuts = sorted(set(rng.choice(np.arange(1, N), size=int(rng.integers(0, max(1, N // 2))), replace=False).tolist())) if N > 1 else []
            labels = np.zeros(N, dtype=int)
            for c in cuts:
                labels[c:] += 1
            plan = FusionPlan.from_assignment(labels.tolist(), graph.fingerprint)
            source = "runs"
        elif kind == 2 and legal_seeds:
            base = legal_seeds[int(rng.integers(len(legal_seeds)))]
            if base.num_groups < 2:
                continue
            a, b = rng.choice(base.num_groups, size=2, replace=False)
            groups = [g for gi, g in enumerate(base.groups) if gi not in (a, b)]
            groups.append(base.groups[a] + base.groups[b])
            plan, source = FusionPlan.from_groups(groups, N, graph.fingerprint), "pair"
        else:
            # Capping anchors stops growth early in CNNs, whose uncapped maximal plan is often
            # the whole graph in one group (and then has no extension at all).
            cap = 1 if rng.uniform() < 0.5 else None
            ext = illegal_extensions(graph, boundary_plan(graph, rng, max_anchors=cap))
            if not ext:
                continue
            plan, source = ext[int(rng.integers(len(ext)))], "boundary+1"
        out.setdefault(plan.hash, (plan.with_name(source), source))
    return list(out.values())


def cross_plan(graph: OpGraph, rng: np.random.Generator, tries: int = 3000) -> FusionPlan | None:
    """Groups ``{u1, v2}`` and ``{u2, v1}`` from two edges, each group convex (see above).

    Edge pairs are tried in random order (at most ``tries``); in a transformer most pairs are
    connected through residuals, so the convex ones are rare and must be searched for.
    """
    from fusion_rl.fusion.legality import convexity_test

    edges = graph.edges
    if len(edges) < 2:
        return None
    is_convex = convexity_test(graph)
    pairs = [(i, j) for i in range(len(edges)) for j in range(len(edges)) if i < j]
    order = rng.permutation(len(pairs))[:tries]
    for k in order:
        i, j = pairs[int(k)]
        if rng.uniform() < 0.5:
            i, j = j, i
        e1, e2 = edges[i], edges[j]
        nodes = {e1.src, e1.dst, e2.src, e2.dst}
        if len(nodes) < 4:
            continue
        a, b = {e1.src, e2.dst}, {e2.src, e1.dst}
        if not (is_convex(a) and is_convex(b)):
            continue
        rest = [[n] for n in range(len(graph)) if n not in nodes]
        return FusionPlan.from_groups([sorted(a), sorted(b), *rest], len(graph), graph.fingerprint)
    return None
