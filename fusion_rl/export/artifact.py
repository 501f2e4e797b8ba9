"""The exported policy artifact: a self-contained folder a compiler user can load with torch.

Layout of ``policies/NAME/``::

    weights.safetensors   the network's tensors (a safe format: loading never unpickles)
    card.json             architecture, feature schema, decision options, hardware statistics,
                          training suite, evaluation, versions, and a content hash over all of it

A policy folder is meant to be shared, so it is untrusted input and loading it executes
nothing: the card names data, never code. ``architecture.class`` must be the one network class
this package registers (:data:`~fusion_rl.policy.snapshot.NETWORK_CLASS`; it is compared, not
imported), its ``kwargs`` are checked against that class's schema (types and ranges), the
observation sizes are bounded, and the weights load only through safetensors. Files are read
with size limits. No SB3 and no gymnasium are needed.

The content hash (SHA-256 over the card and the weights) is a check against accidental damage
(a truncated copy, a hand edit), **not a signature**: anyone can recompute it, so it says
nothing about who made the folder. A card whose feature schema differs from the installed
feature extractor is rejected with the two versions named.

``hardware`` holds the training targets' hardware statistics
(:class:`~fusion_rl.compiler.target.HardwareStats`), with which the plugin normalises a target's
hardware vector exactly as training did. A card that has them is format 2, so a fusion_rl
that predates them refuses it rather than feeding the network raw vectors. Format 1 cards
(written before) have none and still load: :func:`hardware_stats` gives the identity
statistics, i.e. the raw vector those policies were trained on.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fusion_rl import paths
from fusion_rl.compiler.target.normalize import HardwareStats
from fusion_rl.decisions.process import DecisionOptions
from fusion_rl.errors import ConfigError, FusionRLError
from fusion_rl.io import output_dir, read_bounded, read_json, write_atomic

#: Format of a card with hardware statistics; :data:`CARD_FORMATS` are those read.
CARD_FORMAT = 2
#: Format 1: a card from before hardware statistics (read with the identity statistics).
CARD_FORMATS = (1, 2)
WEIGHTS_FILE = "weights.safetensors"
CARD_FILE = "card.json"
#: Largest card read (the shipped one is 6 KiB; evaluation tables make cards grow).
MAX_CARD_BYTES = 4 << 20


class PolicyArtifactError(FusionRLError):
    """A policy folder is missing, incomplete, tampered with, or made for other features."""


@dataclass
class PolicyCard:
    architecture: dict[str, Any]  #: {"class": NETWORK_CLASS, "kwargs": {...}}
    feature_schema: dict[str, Any]
    observation: dict[str, Any]  #: max_nodes, max_edges, hw_dim of the trained network
    #: :meth:`DecisionOptions.to_dict` of the decision process the policy was trained under
    decisions: dict[str, Any]
    training: dict[str, Any] = field(default_factory=dict)  #: suite, targets, schedule, steps, command
    evaluation: dict[str, Any] = field(default_factory=dict)  #: results with their commands
    versions: dict[str, str] = field(default_factory=dict)
    content_hash: str = ""
    #: :meth:`HardwareStats.to_dict` of the training targets; None: a policy trained before
    #: statistics existed (written as a format-1 card, read with the identity statistics).
    hardware: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON form of ``card.json`` (format 2 with ``hardware``, else format 1)."""
        data = {
            "format": CARD_FORMAT if self.hardware is not None else 1,
            "architecture": self.architecture,
            "feature_schema": self.feature_schema,
            "observation": self.observation,
            "decisions": self.decisions,
        }
        if self.hardware is not None:
            data["hardware"] = self.hardware
        data.update(training=self.training, evaluation=self.evaluation, versions=self.versions,
                    content_hash=self.content_hash)
        return data


def content_hash(card: dict[str, Any], weights: bytes) -> str:
    """sha256 over the card (without its own hash) and the weight bytes: a damage check that
    anyone can recompute, not a signature."""
    body = {k: v for k, v in card.items() if k != "content_hash"}
    h = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
    h.update(weights)
    return h.hexdigest()


def save_artifact(directory: str | os.PathLike, network: "torch.nn.Module", card: PolicyCard) -> Path:
    """Write weights and card, each through :func:`fusion_rl.io.write_atomic`."""
    from safetensors.torch import save

    out = output_dir(directory, "policy folder")
    weights = save({k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()})
    data = card.to_dict()
    data["content_hash"] = content_hash(data, weights)
    write_atomic(out / WEIGHTS_FILE, weights, what="policy weights")
    write_atomic(out / CARD_FILE, json.dumps(data, indent=1) + "\n", what="policy card")
    card.content_hash = data["content_hash"]
    return out


def set_evaluation(directory: str | os.PathLike, evaluation: dict[str, Any]) -> Path:
    """Replace the ``evaluation`` section of an exported policy's card (the weights are kept).

    The card is read through :func:`read_card` (so a damaged artifact is refused, not
    re-hashed into looking intact), its content hash recomputed, and the card written
    atomically. Returns the card's path.
    """
    card, weights = read_card(directory)
    card["evaluation"] = evaluation
    card["content_hash"] = content_hash(card, weights)
    path = resolve_policy_dir(directory) / CARD_FILE
    write_atomic(path, json.dumps(card, indent=1) + "\n", what="policy card")
    return path


def resolve_policy_dir(directory: str | os.PathLike) -> Path:
    """The policy folder ``directory`` names: a folder, or a shipped policy's name.

    ``"default"`` and ``"policies/default"`` name the shipped policy wherever fusion_rl runs
    (an installed wheel carries it as package data, see :mod:`fusion_rl.paths`); an existing
    folder always wins.

    Parameters
    ----------
    directory
        A policy folder, ``NAME`` or ``policies/NAME``.

    Returns
    -------
    Path
        The folder (not yet checked to be a policy artifact: :func:`read_card` does that).
    """
    folder = Path(directory)
    if folder.is_dir():
        return folder
    if folder.parent in (Path("."), Path("policies")) and (paths.POLICIES_DIR / folder.name).is_dir():
        return paths.POLICIES_DIR / folder.name
    return folder


def shipped_policies() -> list[str]:
    """Names of the policies shipped with fusion_rl (``policies/NAME`` with a card)."""
    if not paths.POLICIES_DIR.is_dir():
        return []
    return sorted(p.parent.name for p in paths.POLICIES_DIR.glob(f"*/{CARD_FILE}"))


def read_card(directory: str | os.PathLike) -> tuple[dict[str, Any], bytes]:
    """The card and the weight bytes, checked for presence, format and content hash.

    ``directory`` may name a shipped policy (:func:`resolve_policy_dir`).
    """
    from fusion_rl.policy.snapshot import MAX_WEIGHTS_BYTES

    folder = resolve_policy_dir(directory)
    if not folder.is_dir():
        shipped = ", ".join(shipped_policies()) or "none"
        raise PolicyArtifactError(f"policy folder not found: {folder} (shipped policies: {shipped})")
    card_path, weights_path = folder / CARD_FILE, folder / WEIGHTS_FILE
    for p in (card_path, weights_path):
        if not p.is_file():
            raise PolicyArtifactError(f"{folder} is not a policy artifact: {p.name} is missing")
    card = read_json(card_path, "policy card", PolicyArtifactError, MAX_CARD_BYTES)
    if not isinstance(card, dict) or card.get("format") not in CARD_FORMATS:
        shown = card.get("format") if isinstance(card, dict) else type(card).__name__
        raise PolicyArtifactError(f"{card_path}: unsupported card format {str(shown)[:40]!r}")
    weights = read_bounded(weights_path, "policy weights", PolicyArtifactError, MAX_WEIGHTS_BYTES)
    if card.get("content_hash") != content_hash(card, weights):
        raise PolicyArtifactError(
            f"{folder}: content hash mismatch; card.json or {WEIGHTS_FILE} was modified after export"
        )
    return card, weights


def check_schema(card: dict[str, Any]) -> None:
    """The card's feature schema must equal the installed one (features are a contract)."""
    from fusion_rl.graph.features import feature_schema

    installed = feature_schema()
    theirs = card.get("feature_schema")
    theirs = theirs if isinstance(theirs, dict) else {}
    if theirs != installed:
        version = theirs.get("version", "?")
        raise PolicyArtifactError(
            f"policy was trained on feature schema v{str(version)[:20]} but this fusion_rl "
            f"extracts v{installed['version']}"
            + ("" if version != installed["version"] else " (same version, different features)")
            + "; re-export it from its run with this version, or install the matching fusion_rl"
        )


def decision_options(card: dict[str, Any]) -> DecisionOptions:
    """The decision options (masks) the card's policy was trained under, from ``card["decisions"]``.

    A card without the field is refused rather than read with a default: the options decide
    which fuses the policy may choose, and a guess (no cap) is exactly how a policy trained with
    ``max_mac_anchors: 1`` once planned like ``aggressive`` in the plugin. Such a card predates
    the field; re-exporting its run records it.

    Raises
    ------
    PolicyArtifactError
        If the field is missing, or is not a complete, valid set of options.
    """
    if "decisions" not in card:
        raise PolicyArtifactError(
            "card.json has no 'decisions' field, so the decision options the policy was trained with "
            "(e.g. max_mac_anchors) are unknown; re-export it from its run (`fusion-rl export RUN_DIR -o DIR`)"
        )
    try:
        return DecisionOptions.from_dict(card["decisions"], "card.json 'decisions'")
    except ConfigError as exc:
        raise PolicyArtifactError(str(exc)) from None


def hardware_stats(card: dict[str, Any]) -> HardwareStats:
    """The training targets' hardware statistics of the card's policy, from ``card["hardware"]``.

    A format-1 card (written before the statistics existed) has none and gets
    :meth:`HardwareStats.identity`: the raw vector, which is what that policy was trained on.
    A format-2 card must have them.

    Raises
    ------
    PolicyArtifactError
        If a format-2 card lacks them, or they are malformed.
    """
    if "hardware" not in card:
        if card.get("format", 1) == 1:
            return HardwareStats.identity()
        raise PolicyArtifactError(f"card.json of format {card.get('format')} has no 'hardware' statistics")
    try:
        return HardwareStats.from_dict(card["hardware"], "card.json 'hardware'")
    except ConfigError as exc:
        raise PolicyArtifactError(str(exc)) from None


def load_network(directory: str | os.PathLike) -> tuple["torch.nn.Module", dict[str, Any]]:
    """Rebuild the network the card describes and load its weights (eval mode).

    Nothing named in the card is imported or called (see the module docstring); the returned
    card's ``observation`` is the checked one.
    """
    from fusion_rl.compiler.target import HardwareFeatures
    from fusion_rl.decisions.layout import EDGE_DIM, NODE_DIM
    from fusion_rl.policy.snapshot import build_network, check_observation, load_weights

    card, weights = read_card(directory)
    check_schema(card)
    where = f"{Path(directory) / CARD_FILE}"
    network = build_network(card.get("architecture"), where, PolicyArtifactError)
    features = network.config["features"]
    want = (NODE_DIM, EDGE_DIM, len(HardwareFeatures.FEATURE_NAMES))
    if (features["node_dim"], features["edge_dim"], features["hw_dim"]) != want:
        raise PolicyArtifactError(
            f"{where}: the network takes {features['node_dim']} node, {features['edge_dim']} edge and "
            f"{features['hw_dim']} hardware features; this fusion_rl observes {want[0]}, {want[1]} and {want[2]}")
    card["observation"] = check_observation(card.get("observation"), features["hw_dim"], where, PolicyArtifactError)
    load_weights(network, weights, f"{Path(directory) / WEIGHTS_FILE}", PolicyArtifactError)
    return network.eval(), card
