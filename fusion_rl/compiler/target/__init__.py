"""Named compilation targets, their thread settings, and a hardware feature vector.

A :class:`TargetSpec` is the one place that says *what* we compile for: an LLVM CPU model
(``mcpu``) plus a thread count, or a CUDA architecture. Its :attr:`TargetSpec.key` is part of
every measurement's key in the store, so two specs with the same key must produce the same code
and run with the same parallelism.

Named targets (see :data:`TARGET_NAMES`):

- ``{x86-64, haswell, sapphirerapids}-t{1, 2}``: genuinely different LLVM code generation
  (SSE2, AVX2, AVX-512) on any modern x86 host, used for "transfer across hardware" on one machine;
- ``host``: the detected host CPU model with all usable cores (:func:`detect_host_mcpu`);
- ``cuda``: the first CUDA device, with its ``sm_XY`` arch; only usable where TVM sees a GPU.

Free forms accepted by :func:`parse_target`: ``llvm:<mcpu>:t<N>`` (any CPU name the bundled LLVM
accepts, e.g. ``llvm:znver4:t2``) and ``cuda:sm_<XY>`` (no device needed; for keys and
cross-compilation).

TVM is imported lazily so that parsing a target name is cheap and a measurement worker can set
``TVM_NUM_THREADS`` (see :func:`threads_env`) before any TVM code runs.

The package has five modules: :mod:`~fusion_rl.compiler.target.spec` (:class:`TargetSpec`,
names, :func:`parse_target`), :mod:`~fusion_rl.compiler.target.host` (host CPU and CUDA
detection), :mod:`~fusion_rl.compiler.target.threads` (TVM's thread pool),
:mod:`~fusion_rl.compiler.target.hardware` (the hardware feature vector, measured robustly) and
:mod:`~fusion_rl.compiler.target.normalize` (its normalisation with training statistics).
"""

from fusion_rl.compiler.target.hardware import (
    HardwareFeatures,
    cache_sizes,
    default_hw_cache_dir,
    hardware_features,
    is_loaded,
    machine_load,
    measured_rates,
    rates_record,
    run_microbenchmark,
)
from fusion_rl.compiler.target.host import (
    MCPU_LADDER,
    cuda_available,
    cuda_spec,
    detect_host_mcpu,
    host_num_threads,
    host_spec,
    missing_isa,
    read_cpuinfo,
    require_runnable,
    runs_on,
)
from fusion_rl.compiler.target.spec import (
    NAMED_MCPUS,
    NAMED_TARGETS,
    NAMED_THREADS,
    TARGET_NAMES,
    TargetSpec,
    check_target_name,
    llvm_accepts,
    parse_target,
)
from fusion_rl.compiler.target.normalize import HardwareStats
from fusion_rl.compiler.target.threads import threads_env, worker_env

__all__ = [
    "MCPU_LADDER", "NAMED_MCPUS", "NAMED_TARGETS", "NAMED_THREADS", "TARGET_NAMES", "HardwareFeatures",
    "HardwareStats", "TargetSpec", "cache_sizes", "check_target_name", "cuda_available", "cuda_spec",
    "default_hw_cache_dir", "detect_host_mcpu", "hardware_features", "host_num_threads", "host_spec",
    "is_loaded", "llvm_accepts", "machine_load", "measured_rates", "missing_isa", "rates_record", "parse_target", "read_cpuinfo",
    "require_runnable", "run_microbenchmark", "runs_on", "threads_env", "worker_env",
]
