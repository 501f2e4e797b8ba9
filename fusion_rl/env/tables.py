"""Kernel tables made ready before training or a search reads them (issue 11, item 5).

A table serves estimates only once its kernels were timed in more than one regime and its
per-launch cost is fitted for the schedule provider's current key. Both ``scripts/learn_bench.py``
(before training) and ``scripts/search_demos.py`` (before searching the demonstrations) do this
through :func:`prepare_tables`, so the demonstrations and the rewards rate plans alike.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from fusion_rl.compiler.target import parse_target
from fusion_rl.env.fusion_env import FusionEnv
from fusion_rl.fusion.rules import make_plan

__all__ = ["prepare_tables"]


def prepare_tables(env: FusionEnv, models: dict[str, list[str]], rules: Sequence[str], retime: bool,
                   progress: Callable[[str], None] | None = None) -> dict[str, int]:
    """Make each target's kernel table ready to read (``models``: target -> its models), through
    ``env`` (a :class:`~fusion_rl.env.fusion_env.FusionEnv`, which loads each model once):

    - with ``retime``, :meth:`KernelTable.retime` of every rule's plan on every model, each
      kernel once per target; kernels a table lacks are timed first, so a new target's table
      gets two passes too;
    - where the table has no per-launch cost for its key yet (a new machine, or a schedule
      provider's new version: the cost is kept per provider key), one fitted by
      :meth:`KernelTable.calibrate` on the rule plans' end-to-end latencies (the env's
      measurer: a plan already in its store costs nothing). Without it every estimate is the
      sum of the kernels alone, so the launches a fused plan saves earn nothing, in the
      rewards and in the searches.

    ``progress`` gets one line per model retimed and per cost fitted. Returns how many kernels
    each model had timed a second time (none without ``retime``).
    """
    report = progress or (lambda line: None)
    retimed: dict[str, int] = {}
    for target, names in models.items():
        table = env.open_kernel_table(parse_target(target))
        try:
            done: set[str] = set()
            samples, t_fit = [], 0.0
            for name in names:
                model = env.model(name)
                t0 = time.perf_counter()
                plans = list({p.hash: p for p in (make_plan(r, model.mod, model.graph) for r in rules)}.values())
                if retime:
                    new = sum(table.ensure(model, plan) for plan in plans)
                    timed = sum(table.retime(model, plan, done) for plan in plans)
                    retimed[name] = retimed.get(name, 0) + timed
                    report(f"{name} on {target}: {new} rule kernels timed, {timed} timed again "
                           f"({time.perf_counter() - t0:.0f} s)")
                if not table.calibrated:
                    t0 = time.perf_counter()
                    for plan in plans:
                        record = env.measurer(target).measure(model, plan)
                        if record.status == "ok":
                            samples.append((model, plan, float(record.median_ms)))
                    t_fit += time.perf_counter() - t0
            if samples:
                launch = table.calibrate(samples)
                report(f"{target}: per-launch cost {launch * 1e3:.2f} us, fitted on {len(samples)} rule plans "
                       f"({t_fit:.0f} s)")
        finally:
            table.close()
    return retimed
