"""The Gymnasium environment: decide, edge by edge, which operators to fuse."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, SupportsFloat

import gymnasium as gym
import numpy as np
from gymnasium import logger

from fusion_rl.compiler.kernel_table import KernelTable
from fusion_rl.compiler.measure import Measurer
from fusion_rl.compiler.schedules import make_schedule
from fusion_rl.compiler.shape_credit import credit_plan
from fusion_rl.compiler.store import MeasurementStore, default_store_path
from fusion_rl.compiler.target import HardwareFeatures, HardwareStats, TargetSpec, hardware_features, parse_target
from fusion_rl.decisions import ACTION_FUSE, ACTION_KEEP, DecisionProcess, ObservationBuilder, actions_for_plan
from fusion_rl.env import spaces
from fusion_rl.env.plan_index import PlanIndex, plan_index_path
from fusion_rl.env.rewards import FAILURE_PENALTY, CostModel, Reward, RewardContext, TableReward, make_reward
from fusion_rl.env.spec import EnvSpec
from fusion_rl.errors import ConfigError
from fusion_rl.fusion.group_shapes import shape_instances
from fusion_rl.fusion.plan import FusionPlan
from fusion_rl.fusion.rules import make_plan
from fusion_rl.graph.datasets import ModelDataset, zoo_dataset
from fusion_rl.graph.model import Model, load_model

if TYPE_CHECKING:
    from fusion_rl.env.validation import ValidationResult

#: Reward added for an invalid action (out of range, or FUSE where it is masked), which is then
#: taken as KEEP. The same plan was reachable by a valid KEEP, so any penalty makes the invalid
#: action strictly worse; -1 is the scale of a failed measurement (FAILURE_PENALTY).
INVALID_ACTION_PENALTY = -1.0
HW_DIM = len(HardwareFeatures.FEATURE_NAMES)

#: Models loaded in this process, by spec string: an import costs seconds and every env of a
#: process (tests, evaluation loops) can share them; models are not mutated.
_MODELS: dict[str, Model] = {}


def _load_model(name: str) -> Model:
    if name not in _MODELS:
        _MODELS[name] = load_model(name)
    return _MODELS[name]


@dataclass
class _ModelEntry:
    """Everything per model that does not change during an episode (computed once)."""

    name: str
    model: Model
    process: DecisionProcess
    tvm_plan: FusionPlan
    observer: ObservationBuilder = field(repr=False)


class FusionEnv(gym.Env[dict[str, np.ndarray], int]):
    """Learn which operators of a model to fuse, one producer -> consumer edge at a time.

    The model (an OpGraph of ``call_tir`` operators) starts unfused. The env walks its edges in
    topological order (by consumer, then producer) and asks, for each edge whose ends are in
    different groups, whether to merge the producer's group with the consumer's. Edges whose
    ends already share a group are skipped. The result is a :class:`FusionPlan`, measured (or
    predicted) against TVM's own fusion of the same model on the same target.

    ## Action Space

    ``Discrete(2)``: 0 = keep the two groups apart, 1 = fuse them. :meth:`action_masks` (for
    ``MaskablePPO``) is ``[True, legal]``: KEEP is always allowed, FUSE only if the merged group
    is legal (convex, no opaque op, the group graph stays acyclic; optionally at most
    ``max_mac_anchors`` conv/matmul anchors unless the group is one of the spec's
    ``group_shapes``). Under the spec's ``prefuse_epilogues`` the epilogue edges are fused
    without a step. An invalid action (out of range, or a masked FUSE)
    does not raise: it is taken as KEEP and earns :data:`INVALID_ACTION_PENALTY` (-1.0), with
    ``info["invalid_action"] = True``.

    ## Observation Space

    A padded ``Dict`` (see :mod:`fusion_rl.decisions.layout`): ``node_features`` (static features of
    :mod:`fusion_rl.graph.features`, then group size, group-has-anchor, in-producer-group,
    in-consumer-group, all-inputs-decided), ``edge_index``, ``edge_features`` (static, then
    fused, decided, current), ``node_mask``, ``edge_mask``, ``group`` (each node's group label:
    its smallest node id), ``decision`` (edge index, producer, consumer of the edge being
    decided; zeros once terminated) and ``hardware`` (the target's feature vector, normalised
    with :attr:`hardware_stats`: the statistics of the spec's targets, or those given).

    ## Rewards

    Set by the env spec's ``reward`` (:mod:`fusion_rl.env.rewards`): ``e2e`` gives 0 per step
    and ``-log(latency / tvm_latency)`` at the end; ``kernel`` adds dense per-fuse shaping from
    per-kernel times and corrects it at the end so the return equals the ``e2e`` reward;
    ``model`` uses a learned cost model instead of measuring; ``table`` estimates both plans from
    the kernel table (only kernels it has not seen are timed). A plan that fails to build, gives
    a wrong output or times out ends with ``FAILURE_PENALTY`` (-1.0). Plus
    :data:`INVALID_ACTION_PENALTY` per invalid action.

    ## Starting State

    Every operator in its own group, every edge undecided. The (model, target) pair comes from
    ``reset(options={"model": ..., "target": ...})``; what is not given is drawn uniformly from
    the spec's ``models`` and ``targets`` with ``self.np_random`` (seed it with
    ``reset(seed=...)``): a spec listing several targets trains on a target drawn per episode.
    A model outside the suite may be named; it must fit ``max_nodes`` and ``max_edges`` (else
    :class:`~fusion_rl.errors.ConfigError`).

    ## Episode End

    Terminated when no undecided edge is left (an episode has at most ``num_edges`` steps); never
    truncated. The last ``info`` holds ``plan`` (FusionPlan), ``plan_hash``, ``latency_ms``,
    ``reference_latency_ms``, ``speedup_vs_tvm``, ``measurements`` (store misses spent this
    episode), ``measurement_status``, ``e2e_reward``, ``invalid_actions``, ``model`` and
    ``target``. Stepping after termination warns and changes nothing.

    ## Arguments

    * ``spec``: an :class:`~fusion_rl.env.spec.EnvSpec`, a YAML path, a name in ``envs/``
      (``"tiny"``), a mapping, or None for ``envs/default.yaml``.
    * ``render_mode``: None, ``"ansi"`` (one line: model, decisions, groups) or ``"ir"``
      (prints the current plan's fused Relax module as TVMScript and returns it).
    * ``cost_model``: an object with ``predict(graph, plan) -> ms`` for ``reward: model``
      (default: load the spec's ``cost_model`` path).
    * ``invalid_action_penalty``, ``failure_penalty``: the two penalties above.
    * ``hardware_stats``: a :class:`~fusion_rl.compiler.target.HardwareStats` to normalise the
      hardware vector with (an evaluated policy's training statistics); default: computed from
      the spec's targets at first use (training). A target outside their range logs a warning.
    * ``**overrides``: env-spec keys replacing the spec's (``reward="kernel"``, ``store=...``).

    ## Example

    >>> import gymnasium as gym
    >>> import fusion_rl.env
    >>> env = gym.make("fusion_rl/Fusion-v0", spec="tiny")
    >>> obs, info = env.reset(seed=0, options={"model": "mlp_tiny"})
    >>> obs["node_features"].shape, info["model"]
    ((64, 59), 'mlp_tiny')
    >>> fusion = env.unwrapped
    >>> fusion.action_masks()
    array([ True,  True])
    >>> for action in fusion.actions_for_plan(fusion.tvm_plan()):  # replay TVM's own fusion
    ...     obs, reward, terminated, truncated, info = env.step(action)
    >>> terminated, info["plan_hash"] == fusion.tvm_plan().hash, abs(reward) < 1e-9
    (True, True, True)
    >>> env.close()
    """

    metadata = {"render_modes": ["ansi", "ir"], "render_fps": 4}

    def __init__(
        self,
        spec: EnvSpec | str | Mapping[str, Any] | None = None,
        *,
        render_mode: str | None = None,
        cost_model: CostModel | None = None,
        invalid_action_penalty: float = INVALID_ACTION_PENALTY,
        failure_penalty: float = FAILURE_PENALTY,
        hardware_stats: HardwareStats | None = None,
        **overrides: Any,
    ) -> None:
        # `self.spec` is Gymnasium's registration spec; ours is `self.config`.
        self.config = EnvSpec.resolve(spec, **overrides)
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ConfigError(f"render_mode {render_mode!r} is not supported; use None, 'ansi' or 'ir'")
        self.render_mode = render_mode
        self.invalid_action_penalty = float(invalid_action_penalty)
        cfg = self.config
        self.observation_space = spaces.observation_space(HW_DIM, cfg.max_nodes, cfg.max_edges)
        self.action_space = spaces.action_space()
        # Fail at construction, not at the first reset, on a bad target or provider.
        self._targets: dict[str, TargetSpec] = {name: parse_target(name) for name in cfg.targets}
        make_schedule(cfg.schedule, **cfg.schedule_kwargs)
        if cfg.reward == "model" and cost_model is None and cfg.cost_model is not None:
            from fusion_rl.compiler.cost_model import LatencyCostModel

            cost_model = LatencyCostModel.load(cfg.cost_model)
        self._store_path = cfg.store if cfg.store is not None else str(default_store_path())
        self._plan_index = PlanIndex(plan_index_path(self._store_path)) if cfg.reward == "kernel" else None
        self._reward: Reward = make_reward(
            cfg.reward, failure_penalty=failure_penalty, cost_model=cost_model, plan_index=self._plan_index,
            open_table=self.open_kernel_table,
            shape_credit=cfg.decision_options.group_shapes if cfg.shape_credit else (),
        )
        self._store: MeasurementStore | None = None  # opened on first use, in this process
        self._measurers: dict[str, Measurer] = {}
        self._hardware_raw: dict[str, np.ndarray] = {}
        self._hardware: dict[tuple[str, HardwareStats], np.ndarray] = {}
        self._hardware_stats = hardware_stats
        #: The statistics of the episode under way: those given to :meth:`decide`, else None
        #: (this env's :attr:`hardware_stats`).
        self._episode_stats: HardwareStats | None = None
        self._entries: dict[str, _ModelEntry] = {}
        # Episode state (None until the first reset).
        self._entry: _ModelEntry | None = None
        self._target_name = ""
        self._ctx: RewardContext | None = None
        self._terminated = False
        self._shaped = 0.0
        self._invalid = 0
        self._misses_at_reset = 0

    # ---- Gymnasium API ---------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None
              ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        super().reset(seed=seed)
        options = dict(options or {})
        unknown = sorted(set(options) - {"model", "target"})
        if unknown:
            raise ConfigError(f"unknown reset option(s) {unknown}; valid: 'model', 'target'")
        cfg = self.config
        model_name = options.get("model") or cfg.models[int(self.np_random.integers(len(cfg.models)))]
        target_name = options.get("target") or cfg.targets[int(self.np_random.integers(len(cfg.targets)))]
        entry = self._model_entry(str(model_name))
        target = self._target_spec(str(target_name))
        measurer = self.measurer(str(target_name)) if self._reward.needs_measurer else None
        ctx = RewardContext(entry.model, target, entry.tvm_plan, measurer)
        # What the episode spends counts from here: the reference's first measurement too.
        misses = (measurer.stats.misses if measurer is not None else 0) + self._reward.spent
        self._reward.start(ctx)  # may raise (reference failed): leave the last episode intact
        self._entry, self._target_name, self._ctx = entry, str(target_name), ctx
        self._episode_stats = None
        self._misses_at_reset = misses
        entry.process.reset()
        self._terminated, self._shaped, self._invalid = False, 0.0, 0
        return self._observation(), {"model": entry.name, "target": self._target_name}

    def step(self, action: int) -> tuple[dict[str, np.ndarray], SupportsFloat, bool, bool, dict[str, Any]]:
        if self._entry is None or self._ctx is None:
            raise gym.error.ResetNeeded("call reset() before step()")
        if self._terminated:
            logger.warn(
                "step() called after the episode terminated; call reset() to start a new one. "
                "The state is unchanged and the reward is 0."
            )
            return self._observation(), 0.0, True, False, {}
        process = self._entry.process
        reward = 0.0
        info: dict[str, Any] = {}
        fuse = self._fuse_requested(action)
        if fuse is None or (fuse and not process.can_fuse()):
            reward += self.invalid_action_penalty
            info["invalid_action"] = True
            self._invalid += 1
            fuse = False
        merged = process.decide(fuse)
        if merged is not None:
            shaped = float(self._reward.on_merge(self._ctx, *merged))
            self._shaped += shaped
            reward += shaped
        if process.done:
            self._terminated = True
            reward += self._finish(info)
        return self._observation(), float(reward), self._terminated, False, info

    def action_masks(self) -> np.ndarray:
        """``[KEEP allowed, FUSE allowed]``: KEEP always, FUSE iff the merge is legal."""
        process = self._entry.process if self._entry is not None else None
        fuse = bool(process is not None and not self._terminated and process.can_fuse())
        return np.array([True, fuse], dtype=bool)

    def render(self) -> str | None:
        """``"ansi"``: one line of state. ``"ir"``: the fused Relax module of the current
        (partial) plan, printed and returned (CompilerGym's IR view)."""
        if self._entry is None or self.render_mode not in ("ansi", "ir"):
            return None
        if self.render_mode == "ir":
            from fusion_rl.fusion.apply import ApplyFusionPlan

            plan = self._entry.process.plan(name="render")
            text = ApplyFusionPlan(plan)(self._entry.model.mod).script()
            print(text)
            return text
        process = self._entry.process
        fused = [g for g in process.members.values() if len(g) > 1]
        now = "done" if process.done else f"edge {int(process.src[process.current])} -> {int(process.dst[process.current])}"
        return (f"{self._entry.name} on {self._target_name}: {process.steps} decisions, {now}; "
                f"{len(process.members)} groups, fused: {fused}")

    def close(self) -> None:
        self._reward.close()
        for measurer in self._measurers.values():
            measurer.close()
        self._measurers.clear()
        if self._store is not None:
            self._store.close()
            self._store = None
        if self._plan_index is not None:
            self._plan_index.close()  # reopens if the env is reset again
        super().close()

    # ---- helpers for policies, imitation and evaluation ------------------------------------
    def tvm_plan(self, model: str | None = None) -> FusionPlan:
        """The reference plan (TVM FuseOps) of ``model`` (default: this episode's model)."""
        return self._model_entry(model).tvm_plan if model is not None else self._current().tvm_plan

    def actions_for_plan(self, plan: FusionPlan, model: str | None = None) -> list[int]:
        """The actions that make an episode on ``model`` (default: this episode's) end in
        ``plan``; see :func:`fusion_rl.decisions.actions_for_plan`."""
        entry = self._model_entry(model) if model is not None else self._current()
        return actions_for_plan(entry.model.graph, plan, self.config.decision_options)

    def credit_plan(self, model: str, target: str) -> tuple[FusionPlan, int] | None:
        """``model``'s credit plan on ``target`` (:func:`fusion_rl.compiler.shape_credit.credit_plan`)
        over this spec's declared group shapes, and how many instances it forms; ``None`` when
        the model has no instance of them. Kernels the table lacks are timed (and counted in
        :attr:`measurements_spent`).

        Raises
        ------
        ConfigError
            unless the spec has ``reward: table`` and declared group shapes.
        """
        shapes = self.config.decision_options.group_shapes
        if not isinstance(self._reward, TableReward) or not shapes:
            raise ConfigError("credit plans are priced from the kernel table: the env spec needs "
                              "'reward: table' and 'group_shapes'")
        entry = self._model_entry(model)
        if not any(shape_instances(entry.model.graph, name) for name in shapes):
            return None
        return credit_plan(self._reward.table(self._target_spec(target)), entry.model, shapes)

    def current_plan(self) -> FusionPlan:
        """The (partial) plan of this episode so far."""
        return self._current().process.plan()

    def validate(self, check_latency: bool = False) -> ValidationResult:
        """Re-verify the current plan, after CompilerGym's ``validate()``.

        Checks legality, then builds the plan afresh (never from the store; isolated when the
        spec says so) and compares its outputs with ONNX Runtime. With ``check_latency`` the
        plan is also re-timed with the spec's protocol and its stored latency must still hold
        (the criterion of ``fusion-rl validate``). See :mod:`fusion_rl.env.validation`.
        """
        from fusion_rl.env.validation import validate_plan

        entry = self._current()
        plan = entry.process.plan(name="validate")
        stored = self.measurer(self._target_name).cached(entry.model, plan) if check_latency else None
        return validate_plan(entry.model, plan, self._target_spec(self._target_name), self.config,
                             stored=stored, check_latency=check_latency)

    @property
    def dataset(self) -> ModelDataset:
        """The built-in models (every zoo suite) with their versions; any of them can be named
        in ``reset(options={"model": ...})`` if it fits ``max_nodes``/``max_edges``."""
        return zoo_dataset()

    def model(self, name: str) -> Model:
        """The loaded model ``name`` (raises :class:`ConfigError` when it does not fit the env)."""
        return self._model_entry(name).model

    def decide(self, choose: Callable[[dict[str, np.ndarray], np.ndarray], int], model: str,
               target: str, name: str = "decided", hardware_stats: HardwareStats | None = None) -> FusionPlan:
        """Play one episode on (``model``, ``target``) with ``choose(obs, mask)`` picking each
        action, and return the final plan *without measuring anything*.

        ``reset``/``step`` would measure the reference plan and the final plan; inference (a
        trained policy deciding zero-shot, :mod:`fusion_rl.evaluate`) must spend nothing, so this
        drives the decision process directly (no measurer is created). An action that is not a
        legal FUSE is taken as KEEP, as in :meth:`step`. The env is left terminated: call
        :meth:`reset` before stepping again.

        ``hardware_stats`` (the deciding policy's training statistics, e.g.
        :attr:`fusion_rl.policy.snapshot.PolicySnapshot.hardware_stats`) normalise the hardware
        vector of this episode instead of :attr:`hardware_stats`, so one env can serve policies
        trained on different targets.
        """
        entry = self._model_entry(model)
        self._target_spec(target)  # validate the target name before deciding
        entry.process.reset()
        self._entry, self._target_name, self._terminated = entry, target, False
        self._episode_stats = hardware_stats
        process = entry.process
        while not process.done:
            action = int(np.asarray(choose(self._observation(), self.action_masks())).reshape(-1)[0])
            process.decide(action == ACTION_FUSE and process.can_fuse())
        self._terminated = True
        return process.plan(name=name)

    @property
    def store_path(self) -> str:
        """Path of the measurement store this env reads and writes."""
        return str(self._store_path)

    @property
    def measurements_spent(self) -> int:
        """Measurements this env has made so far, all targets: its measurers' store misses, and
        the kernels a ``table`` reward timed."""
        return sum(m.stats.misses for m in self._measurers.values()) + self._reward.spent

    def open_kernel_table(self, target: TargetSpec) -> KernelTable:
        """The kernel table of ``target`` for the ``table`` reward: beside the store, under this
        spec's schedule provider, kernels timed with the table's own protocol."""
        cfg = self.config
        return KernelTable(Path(self._store_path).with_name("kernels.sqlite"), target, cfg.schedule,
                           dict(cfg.schedule_kwargs), timeout_s=cfg.timeout_s, isolate=cfg.isolate)

    def measurer(self, target: str) -> Measurer:
        """The :class:`Measurer` of ``target`` (one per target, sharing this env's store)."""
        if target not in self._measurers:
            cfg = self.config
            if self._store is None:
                self._store = MeasurementStore(self._store_path)
            self._measurers[target] = Measurer(
                target=self._target_spec(target), schedule=cfg.schedule,
                schedule_kwargs=dict(cfg.schedule_kwargs), store=self._store,
                protocol=cfg.protocol, isolate=cfg.isolate, timeout_s=cfg.timeout_s,
            )
        return self._measurers[target]

    # ---- internals -------------------------------------------------------------------------
    def _current(self) -> _ModelEntry:
        if self._entry is None:
            raise gym.error.ResetNeeded("call reset() first, or name the model")
        return self._entry

    def _target_spec(self, name: str) -> TargetSpec:
        if name not in self._targets:
            self._targets[name] = parse_target(name)
        return self._targets[name]

    def raw_hardware_vector(self, target: str) -> np.ndarray:
        """The raw (unnormalised) hardware vector of ``target``, measured once per env."""
        if target not in self._hardware_raw:
            self._hardware_raw[target] = hardware_features(self._target_spec(target)).as_vector()
        return self._hardware_raw[target]

    @property
    def hardware_stats(self) -> HardwareStats:
        """The statistics the hardware vector is normalised with: those given at construction,
        else those of the spec's targets (measured at first use), which a trained policy keeps
        in its snapshot and card."""
        if self._hardware_stats is None:
            self._hardware_stats = HardwareStats.from_vectors(
                {self._target_spec(t).key: self.raw_hardware_vector(t) for t in self.config.targets})
        return self._hardware_stats

    def _hardware_vector(self, name: str, stats: HardwareStats | None = None) -> np.ndarray:
        # Stats given for an episode are an evaluated policy's: a target outside them is news.
        where = "evaluation" if stats is not None else "env"
        stats = stats if stats is not None else self.hardware_stats
        key = (name, stats)
        if key not in self._hardware:
            raw = self.raw_hardware_vector(name)
            stats.warn_outside(raw, name, where=where)
            self._hardware[key] = stats.normalize(raw)
        return self._hardware[key]

    def _model_entry(self, name: str) -> _ModelEntry:
        if name in self._entries:
            return self._entries[name]
        model = _load_model(name)
        graph = model.graph
        cfg = self.config
        entry = _ModelEntry(
            name=name, model=model, process=DecisionProcess(graph, cfg.decision_options),
            tvm_plan=make_plan("tvm", model.mod, graph),
            observer=ObservationBuilder(graph, cfg.max_nodes, cfg.max_edges),
        )
        self._entries[name] = entry
        return entry

    @staticmethod
    def _fuse_requested(action: Any) -> bool | None:
        """The action as a bool, or None if it is not 0 or 1."""
        if isinstance(action, (bool, np.bool_)):
            return None  # a bool is not an action index; refuse rather than guess
        if isinstance(action, (int, np.integer)) or (
            isinstance(action, np.ndarray) and action.shape in ((), (1,)) and np.issubdtype(action.dtype, np.integer)
        ):
            value = int(np.asarray(action).reshape(()))
            return {ACTION_KEEP: False, ACTION_FUSE: True}.get(value)
        return None

    def _finish(self, info: dict[str, Any]) -> float:
        """The terminal reward; fills the episode's ``info``."""
        assert self._entry is not None and self._ctx is not None
        plan = self._entry.process.plan(name="env")
        final, reward_info = self._reward.terminal(self._ctx, plan, self._shaped)
        measurer = self._ctx.measurer
        info.update(reward_info)
        info.update(
            plan=plan, plan_hash=plan.hash,
            measurements=(measurer.stats.misses if measurer is not None else 0) + self._reward.spent
            - self._misses_at_reset,
            invalid_actions=self._invalid, model=self._entry.name, target=self._target_name,
        )
        return final

    def _observation(self) -> dict[str, np.ndarray]:
        entry = self._current()
        hardware = self._hardware_vector(self._target_name, self._episode_stats)
        return entry.observer.observe(entry.process, hardware)

