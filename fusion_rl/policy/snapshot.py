"""A run's policy in files that never execute: safetensors weights and a JSON description.

SB3 saves a model as a zip whose ``data`` entry holds cloudpickled objects, so loading it runs
whatever the pickle says. That is acceptable for ``--resume`` of one's own run and nowhere else.
Training therefore writes, beside every ``final_model.zip`` and ``checkpoints/step_N.zip``::

    final_model.safetensors   the actor network's tensors (safetensors: data only)
    final_model.json          {"format": 1, "network": {"class": ..., "kwargs": ...},
                               "observation": {"max_nodes", "max_edges", "hw_dim"},
                               "num_timesteps": N,
                               "hardware_stats": {...},   (the training targets' statistics)
                               "decisions": {...}}        (the training env's DecisionOptions)

and ``fusion-rl export`` and ``fusion-rl evaluate`` read only these (:func:`load_snapshot`).
The network class is not read from the file: :class:`~fusion_rl.policy.network.PolicyNetwork`
is the only one, and its keyword arguments are checked against its schema before it is built.

``hardware_stats`` (:class:`~fusion_rl.compiler.target.HardwareStats`) are the statistics the
training env normalised the hardware vector with; evaluation normalises with them, and export
copies them into the card. A snapshot written before they existed has none and reads as
:meth:`HardwareStats.identity` (raw vectors, as it was trained).

``decisions`` are the :class:`~fusion_rl.decisions.DecisionOptions` the training env decided
under. The run's ``config.json`` names its env spec by path, and that file can change after
training; evaluation and export compare the spec's options with these and refuse a mismatch. A
snapshot written before they were recorded has none (``None``: nothing to compare).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fusion_rl.compiler.target.normalize import HardwareStats
from fusion_rl.decisions.process import DecisionOptions
from fusion_rl.decisions.layout import MAX_PADDED_EDGES, MAX_PADDED_NODES
from fusion_rl.errors import ConfigError, FusionRLError
from fusion_rl.io import read_bounded, read_json, write_atomic
from fusion_rl.policy.network import PolicyNetwork

__all__ = ["NETWORK_CLASS", "SNAPSHOT_FORMAT", "PolicySnapshot", "build_network", "check_observation",
           "load_snapshot", "load_weights", "save_snapshot", "snapshot_paths"]

SNAPSHOT_FORMAT = 1
#: The only network class a snapshot or a policy card may name.
NETWORK_CLASS = f"{PolicyNetwork.__module__}.{PolicyNetwork.__name__}"
#: Largest weights file read (the shipped policy's is 0.3 MiB).
MAX_WEIGHTS_BYTES = 256 << 20


def snapshot_paths(zip_path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """``(weights, description)`` beside an SB3 zip: ``X.zip`` -> ``X.safetensors``, ``X.json``."""
    path = Path(zip_path)
    return path.with_suffix(".safetensors"), path.with_suffix(".json")


def check_observation(observation: Any, hw_dim: int, where: str,
                      error: type[FusionRLError] = ConfigError) -> dict[str, int]:
    """The observation sizes of a saved policy, bounded (they size arrays before any check of
    the model runs) and consistent with its network's hardware width."""
    if not isinstance(observation, dict):
        raise error(f"{where}: 'observation' must be an object with max_nodes, max_edges, hw_dim")
    out = {}
    for key, high in (("max_nodes", MAX_PADDED_NODES), ("max_edges", MAX_PADDED_EDGES), ("hw_dim", 4096)):
        value = observation.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
            raise error(f"{where}: observation.{key} must be an integer in 1..{high}, got {value!r}")
        out[key] = value
    if out["hw_dim"] != hw_dim:
        raise error(f"{where}: observation.hw_dim {out['hw_dim']} differs from the network's {hw_dim}")
    return out


def build_network(architecture: Any, where: str, error: type[FusionRLError] = ConfigError) -> PolicyNetwork:
    """The network an ``{"class": ..., "kwargs": ...}`` description names, built from checked
    arguments. The class is compared with a fixed name, never imported: a file names data."""
    if not isinstance(architecture, dict) or architecture.get("class") != NETWORK_CLASS:
        name = architecture.get("class") if isinstance(architecture, dict) else architecture
        raise error(f"{where} names network class {str(name)[:100]!r}, which is not one of the classes "
                    f"fusion_rl registers ({NETWORK_CLASS}); a saved policy names data, never code")
    try:
        kwargs = PolicyNetwork.check_config(architecture.get("kwargs"), f"{where}: architecture.kwargs")
    except ConfigError as exc:
        raise error(str(exc)) from None
    return PolicyNetwork(**kwargs)


def load_weights(network: torch.nn.Module, blob: bytes, where: str,
                 error: type[FusionRLError] = ConfigError) -> None:
    """Load safetensors ``blob`` into ``network``: every name and shape must match exactly.

    Only safetensors is read (a header and raw tensor bytes); a pickle, or any other format,
    is refused, so a weights file can never run code.
    """
    from safetensors.torch import load

    try:
        tensors = load(blob)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own (Rust) error types
        first = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise error(f"{where} is not a safetensors file ({first}); weights are read only from "
                    "safetensors, never from a pickle") from None
    try:
        network.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise error(f"{where} does not fit the network it describes: {str(exc).splitlines()[0][:200]}") from None


@dataclass
class PolicySnapshot:
    """A trained actor loaded from a run folder, with SB3's ``predict`` for evaluation."""

    network: PolicyNetwork
    observation: dict[str, int]
    num_timesteps: int
    path: Path  #: the description (``.json``)
    #: The training targets' statistics (identity for snapshots written before they existed).
    hardware_stats: HardwareStats = dataclasses.field(default_factory=HardwareStats.identity)
    #: The training env's decision options (None for snapshots written before they were recorded).
    decisions: DecisionOptions | None = None

    def check_decisions(self, options: DecisionOptions, where: str) -> None:
        """Refuse to decide under ``options`` (those of ``where``) if training recorded others.

        Raises
        ------
        ConfigError
            naming both, when the snapshot recorded options and they differ.
        """
        if self.decisions is not None and self.decisions != options:
            raise ConfigError(
                f"{self.path}: the policy was trained under decision options {self.decisions.to_dict()}, "
                f"but {where} decides under {options.to_dict()} (has its env spec changed since training?)"
            )

    @torch.no_grad()
    def predict(self, observation: dict[str, np.ndarray], action_masks: np.ndarray | None = None,
                deterministic: bool = True) -> tuple[np.ndarray, None]:
        """The masked greedy action for one observation, as SB3's ``predict(deterministic=True)``
        gives it (an action the mask forbids is never chosen)."""
        if not deterministic:
            raise ValueError("a policy snapshot only acts deterministically")
        logits = self.network({k: torch.as_tensor(np.asarray(v))[None] for k, v in observation.items()})[0]
        if action_masks is not None:
            mask = torch.as_tensor(np.asarray(action_masks, dtype=bool).reshape(-1))
            logits = torch.where(mask, logits, torch.full_like(logits, -torch.inf))
        return np.array(int(torch.argmax(logits))), None


def _training_env_attr(model: Any, name: str) -> Any:
    """Attribute ``name`` of ``model``'s (first) training env, None if it has none."""
    try:
        return model.get_env().get_attr(name, indices=[0])[0]
    except Exception:  # noqa: BLE001 - an env without the attribute (not a FusionEnv)
        return None


def save_snapshot(model: Any, zip_path: str | os.PathLike[str],
                  hardware_stats: HardwareStats | None = None) -> tuple[Path, Path]:
    """Write the actor of MaskablePPO ``model`` beside ``zip_path`` (see the module docstring).

    ``hardware_stats`` default to those of the model's training env
    (:attr:`fusion_rl.env.fusion_env.FusionEnv.hardware_stats`).
    """
    from safetensors.torch import save

    network = PolicyNetwork.from_sb3(model)
    space = model.observation_space
    description = {
        "format": SNAPSHOT_FORMAT,
        "network": {"class": NETWORK_CLASS, "kwargs": network.config},
        "observation": {"max_nodes": int(space["node_features"].shape[0]),
                        "max_edges": int(space["edge_features"].shape[0]),
                        "hw_dim": int(space["hardware"].shape[0])},
        "num_timesteps": int(model.num_timesteps),
    }
    stats = hardware_stats if hardware_stats is not None else _training_env_attr(model, "hardware_stats")
    if isinstance(stats, HardwareStats):
        description["hardware_stats"] = stats.to_dict()
    spec = _training_env_attr(model, "config")  # the FusionEnv's EnvSpec
    if hasattr(spec, "decision_options"):
        description["decisions"] = spec.decision_options.to_dict()
    weights_path, json_path = snapshot_paths(zip_path)
    write_atomic(weights_path, save({k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}),
                 what="policy weights")
    write_atomic(json_path, json.dumps(description, indent=1) + "\n", what="policy description")
    return weights_path, json_path


def load_snapshot(json_path: str | os.PathLike[str]) -> PolicySnapshot:
    """Read a snapshot written by :func:`save_snapshot`; nothing in it is imported or unpickled.

    Raises
    ------
    ConfigError
        one line naming the file and what is wrong with it.
    """
    json_path = Path(json_path)
    weights_path = json_path.with_suffix(".safetensors")
    data = read_json(json_path, "policy description", ConfigError, 1 << 20)
    if not isinstance(data, dict) or data.get("format") != SNAPSHOT_FORMAT:
        raise ConfigError(f"{json_path}: not a policy description of format {SNAPSHOT_FORMAT}")
    network = build_network(data.get("network"), str(json_path))
    observation = check_observation(data.get("observation"), network.config["features"]["hw_dim"], str(json_path))
    steps = data.get("num_timesteps")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ConfigError(f"{json_path}: num_timesteps must be an integer >= 0, got {steps!r}")
    stats = HardwareStats.from_dict(data.get("hardware_stats"), f"{json_path}: hardware_stats")
    decisions = data.get("decisions")
    if decisions is not None:
        decisions = DecisionOptions.from_dict(decisions, f"{json_path}: decisions")
    load_weights(network, read_bounded(weights_path, "policy weights", ConfigError, MAX_WEIGHTS_BYTES),
                 str(weights_path))
    return PolicySnapshot(network.eval(), observation, steps, json_path, stats, decisions)
