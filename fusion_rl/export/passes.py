"""``LearnedFusion``: a trained fusion policy as a TVM pass, in place of FuseOps + FuseTIR.

The policy proposes, legality disposes (as MLGO keeps correctness in the compiler): the policy
only ever chooses among the moves the legality mask allows, and the final plan is checked again
before it is applied; any group that fails the check is split back into single ops. The masks are
those the policy was trained under: the card's ``decisions`` options (``max_mac_anchors``, ``group_shapes``,
``prefuse_epilogues``) build the same :class:`~fusion_rl.decisions.DecisionProcess` as training and ``FusionEnv.decide``,
and the card's ``hardware`` statistics normalise the target's hardware vector as training did
(:class:`~fusion_rl.compiler.target.HardwareStats`; a target outside their range logs a warning).
Numerics never change: the pass only regroups ``call_tir`` operators and fuses their TIR.

Use it in a pipeline::

    import fusion_rl.export  # registers the pass under its name
    learned = tvm.get_global_func("fusion_rl.transform.LearnedFusion")("policies/default", "host")
    seq = tvm.transform.Sequential([
        relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(), learned,   # instead of FuseOps() + FuseTIR()
    ])
"""

from __future__ import annotations

import os

import torch
import tvm
import tvm_ffi

from fusion_rl.compiler.target import hardware_features, parse_target
from fusion_rl.decisions import DecisionProcess, ObservationBuilder
from fusion_rl.export.artifact import decision_options, hardware_stats, load_network
from fusion_rl.fusion.apply import ApplyFusionPlan
from fusion_rl.fusion.legality import check_plan
from fusion_rl.fusion.plan import FusionPlan
from fusion_rl.graph.importer import check_legalized
from fusion_rl.graph.opgraph import OpGraph, extract_opgraph

PASS_NAME = "fusion_rl.transform.LearnedFusion"


class LearnedPlanner:
    """Runs an exported policy deterministically over an OpGraph and returns a legal plan.

    Parameters
    ----------
    policy_dir : path
        An exported policy folder (``policies/NAME``).
    target : str
        The target the policy plans for (its hardware vector is an input of the policy).

    Raises
    ------
    PolicyArtifactError
        If the folder is not a valid policy artifact, or its card does not record the decision
        options the policy was trained with, or its hardware statistics are malformed.
    """

    def __init__(self, policy_dir: str | os.PathLike, target: str = "host") -> None:
        self.policy_dir = str(policy_dir)
        self.network, self.card = load_network(policy_dir)
        #: The masks of training (the card's ``decisions``), enforced on every plan.
        self.options = decision_options(self.card)
        #: The training targets' statistics (identity for a card from before they existed).
        self.hardware_stats = hardware_stats(self.card)
        self.target = parse_target(target)
        #: The raw vector of the target, and the normalised one the network sees.
        self.raw_hardware = hardware_features(self.target).as_vector()
        self.hardware_stats.warn_outside(self.raw_hardware, self.target.name, where="plan")
        self.hardware = self.hardware_stats.normalize(self.raw_hardware)
        obs = self.card.get("observation") or {}
        self.max_nodes = int(obs.get("max_nodes", 256))
        self.max_edges = int(obs.get("max_edges", 512))

    @torch.no_grad()
    def plan(self, graph: OpGraph) -> FusionPlan:
        process = DecisionProcess(graph, self.options)
        if not graph.edges:
            return process.plan("learned")
        # The GNN strips padding, so a graph larger than the training padding is fine: pad it
        # to its own size instead of refusing it.
        builder = ObservationBuilder(
            graph, max(self.max_nodes, len(graph)), max(self.max_edges, len(graph.edges))
        )
        while not process.done:
            fuse = False
            if process.can_fuse():
                obs = builder.observe(process, self.hardware)
                logits = self.network({k: torch.as_tensor(v)[None] for k, v in obs.items()})[0]
                fuse = bool(logits[1] > logits[0])
            process.decide(fuse)
        return _legal_or_split(graph, process.plan("learned"))


def _legal_or_split(graph: OpGraph, plan: FusionPlan) -> FusionPlan:
    """Legality disposes: split every group named by a violation into single ops."""
    report = check_plan(graph, plan)
    if report.legal:
        return plan
    bad = {v.group for v in report.errors}
    groups = [g for i, g in enumerate(plan.groups) if i not in bad]
    groups += [(n,) for i, g in enumerate(plan.groups) if i in bad for n in g]
    return FusionPlan.from_groups(groups, plan.num_nodes, plan.fingerprint, "learned")


@tvm.transform.module_pass(opt_level=0, name="fusion_rl.LearnedFusion")
class LearnedFusion:
    """Fuse a legalized Relax module as the policy in ``policy_dir`` decides for ``target``.

    Before: ``main`` holds one ``call_tir`` per operator (after LegalizeOps,
    AnnotateTIROpPattern, FoldConstant). After: one fused PrimFunc per group of the policy's
    plan, exactly as :class:`~fusion_rl.fusion.apply.ApplyFusionPlan` would apply it.
    """

    def __init__(self, policy_dir: str | os.PathLike, target: str = "host") -> None:
        self.planner = LearnedPlanner(policy_dir, target)
        self.last_plan: FusionPlan | None = None

    def transform_module(self, mod: tvm.IRModule, ctx: tvm.transform.PassContext) -> tvm.IRModule:
        check_legalized(mod)
        graph = extract_opgraph(mod)
        self.last_plan = self.planner.plan(graph)
        return ApplyFusionPlan(self.last_plan, graph)(mod)


def _make_pass(policy_dir: str, target: str = "host") -> tvm.transform.Pass:
    return LearnedFusion(policy_dir, target)


# Look-up by name from any TVM code: tvm.get_global_func("fusion_rl.transform.LearnedFusion").
tvm_ffi.register_global_func(PASS_NAME, _make_pass, override=True)
