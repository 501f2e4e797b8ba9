"""Thread settings: TVM's thread pool, worker environments, and running with N threads in-process."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, Iterator

from fusion_rl.compiler.target.spec import TargetSpec
from fusion_rl.errors import ConfigError

# Finding (TVM 0.27.0.post1, verified here): TVM's CPU thread pool is created lazily at the
# first parallel kernel launch *or* the first call of ``runtime.NumThreads``, and reads
# TVM_NUM_THREADS only then. Importing tvm and compiling do not create it. After creation,
# changing the environment variable has no effect; ``runtime.config_threadpool`` can lower the
# number of workers and raise it back, but never above the count the pool was created with.
# Without TVM_NUM_THREADS, TVM uses half the cores on x86 (one thread on this 2-core machine).
#
# Hence: measurement workers are fresh processes that get TVM_NUM_THREADS in their environment
# (:func:`worker_env`) before tvm runs anything. In-process, :func:`threads_env` works when the
# pool does not exist yet or is at least as large as requested, and raises otherwise.


def worker_env(spec: TargetSpec | int, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a fresh worker process that times code for ``spec``.

    Sets ``TVM_NUM_THREADS`` (read once by TVM at thread-pool creation) and the BLAS/OpenMP
    counts, so that helper libraries in the worker do not oversubscribe the cores.
    """
    n = spec if isinstance(spec, int) else spec.num_threads
    env = dict(os.environ if base is None else base)
    for var in ("TVM_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(n)
    return env


def _tvm_pool_functions() -> tuple[Any, Any] | None:
    if "tvm" not in sys.modules:  # TVM not imported: nothing has a pool yet
        return None
    import tvm

    return tvm.get_global_func("runtime.NumThreads"), tvm.get_global_func("runtime.config_threadpool")


# Mode 1 is ThreadGroup::kBig, the mode TVM uses when it creates the pool.
_POOL_MODE_BIG = 1


@contextlib.contextmanager
def threads_env(spec: TargetSpec | int) -> Iterator[int]:
    """Run TVM code with ``spec.num_threads`` threads, then restore the previous setting.

    Sets ``TVM_NUM_THREADS`` and, when tvm is already imported, makes the live thread pool
    match (creating it at this size if it does not exist yet).

    Raises
    ------
    ConfigError
        when this process's TVM pool already exists with fewer threads than
        requested (TVM cannot grow it); run the work in a fresh process with :func:`worker_env`.
    """
    n = spec if isinstance(spec, int) else spec.num_threads
    if n < 1:
        raise ConfigError(f"thread count must be >= 1, got {n}")
    old_env = os.environ.get("TVM_NUM_THREADS")
    os.environ["TVM_NUM_THREADS"] = str(n)
    restore_pool: int | None = None
    try:
        funcs = _tvm_pool_functions()
        if funcs is not None:
            num_threads, config_pool = funcs
            current = int(num_threads())  # creates the pool at size n if it does not exist
            if current != n:
                config_pool(_POOL_MODE_BIG, n)
                if int(num_threads()) != n:
                    config_pool(_POOL_MODE_BIG, current)
                    raise ConfigError(
                        f"TVM's thread pool in this process was created with {current} threads and "
                        f"cannot grow to {n}; TVM reads TVM_NUM_THREADS once. Run the work in a fresh "
                        "process started with fusion_rl.compiler.target.worker_env(spec)"
                    )
                restore_pool = current
        yield n
    finally:
        if restore_pool is not None:
            funcs = _tvm_pool_functions()
            if funcs is not None:
                funcs[1](_POOL_MODE_BIG, restore_pool)
        if old_env is None:
            os.environ.pop("TVM_NUM_THREADS", None)
        else:
            os.environ["TVM_NUM_THREADS"] = old_env
