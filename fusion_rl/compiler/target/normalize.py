"""Normalising the hardware vector with the training targets' statistics.

A policy sees a target only through its hardware vector
(:meth:`~fusion_rl.compiler.target.hardware.HardwareFeatures.as_vector`). Raw, that vector
says little a network can use across targets: most entries are constant over a training set
(caches, core count on one machine), and the rest differ by amounts the fixed log scales do not
put on a common footing. :class:`HardwareStats` holds the per-feature mean, standard deviation,
minimum and maximum over the training targets; it is computed when training starts (by the
env, from its spec's targets), written into the run's policy snapshot and the exported card
(``card.json`` ``hardware``), and applied by the env, by
:class:`~fusion_rl.policy.snapshot.PolicySnapshot` (evaluation) and by
:class:`~fusion_rl.export.LearnedPlanner` (the plugin) through this one module, so training,
evaluation and the plugin feed the network the same numbers.

The normalised vector is ``clip((x - mean) / max(std, MIN_SCALE), -CLIP, CLIP)``:

- a feature that was constant in training (``std == 0``) becomes 0 there. ``MIN_SCALE`` (0.05 of
  a raw unit, about a 1.4x change of a rate on its log2/10 scale) keeps an unseen value at test
  time finite instead of dividing by zero;
- ``CLIP`` bounds what an out-of-range target can feed the network.

A target whose raw features lie outside ``[min - RANGE_TOLERANCE, max + RANGE_TOLERANCE]`` of
training is outside what the policy saw: :meth:`HardwareStats.warn_outside` logs one line
naming the features (at plan time and in evaluation).

Cards and snapshots written before these statistics existed have none. They load with
:meth:`HardwareStats.identity`, which passes the raw vector through unchanged: exactly what those
policies were trained on, so their plans do not change. Such a policy cannot tell whether a
target is outside its training range, and no warning is given.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from fusion_rl.compiler.target.hardware import HardwareFeatures
from fusion_rl.errors import ConfigError

__all__ = ["CLIP", "MIN_SCALE", "RANGE_TOLERANCE", "HardwareStats", "logger"]

#: Smallest divisor of a feature (raw units): see the module docstring.
MIN_SCALE = 0.05
#: Normalised values are clipped to [-CLIP, CLIP].
CLIP = 5.0
#: Raw-unit slack around the training range before a target counts as outside it: measured
#: rates of one machine wander by a few percent between measurements (0.01 raw = 7% of a rate).
RANGE_TOLERANCE = 0.01

#: One logger for every hardware warning: without logging configured, Python prints a WARNING
#: record as one line on stderr.
logger = logging.getLogger("fusion_rl.hardware")

_METHODS = ("zscore", "identity")
_MAX_TARGETS = 1024
_WARNED: set[tuple[str, str]] = set()


@dataclass(frozen=True)
class HardwareStats:
    """Per-feature statistics of the training targets' raw hardware vectors.

    Parameters
    ----------
    method
        ``"zscore"`` (normalise with the statistics) or ``"identity"`` (pass the raw vector
        through: policies trained before statistics existed).
    feature_names
        Names of the features, in the order of the vector
        (:attr:`HardwareFeatures.FEATURE_NAMES` when computed).
    mean, std, low, high
        Per feature, over the training targets (raw units). Empty for ``identity``.
    targets
        Target keys the statistics were computed over (for the card's reader).
    """

    method: str
    feature_names: tuple[str, ...]
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    low: tuple[float, ...] = ()
    high: tuple[float, ...] = ()
    targets: tuple[str, ...] = ()

    # ---- construction --------------------------------------------------------------------
    @classmethod
    def identity(cls) -> HardwareStats:
        """Statistics that change nothing: the fallback for cards without any."""
        return cls(method="identity", feature_names=HardwareFeatures.FEATURE_NAMES)

    @classmethod
    def from_vectors(cls, vectors: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]]) -> HardwareStats:
        """Statistics over the raw vectors of the training targets (``{target_key: vector}``).

        Raises
        ------
        ConfigError
            If there is no vector, or they differ in length from the feature names.
        """
        items = list(vectors.items() if isinstance(vectors, Mapping) else vectors)
        if not items:
            raise ConfigError("hardware statistics need the vector of at least one training target")
        names = HardwareFeatures.FEATURE_NAMES
        matrix = np.asarray([np.asarray(v, dtype=np.float64).reshape(-1) for _, v in items])
        if matrix.shape[1] != len(names):
            raise ConfigError(f"hardware vectors have {matrix.shape[1]} features, expected {len(names)}")
        as_tuple = lambda a: tuple(float(x) for x in a)  # noqa: E731 - JSON-friendly floats
        return cls(method="zscore", feature_names=names, mean=as_tuple(matrix.mean(0)),
                   std=as_tuple(matrix.std(0)), low=as_tuple(matrix.min(0)), high=as_tuple(matrix.max(0)),
                   targets=tuple(str(k) for k, _ in items))

    # ---- application ---------------------------------------------------------------------
    @property
    def is_identity(self) -> bool:
        """Whether these are the fallback statistics (raw vectors pass through)."""
        return self.method == "identity"

    def normalize(self, raw: np.ndarray) -> np.ndarray:
        """The vector the policy sees for the raw vector ``raw`` (float32, same length)."""
        raw = np.asarray(raw, dtype=np.float32).reshape(-1)
        if self.is_identity:
            return raw.copy()
        self._check_length(raw)
        scale = np.maximum(np.asarray(self.std, np.float64), MIN_SCALE)
        z = (raw.astype(np.float64) - np.asarray(self.mean, np.float64)) / scale
        return np.clip(z, -CLIP, CLIP).astype(np.float32)

    def outside(self, raw: np.ndarray) -> list[str]:
        """Names of the features of ``raw`` outside the training range (none for ``identity``)."""
        if self.is_identity:
            return []
        raw = np.asarray(raw, dtype=np.float64).reshape(-1)
        self._check_length(raw)
        return [name for name, x, lo, hi in zip(self.feature_names, raw, self.low, self.high)
                if x < lo - RANGE_TOLERANCE or x > hi + RANGE_TOLERANCE]

    def warn_outside(self, raw: np.ndarray, target: str, where: str) -> list[str]:
        """Log one warning line when ``raw`` lies outside the training range; return the features.

        Warned once per (target, statistics) in a process: an evaluation deciding many models on
        one target says it once.
        """
        names = self.outside(raw)
        key = (str(target), repr(self))
        if names and key not in _WARNED:
            _WARNED.add(key)
            logger.warning(
                "warning: %s: target %s is outside the hardware range the policy was trained on (%s; trained on %s); "
                "its plans are an extrapolation", where, target, ", ".join(names), ", ".join(self.targets) or "?")
        return names

    def _check_length(self, raw: np.ndarray) -> None:
        if raw.shape[0] != len(self.mean):
            raise ConfigError(f"hardware vector has {raw.shape[0]} features; the statistics have {len(self.mean)}")

    # ---- (de)serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The JSON form stored in a snapshot and a card (``min``/``max`` for low/high)."""
        if self.is_identity:
            return {"method": "identity"}
        return {"method": self.method, "feature_names": list(self.feature_names), "mean": list(self.mean),
                "std": list(self.std), "min": list(self.low), "max": list(self.high), "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, data: Any, where: str = "hardware statistics") -> HardwareStats:
        """Read :meth:`to_dict`'s form, checked: it comes from a card, which is untrusted data.

        ``None`` (a card or snapshot without statistics) gives :meth:`identity`.

        Raises
        ------
        ConfigError
            One line naming ``where`` and the problem: an unknown method, feature names other
            than the installed ones, lists of the wrong length, non-finite numbers, min > max.
        """
        if data is None:
            return cls.identity()
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where} must be an object, got {type(data).__name__}")
        method = data.get("method")
        if method not in _METHODS:
            raise ConfigError(f"{where}: method must be one of {', '.join(_METHODS)}, got {str(method)[:40]!r}")
        if method == "identity":
            return cls.identity()
        names = HardwareFeatures.FEATURE_NAMES
        if data.get("feature_names") != list(names):
            raise ConfigError(f"{where}: feature_names differ from this fusion_rl's hardware features "
                              f"({', '.join(names)}); re-export the policy with this version")
        columns: dict[str, tuple[float, ...]] = {}
        for key in ("mean", "std", "min", "max"):
            columns[key] = _floats(data.get(key), len(names), f"{where}: {key}")
        if any(s < 0 for s in columns["std"]) or any(lo > hi for lo, hi in zip(columns["min"], columns["max"])):
            raise ConfigError(f"{where}: std must be >= 0 and min <= max for every feature")
        targets = data.get("targets", [])
        if not (isinstance(targets, list) and len(targets) <= _MAX_TARGETS
                and all(isinstance(t, str) and len(t) <= 200 for t in targets)):
            raise ConfigError(f"{where}: targets must be a list of at most {_MAX_TARGETS} target keys")
        return cls(method="zscore", feature_names=names, mean=columns["mean"], std=columns["std"],
                   low=columns["min"], high=columns["max"], targets=tuple(targets))


def _floats(value: Any, length: int, where: str) -> tuple[float, ...]:
    ok = (isinstance(value, list) and len(value) == length
          and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in value))
    if not ok:
        raise ConfigError(f"{where} must be a list of {length} finite numbers")
    return tuple(float(x) for x in value)

