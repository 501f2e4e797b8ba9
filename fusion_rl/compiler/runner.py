"""Runners: where a :class:`~fusion_rl.compiler.measure.Measurer` runs its jobs.

- :class:`LocalRunner` (targets without ``rpc://``): builds, verifies and times on this machine,
  in a persistent worker process (:class:`~fusion_rl.compiler.worker.Worker`) that a crash or a
  hang costs one measurement, or in this process (``isolate=False``).
- :class:`RpcRunner` (``rpc://HOST:PORT/KEY:<target>``): the local worker builds for the
  device's target, then verifies and times on a device the tracker hands out
  (:mod:`fusion_rl.compiler.rpc`). Always isolated: the worker's timeout is what turns a hung
  device into a ``timeout`` record instead of a hung search.

Both return the same result dict, so a measurement record does not depend on where it was
taken, except through the target key (which names the device pool).

Several runners measure in parallel through :class:`~fusion_rl.compiler.pool.MeasurerPool`.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Protocol

from fusion_rl.compiler.target import TargetSpec, threads_env
from fusion_rl.compiler.worker import InterleavedJob, KernelJob, MeasureJob, Worker, run_any
from fusion_rl.errors import ConfigError
from fusion_rl.graph.model import Model


class Runner(Protocol):
    """Runs one measurement job at a time and returns its result dict."""

    name: str

    def run(self, job: Any, model: Model) -> dict:
        """Run ``job`` (of ``model``); never raises for a bad plan, a crash or a hang."""

    def close(self) -> None:
        """Stop whatever the runner started."""


class LocalRunner:
    """Run jobs on this machine: in a worker process (``isolate``) or in this process.

    Parameters
    ----------
    spec:
        The target (its thread count sets the worker's ``TVM_NUM_THREADS``).
    isolate:
        Use a worker process, killed and replaced after a crash or a timeout.
    timeout_s:
        How long a job may take in the worker.
    """

    name = "local"

    def __init__(self, spec: TargetSpec, isolate: bool = True, timeout_s: float = 600.0) -> None:
        self.spec, self.isolate, self.timeout_s = spec, isolate, timeout_s
        self._worker: Worker | None = None
        self._worker_thread: threading.Thread | None = None
        self._models: dict = {}
        #: ``progress(done, total, label)`` while a job runs (tuning reports each task).
        self.progress: Callable[[int, int | None, str], None] | None = None

    def run(self, job: Any, model: Model) -> dict:
        if not self.isolate:
            from fusion_rl.compiler import worker

            self._models.setdefault((job.model, job.fingerprint), model)
            sink, worker.progress_sink = worker.progress_sink, self.progress
            try:
                with threads_env(self.spec):
                    return run_any(job, self._models)
            finally:
                worker.progress_sink = sink
        if self._worker is not None and self._worker_thread is not None and not self._worker_thread.is_alive():
            # The worker dies with the *thread* that started it (PR_SET_PDEATHSIG), e.g. a
            # thread of a pool or of the caller that has since ended: start a fresh one rather
            # than lose a measurement to a worker killed under it.
            self._worker.kill()
            self._worker = None
        if self._worker is None or not self._worker.alive:
            self._worker = Worker(self.spec.num_threads)
            self._worker_thread = threading.current_thread()
        self._worker.on_progress = self.progress
        result = self._worker.run(job, self.timeout_s)
        if not self._worker.alive:
            # Killed after a crash or a timeout; the next job starts a fresh one. (A device that
            # went away is ``crashed`` too, but the worker that reported it lives on.)
            self._worker = None
        return result

    def close(self) -> None:
        if self._worker is not None:
            self._worker.close()
            self._worker = None


class RpcRunner(LocalRunner):
    """Build here, verify and time on a device of ``spec.remote`` (see :mod:`fusion_rl.compiler.rpc`).

    Only whole-model measurements (:class:`~fusion_rl.compiler.worker.MeasureJob`) without
    per-kernel times run remotely: per-kernel timing instruments the VM with a Python callback,
    which cannot cross the RPC connection.
    """

    name = "rpc"

    def __init__(self, spec: TargetSpec, isolate: bool = True, timeout_s: float = 600.0) -> None:
        if spec.remote is None:
            raise ConfigError(f"target {spec.name} has no remote device; use a LocalRunner")
        # ``isolate`` is ignored: only a worker's timeout can end a session with a hung device.
        super().__init__(spec, isolate=True, timeout_s=timeout_s)

    def run(self, job: Any, model: Model) -> dict:
        if isinstance(job, (InterleavedJob, KernelJob)) or (isinstance(job, MeasureJob) and job.per_kernel):
            what = "per-kernel times" if isinstance(job, MeasureJob) else type(job).__name__
            raise ConfigError(f"{what} are not measured on remote targets ({self.spec.name}) yet; "
                              "measure whole models there")
        return super().run(job, model)


def make_runner(spec: TargetSpec, isolate: bool = True, timeout_s: float = 600.0) -> LocalRunner:
    """The runner for ``spec``: :class:`RpcRunner` for ``rpc://`` targets, else :class:`LocalRunner`."""
    return (RpcRunner if spec.remote is not None else LocalRunner)(spec, isolate=isolate, timeout_s=timeout_s)
