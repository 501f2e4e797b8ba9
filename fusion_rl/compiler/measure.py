"""Measure plans: served from the store when known, else compiled and timed in a worker.

:class:`Measurer` is the one entry point the layers above (CLI, env, search, evaluation) use to
get a latency. Every measurement is a :class:`~fusion_rl.compiler.store.MeasurementRecord` keyed
by (model fingerprint, plan hash, target, schedule provider, budget, library versions, timing
protocol); an identical request is served from the store and costs nothing.

A failure is remembered too (a crash is not paid for twice), but only for requests that would
have failed the same way: its key also holds the timeout (:meth:`Measurer.failure_key`), so a
run with ``--timeout 0.001`` never poisons a later run with the default timeout. Failures that
say nothing about the plan (the worker killed from outside, the model file changed during the
measurement) are not stored at all.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from fusion_rl.compiler.regime import NearFloor
from fusion_rl.compiler.runner import LocalRunner, make_runner
from fusion_rl.compiler.schedules import make_schedule
from fusion_rl.compiler.store import STATUSES, MeasurementKey, MeasurementRecord, MeasurementStore, library_versions
from fusion_rl.compiler.target import TargetSpec, parse_target, require_runnable
from fusion_rl.compiler.timing import TimingProtocol
from fusion_rl.compiler.worker import FAULTS, InterleavedJob, MeasureJob
from fusion_rl.errors import ConfigError
from fusion_rl.fusion.legality import require_legal
from fusion_rl.fusion.plan import FusionPlan
from fusion_rl.graph.model import Model


@dataclass
class MeasureStats:
    """Counters: measurements are the currency of search and RL training alike."""

    hits: int = 0  #: served from the store
    misses: int = 0  #: compiled and timed (what a search or training run *spends*)
    failures: int = 0  #: misses that did not give a latency (failed, wrong, crashed, timeout)

    def to_dict(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "failures": self.failures}


@dataclass
class Measurer:
    """Measure (model, plan) pairs on one target under one schedule provider.

    Parameters
    ----------
    target:
        A target name (``host``, ``haswell-t1``, ``rpc://HOST:PORT/KEY:host``, ...) or spec. An
        ``rpc://`` target is measured on a device of a TVM RPC tracker
        (:class:`~fusion_rl.compiler.runner.RpcRunner`); any other on this machine
        (:class:`~fusion_rl.compiler.runner.LocalRunner`).
    schedule, schedule_kwargs:
        The schedule provider, e.g. ``"tuned"`` with ``{"trials_per_task": 16}``.
    store:
        Where records live; ``None`` measures without remembering.
    protocol:
        The timing protocol.
    isolate:
        Run builds and timings in a worker process with ``timeout_s`` (default). ``False`` runs
        them in this process: faster to start, but a TVM crash takes the caller with it.
        Remote targets always use a worker.
    retry:
        Statuses of stored records to measure again instead of serving, e.g.
        ``("crashed", "timeout")`` after a fix (a crash is otherwise remembered, so a search or
        training run does not pay for it twice). The new record replaces the old one.
    """

    target: str | TargetSpec = "host"
    schedule: str = "naive"
    schedule_kwargs: dict[str, Any] = field(default_factory=dict)
    store: MeasurementStore | None = None
    protocol: TimingProtocol = field(default_factory=TimingProtocol)
    isolate: bool = True
    timeout_s: float = 600.0
    retry: tuple[str, ...] = ()
    stats: MeasureStats = field(default_factory=MeasureStats)
    #: ``progress(done, total, label)`` while a job runs: the ``tuned`` provider reports each
    #: tuning task (minutes each), the rest report nothing. Not part of any key.
    progress: Callable[[int, int | None, str], None] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not (isinstance(self.timeout_s, (int, float)) and math.isfinite(self.timeout_s) and self.timeout_s > 0):
            raise ConfigError(f"timeout_s must be a finite number of seconds > 0, got {self.timeout_s!r}")
        failures = set(STATUSES) - {"ok"}
        if not set(self.retry) <= failures:
            raise ConfigError(f"retry: statuses to re-measure must be among {sorted(failures)}, "
                              f"got {sorted(self.retry)}")
        self.spec = parse_target(self.target)
        # Validates the provider name and options up front (bad budget, unknown name).
        self.provider = make_schedule(self.schedule, **self.schedule_kwargs)
        self.runner: LocalRunner = make_runner(self.spec, isolate=self.isolate, timeout_s=self.timeout_s)
        self._versions = library_versions()
        #: measurements each remote device (``host:port`` of its RPC server) served
        self.devices: Counter[str] = Counter()
        #: this host's near fork-join probe at the target's threads, which head-to-head
        #: comparisons judge their repeats' regime by; ``None`` for a remote or GPU target
        self.near_floor: NearFloor | None = NearFloor.for_target(self.spec)

    def key(self, model: Model, plan: FusionPlan) -> MeasurementKey:
        return MeasurementKey(
            model_fingerprint=model.fingerprint,
            plan_hash=plan.hash,
            target=self.spec.key,
            provider=self.provider.key,
            budget=self.provider.budget,
            versions=self._versions,
            protocol=self.protocol.key,
        )

    def failure_key(self, key: MeasurementKey) -> MeasurementKey:
        """Where a failed measurement of ``key`` is stored: the key plus this measurer's
        timeout, because a timeout (or a crash under memory pressure) is a verdict on the
        request, not only on the plan."""
        return dataclasses.replace(key, protocol=f"{key.protocol};timeout={self.timeout_s:g}s")

    def _lookup(self, key: MeasurementKey) -> MeasurementRecord | None:
        if self.store is None:
            return None
        record = self.store.get(key)
        if record is not None and record.status == "ok":
            return record
        # A failure under the plain key was stored by a fusion_rl that did not key failures by
        # their timeout: it may come from another timeout, so it is measured again.
        return self.store.get(self.failure_key(key))

    def cached(self, model: Model, plan: FusionPlan) -> MeasurementRecord | None:
        """The stored record this request would be served, if any; never measures."""
        return self._lookup(self.key(model, plan))

    def measure(
        self, model: Model, plan: FusionPlan, per_kernel: bool = False, fault: str | None = None
    ) -> MeasurementRecord:
        """The record for (model, plan): from the store, or measured now and stored.

        An illegal plan raises :class:`~fusion_rl.errors.IllegalPlanError` (a user error, not a
        measurement). A plan that fails to build, gives a wrong output, crashes or hangs yields
        a record with that status, which is stored too, so it is not retried without reason.
        """
        if fault is not None and fault not in FAULTS:
            raise ConfigError(f"unknown fault {fault!r}; injectable faults: {', '.join(FAULTS)}")
        require_legal(model.graph, plan)
        key = self.key(model, plan)
        if self.store is not None and fault is None:
            record = self._lookup(key)
            if record is not None and record.status not in self.retry \
                    and (not per_kernel or record.kernel_times_ms is not None):
                self.stats.hits += 1
                return record
        self._require_runnable()
        job = MeasureJob(
            model=model.ref,
            fingerprint=model.fingerprint,
            plan=plan.to_dict(),
            target=self.spec,
            schedule=self.schedule,
            schedule_kwargs=dict(self.schedule_kwargs),
            protocol=self.protocol,
            per_kernel=per_kernel,
            fault=fault,
            timeout_s=self.timeout_s,
        )
        result = self._run(job, model)
        self.stats.misses += 1
        if result.get("device"):
            self.devices[result["device"]] += 1
        record = _to_record(key if result["status"] == "ok" else self.failure_key(key), result)
        if record.status != "ok":
            self.stats.failures += 1
        if self.store is not None and fault is None and not result.get("transient"):
            self.store.put(record)
        return record

    def _require_runnable(self) -> None:
        """Refuse, before anything runs or is stored, a target this CPU cannot execute (its
        code would die with SIGILL), or a remote target whose tracker is unreachable or has no
        server of its key; checked once per measurer."""
        if not getattr(self, "_runnable", False):
            require_runnable(self.spec)
            if self.spec.remote is not None:
                from fusion_rl.compiler.rpc import require_device

                require_device(self.spec.remote)  # a reachable tracker with servers of the key
            self._runnable = True

    def time_together(self, model: Model, plans: Sequence[FusionPlan]) -> dict[str, Any]:
        """Time ``plans`` of ``model`` repeat by repeat in one build (never from the store).

        Returns ``{"status", "error", "times_ms": [one list per plan], "fork_join_us": [one
        probe per repeat], "wall_s"}``; see
        :func:`fusion_rl.compiler.timing.time_interleaved` for why. Not a measurement record:
        nothing is stored, and the counters count it as one miss.
        """
        for plan in plans:
            require_legal(model.graph, plan)
        self._require_runnable()
        job = InterleavedJob(model=model.ref, fingerprint=model.fingerprint, plans=tuple(p.to_dict() for p in plans), target=self.spec,
                         schedule=self.schedule, schedule_kwargs=dict(self.schedule_kwargs),
                         protocol=self.protocol)
        result = self._run(job, model)
        self.stats.misses += 1
        if result["status"] != "ok":
            self.stats.failures += 1
        return result

    def run_job(self, job: Any, model: Model) -> dict:
        """Run another worker job (e.g. a :class:`~fusion_rl.compiler.worker.KernelJob`) on
        this measurer's worker and target threads; never stored, counted as one miss."""
        result = self._run(job, model)
        self.stats.misses += 1
        if result["status"] != "ok":
            self.stats.failures += 1
        return result

    @property
    def _worker(self) -> Any:
        """The runner's worker process, ``None`` before the first job or after a crash (tests)."""
        return self.runner._worker

    def _run(self, job: MeasureJob | InterleavedJob, model: Model) -> dict:
        self.runner.timeout_s = self.timeout_s  # callers may change it between measurements
        self.runner.progress = self.progress
        return self.runner.run(job, model)

    def close(self) -> None:
        self.runner.close()

    def __enter__(self) -> "Measurer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _to_record(key: MeasurementKey, result: dict) -> MeasurementRecord:
    extra = {
        "num_kernels": result.get("num_kernels"),
        "kernel_times_ms": result.get("kernel_times_ms"),
        "kernel_schedules": result.get("kernel_schedules"),
        "wall_s": float(result.get("wall_s", 0.0)),
    }
    if result["status"] == "ok":
        return MeasurementRecord.from_times(key, result["times_ms"], **extra)
    return MeasurementRecord(key=key, status=result["status"], error=result.get("error"), **extra)
