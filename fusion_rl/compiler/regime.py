"""The host's fork-join regime: a probe timed between repeats, and a label for each repeat.

Why: on this project's 2-vCPU VMs, the cost of TVM handing work to its second thread and waiting
for it switches between two levels, several times apart, that last seconds to minutes, while each
vCPU alone computes as fast as before (docs/design.md §7 has the measurements). It looks like the
hypervisor placing the two vCPUs on cores that do or do not share a cache. Models of many small
parallel kernels pay for every hand-off, and plans with fewer kernels pay less, so a paired ratio
taken in one regime does not hold in the other. Each repeat of
:func:`fusion_rl.compiler.timing.time_interleaved` is therefore preceded by :func:`fork_join_us`,
and comparisons can be split by :func:`regime_labels`.
"""

from __future__ import annotations

import functools
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


__all__ = ["FAR_FACTOR", "fork_join_us", "probes_by_regime", "regime_labels"]
