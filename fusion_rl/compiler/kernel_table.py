"""A table of fused kernels timed alone, and plan latency estimated from it.

Plans of one model share most of their kernels (a conv+bias+relu group recurs in many plans),
so each distinct kernel is timed once and kept: keyed by its structural hash (the PrimFunc after
fusion and ``FuseTIR``, before scheduling: equal hashes are the same loops on the same shapes,
in any plan or model), the target, the schedule provider and its budget, library versions and
the kernel timing protocol. A plan's latency is then estimated without building it::

    estimate = sum of its launched kernels' times + launches x launch_ms

``launch_ms`` is the per-launch cost that kernels timed alone do not see (VM dispatch, memory
planning, thread-pool wake-ups), fitted by least squares from end-to-end measurements with
:meth:`KernelTable.calibrate`. Reshapes that the lowering turns into views are not launches
(as in :func:`fusion_rl.compiler.build.num_kernels`).

Timing a plan's new kernels (:meth:`KernelTable.ensure`) applies and schedules the whole plan,
as a build would, but compiles and times only the kernels missing from the table, in the
measurer's worker process. Kernels are not verified: an estimate is not a measurement.

>>> with KernelTable(target="host", schedule="rules") as table:  # doctest: +SKIP
...     table.calibrate([(model, plan, e2e_ms) for plan, e2e_ms in measured])
...     table.estimate(model, other_plan).latency_ms
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import tvm
import tvm_ffi
from tvm import relax

from fusion_rl.compiler.measure import MeasureStats, Measurer
from fusion_rl.compiler.schedules import DEFAULT_SCHEDULE, make_schedule
from fusion_rl.compiler.schedules.prepack import packed_arg_specs
from fusion_rl.compiler.store import default_store_path, library_versions
from fusion_rl.compiler.target import TargetSpec
from fusion_rl.compiler.timing import TimingProtocol, time_kernels_hot_cold
from fusion_rl.compiler.worker import KernelJob
from fusion_rl.errors import ConfigError, MeasurementError, StoreError
from fusion_rl.fusion.apply import apply_plan
from fusion_rl.fusion.plan import FusionPlan
from fusion_rl.graph.model import Model

#: Kernels are timed shorter than plans: there are many, and each runs alone on hot caches.
KERNEL_PROTOCOL = TimingProtocol(repeat=5, min_repeat_ms=10, warmup=1)
#: Marks a SQLite file as a fusion_rl kernel table (``PRAGMA application_id``; ASCII "FuRK").
APPLICATION_ID = 0x4675524B
_KEY = ("target", "provider", "budget", "versions", "protocol")
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS kernels (
    kernel TEXT NOT NULL, {", ".join(f"{c} {'INTEGER' if c == 'budget' else 'TEXT'} NOT NULL" for c in _KEY)},
    name TEXT NOT NULL, median_ms REAL NOT NULL, spread_ms REAL NOT NULL, times_ms TEXT NOT NULL,
    created REAL NOT NULL, PRIMARY KEY (kernel, {", ".join(_KEY)})) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS calibration (
    {", ".join(f"{c} {'INTEGER' if c == 'budget' else 'TEXT'} NOT NULL" for c in _KEY)},
    launch_ms REAL NOT NULL, samples INTEGER NOT NULL, created REAL NOT NULL,
    PRIMARY KEY ({", ".join(_KEY)})) WITHOUT ROWID;
"""
_CALL_TIR = tvm.ir.Op.get("relax.call_tir")
#: Plans whose kernel sites every table of this process shares, most recently used last. Listing
#: a plan's sites lowers the whole model, and each training seed, search and evaluation opens
#: tables of its own, so every seed listed the same rule, demonstration and credit plans again
#: (EfficientNet-B0's credit plan: 8.3 s in a fresh env, 0.2 s in a second one of the process).
_SHARED_SITES: OrderedDict[tuple, list[KernelSite]] = OrderedDict()
_SHARED_SITES_MAX = 4096


def default_table_path() -> Path:
    """``kernels.sqlite`` beside the measurement store (``$FUSION_RL_CACHE`` or ~/.cache)."""
    return default_store_path().with_name("kernels.sqlite")


@dataclass(frozen=True)
class KernelSite:
    """One kernel launch of a plan: structural hash, PrimFunc name, (shape, dtype) per arg."""

    kernel: str
    name: str
    args: tuple[tuple[tuple[int, ...], str], ...]
    #: The provider's key for this kernel's schedule (``ScheduleProvider.kernel_key``); empty
    #: when the sites were listed without a provider.
    schedule: str = ""


@dataclass(frozen=True)
class PlanEstimate:
    """``latency_ms = kernel_ms + launches * launch_ms``."""

    latency_ms: float
    kernel_ms: float  #: sum over launches of each kernel's time alone
    launches: int
    launch_ms: float  #: the calibrated per-launch cost (0.0 before any calibration)
    timed: int  #: kernels timed to make this estimate (0 when all were in the table)


def plan_kernels(model: Model, plan: FusionPlan,
                 kernel_key: Callable[[tvm.tirx.PrimFunc], str] | None = None,
                 known_keys: dict[str, str] | None = None) -> list[KernelSite]:
    """The kernels ``plan`` launches, in order (a shared kernel once per launch), each with
    ``kernel_key`` of its PrimFunc (a provider's :meth:`~.ScheduleProvider.kernel_key`) if given.
    ``known_keys`` (kernel hash -> key) is read first and filled: a key costs a few ms of
    schedule analysis, and a search lists the same kernels in hundreds of plans."""
    fused = apply_plan(model.mod, plan, model.graph)
    lowered = relax.transform.RewriteDataflowReshape()(fused)  # views are not launches
    sites, hashes, keys = [], {}, {}
    for block in lowered["main"].body.blocks:
        for binding in block.bindings:
            call = binding.value
            if not (isinstance(call, relax.Call) and call.op == _CALL_TIR):
                continue
            gv = call.args[0]
            if gv.name_hint not in hashes:
                hashes[gv.name_hint] = f"{tvm_ffi.structural_hash(fused[gv]) & (2**64 - 1):016x}"
                h = hashes[gv.name_hint]
                if kernel_key is None:
                    keys[gv.name_hint] = ""
                elif known_keys is not None and h in known_keys:
                    keys[gv.name_hint] = known_keys[h]
                else:
                    keys[gv.name_hint] = kernel_key(fused[gv])
                    if known_keys is not None:
                        known_keys[h] = keys[gv.name_hint]
            out = call.ty_args[0]
            types = [a.ty for a in call.args[1].fields] + list(getattr(out, "fields", [out]))
            args = tuple((tuple(int(d) for d in t.shape.values), str(t.dtype)) for t in types)
            sites.append(KernelSite(hashes[gv.name_hint], gv.name_hint, args, keys[gv.name_hint]))
    return sites


@dataclass(frozen=True)
class KernelHotCold:
    """One distinct kernel of a plan, timed alone both ways (:func:`time_plan_kernels_hot_cold`)."""

    name: str
    launches: int  #: how often the plan launches it
    hot_ms: float  #: median, repeated on the same arguments (as the table times it)
    cold_ms: float  #: median, one call after its weights and output left the caches


def time_plan_kernels_hot_cold(model: Model, plan: FusionPlan, spec: TargetSpec,
                               protocol: TimingProtocol = KERNEL_PROTOCOL, rounds: int = 3,
                               schedule: str = DEFAULT_SCHEDULE) -> list[KernelHotCold]:
    """Every distinct kernel of ``plan``, scheduled by ``schedule`` for ``spec``, timed alone hot
    and cold back to back (:func:`~fusion_rl.compiler.timing.time_kernels_hot_cold`, in this
    process, one build). Nothing is kept: a cold time is not what the table's estimates add up."""
    target = spec.to_tvm()
    scheduled = make_schedule(schedule).schedule(apply_plan(model.mod, plan, model.graph), target)
    sites = plan_kernels(model, plan)
    launches = Counter(s.name for s in sites)
    funcs = {s.name: scheduled[s.name] for s in sites}
    specs = {s.name: packed_arg_specs(funcs[s.name], s.args) for s in sites}
    times = time_kernels_hot_cold(funcs, specs, target, protocol, rounds)
    return [KernelHotCold(name, n, float(np.median(times[name][0])), float(np.median(times[name][1])))
            for name, n in launches.items()]


class KernelTable:
    """Kernel times for one (target, schedule provider), kept in a SQLite file.

    Parameters
    ----------
    path:
        The table file (default :func:`default_table_path`); created if absent.
    target, schedule, schedule_kwargs, timeout_s, isolate:
        As for :class:`~fusion_rl.compiler.measure.Measurer`, which runs the timing jobs.
    protocol:
        How each kernel is timed (part of the key).
    """

    def __init__(self, path: str | os.PathLike | None = None, target: Any = "host",
                 schedule: str = "rules", schedule_kwargs: dict[str, Any] | None = None,
                 protocol: TimingProtocol = KERNEL_PROTOCOL, timeout_s: float = 600.0,
                 isolate: bool = True) -> None:
        self.measurer = Measurer(target, schedule, dict(schedule_kwargs or {}), store=None,
                                 protocol=protocol, timeout_s=timeout_s, isolate=isolate)
        m = self.measurer
        #: The table's key: plan-level rows (the launch cost) use it whole; a kernel's row
        #: puts its own schedule key (``KernelSite.schedule``) in the provider's place.
        self.key = (m.spec.key, m.provider.key, m.provider.budget, library_versions(), protocol.key)
        self._schedule_of: dict[str, str] = {}  # kernel hash -> its schedule key, as listed
        # What a plan's sites depend on besides the model and the plan (``_SHARED_SITES``).
        self._sites_key = (m.spec.key, m.provider.key, m.provider.budget,
                           json.dumps(m.schedule_kwargs, sort_keys=True, default=str))
        self.path = Path(path or default_table_path()).expanduser()
        self.timed = 0  #: kernels this instance has timed (what the table saves is the rest)
        self._db = self._open()

    # ---- the table ----------------------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            app = db.execute("PRAGMA application_id").fetchone()[0]
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if tables and (app != APPLICATION_ID or not {"kernels", "calibration"} <= tables):
                db.close()
                raise StoreError(f"{self.path} is not a fusion_rl kernel table; move it aside or "
                                 "give another path")
            db.execute("PRAGMA journal_mode = WAL")
            db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            db.executescript(_SCHEMA)
            return db
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open kernel table {self.path}: {exc}") from exc

    def times(self, kernels: Sequence[str]) -> dict[str, float]:
        """Median ms of each of ``kernels`` that the table holds for this key.

        Each kernel is looked up under its schedule key, known once :meth:`kernels` has listed
        it; a kernel never listed is looked up under the provider's current key."""
        out: dict[str, float] = {}
        where = " AND ".join(f"{c} = ?" for c in _KEY)
        for k in set(kernels):
            row = self._db.execute(f"SELECT median_ms FROM kernels WHERE kernel = ? AND {where}",
                                   (k, *self._row_key(k))).fetchone()
            if row is not None:
                out[k] = float(row[0])
        return out

    def _row_key(self, kernel: str) -> tuple:
        """The key of ``kernel``'s row: the provider's key for that kernel's schedule."""
        target, provider, *rest = self.key
        return (target, self._schedule_of.get(kernel) or provider, *rest)

    def __len__(self) -> int:
        """Kernels held for this key, under every schedule key of the provider's kernels."""
        target, _, *rest = self.key
        keys = self.measurer.provider.kernel_keys
        where = " AND ".join(f"{c} = ?" for c in _KEY if c != "provider")
        return int(self._db.execute(
            f"SELECT COUNT(*) FROM kernels WHERE provider IN ({', '.join('?' * len(keys))}) AND {where}",
            (*keys, target, *rest)).fetchone()[0])

    @property
    def launch_ms(self) -> float:
        """The calibrated per-launch cost for this key; 0.0 before :meth:`calibrate`."""
        row = self._calibration()
        return 0.0 if row is None else float(row[0])

    @property
    def calibrated(self) -> bool:
        """Whether :meth:`calibrate` has fitted a per-launch cost for this key."""
        return self._calibration() is not None

    def _calibration(self) -> tuple | None:
        where = " AND ".join(f"{c} = ?" for c in _KEY)
        return self._db.execute(f"SELECT launch_ms FROM calibration WHERE {where}", self.key).fetchone()

    # ---- plans --------------------------------------------------------------------------------

    def kernels(self, model: Model, plan: FusionPlan) -> list[KernelSite]:
        """:func:`plan_kernels`, remembered per (model, plan) by every table of this process
        with the same target, provider and schedule arguments (lowering is deterministic)."""
        key = (model.fingerprint, plan.hash, *self._sites_key)
        sites = _SHARED_SITES.get(key)
        if sites is None:
            sites = plan_kernels(model, plan, self.measurer.provider.kernel_key, self._schedule_of)
            _SHARED_SITES[key] = sites
            if len(_SHARED_SITES) > _SHARED_SITES_MAX:
                _SHARED_SITES.popitem(last=False)
        else:
            _SHARED_SITES.move_to_end(key)
            for site in sites:  # this table's rows are looked up under each kernel's own key
                self._schedule_of.setdefault(site.kernel, site.schedule)
        return sites

    def ensure(self, model: Model, plan: FusionPlan) -> int:
        """Time the kernels of ``plan`` that the table lacks; returns how many were timed.

        Raises
        ------
        MeasurementError
            If the plan could not be scheduled or a kernel could not be built or run.
        """
        sites = self.kernels(model, plan)
        known = self.times([s.kernel for s in sites])
        todo = {s.kernel: s for s in sites if s.kernel not in known}
        return self._store(todo, self._time(model, plan, todo), keep_faster=False)

    def retime(self, model: Model, plan: FusionPlan, skip: set[str] | None = None) -> int:
        """Time the kernels of ``plan`` again (all but ``skip``), keeping each one's faster median.

        This machine drifts between speed regimes that last minutes and slow compute-bound
        kernels by up to 1.6x; a kernel timed once in a slow regime inflates the estimate of every
        plan that launches it. A later pass that keeps the faster of two medians is the kernel-side
        twin of taking a plan's fastest end-to-end pass. The kernels timed are added to ``skip``,
        so one pass over many plans times each shared kernel once. Returns how many were timed.
        """
        skip = set() if skip is None else skip
        todo = {s.kernel: s for s in self.kernels(model, plan) if s.kernel not in skip}
        skip.update(todo)
        return self._store(todo, self._time(model, plan, todo), keep_faster=True)

    def _time(self, model: Model, plan: FusionPlan, todo: dict[str, KernelSite]) -> dict[str, list[float]]:
        if not todo:
            return {}
        job = KernelJob(model=model.ref, plan=plan.to_dict(), target=self.measurer.spec,
                        schedule=self.measurer.schedule,
                        schedule_kwargs=dict(self.measurer.schedule_kwargs),
                        protocol=self.measurer.protocol,
                        kernels=tuple((k, s.name, s.args) for k, s in todo.items()))
        result = self.measurer.run_job(job, model)
        if result["status"] != "ok":
            raise MeasurementError(f"timing kernels of plan {plan.hash} on {model.name}: "
                                   f"{result['status']}: {result.get('error')}")
        return result["times_ms"]

    def _store(self, todo: dict[str, KernelSite], timed: dict[str, list[float]], keep_faster: bool) -> int:
        known = self.times(list(timed)) if keep_faster else {}
        rows = []
        for k, times in timed.items():
            q1, q2, q3 = np.percentile(times, [25, 50, 75])
            if k in known and known[k] <= q2:
                continue
            rows.append((k, *self._row_key(k), todo[k].name, float(q2), float(q3 - q1), json.dumps(times),
                         time.time()))
        self._write("INSERT OR REPLACE INTO kernels VALUES (" + ", ".join("?" * 11) + ")", rows)
        self.timed += len(timed)
        return len(timed)

    def estimate(self, model: Model, plan: FusionPlan) -> PlanEstimate:
        """The plan's estimated latency, timing its missing kernels first."""
        timed = self.ensure(model, plan)
        est = self.estimate_known(model, plan)
        if est is None:  # ensure() times every missing kernel or raises; a table edited meanwhile
            raise MeasurementError(f"kernel table {self.path} lost kernels of plan {plan.hash} while estimating")
        return PlanEstimate(est.latency_ms, est.kernel_ms, est.launches, est.launch_ms, timed)

    def estimate_known(self, model: Model, plan: FusionPlan) -> PlanEstimate | None:
        """The estimate from the table alone (nothing is timed); ``None`` if a kernel is missing."""
        sites = self.kernels(model, plan)
        known = self.times([s.kernel for s in sites])
        if any(s.kernel not in known for s in sites):
            return None
        kernel_ms = float(sum(known[s.kernel] for s in sites))
        launch = self.launch_ms
        return PlanEstimate(kernel_ms + len(sites) * launch, kernel_ms, len(sites), launch, 0)

    def calibrate(self, samples: Sequence[tuple[Model, FusionPlan, float]]) -> float:
        """Fit and keep ``launch_ms`` from ``(model, plan, end-to-end ms)`` samples.

        Least squares of ``e2e - kernel_ms = launch_ms * launches`` (through the origin: no
        kernels, no cost) in *relative* error, each sample weighted by ``1 / e2e**2``: the
        estimator is judged by percentage error, and in absolute terms the largest model's
        noise would decide the cost for every model. Returns the fitted value.
        """
        if not samples:
            raise ConfigError("calibrate needs at least one (model, plan, end-to-end ms) sample")
        n, gap, w = [], [], []
        for model, plan, e2e_ms in samples:
            est = self.estimate(model, plan)
            n.append(est.launches)
            gap.append(float(e2e_ms) - est.kernel_ms)
            w.append(1.0 / max(float(e2e_ms), 1e-9) ** 2)
        n_arr, gap_arr, w_arr = np.asarray(n, float), np.asarray(gap), np.asarray(w)
        launch_ms = float((w_arr * n_arr) @ gap_arr / max(float((w_arr * n_arr) @ n_arr), 1e-30))
        # Not below 0: where the plans ran faster end to end than their kernels timed alone (each
        # kernel's time includes its own call), a negative cost made the estimate of a plan of
        # many small kernels negative (seen on mlp_tiny with another process on the machine).
        launch_ms = max(launch_ms, 0.0)
        self._write("INSERT OR REPLACE INTO calibration VALUES (" + ", ".join("?" * 8) + ")",
                    [(*self.key, launch_ms, len(samples), time.time())])
        return launch_ms

    def _write(self, sql: str, rows: list[tuple]) -> None:
        try:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany(sql, rows)
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise StoreError(f"cannot write to kernel table {self.path}: {exc}") from exc

    # ---- lifetime -----------------------------------------------------------------------------

    def close(self) -> None:
        self.measurer.close()
        self._db.close()

    def __enter__(self) -> "KernelTable":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class EstimateRecord:
    """What :meth:`TableObjective.measure` returns: shaped like a measurement record (``status``,
    ``median_ms``, ``error``), so search and training code take either."""

    status: str  #: "ok", or "failed" when a kernel could not be scheduled, built or run
    median_ms: float | None  #: the estimate; ``None`` unless ok
    error: str | None = None
    kernels_timed: int = 0  #: kernels this estimate had to time (the measurements it spent)


class TableObjective:
    """A :class:`KernelTable` behind a measurer's interface: plans are *estimated*, not built.

    Search algorithms (:mod:`fusion_rl.baselines.search`) call ``measure`` and count
    ``stats.misses`` as the measurements they spend. Here a miss is one kernel timed alone: a
    plan whose kernels are all in the table costs nothing, so a search can evaluate thousands
    of plans for the price of the kernels it has not seen. The plan a search returns is only
    estimated fast; re-time it end to end (head to head) before believing it.
    """

    def __init__(self, table: KernelTable) -> None:
        self.table = table
        self.stats = MeasureStats()
        self.estimates = 0  #: plans estimated (kernel-table evaluations)

    def measure(self, model: Model, plan: FusionPlan, per_kernel: bool = False) -> EstimateRecord:
        """The plan's estimate, timing its kernels that the table lacks (``per_kernel`` is
        accepted for the measurer interface and ignored: the table is per kernel already)."""
        self.estimates += 1
        try:
            est = self.table.estimate(model, plan)
        except MeasurementError as exc:
            self.stats.misses += 1
            self.stats.failures += 1
            return EstimateRecord("failed", None, str(exc))
        if est.timed:
            self.stats.misses += est.timed
        else:
            self.stats.hits += 1
        return EstimateRecord("ok", est.latency_ms, None, est.timed)

    def cached(self, model: Model, plan: FusionPlan) -> EstimateRecord | None:
        """The estimate if every kernel of ``plan`` is in the table (nothing is timed), else ``None``."""
        est = self.table.estimate_known(model, plan)
        return None if est is None else EstimateRecord("ok", est.latency_ms)


__all__ = ["KERNEL_PROTOCOL", "EstimateRecord", "KernelSite", "KernelTable", "PlanEstimate",
           "TableObjective", "default_table_path", "plan_kernels"]
