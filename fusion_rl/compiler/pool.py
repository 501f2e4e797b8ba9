"""Measure several plans at once on N runners (:class:`MeasurerPool`).

Each member is a full :class:`~fusion_rl.compiler.measure.Measurer` with its own runner (a
worker process, which for ``rpc://`` targets drives one device session per job) and its own
connection to the store, so members never share mutable state; the SQLite store keeps their
concurrent writes consistent (WAL, one write lock, ``busy_timeout``).

Where parallelism pays:

- **RPC devices** (``rpc://HOST:PORT/KEY:...`` with several servers under KEY): N members time on
  up to N devices at once; the tracker hands each job a free server, first come first served.
- **Local builds**: N local workers compile N plans at once. But on one machine, parallel
  *timing* disturbs itself (the workers share cores, caches and memory bandwidth), so local
  latencies measured with N > 1 are noisier and slower than alone. Use local parallelism to
  build (e.g. to fill a store with ``--schedule tuned`` builds), and time on RPC devices.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

from fusion_rl.compiler.measure import MeasureStats, Measurer
from fusion_rl.compiler.store import MeasurementRecord, MeasurementStore
from fusion_rl.errors import ConfigError
from fusion_rl.fusion.plan import FusionPlan
from fusion_rl.graph.model import Model


class MeasurerPool:
    """N measurers of one target and schedule, used as one.

    Parameters
    ----------
    members:
        The measurers; all must measure the same target, schedule provider and protocol (the
        records of one request must not depend on which member took it).

    Notes
    -----
    :meth:`measure` uses the first member; :meth:`measure_many` spreads plans over all members,
    plan ``i`` on member ``i % N``, so a batch of N plans runs in parallel. :attr:`stats` sums
    the members' counters.
    """

    def __init__(self, members: Sequence[Measurer]) -> None:
        if not members:
            raise ConfigError("a measurer pool needs at least one measurer")
        first = members[0]
        for m in members[1:]:
            if (m.spec.key, m.provider.key, m.protocol.key) != (first.spec.key, first.provider.key, first.protocol.key):
                raise ConfigError("every measurer of a pool must measure the same target, schedule and protocol")
        self.members = list(members)
        self._own_stores = False  # stores of :meth:`create`'s members are closed with the pool
        self._executor = ThreadPoolExecutor(max_workers=len(members), thread_name_prefix="fusion_rl-measure")

    @classmethod
    def create(cls, runners: int, store_path: str | None = None, **kwargs: Any) -> "MeasurerPool":
        """``runners`` measurers built from :class:`Measurer` keyword arguments, each with its own
        store connection to ``store_path`` (``None``: no store)."""
        if isinstance(runners, bool) or not isinstance(runners, int) or runners < 1:
            raise ConfigError(f"runners must be a positive number of measurers, got {runners!r}")
        pool = cls([Measurer(store=MeasurementStore(store_path) if store_path else None, **kwargs)
                    for _ in range(runners)])
        pool._own_stores = True
        return pool

    @property
    def runners(self) -> int:
        """How many plans :meth:`measure_many` measures at once."""
        return len(self.members)

    # The parts of the Measurer interface that callers (search, CLI) read.
    spec = property(lambda self: self.members[0].spec)
    provider = property(lambda self: self.members[0].provider)
    protocol = property(lambda self: self.members[0].protocol)
    schedule = property(lambda self: self.members[0].schedule)
    target = property(lambda self: self.members[0].target)
    store = property(lambda self: self.members[0].store)

    @property
    def stats(self) -> MeasureStats:
        """The members' counters, summed (a fresh object: read it, do not update it)."""
        total = MeasureStats()
        for m in self.members:
            for f in dataclasses.fields(MeasureStats):
                setattr(total, f.name, getattr(total, f.name) + getattr(m.stats, f.name))
        return total

    @property
    def devices(self) -> Counter[str]:
        """Measurements each remote device served, over all members."""
        return sum((m.devices for m in self.members), Counter())

    def key(self, model: Model, plan: FusionPlan) -> Any:
        return self.members[0].key(model, plan)

    def cached(self, model: Model, plan: FusionPlan) -> MeasurementRecord | None:
        return self.members[0].cached(model, plan)

    def measure(self, model: Model, plan: FusionPlan, **kwargs: Any) -> MeasurementRecord:
        """One measurement, on the first member."""
        return self.members[0].measure(model, plan, **kwargs)

    def measure_many(self, model: Model, plans: Sequence[FusionPlan], per_kernel: bool = False,
                     faults: Sequence[str | None] | None = None) -> list[MeasurementRecord]:
        """Measure ``plans`` in parallel, plan ``i`` on member ``i % N``; records in order.

        ``faults`` (tests only) injects a fault into plan ``i``'s job. The first exception a job
        raises (an illegal plan, a bad option) is raised after every job has finished.
        """
        faults = list(faults) if faults is not None else [None] * len(plans)
        n = len(self.members)
        lanes = [[i for i in range(len(plans)) if i % n == k] for k in range(n)]

        def lane(k: int) -> Callable[[], list[tuple[int, MeasurementRecord]]]:
            def run() -> list[tuple[int, MeasurementRecord]]:
                m = self.members[k]
                return [(i, m.measure(model, plans[i], per_kernel=per_kernel, fault=faults[i])) for i in lanes[k]]
            return run

        futures = [self._executor.submit(lane(k)) for k in range(n) if lanes[k]]
        records: list[MeasurementRecord | None] = [None] * len(plans)
        error: BaseException | None = None
        for future in futures:
            try:
                for i, record in future.result():
                    records[i] = record
            except BaseException as exc:  # noqa: BLE001 - re-raised once every lane is done
                error = error or exc
        if error is not None:
            raise error
        return [r for r in records if r is not None]

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        for m in self.members:
            m.close()
            if self._own_stores and m.store is not None:
                m.store.close()

    def __enter__(self) -> "MeasurerPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
