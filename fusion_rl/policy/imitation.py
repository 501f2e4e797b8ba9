"""Behaviour cloning: warm-start a policy on the best known plans before PPO (issue 11, item 5).

PPO from a random policy spends its first thousands of episodes rediscovering what a rule set
already knows. Cloning first starts it from the best known plan of each training (model,
target) pair instead:

1. :func:`best_known_plans`: each candidate (rule sets, and plans from searches) is played
   through the env and scored by its reward (an estimate under ``reward: table``, a
   measurement otherwise); the best per pair is the demonstration.
2. :func:`demonstration_steps`: the demonstration is replayed through
   :meth:`FusionEnv.decide <fusion_rl.env.fusion_env.FusionEnv.decide>` (nothing is measured),
   recording each decision's observation, action mask and action.
3. :func:`behaviour_clone`: minimise ``-log pi(action | observation)`` under the masks, in
   minibatches, with the policy's own optimiser settings left untouched (a separate Adam).

>>> plans = best_known_plans(env, ["tvm", "aggressive_1anchor"])  # doctest: +SKIP
>>> losses = behaviour_clone(model, demonstration_steps(env, plans), epochs=20)  # doctest: +SKIP

After PPO, :class:`FineTune` clones again, on other labels: :func:`credit_demonstrations`, the
credit plans of the training models (:mod:`fusion_rl.compiler.shape_credit`: the one-anchor
rule's plan with every declared group-shape instance formed that the kernel table rates
faster alone). Which instances pay is a percent or two of an episode's reward each, too little
for PPO to learn from a few episodes per model; as labels they are exact on the training
models, and what the policy makes of them on other models is what a held-out evaluation shows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from fusion_rl.errors import ConfigError, IllegalPlanError
from fusion_rl.fusion.plan import FusionPlan
from fusion_rl.fusion.rules import make_plan

__all__ = ["Demonstration", "DemonstrationSteps", "FineTune", "WarmStart", "behaviour_clone",
           "best_known_plans", "credit_demonstrations", "demonstration_steps"]


@dataclass
class WarmStart:
    """Behaviour cloning before PPO, as a training config's ``warm_start`` section.

    ``epochs: 0`` (the default) turns it off. ``rules`` and ``plans`` (plan JSON files, e.g. the
    best plans of searches) are the candidates of :func:`best_known_plans`.
    """

    epochs: int = 0
    rules: list[str] = field(default_factory=lambda: ["tvm", "aggressive_1anchor"])
    plans: list[str] = field(default_factory=list)
    learning_rate: float = 1e-3
    batch_size: int = 64


@dataclass
class FineTune:
    """Behaviour cloning after PPO on the training models' credit plans
    (:func:`credit_demonstrations`), as a training config's ``fine_tune`` section.

    ``epochs: 0`` (the default) turns it off. It needs an env spec with ``reward: table`` and
    declared ``group_shapes``; models without an instance of them are not cloned.
    """

    epochs: int = 0
    learning_rate: float = 1e-3
    batch_size: int = 64


@dataclass(frozen=True)
class Demonstration:
    """The best known plan of one (model, target) pair and the reward that made it the best."""

    model: str
    target: str
    plan: FusionPlan
    source: str  #: the rule set's name or the plan's name
    reward: float  #: its episode reward (0 is ``tvm``'s)


@dataclass
class DemonstrationSteps:
    """Decisions of the demonstrations: one row per decision."""

    observations: dict[str, np.ndarray]  #: each observation key, stacked
    masks: np.ndarray  #: (n, 2) bool action masks
    actions: np.ndarray  #: (n,) int


def _play(env: Any, model: str, target: str, plan: FusionPlan) -> tuple[float, dict[str, Any]]:
    env.reset(options={"model": model, "target": target})
    reward, info = 0.0, {}
    for action in env.actions_for_plan(plan, model):
        _, r, terminated, _, info = env.step(action)
        reward += float(r)
        if terminated:
            break
    return reward, info


def best_known_plans(env: Any, rules: Sequence[str], plans: Sequence[FusionPlan] = ()) -> list[Demonstration]:
    """The best candidate of each (model, target) of ``env``'s spec, by episode reward.

    Candidates are the plans of the ``rules`` rule sets and those of ``plans`` that belong to
    the model (by fingerprint). Scoring spends what the env's reward spends (kernels timed
    under ``reward: table``). A candidate the action mask forbids is skipped.
    """
    if not rules and not plans:
        raise ConfigError("warm start needs at least one rule set or plan to imitate")
    demos = []
    for target in env.config.targets:
        for name in env.config.models:
            model = env.model(name)
            candidates = [(r, make_plan(r, model.mod, model.graph)) for r in rules]
            candidates += [(p.name or p.hash, p) for p in plans if p.fingerprint == model.fingerprint]
            best = None
            for source, plan in candidates:
                try:
                    reward, info = _play(env, name, target, plan)
                except IllegalPlanError:
                    continue  # a plan outside the action space (masked), e.g. a multi-anchor one
                if info.get("plan_hash") != plan.hash or info.get("invalid_actions"):
                    continue
                if best is None or reward > best.reward:
                    best = Demonstration(name, target, plan, source, reward)
            if best is None:
                raise ConfigError(f"no warm-start candidate is reachable on {name!r}, {target!r}")
            demos.append(best)
    return demos


def credit_demonstrations(env: Any) -> list[Demonstration]:
    """The credit plan (:meth:`FusionEnv.credit_plan <fusion_rl.env.fusion_env.FusionEnv.credit_plan>`)
    of every (model, target) of ``env``'s spec whose model has an instance of a declared group
    shape, scored by its episode reward.

    Raises
    ------
    ConfigError
        if no model has such an instance, or a credit plan is outside the action space.
    """
    demos = []
    for target in env.config.targets:
        for name in env.config.models:
            found = env.credit_plan(name, target)
            if found is None:
                continue
            plan, formed = found
            try:
                reward, info = _play(env, name, target, plan)
            except IllegalPlanError as exc:
                raise ConfigError(f"the credit plan of {name!r} is outside the action space: {exc}") from None
            if info.get("plan_hash") != plan.hash or info.get("invalid_actions"):
                raise ConfigError(f"the credit plan of {name!r} on {target!r} did not replay to itself")
            # The source names the model: a record's sources are listed as a set, and two models'
            # credit plans with as many instances formed must not read as one.
            demos.append(Demonstration(name, target, plan, f"credit plan of {name} ({formed} formed)", reward))
    if not demos:
        raise ConfigError("fine_tune: no training model has an instance of the env spec's group shapes")
    return demos


def demonstration_steps(env: Any, demos: Sequence[Demonstration]) -> DemonstrationSteps:
    """Every decision of ``demos``, replayed without measuring (:meth:`FusionEnv.decide`)."""
    obs: list[dict[str, np.ndarray]] = []
    masks: list[np.ndarray] = []
    actions: list[int] = []
    for demo in demos:
        todo = iter(env.actions_for_plan(demo.plan, demo.model))

        def choose(observation: dict[str, np.ndarray], mask: np.ndarray) -> int:
            action = next(todo)
            obs.append({k: np.array(v, copy=True) for k, v in observation.items()})
            masks.append(np.array(mask, dtype=bool))
            actions.append(int(action))
            return action

        plan = env.decide(choose, demo.model, demo.target, name="demonstration")
        if plan.hash != demo.plan.hash:
            raise ConfigError(f"demonstration {demo.source!r} on {demo.model!r} did not replay to its plan")
    if not actions:
        raise ConfigError("the demonstrations have no decisions to imitate")
    stacked = {k: np.stack([o[k] for o in obs]) for k in obs[0]}
    return DemonstrationSteps(stacked, np.stack(masks), np.asarray(actions, dtype=np.int64))


def behaviour_clone(model: Any, steps: DemonstrationSteps, epochs: int = 20, learning_rate: float = 1e-3,
                    batch_size: int = 64, seed: int = 0) -> list[float]:
    """Fit ``model.policy`` (a MaskablePPO policy) to the demonstrated actions; returns the mean
    negative log-likelihood of each epoch.

    Minimises ``-log pi(a | s)`` with the masks applied (a masked action has no probability to
    give), through the policy's ``evaluate_actions``; the critic is not trained here (PPO's first
    updates fit it to the warm-started policy's returns).
    """
    import torch
    from stable_baselines3.common.utils import obs_as_tensor

    if epochs <= 0 or batch_size <= 0 or learning_rate <= 0:
        raise ConfigError("behaviour cloning needs epochs, batch_size and learning_rate > 0")
    policy = model.policy
    device = policy.device
    optimiser = torch.optim.Adam(policy.parameters(), lr=learning_rate)
    rng = np.random.default_rng(seed)
    n = len(steps.actions)
    losses = []
    policy.set_training_mode(True)
    for _ in range(epochs):
        order = rng.permutation(n)
        total = 0.0
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            obs = obs_as_tensor({k: v[idx] for k, v in steps.observations.items()}, device)
            actions = torch.as_tensor(steps.actions[idx], device=device)
            _, log_prob, _ = policy.evaluate_actions(obs, actions, action_masks=steps.masks[idx])
            loss = -log_prob.mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += float(loss.detach()) * len(idx)
        losses.append(total / n)
    policy.set_training_mode(False)
    return losses
