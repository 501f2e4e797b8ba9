"""Measurement keys and records: what identifies a latency measurement and what it holds.

The :class:`~fusion_rl.compiler.store.MeasurementStore` keeps them in SQLite; the column tuples
here are the row layout it reads and writes (:meth:`MeasurementRecord.to_row`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from importlib import metadata
from typing import Any, Sequence

import numpy as np

from fusion_rl.errors import StoreError
from fusion_rl.io import parse_json

#: Allowed values of :attr:`MeasurementRecord.status`.
STATUSES = ("ok", "failed", "timeout", "crashed", "wrong_output")

#: The key fields, in table-column order.
KEY_COLUMNS = ("model_fingerprint", "plan_hash", "target", "provider", "budget", "versions", "protocol")
#: The value fields, in table-column order.
VALUE_COLUMNS = (
    "status", "median_ms", "spread_ms", "repeats", "times_ms", "num_kernels", "kernel_times_ms",
    "error", "created", "wall_s", "kernel_schedules",
)
#: A row of the measurements table.
COLUMNS = KEY_COLUMNS + VALUE_COLUMNS


def library_versions() -> str:
    """The ``versions`` key field for this environment, e.g.
    ``"tvm=0.27.0.post1;ffi=0.1.14.post1;fusion_rl=0.1.0"``.

    Read from package metadata, so TVM is not imported.
    """
    import fusion_rl

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "none"

    return f"tvm={version('apache-tvm')};ffi={version('apache-tvm-ffi')};fusion_rl={fusion_rl.__version__}"


@dataclasses.dataclass(frozen=True)
class MeasurementKey:
    """Everything that determines a measurement's outcome; two equal keys are one measurement.

    Parameters
    ----------
    model_fingerprint
        The model's fingerprint (graph + shapes + dtypes).
    plan_hash
        The fusion plan's canonical hash.
    target
        :attr:`fusion_rl.compiler.target.TargetSpec.key` (includes thread count).
    provider
        :attr:`fusion_rl.compiler.schedules.base.ScheduleProvider.key`: the provider's
        name plus the options that change its schedules (``naive``, ``rules``,
        ``tuned:structural``, ...).
    budget
        The provider's search budget (trials per task; 0 for none).
    versions
        Library versions (see :func:`library_versions`).
    protocol
        Timing protocol: ``fusion_rl.compiler.timing.TimingProtocol.key``, e.g.
        ``"n1r7m50w2"`` (number 1, repeat 7, min_repeat_ms 50, warm-up 2).
    """

    model_fingerprint: str
    plan_hash: str
    target: str
    provider: str
    budget: int
    versions: str
    protocol: str

    def __post_init__(self) -> None:
        for name in KEY_COLUMNS:
            value = getattr(self, name)
            if name == "budget":
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    raise StoreError(f"measurement key: budget must be an int >= 0, got {value!r}")
            elif not isinstance(value, str) or not value:
                raise StoreError(f"measurement key: {name} must be a non-empty str, got {value!r}")

    def digest(self) -> str:
        """A stable short hash of the key (for file names and logs)."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MeasurementKey:
        return cls(**{name: data[name] for name in KEY_COLUMNS})


@dataclasses.dataclass
class MeasurementRecord:
    """The outcome of measuring one :class:`MeasurementKey`.

    Parameters
    ----------
    key
        What was measured.
    status
        One of :data:`STATUSES`. Only ``"ok"`` latencies may be compared.
    median_ms
        Median of ``times_ms`` (required for ``"ok"``; ``None`` if nothing ran).
    spread_ms
        Interquartile range of ``times_ms`` (75th minus 25th percentile, numpy's
        linear interpolation): robust to the odd slow repeat, unlike the standard deviation.
    repeats
        Number of timed repeats (``len(times_ms)``).
    times_ms
        Every repeat's time (each the mean over ``number`` runs), in ms.
    num_kernels
        Kernels (PrimFunc calls) in the compiled plan.
    kernel_times_ms
        Optional per-kernel times, JSON-serializable (e.g. name -> ms).
    error
        The failure message, for non-``ok`` statuses.
    created
        Unix time of the measurement.
    wall_s
        Wall seconds spent (schedule + build + verify + time).
    kernel_schedules
        Kernel name -> the schedule it got (``fallback: <reason>`` for a
        kernel left as naive loops); ``None`` when the build did not get that far.
    """

    key: MeasurementKey
    status: str
    median_ms: float | None = None
    spread_ms: float | None = None
    repeats: int = 0
    times_ms: list[float] = dataclasses.field(default_factory=list)
    num_kernels: int | None = None
    kernel_times_ms: Any = None
    error: str | None = None
    created: float = dataclasses.field(default_factory=time.time)
    wall_s: float = 0.0
    kernel_schedules: dict[str, str] | None = None

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise StoreError(f"measurement status must be one of {STATUSES}, got {self.status!r}")
        if self.status == "ok" and (self.median_ms is None or not math.isfinite(self.median_ms)):
            raise StoreError(f"an 'ok' measurement needs a finite median_ms, got {self.median_ms!r}")
        self.times_ms = [float(t) for t in self.times_ms]

    @classmethod
    def from_times(cls, key: MeasurementKey, times_ms: Sequence[float], **fields: Any) -> MeasurementRecord:
        """An ``ok`` record with median, spread (IQR) and repeats computed from ``times_ms``."""
        times = np.asarray(times_ms, dtype=np.float64)
        if times.size == 0:
            raise StoreError("from_times needs at least one time")
        q25, q50, q75 = np.percentile(times, [25, 50, 75])
        return cls(
            key=key, status=fields.pop("status", "ok"), median_ms=float(q50), spread_ms=float(q75 - q25),
            repeats=int(times.size), times_ms=times.tolist(), **fields,
        )

    def to_dict(self) -> dict[str, Any]:
        """A flat dict: the key's fields and the value fields side by side (one table row)."""
        data = self.key.to_dict()
        data.update({name: getattr(self, name) for name in VALUE_COLUMNS})
        data["times_ms"] = list(self.times_ms)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MeasurementRecord:
        return cls(key=MeasurementKey.from_dict(data), **{name: data[name] for name in VALUE_COLUMNS if name in data})

    def to_row(self) -> tuple[Any, ...]:
        data = self.to_dict()
        data["times_ms"] = json.dumps(data["times_ms"])
        data["kernel_times_ms"] = None if self.kernel_times_ms is None else json.dumps(self.kernel_times_ms)
        data["kernel_schedules"] = None if self.kernel_schedules is None else json.dumps(self.kernel_schedules)
        return tuple(data[name] for name in COLUMNS)

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> MeasurementRecord:
        """A record from a table row; a damaged row (invalid JSON in a column, non-numeric
        times) raises :class:`StoreError`, never a bare JSON or type error."""
        data = dict(zip(COLUMNS, row))
        what = f"the record of plan {str(data.get('plan_hash'))[:20]}"
        data["times_ms"] = parse_json(str(data["times_ms"]), f"{what}: times_ms", StoreError)
        if not isinstance(data["times_ms"], list) or not all(
                isinstance(t, (int, float)) and not isinstance(t, bool) for t in data["times_ms"]):
            raise StoreError(f"{what}: times_ms is not a list of numbers")
        if data["kernel_times_ms"] is not None:
            data["kernel_times_ms"] = parse_json(str(data["kernel_times_ms"]), f"{what}: kernel_times_ms", StoreError)
        if data["kernel_schedules"] is not None:
            data["kernel_schedules"] = parse_json(str(data["kernel_schedules"]), f"{what}: kernel_schedules", StoreError)
        return cls.from_dict(data)


def key_values(key: MeasurementKey) -> tuple[Any, ...]:
    """The key's fields in :data:`KEY_COLUMNS` order (a row's key part, or a lookup's parameters)."""
    return tuple(getattr(key, name) for name in KEY_COLUMNS)
