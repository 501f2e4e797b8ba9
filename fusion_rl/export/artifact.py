"""The exported policy artifact: a self-contained folder a compiler user can load with torch.

Layout of ``policies/NAME/``::

    weights.safetensors   the network's tensors (a safe format: loading never unpickles)
    card.json             architecture, feature schema, decision options, training suite,
                          evaluation, versions, and a content hash over all of it

The network is rebuilt from ``card["architecture"]`` (a class under ``fusion_rl.policy`` and
its constructor kwargs) and loaded with the weights; no SB3 and no gymnasium are needed.
Tampering with either file changes the content hash and is rejected; a card whose feature schema
differs from the installed feature extractor is rejected with the two versions named.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fusion_rl import paths
from fusion_rl.decisions.process import DecisionOptions
from fusion_rl.errors import ConfigError, FusionRLError

CARD_FORMAT = 1
WEIGHTS_FILE = "weights.safetensors"
CARD_FILE = "card.json"
#: Only classes from these packages may be named in a card (a card is untrusted input).
ALLOWED_MODULES = ("fusion_rl.policy.",)


class PolicyArtifactError(FusionRLError):
    """A policy folder is missing, incomplete, tampered with, or made for other features."""


@dataclass
class PolicyCard:
    architecture: dict[str, Any]  #: {"class": "fusion_rl.policy.x.Y", "kwargs": {...}}
    feature_schema: dict[str, Any]
    observation: dict[str, Any]  #: max_nodes, max_edges, hw_dim of the trained network
    #: :meth:`DecisionOptions.to_dict` of the decision process the policy was trained under
    decisions: dict[str, Any]
    training: dict[str, Any] = field(default_factory=dict)  #: suite, targets, schedule, steps, command
    evaluation: dict[str, Any] = field(default_factory=dict)  #: results with their commands
    versions: dict[str, str] = field(default_factory=dict)
    content_hash: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": CARD_FORMAT,
            "architecture": self.architecture,
            "feature_schema": self.feature_schema,
            "observation": self.observation,
            "decisions": self.decisions,
            "training": self.training,
            "evaluation": self.evaluation,
            "versions": self.versions,
            "content_hash": self.content_hash,
        }


def content_hash(card: dict[str, Any], weights: bytes) -> str:
    """sha256 over the card (without its own hash) and the weight bytes."""
    body = {k: v for k, v in card.items() if k != "content_hash"}
    h = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
    h.update(weights)
    return h.hexdigest()


def save_artifact(directory: str | os.PathLike, network: "torch.nn.Module", card: PolicyCard) -> Path:
    """Write weights and card atomically (temp files, then rename)."""
    from safetensors.torch import save

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    weights = save({k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()})
    data = card.to_dict()
    data["content_hash"] = content_hash(data, weights)
    for name, blob in ((WEIGHTS_FILE, weights), (CARD_FILE, (json.dumps(data, indent=1) + "\n").encode())):
        tmp = out / f".{name}.tmp"
        tmp.write_bytes(blob)
        os.replace(tmp, out / name)
    card.content_hash = data["content_hash"]
    return out


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
    folder = resolve_policy_dir(directory)
    if not folder.is_dir():
        shipped = ", ".join(shipped_policies()) or "none"
        raise PolicyArtifactError(f"policy folder not found: {folder} (shipped policies: {shipped})")
    card_path, weights_path = folder / CARD_FILE, folder / WEIGHTS_FILE
    for p in (card_path, weights_path):
        if not p.is_file():
            raise PolicyArtifactError(f"{folder} is not a policy artifact: {p.name} is missing")
    try:
        card = json.loads(card_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PolicyArtifactError(f"{card_path} is not valid JSON: {exc}") from None
    if not isinstance(card, dict) or card.get("format") != CARD_FORMAT:
        raise PolicyArtifactError(f"{card_path}: unsupported card format {card.get('format') if isinstance(card, dict) else card!r}")
    weights = weights_path.read_bytes()
    if card.get("content_hash") != content_hash(card, weights):
        raise PolicyArtifactError(
            f"{folder}: content hash mismatch; card.json or {WEIGHTS_FILE} was modified after export"
        )
    return card, weights


def check_schema(card: dict[str, Any]) -> None:
    """The card's feature schema must equal the installed one (features are a contract)."""
    from fusion_rl.graph.features import feature_schema

    installed = feature_schema()
    theirs = card.get("feature_schema") or {}
    if theirs != installed:
        raise PolicyArtifactError(
            f"policy was trained on feature schema v{theirs.get('version', '?')} but this fusion_rl "
            f"extracts v{installed['version']}"
            + ("" if theirs.get("version") != installed["version"] else " (same version, different features)")
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


def load_network(directory: str | os.PathLike) -> tuple["torch.nn.Module", dict[str, Any]]:
    """Rebuild the network named by the card and load its weights (eval mode)."""
    from safetensors.torch import load

    card, weights = read_card(directory)
    check_schema(card)
    arch = card.get("architecture") or {}
    cls_path = str(arch.get("class", ""))
    if not cls_path.startswith(ALLOWED_MODULES):
        raise PolicyArtifactError(f"card names class '{cls_path}', outside {ALLOWED_MODULES}")
    module_name, _, cls_name = cls_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), cls_name)
        network = cls(**dict(arch.get("kwargs") or {}))
        network.load_state_dict(load(weights))
    except (ImportError, AttributeError, TypeError, RuntimeError, ConfigError) as exc:
        raise PolicyArtifactError(f"cannot rebuild the policy network {cls_path}: {exc}".splitlines()[0]) from None
    return network.eval(), card
