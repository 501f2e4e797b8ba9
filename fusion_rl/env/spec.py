"""Env specs: which models, targets, schedule and reward a :class:`FusionEnv` trains on.

An env spec is a small YAML file in ``envs/`` (``envs/default.yaml``, ``envs/tiny.yaml``)::

    models: [mlp_tiny, cnn_plain]      # zoo names or .onnx paths (required, non-empty)
    targets: [host]                    # target names (fusion_rl.compiler.target)
    schedule: rules                    # schedule provider: naive | rules (default) | tuned
    schedule_kwargs: {}                # options of the provider, e.g. {trials_per_task: 16}
    reward: e2e                        # e2e | kernel | model | table (fusion_rl.env.rewards)
    max_nodes: 256                     # observation padding; larger models are refused
    max_edges: 512
    store: null                        # measurement store path; null = the default store
    protocol: {repeat: 7, min_repeat_ms: 50}   # timing protocol (also: number, warmup)
    isolate: true                      # measure in a worker process (false: in-process)
    timeout_s: 600                     # per measurement, when isolated
    cost_model: null                   # saved LatencyCostModel, for reward: model
    max_mac_anchors: null              # mask fuses giving a group more conv/matmul anchors
    group_shapes: []                   # ...except into these shapes; "provider": the schedule's own
    prefuse_epilogues: false           # fuse epilogue edges (the tensorrt rule's) without asking
    shape_credit: false                # reward: table: pay a group shape's worth at the fuse forming it

Unknown keys and wrong types raise :class:`~fusion_rl.errors.ConfigError` naming the key, so a
typo never silently falls back to a default. Relative ``store``, ``cost_model`` and ``.onnx``
paths are relative to the YAML file's folder.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from fusion_rl import paths
from fusion_rl.compiler.schedules import DEFAULT_SCHEDULE, declared_group_shapes
from fusion_rl.compiler.timing import TimingProtocol
from fusion_rl.decisions.layout import DEFAULT_MAX_EDGES, DEFAULT_MAX_NODES, MAX_PADDED_EDGES, MAX_PADDED_NODES
from fusion_rl.decisions.process import DecisionOptions
from fusion_rl.errors import ConfigError
from fusion_rl.io import read_yaml

#: Reward modes (see :mod:`fusion_rl.env.rewards`).
REWARD_MODES = ("e2e", "kernel", "model", "table")
#: Folder of the named specs shipped with fusion_rl (``spec="tiny"`` -> ``envs/tiny.yaml``).
ENVS_DIR = paths.ENVS_DIR

_PROTOCOL_KEYS = ("repeat", "min_repeat_ms", "number", "warmup")
#: Longest per-measurement timeout a spec may set (a day): longer is a typo, and infinity would
#: let one hung build stall training forever.
MAX_TIMEOUT_S = 86_400


@dataclass(frozen=True)
class EnvSpec:
    """A validated env spec; build it with :meth:`from_yaml`, :meth:`from_dict` or :meth:`resolve`.

    Field meanings are those of the module docstring's YAML keys.
    """

    models: tuple[str, ...]
    targets: tuple[str, ...] = ("host",)
    schedule: str = DEFAULT_SCHEDULE
    schedule_kwargs: Mapping[str, Any] = field(default_factory=dict)
    reward: str = "e2e"
    max_nodes: int = DEFAULT_MAX_NODES
    max_edges: int = DEFAULT_MAX_EDGES
    store: str | None = None
    protocol: TimingProtocol = field(default_factory=TimingProtocol)
    isolate: bool = True
    timeout_s: float = 600.0
    cost_model: str | None = None
    max_mac_anchors: int | None = None
    #: Group shape names (:mod:`fusion_rl.fusion.group_shapes`), or ``"provider"``: those the
    #: schedule provider declares (:func:`~fusion_rl.compiler.schedules.declared_group_shapes`).
    group_shapes: tuple[str, ...] | str = ()
    #: Fuse the epilogue edges (:func:`~fusion_rl.fusion.epilogues.epilogue_edges`) without a
    #: decision (:class:`~fusion_rl.decisions.DecisionOptions`).
    prefuse_epilogues: bool = False
    #: Under ``reward: table``, pay the fuse that forms one of ``group_shapes`` that instance's
    #: worth at its own step (:class:`~fusion_rl.env.rewards.TableReward`); returns are unchanged.
    shape_credit: bool = False

    def __post_init__(self) -> None:
        # Constructing an EnvSpec directly gets the same checks as a YAML file.
        if isinstance(self.group_shapes, list):
            object.__setattr__(self, "group_shapes", tuple(self.group_shapes))
        _validate(self.to_dict(), "EnvSpec")
        if self.group_shapes and self.max_mac_anchors is None:
            raise ConfigError("env spec: 'group_shapes' needs 'max_mac_anchors': without a cap every group is allowed")
        if self.shape_credit and (self.reward != "table" or not self.group_shapes):
            raise ConfigError("env spec: 'shape_credit' needs 'reward: table' (it is priced from the kernel "
                              "table) and 'group_shapes' (the shapes it credits)")
        self.decision_options  # noqa: B018 - a shape name or a missing cap fails here, not mid-training

    # ---- construction ----------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "env spec",
                  base_dir: str | os.PathLike | None = None) -> EnvSpec:
        """Validate ``data`` (the YAML mapping) and build the spec.

        Parameters
        ----------
        source
            Named in error messages (the file path).
        base_dir
            Relative paths are resolved against it (the YAML file's folder).

        Raises
        ------
        ConfigError
            for an unknown key, a missing ``models``, or a wrong type/value.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: an env spec must be a mapping of keys, got {type(data).__name__}")
        values = _validate(dict(data), source)
        for key in ("store", "cost_model"):
            if values.get(key) is not None:
                values[key] = os.fspath(values[key])
        if base_dir is not None:
            base = Path(base_dir)
            for key in ("store", "cost_model"):
                if values.get(key) is not None:
                    values[key] = _resolve_path(values[key], base)
            values["models"] = [
                _resolve_path(m, base) if m.lower().endswith(".onnx") else m for m in values["models"]
            ]
        protocol = values.pop("protocol", None)
        return cls(
            models=tuple(values.pop("models")),
            targets=tuple(values.pop("targets", ("host",))),
            protocol=TimingProtocol(**protocol) if protocol is not None else TimingProtocol(),
            schedule_kwargs=dict(values.pop("schedule_kwargs", {})),
            **values,
        )

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> EnvSpec:
        """Read and validate an env spec file.

        Raises
        ------
        ConfigError
            for a missing or unparsable file, or an invalid spec.
        """
        path = Path(path)
        data = read_yaml(path, "env spec", f"; named specs live in {ENVS_DIR}")
        return cls.from_dict(data if data is not None else {}, str(path), path.resolve().parent)

    @classmethod
    def resolve(cls, spec: EnvSpec | str | os.PathLike | Mapping[str, Any] | None,
                **overrides: Any) -> EnvSpec:
        """An :class:`EnvSpec` from a spec, a YAML path, a name in ``envs/`` (``"tiny"``), a
        mapping, or ``None`` (``envs/default.yaml``); ``overrides`` replace keys (validated)."""
        if spec is None:
            spec = "default"
        if isinstance(spec, EnvSpec):
            base = spec
        elif isinstance(spec, Mapping):
            base = cls.from_dict(spec)
        else:
            path = Path(spec)
            if not path.exists() and path.suffix == "" and (ENVS_DIR / f"{spec}.yaml").exists():
                path = ENVS_DIR / f"{spec}.yaml"
            base = cls.from_yaml(path)
        if not overrides:
            return base
        merged = base.to_dict()
        merged.update(overrides)
        return cls.from_dict(merged, source="env spec overrides")

    # ---- views -----------------------------------------------------------------------------
    @property
    def decision_options(self) -> DecisionOptions:
        """The masks of the decision process this spec trains and evaluates under (what an
        exported policy's card records and the plugin enforces)."""
        shapes = self.group_shapes
        if shapes == "provider":
            shapes = declared_group_shapes(self.schedule)
        try:
            return DecisionOptions(max_mac_anchors=self.max_mac_anchors, group_shapes=tuple(shapes),
                                   prefuse_epilogues=self.prefuse_epilogues)
        except ConfigError as exc:
            raise ConfigError(f"env spec: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        """The YAML mapping of this spec (round-trips through :meth:`from_dict`)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["models"] = list(self.models)
        out["targets"] = list(self.targets)
        out["schedule_kwargs"] = dict(self.schedule_kwargs)
        if not isinstance(self.group_shapes, str):
            out["group_shapes"] = list(self.group_shapes)
        p = self.protocol
        out["protocol"] = (
            {k: getattr(p, k) for k in _PROTOCOL_KEYS} if isinstance(p, TimingProtocol) else p
        )
        return out


# --------------------------------------------------------------------------------------------


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_str_list(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and all(isinstance(x, str) and x for x in v)


#: key -> (check, what the error says it must be).
_CHECKS: dict[str, tuple[Any, str]] = {
    "models": (lambda v: _is_str_list(v) and len(v) > 0, "a non-empty list of zoo names or .onnx paths"),
    "targets": (lambda v: _is_str_list(v) and len(v) > 0, "a non-empty list of target names"),
    "schedule": (lambda v: isinstance(v, str), "a schedule provider name (naive, rules, tuned)"),
    "schedule_kwargs": (lambda v: isinstance(v, Mapping) and all(isinstance(k, str) for k in v),
                        "a mapping of provider options"),
    "reward": (lambda v: v in REWARD_MODES, f"one of {', '.join(REWARD_MODES)}"),
    "max_nodes": (lambda v: _is_int(v) and 1 <= v <= MAX_PADDED_NODES, f"an int in 1..{MAX_PADDED_NODES}"),
    "max_edges": (lambda v: _is_int(v) and 1 <= v <= MAX_PADDED_EDGES, f"an int in 1..{MAX_PADDED_EDGES}"),
    "store": (lambda v: v is None or isinstance(v, (str, os.PathLike)), "a path or null"),
    "protocol": (lambda v: isinstance(v, (Mapping, TimingProtocol)), "a mapping with repeat, min_repeat_ms"),
    "isolate": (lambda v: isinstance(v, bool), "true or false"),
    "timeout_s": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                  and 0 < v <= MAX_TIMEOUT_S, f"a finite number of seconds in (0, {MAX_TIMEOUT_S}]"),
    "cost_model": (lambda v: v is None or isinstance(v, (str, os.PathLike)), "a path or null"),
    "max_mac_anchors": (lambda v: v is None or (_is_int(v) and 1 <= v <= MAX_PADDED_NODES), "an int >= 1 or null"),
    "group_shapes": (lambda v: v == "provider" or _is_str_list(v),
                     "a list of group shape names, or \"provider\""),
    "prefuse_epilogues": (lambda v: isinstance(v, bool), "true or false"),
    "shape_credit": (lambda v: isinstance(v, bool), "true or false"),
}


def _validate(data: dict[str, Any], source: str) -> dict[str, Any]:
    unknown = sorted(set(data) - set(_CHECKS))
    if unknown:
        raise ConfigError(
            f"{source}: unknown key {unknown[0]!r}"
            f"{f' (and {unknown[1:]})' if len(unknown) > 1 else ''}; valid keys: {', '.join(_CHECKS)}"
        )
    if "models" not in data:
        raise ConfigError(f"{source}: key 'models' is required (a list of zoo names or .onnx paths)")
    for key, value in data.items():
        check, what = _CHECKS[key]
        if not check(value):
            raise ConfigError(f"{source}: key {key!r} must be {what}, got {value!r}")
    protocol = data.get("protocol")
    if isinstance(protocol, Mapping):
        bad = sorted(set(protocol) - set(_PROTOCOL_KEYS))
        if bad:
            raise ConfigError(f"{source}: unknown key 'protocol.{bad[0]}'; valid: {', '.join(_PROTOCOL_KEYS)}")
        for k, v in protocol.items():
            if not _is_int(v) or v < 0:
                raise ConfigError(f"{source}: key 'protocol.{k}' must be an int >= 0, got {v!r}")
        data = {**data, "protocol": dict(protocol)}
        TimingProtocol(**protocol)  # its upper bounds too
    elif isinstance(protocol, TimingProtocol):
        data = {**data, "protocol": {k: getattr(protocol, k) for k in _PROTOCOL_KEYS}}
    _check_names(data, source)
    return data


def _check_names(data: dict[str, Any], source: str) -> None:
    """Targets, schedule and its options are checked now, not at the first measurement
    (minutes into a training run): unknown names, a negative trial budget, bad options."""
    from fusion_rl.compiler.schedules import check_schedule
    from fusion_rl.compiler.target import check_target_name

    for target in data.get("targets", ()):
        try:
            check_target_name(target)
        except ConfigError as exc:
            raise ConfigError(f"{source}: key 'targets': {exc}") from None
    try:
        check_schedule(data.get("schedule", "naive"), dict(data.get("schedule_kwargs") or {}))
    except ConfigError as exc:
        raise ConfigError(f"{source}: key 'schedule': {exc}") from None


def _resolve_path(value: str | os.PathLike, base: Path) -> str:
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else (base / path))
