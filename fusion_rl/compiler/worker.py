"""The measurement job and the persistent worker process that runs it.

A TVM segfault or hang must cost one measurement, not the training run or search that asked
for it. So builds and timings run in a separate, persistent process (started once, reused for
many jobs; TVM and torch take seconds to import), and the parent waits with a timeout. A worker
that dies or overruns is killed and replaced, and the job is recorded as ``crashed`` or
``timeout``.

This module must not import tvm at module level: the worker's ``TVM_NUM_THREADS`` is read once,
when TVM creates its thread pool, and the parent sets it in the worker's environment.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Callable

from fusion_rl.errors import FusionRLError

#: Faults a request can inject, to test that callers survive them (tests/compiler/test_faults.py).
FAULTS = ("segfault", "hang_build", "hang_run", "exit", "raise")

#: Where a schedule provider that reports progress (``tuned``: one call per tuning task) sends
#: ``(done, total, label)`` while a job runs: in a worker process, a message to the parent
#: (:meth:`Worker.run` hands it to ``Worker.on_progress``); in-process, the caller's callback.
progress_sink: Callable[[int, "int | None", str], None] | None = None


class ModelChangedError(FusionRLError):
    """The model a worker loaded is not the one the caller measures (its file changed)."""


@dataclass(frozen=True)
class MeasureJob:
    """Everything a worker needs to compile, verify and time one plan (picklable)."""

    model: Any  #: fusion_rl.graph.model.ModelRef
    plan: dict  #: FusionPlan.to_dict()
    target: Any  #: a TargetSpec (or a name for parse_target)
    schedule: str
    schedule_kwargs: dict = field(default_factory=dict)
    protocol: Any = None  #: fusion_rl.compiler.timing.TimingProtocol
    per_kernel: bool = False
    fault: str | None = None  #: one of FAULTS, for fault-injection tests only
    fingerprint: str = ""  #: the model the caller measures; the worker checks it loaded that one
    timeout_s: float = 0.0  #: the caller's timeout; a remote device ends a session that outlives it


@dataclass(frozen=True)
class InterleavedJob:
    """Compile and verify several plans of one model, then time them repeat by repeat
    (:func:`fusion_rl.compiler.timing.time_interleaved`); picklable like :class:`MeasureJob`."""

    model: Any
    plans: tuple  #: FusionPlan.to_dict() of each plan
    target: Any
    schedule: str
    schedule_kwargs: dict = field(default_factory=dict)
    protocol: Any = None
    fingerprint: str = ""  #: as in MeasureJob


@dataclass(frozen=True)
class KernelJob:
    """Time some kernels of one plan alone (:mod:`fusion_rl.compiler.kernel_table`); picklable.

    ``kernels`` holds ``(key, PrimFunc name in the fused module, arg specs)`` per kernel.
    """

    model: Any
    plan: dict
    target: Any
    schedule: str
    schedule_kwargs: dict = field(default_factory=dict)
    protocol: Any = None
    kernels: tuple = ()
    fingerprint: str = ""  #: as in MeasureJob


def run_any(job: MeasureJob | InterleavedJob | KernelJob, models: dict | None = None) -> dict:
    """Run a job of any kind (the worker's dispatch)."""
    if isinstance(job, KernelJob):
        return run_kernel_job(job, models)
    if isinstance(job, MeasureJob) and getattr(job.target, "remote", None) is not None:
        from fusion_rl.compiler.rpc import run_remote_job

        return run_remote_job(job, models)  # built here, verified and timed on the device
    return run_interleaved_job(job, models) if isinstance(job, InterleavedJob) else run_job(job, models)


def run_kernel_job(job: KernelJob, models: dict | None = None) -> dict:
    """Apply and schedule ``job.plan`` as a build would, then compile and time only the
    requested kernels, each alone; ``times_ms`` maps each key to its repeats."""
    from fusion_rl.compiler.schedules.prepack import packed_arg_specs
    from fusion_rl.compiler.timing import TimingProtocol, time_kernels
    from fusion_rl.fusion.apply import apply_plan
    from fusion_rl.fusion.plan import FusionPlan

    def body(result: dict[str, Any]) -> None:
        model, target, provider = setup_job(job, models)
        fused = apply_plan(model.mod, FusionPlan.from_dict(job.plan), model.graph)
        scheduled = provider.schedule(fused, target)  # the whole module: providers see plans
        funcs = {key: scheduled[name] for key, name, _ in job.kernels}
        # Weights packed at compile time change the kernel's parameter shapes.
        specs = {key: packed_arg_specs(funcs[key], spec) for key, _, spec in job.kernels}
        times = time_kernels(funcs, specs, target, job.protocol or TimingProtocol())
        result.update(status="ok", times_ms=times)

    return guarded(body, {"status": "failed", "times_ms": {}})


def run_interleaved_job(job: InterleavedJob, models: dict | None = None) -> dict:
    """Build, verify and interleave-time ``job.plans``; ``times_ms`` holds one list per plan,
    ``num_kernels`` one count per plan, ``fork_join_us`` the host probe before each repeat.

    Any plan that fails to build or verify fails the whole comparison (the error names the
    plan): a comparison with a wrong or missing member means nothing.
    """
    from fusion_rl.compiler.build import compile_plan
    from fusion_rl.compiler.timing import TimingProtocol, time_interleaved
    from fusion_rl.compiler.verify import verify_executable
    from fusion_rl.fusion.plan import FusionPlan

    def body(result: dict[str, Any]) -> None:
        model, target, provider = setup_job(job, models)
        executables, kernels = [], []
        for data in job.plans:
            plan = FusionPlan.from_dict(data)
            compiled = compile_plan(model, plan, target, provider)
            verify_executable(compiled.executable, model, f"plan {plan.hash}")
            executables.append(compiled.executable)
            kernels.append(compiled.num_kernels)
        timings = time_interleaved(executables, model.inputs, job.protocol or TimingProtocol())
        result.update(status="ok", times_ms=[list(t.times_ms) for t in timings], num_kernels=kernels,
                      fork_join_us=list(timings[0].fork_join_us) if timings else [])

    return guarded(body, {"status": "failed", "times_ms": []})


def run_job(job: MeasureJob, models: dict | None = None) -> dict:
    """Compile, verify and time ``job``; returns a result dict (never raises for bad plans)."""
    from fusion_rl.compiler.timing import TimingProtocol, kernel_times, time_executable
    from fusion_rl.compiler.verify import verify_executable

    def body(result: dict[str, Any]) -> None:
        model, plan, compiled = build_job(job, models, result)
        result["verify"] = verify_executable(compiled.executable, model, f"plan {plan.hash}").to_dict()
        inject_fault(job.fault, "run")
        timing = time_executable(compiled.executable, model.inputs, job.protocol or TimingProtocol())
        result.update(status="ok", times_ms=list(timing.times_ms))
        if job.per_kernel:
            result["kernel_times_ms"] = kernel_times(compiled.executable, model.inputs)

    return guarded(body, {"status": "failed", "times_ms": [], "num_kernels": None})


def build_job(job: MeasureJob, models: dict | None, result: dict[str, Any]) -> tuple[Any, Any, Any]:
    """(model, plan, compiled plan) of ``job``, its build facts recorded in ``result``; the
    ``build`` fault fires first. Shared by the local job and the RPC job (built here)."""
    from fusion_rl.compiler.build import compile_plan
    from fusion_rl.fusion.plan import FusionPlan

    model, target, provider = setup_job(job, models)
    plan = FusionPlan.from_dict(job.plan)
    inject_fault(job.fault, "build")
    compiled = compile_plan(model, plan, target, provider)
    result.update(num_kernels=compiled.num_kernels, schedule_s=compiled.schedule_s,
                  build_s=compiled.build_s, kernel_schedules=compiled.schedules)
    return model, plan, compiled


def setup_job(job: MeasureJob | InterleavedJob, models: dict | None) -> tuple[Any, Any, Any]:
    """(model, TVM target, schedule provider) of a job; models are cached per worker."""
    from fusion_rl.compiler.schedules import make_schedule
    from fusion_rl.compiler.target import parse_target

    models = models if models is not None else {}
    provider = make_schedule(job.schedule, **job.schedule_kwargs)
    if hasattr(provider, "progress"):  # not part of the provider's options or its key
        provider.progress = progress_sink
    model = models.get((job.model, job.fingerprint))
    if model is None:
        model = job.model.load()
        if job.fingerprint and model.fingerprint != job.fingerprint:
            # The file behind the reference changed since the caller loaded it: a result here
            # would be stored under the other model's fingerprint.
            raise ModelChangedError(f"the model changed during the measurement (loaded {model.fingerprint}, "
                                    f"expected {job.fingerprint}); measure again")
        models[(job.model, job.fingerprint)] = model
    return model, parse_target(job.target).to_tvm(), provider


def guarded(body: Callable[[dict[str, Any]], None], result: dict[str, Any]) -> dict[str, Any]:
    """Run ``body(result)``; a wrong output, a fusion_rl error or any TVM-internal error becomes
    the result's status (a bad plan must not end the worker), and ``wall_s`` is always set."""
    from fusion_rl.errors import FusionRLError, VerificationError

    t0 = time.perf_counter()
    try:
        body(result)
    except ModelChangedError as exc:
        result.update(status="failed", error=str(exc), transient=True)  # not a verdict on the plan
    except VerificationError as exc:
        result.update(status="wrong_output", error=str(exc))
    except FusionRLError as exc:
        result.update(status="failed", error=str(exc))
    except Exception as exc:  # noqa: BLE001
        result.update(status="failed", error=f"{type(exc).__name__}: {exc}".splitlines()[0][:500])
        result["traceback"] = traceback.format_exc(limit=8)
    finally:
        result["wall_s"] = time.perf_counter() - t0
    return result


def inject_fault(fault: str | None, stage: str) -> None:
    """Simulate ``fault`` (see :data:`FAULTS`) at ``stage`` (``build`` or ``run``), for tests."""
    if fault is None:
        return
    if fault == "segfault" and stage == "build":
        os.kill(os.getpid(), signal.SIGSEGV)
    if fault == "exit" and stage == "build":
        os._exit(3)
    if fault == "raise" and stage == "build":
        raise RuntimeError("injected fault")
    if (fault == "hang_build" and stage == "build") or (fault == "hang_run" and stage == "run"):
        # Say that the hang has begun, so a test can act on the hanging worker without guessing
        # how long the stages before it take.
        marker = os.environ.get("FUSION_RL_FAULT_MARKER")
        if marker:
            Path(marker).write_text(stage)
        while True:
            time.sleep(3600)


def _serve(conn_in: Connection, conn_out: Connection) -> None:
    """The worker loop: receive a job, send its result, until ``None`` or EOF. Progress
    messages ``("progress", done, total, label)`` may precede a result."""
    global progress_sink
    models: dict = {}
    progress_sink = lambda done, total, label: conn_out.send(("progress", done, total, label))  # noqa: E731
    while True:
        try:
            job = conn_in.recv()
        except (EOFError, KeyboardInterrupt):
            return
        if job is None:
            return
        conn_out.send(run_any(job, models))


class Worker:
    """One persistent measurement process (``python -m fusion_rl.compiler.worker``).

    A fresh interpreter rather than ``multiprocessing``: the spawn start method re-imports the
    caller's ``__main__``, which breaks user scripts without a main guard, and fork after TVM or
    torch started threads is unsafe. The environment sets ``TVM_NUM_THREADS`` before tvm loads.
    """

    def __init__(self, num_threads: int) -> None:
        from fusion_rl.compiler.target import worker_env

        self.num_threads = num_threads
        #: Gets ``(done, total, label)`` of the running job's progress messages, if set.
        self.on_progress: Callable[[int, int | None, str], None] | None = None
        job_r, job_w = os.pipe()
        res_r, res_w = os.pipe()
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "fusion_rl.compiler.worker", str(job_r), str(res_w)],
            pass_fds=(job_r, res_w),
            env=worker_env(num_threads),
            stdin=subprocess.DEVNULL,
        )
        os.close(job_r)
        os.close(res_w)
        self._send = Connection(job_w, readable=False)
        self._recv = Connection(res_r, writable=False)

    @property
    def alive(self) -> bool:
        return self._proc.poll() is None

    def run(self, job: MeasureJob | InterleavedJob, timeout_s: float) -> dict:
        """Send ``job``; wait at most ``timeout_s``. Kills the worker on timeout or crash."""
        t0 = time.perf_counter()
        deadline = time.monotonic() + timeout_s
        timed_out = True
        try:
            self._send.send(job)
            while self._recv.poll(max(0.0, deadline - time.monotonic())):
                message = self._recv.recv()  # EOFError here: the worker died mid-job
                if isinstance(message, tuple) and message and message[0] == "progress":
                    if self.on_progress is not None:
                        self.on_progress(*message[1:])
                    continue
                return message
        except (EOFError, OSError):
            timed_out = False
        wall = time.perf_counter() - t0
        if timed_out:
            self.kill()
            return {"status": "timeout", "error": f"no result within {timeout_s:g} s", "wall_s": wall}
        transient = False
        try:
            code = self._proc.wait(timeout=10)  # a crash handler may still be printing
            what = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
            # Killed from outside (the OOM killer, a user): says nothing about the plan.
            transient = code in (-signal.SIGKILL, -signal.SIGTERM, -signal.SIGINT)
        except subprocess.TimeoutExpired:
            what = "closed its pipe"
        self.kill()
        return {"status": "crashed", "error": f"worker died ({what})", "wall_s": wall, "transient": transient}

    def kill(self) -> None:
        if self.alive:
            self._proc.kill()
        self._proc.wait()
        for conn in (self._send, self._recv):
            try:
                conn.close()
            except OSError:
                pass

    def close(self) -> None:
        if self.alive:
            try:
                self._send.send(None)
                self._proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self.kill()


def _die_with_parent() -> None:
    """Ask Linux to kill this worker when its parent dies, so an interrupted search or
    training run leaves no orphan still tuning or timing (no-op elsewhere)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)


if __name__ == "__main__":
    # Run the package's copy of this module, not ``__main__``'s: jobs arrive pickled as
    # ``fusion_rl.compiler.worker.InterleavedJob``, and isinstance against ``__main__.InterleavedJob``
    # would fail.
    from fusion_rl.compiler import worker as _package

    _package._die_with_parent()
    _package._serve(Connection(int(sys.argv[1]), writable=False),
                    Connection(int(sys.argv[2]), readable=False))
