"""A self-contained, re-checkable measurement result, and the criterion that re-checks it.

``fusion-rl measure --json`` prints a *measurement* (model, plan hash, target, schedule, budget,
latency, spread, raw times, ...) but not the plan's groups, so on its own it cannot be measured
again. A :class:`Result` bundles that JSON with everything needed to repeat it:

.. code-block:: json

    {"format": "fusion_rl.result/1",
     "measurement": {... what `fusion-rl measure --json` printed ...},
     "plan": {... FusionPlan.to_dict() ...},
     "model": "cnn_plain", "seed": 0, "input_shapes": {},
     "protocol": {"repeat": 7, "min_repeat_ms": 50, "number": 1, "warmup": 2}}

:func:`load_result` accepts either that bundle or a bare measure JSON (then the plan must come
from elsewhere: ``--plan``/``--rules``, or the rule set named in the measurement's ``plan``).

The criterion (:func:`holds`), after CompilerGym's ``validate()``, which replays a state and
checks the reward within a tolerance: a stored latency *holds* if a fresh measurement's median
is within

    tolerance = max(3 * sqrt(IQR_old**2 + IQR_new**2),  0.10 * median_old)

of the stored median. Why: the IQR of the repeats measures the noise *inside* one timing run;
the two runs are independent, so their spreads add in quadrature, and 3x that is a ~3-sigma
band (for normal noise IQR ~ 1.35 sigma, so it is generous). Within-run IQR does not see what
changes *between* runs on a shared machine (frequency, co-tenants, cache state), which moved
medians here by 3-8 %; the 10 % floor covers that, and is still far below the effects fusion
results report (a 10x tampered latency, or a 1.1-1.3x fusion win, stands out).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fusion_rl.errors import ConfigError
from fusion_rl.io import dumps_json, read_json, write_atomic

RESULT_FORMAT = "fusion_rl.result/1"
#: Fields a measurement must have to be validated (all printed by ``fusion-rl measure --json``).
REQUIRED_FIELDS = ("model", "plan_hash", "target", "schedule", "budget", "status", "latency_ms", "spread_ms")
#: Relative floor of the tolerance (see the module docstring).
REL_FLOOR = 0.10
#: Multiple of the combined IQR.
IQR_FACTOR = 3.0


@dataclass
class Result:
    """A measurement plus (optionally) what is needed to repeat it."""

    measurement: dict[str, Any]
    plan: dict[str, Any] | None = None
    model: str | None = None
    seed: int = 0
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    protocol: dict[str, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": RESULT_FORMAT,
            "measurement": self.measurement,
            "plan": self.plan,
            "model": self.model,
            "seed": self.seed,
            "input_shapes": self.input_shapes,
            "protocol": self.protocol,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the bundle through :func:`fusion_rl.io.write_atomic`."""
        return write_atomic(path, dumps_json(self.to_dict(), indent=1) + "\n", what="result bundle")


def load_result(path: str | os.PathLike) -> Result:
    """Read a result bundle or a bare ``fusion-rl measure --json`` output.

    Raises
    ------
    ConfigError
        one line naming what is wrong (missing file, not JSON, missing or
        mistyped fields, a failed measurement).
    """
    path = Path(path)
    if not os.path.lexists(path):
        raise ConfigError(f"result file not found: {path}")
    data = read_json(path, "result file", ConfigError, 64 << 20)
    if not isinstance(data, dict):
        raise ConfigError(f"result file {path} must hold a JSON object (the output of `fusion-rl measure --json`)")
    if data.get("format") == RESULT_FORMAT:
        result = Result(
            measurement=data.get("measurement"),  # type: ignore[arg-type]
            plan=data.get("plan"),
            model=data.get("model"),
            seed=data.get("seed", 0),
            input_shapes=data.get("input_shapes") or {},
            protocol=data.get("protocol"),
        )
    elif "format" in data and "measurement" in data:
        raise ConfigError(f"result file {path} has unsupported format {data['format']!r}; expected {RESULT_FORMAT!r}")
    else:
        result = Result(measurement=data, model=data.get("model") if isinstance(data.get("model"), str) else None)
    _check(result, path)
    return result


def _check(result: Result, path: Path) -> None:
    m = result.measurement
    if not isinstance(m, dict):
        raise ConfigError(f"result file {path}: 'measurement' must be a JSON object")
    missing = [f for f in REQUIRED_FIELDS if f not in m]
    if missing:
        raise ConfigError(f"result file {path} lacks {', '.join(missing)}; give the output of `fusion-rl measure --json`")
    for name in ("model", "plan_hash", "target", "schedule"):
        if not isinstance(m[name], str) or not m[name]:
            raise ConfigError(f"result file {path}: '{name}' must be a non-empty string, got {m[name]!r}")
    if not isinstance(m["budget"], int) or isinstance(m["budget"], bool) or m["budget"] < 0:
        raise ConfigError(f"result file {path}: 'budget' must be an integer >= 0, got {m['budget']!r}")
    if m["status"] != "ok":
        raise ConfigError(f"result file {path} records a failed measurement (status {m['status']!r}); there is no latency to validate")
    for name in ("latency_ms", "spread_ms"):
        v = m[name]
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
            raise ConfigError(f"result file {path}: '{name}' must be a finite number >= 0, got {v!r}")
    if m["latency_ms"] <= 0:
        raise ConfigError(f"result file {path}: 'latency_ms' must be > 0, got {m['latency_ms']!r}")
    if result.plan is not None and not isinstance(result.plan, dict):
        raise ConfigError(f"result file {path}: 'plan' must be a plan object (FusionPlan.to_dict())")
    if not isinstance(result.seed, int) or isinstance(result.seed, bool):
        raise ConfigError(f"result file {path}: 'seed' must be an integer, got {result.seed!r}")
    if not isinstance(result.input_shapes, dict):
        raise ConfigError(f"result file {path}: 'input_shapes' must be an object NAME -> [dims]")
    if result.protocol is not None:
        if not isinstance(result.protocol, dict) or set(result.protocol) - {"repeat", "min_repeat_ms", "number", "warmup"} or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in result.protocol.values()
        ):
            raise ConfigError(f"result file {path}: 'protocol' must map repeat/min_repeat_ms/number/warmup to integers")


def target_name(key: str) -> str:
    """The :func:`~fusion_rl.compiler.target.parse_target` name of a target key
    (``llvm-haswell-t2`` -> ``llvm:haswell:t2``; ``cuda-sm_90`` -> ``cuda:sm_90``)."""
    if key.startswith("llvm-"):
        mcpu, _, threads = key[len("llvm-"):].rpartition("-")
        if mcpu and threads.startswith("t") and threads[1:].isdigit():
            return f"llvm:{mcpu}:{threads}"
    if key.startswith("cuda-"):
        return f"cuda:{key[len('cuda-'):]}"
    raise ConfigError(f"result target {key!r} is not a target key like 'llvm-haswell-t2' or 'cuda-sm_90'")


@dataclass(frozen=True)
class Verdict:
    """Whether a stored latency still holds (see the module docstring for the criterion)."""

    holds: bool
    old_ms: float
    new_ms: float | None
    old_spread_ms: float
    new_spread_ms: float | None
    tolerance_ms: float
    status: str  #: the re-measurement's status ("ok", "wrong_output", ...)
    error: str | None = None

    @property
    def diff_ms(self) -> float | None:
        return None if self.new_ms is None else self.new_ms - self.old_ms

    def line(self, what: str) -> str:
        if self.new_ms is None:
            return f"DOES NOT HOLD: {what}: re-measurement {self.status}: {self.error}"
        word = "HOLDS" if self.holds else "DOES NOT HOLD"
        return (
            f"{word}: {what}: stored {self.old_ms:.4g} ms, now {self.new_ms:.4g} ms "
            f"(diff {self.diff_ms:+.3g} ms, {100 * self.diff_ms / self.old_ms:+.1f}%; tolerance "
            f"{self.tolerance_ms:.3g} ms)"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "holds": self.holds, "stored_ms": self.old_ms, "new_ms": self.new_ms,
            "diff_ms": self.diff_ms, "stored_spread_ms": self.old_spread_ms,
            "new_spread_ms": self.new_spread_ms, "tolerance_ms": self.tolerance_ms,
            "criterion": f"|new - stored| <= max({IQR_FACTOR:g} * sqrt(iqr_stored^2 + iqr_new^2), {REL_FLOOR:g} * stored)",
            "status": self.status, "error": self.error,
        }


def tolerance(old_ms: float, old_spread_ms: float, new_spread_ms: float) -> float:
    """``max(3 * sqrt(old_iqr**2 + new_iqr**2), 0.10 * old_ms)``."""
    return max(IQR_FACTOR * math.hypot(old_spread_ms, new_spread_ms), REL_FLOOR * old_ms)


def holds(old_ms: float, old_spread_ms: float, new_ms: float, new_spread_ms: float) -> Verdict:
    """Apply the criterion to two ``ok`` measurements."""
    tol = tolerance(old_ms, old_spread_ms, new_spread_ms)
    return Verdict(abs(new_ms - old_ms) <= tol, old_ms, new_ms, old_spread_ms, new_spread_ms, tol, "ok")
