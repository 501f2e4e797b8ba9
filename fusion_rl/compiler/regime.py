"""The host's fork-join regime: a probe timed between repeats, and a label for each repeat.

Why: on this project's 2-vCPU VMs, the cost of TVM handing work to its second thread and waiting
for it switches between two levels, several times apart, that last seconds to minutes, while each
vCPU alone computes as fast as before (docs/design.md §7 has the measurements). It looks like the
hypervisor placing the two vCPUs on cores that do or do not share a cache. Models of many small
parallel kernels pay for every hand-off, and plans with fewer kernels pay less, so a paired ratio
taken in one regime does not hold in the other. Each repeat of
:func:`fusion_rl.compiler.timing.time_interleaved` is therefore preceded by :func:`fork_join_us`,
and comparisons can be split by :func:`regime_labels`.

A comparison can only judge its repeats against the probes it has seen. One spent wholly in the
far regime would count every repeat near, so :class:`NearFloor` keeps the host's lowest probe of
recent comparisons on disk, per host and thread count, and every comparison of a local
:class:`~fusion_rl.compiler.measure.Measurer` is judged against it from its first repeat on.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

#: A repeat is *far* when its probe exceeds the reference (the lowest probe of the comparison,
#: or of the whole run) by this factor: between the spread within one level and the gap between
#: the two (docs/design.md §7).
FAR_FACTOR = 1.6

#: Below this a probe is a call with no hand-off (a pool of one thread), never a far regime.
NO_HANDOFF_US = 0.1

#: Parallel launches per probe: a few ms in all, small beside a ``min_repeat_ms`` of 50.
PROBE_LAUNCHES = 2000


@functools.lru_cache(maxsize=1)
def _probe_kernel() -> tuple[Any, Any]:
    import tvm
    from tvm.script import tirx as T

    n = max(1, int(tvm.get_global_func("runtime.NumThreads")()))

    @T.prim_func
    def fork_join(a: T.Buffer((n, 16), "float32")):
        for i in T.parallel(n):  # one task per pool thread: the probe is the hand-off itself
            for j in range(16):
                a[i, j] = a[i, j] + T.float32(1)

    lib = tvm.compile(tvm.IRModule({"fork_join": fork_join.with_attr("global_symbol", "fork_join")}),
                      target="llvm").jit()
    dev = tvm.cpu()
    return lib.time_evaluator("fork_join", dev, number=PROBE_LAUNCHES, repeat=3), \
        tvm.runtime.tensor(np.zeros((n, 16), "float32"), dev)


#: Days a comparison's lowest probe stays part of the host's floor. The near level is a property
#: of the host (docs/design.md §7); when it changes (a new kernel, a moved VM), a floor left too
#: low would label every repeat far, and comparisons would spend their extra rounds for nothing,
#: for at most this long.
FLOOR_DAYS = 7.0

#: Comparisons a floor file remembers (the newest kept): enough for a week of runs.
FLOOR_ENTRIES = 512


def fork_join_us() -> float:
    """Microseconds of one parallel launch of a near-empty kernel on TVM's thread pool (best of
    three batches). Compiled once per process; the pool is the one the timed code uses."""
    evaluator, arg = _probe_kernel()
    return float(min(evaluator(arg).results)) * 1e6


def regime_labels(probes_us: Sequence[float], reference_us: float | None = None) -> list[str]:
    """``"near"`` or ``"far"`` for each repeat's probe: far when it exceeds ``FAR_FACTOR`` x
    ``reference_us`` (default: the lowest of ``probes_us``) and ``NO_HANDOFF_US``.

    A relative test cannot tell a comparison spent wholly in the far regime from one spent
    wholly in the near one; pass the lowest probe of a longer run as ``reference_us`` for that,
    and report the probes themselves.
    """
    if not probes_us:
        return []
    ref = min(probes_us) if reference_us is None else reference_us
    return ["far" if p > FAR_FACTOR * ref and p > NO_HANDOFF_US else "near" for p in probes_us]


def probes_by_regime(probes_us: Sequence[float], reference_us: float | None = None) -> dict[str, list[float]]:
    """The probes of each regime, ``{"near": [...], "far": [...]}``, labelled as by
    :func:`regime_labels`."""
    out: dict[str, list[float]] = {"near": [], "far": []}
    for p, label in zip(probes_us, regime_labels(probes_us, reference_us)):
        out[label].append(p)
    return out


class NearFloor:
    """The lowest fork-join probe of this host's recent comparisons at one thread count.

    A JSON file under the hardware cache (``$FUSION_RL_CACHE/hw``), one per host, CPU and
    thread count, holding ``[unix time, lowest probe]`` per recorded comparison; probes older
    than :data:`FLOOR_DAYS` are dropped. It is data: read as JSON, and an unreadable or
    malformed file is no floor (the comparison falls back to its own probes), never an error.

    >>> floor = NearFloor.for_threads(2)  # doctest: +SKIP
    >>> floor.reference_us()               # doctest: +SKIP
    0.58
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @classmethod
    def for_threads(cls, num_threads: int, cache_dir: str | Path | None = None) -> NearFloor:
        """The floor of this host at ``num_threads`` TVM threads, in ``cache_dir`` (default the
        hardware cache)."""
        from fusion_rl.compiler.target.hardware import _host_identity, cache_file, default_hw_cache_dir

        hostname, cpu_model = _host_identity()
        directory = Path(cache_dir) if cache_dir is not None else default_hw_cache_dir()
        return cls(cache_file(directory, f"fork-join-t{num_threads}", hostname, cpu_model))

    @classmethod
    def for_target(cls, spec: Any) -> NearFloor | None:
        """The floor a comparison on ``spec`` (a :class:`~fusion_rl.compiler.target.TargetSpec`)
        is judged by: this host's at its threads; ``None`` for a remote or GPU target, whose
        probes this host's floor does not describe."""
        return cls.for_threads(spec.num_threads) if spec.remote is None and spec.kind == "llvm" else None

    def _entries(self, now: float) -> list[tuple[float, float]]:
        try:
            data = json.loads(self.path.read_text())
            entries = [(float(t), float(p)) for t, p in data["probes"]]
        except (OSError, ValueError, TypeError, KeyError):
            return []
        return [(t, p) for t, p in entries if 0 <= now - t <= FLOOR_DAYS * 86400 and p > NO_HANDOFF_US]

    def reference_us(self, now: float | None = None) -> float | None:
        """The lowest probe recorded in the last :data:`FLOOR_DAYS` days, or ``None``."""
        entries = self._entries(time.time() if now is None else now)
        return min(p for _, p in entries) if entries else None

    def record(self, probes_us: Sequence[float], now: float | None = None) -> None:
        """Add a comparison's lowest probe (probes of a pool of one thread are not regimes and
        are skipped). An unwritable cache is skipped too: without a floor, comparisons judge
        their repeats by their own probes, as before it existed."""
        from fusion_rl.compiler.target.hardware import _write_json_atomic

        probes = [p for p in probes_us if p > NO_HANDOFF_US]
        if not probes:
            return
        now = time.time() if now is None else now
        entries = self._entries(now) + [(now, min(probes))]
        _write_json_atomic(self.path, {"probes": [list(e) for e in entries[-FLOOR_ENTRIES:]]})


def near_reference_us(probes_us: Sequence[float], *references: float | None) -> float | None:
    """The reference a comparison judges its repeats by: the lowest of its own ``probes_us``
    and the ``references`` given (a run's lowest probe, a :class:`NearFloor`), or ``None``."""
    values = [*probes_us, *(r for r in references if r is not None)]
    return min(values) if values else None


def settle_reference(probes_us: Sequence[float], floor: NearFloor | None, *references: float | None) -> float | None:
    """What a finished comparison's repeats are judged by (:func:`near_reference_us` of its
    probes, ``references`` and ``floor``); its probes are then recorded in ``floor``."""
    reference = near_reference_us(probes_us, *references, floor.reference_us() if floor is not None else None)
    if floor is not None:
        floor.record(probes_us)
    return reference


__all__ = ["FAR_FACTOR", "FLOOR_DAYS", "NearFloor", "fork_join_us", "near_reference_us", "probes_by_regime",
           "regime_labels", "settle_reference"]
