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
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import platform
import re
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Iterator

import numpy as np

from fusion_rl.errors import ConfigError, MeasurementError

if TYPE_CHECKING:  # pragma: no cover - typing only
    import tvm

#: CPU models of the named LLVM targets, from the oldest ISA to the newest.
NAMED_MCPUS: tuple[str, ...] = ("x86-64", "haswell", "sapphirerapids")
#: Thread counts of the named LLVM targets.
NAMED_THREADS: tuple[int, ...] = (1, 2)

#: fp32 SIMD lanes of the widest vector ISA each known ``mcpu`` enables (SSE2 4, AVX2 8,
#: AVX-512 16). Other CPU names are resolved through LLVM's feature list.
_VECTOR_LANES: dict[str, int] = {
    "x86-64": 4,
    "haswell": 8,
    "skylake-avx512": 16,
    "sapphirerapids": 16,
}

_KINDS = ("llvm", "cuda")


@dataclasses.dataclass(frozen=True)
class TargetSpec:
    """What to compile for: an LLVM CPU model and thread count, or a CUDA architecture.

    :param name: The user-facing name (``haswell-t2``, ``host``, ``cuda``, ...).
    :param kind: ``"llvm"`` or ``"cuda"``.
    :param mcpu: LLVM CPU name (``llvm`` only), e.g. ``"sapphirerapids"``.
    :param num_threads: Threads TVM's runtime uses (``TVM_NUM_THREADS``) when tuning and timing
        on the CPU. For ``cuda`` it is the host-side thread count and not part of the key.
    :param arch: CUDA architecture, e.g. ``"sm_90"`` (``cuda`` only).
    """

    name: str
    kind: str
    mcpu: str | None = None
    num_threads: int = 1
    arch: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ConfigError(f"target kind {self.kind!r} is not supported; use one of {_KINDS}")
        if self.kind == "llvm" and not self.mcpu:
            raise ConfigError(f"llvm target {self.name!r} needs an mcpu, e.g. 'haswell'")
        if self.kind == "cuda" and not (self.arch and re.fullmatch(r"sm_\d+[a-z]?", self.arch)):
            raise ConfigError(f"cuda target {self.name!r} needs an arch like 'sm_90', got {self.arch!r}")
        if not isinstance(self.num_threads, int) or self.num_threads < 1:
            raise ConfigError(f"target {self.name!r}: num_threads must be an int >= 1, got {self.num_threads!r}")

    @property
    def key(self) -> str:
        """Stable identifier for the measurement store, e.g. ``"llvm-sapphirerapids-t2"``.

        It names the generated code and the parallelism, not the user-facing name: ``host`` on a
        machine detected as ``sapphirerapids`` with 2 cores shares records with
        ``sapphirerapids-t2``, because both compile and run identically.
        """
        if self.kind == "llvm":
            return f"llvm-{self.mcpu}-t{self.num_threads}"
        return f"cuda-{self.arch}"

    def to_tvm(self) -> tvm.target.Target:
        """Build the ``tvm.target.Target`` (TVM 0.27 accepts only the dict form).

        ``num-cores`` tells MetaSchedule how many parallel jobs to plan for; the runtime thread
        count itself comes from ``TVM_NUM_THREADS`` (see :func:`threads_env`).
        """
        from tvm.target import Target

        if self.kind == "llvm":
            return Target({"kind": "llvm", "mcpu": self.mcpu, "num-cores": self.num_threads})
        return Target({"kind": "cuda", "arch": self.arch, "host": {"kind": "llvm"}})

    @property
    def vector_lanes(self) -> int:
        """fp32 SIMD lanes of the target: 4 (SSE2), 8 (AVX2), 16 (AVX-512); 32 (a warp) on CUDA."""
        if self.kind == "cuda":
            return 32
        assert self.mcpu is not None
        if self.mcpu in _VECTOR_LANES:
            return _VECTOR_LANES[self.mcpu]
        return _llvm_vector_lanes(self.mcpu)


def _named_llvm_specs() -> dict[str, TargetSpec]:
    specs = {}
    for mcpu in NAMED_MCPUS:
        for n in NAMED_THREADS:
            name = f"{mcpu}-t{n}"
            specs[name] = TargetSpec(name=name, kind="llvm", mcpu=mcpu, num_threads=n)
    return specs


#: The fixed named LLVM targets (independent of the machine).
NAMED_TARGETS: dict[str, TargetSpec] = _named_llvm_specs()
#: Every name :func:`parse_target` accepts besides the ``llvm:``/``cuda:`` free forms.
TARGET_NAMES: tuple[str, ...] = (*NAMED_TARGETS, "host", "cuda")


def parse_target(name: str | TargetSpec) -> TargetSpec:
    """Resolve a target name (or pass a :class:`TargetSpec` through).

    Accepted: the names in :data:`TARGET_NAMES`, ``llvm:<mcpu>:t<N>`` and ``cuda:sm_<XY>``.

    :raises ConfigError: for an unknown name (the message lists the valid ones), a CPU name the
        bundled LLVM rejects, or ``cuda`` where no CUDA device is visible.
    """
    if isinstance(name, TargetSpec):
        return name
    text = str(name).strip()
    if text in NAMED_TARGETS:
        return NAMED_TARGETS[text]
    if text == "host":
        return host_spec()
    if text == "cuda":
        return cuda_spec()
    m = re.fullmatch(r"llvm:([A-Za-z0-9_.\-]+):t(\d+)", text)
    if m:
        mcpu, threads = m.group(1), int(m.group(2))
        if threads < 1:
            raise ConfigError(f"target {text!r}: thread count must be >= 1")
        if mcpu not in _VECTOR_LANES and not _llvm_accepts(mcpu):
            raise ConfigError(
                f"target {text!r}: LLVM in this TVM build does not know CPU {mcpu!r}; "
                "see tvm.target.codegen.llvm_get_cpu_archlist() for valid names"
            )
        return TargetSpec(name=f"{mcpu}-t{threads}", kind="llvm", mcpu=mcpu, num_threads=threads)
    m = re.fullmatch(r"cuda:(sm_\d+[a-z]?)", text)
    if m:
        return TargetSpec(name=text, kind="cuda", arch=m.group(1))
    raise ConfigError(
        f"unknown target {text!r}; valid names: {', '.join(TARGET_NAMES)}, "
        "or the forms 'llvm:<mcpu>:t<N>' and 'cuda:sm_<XY>'"
    )


def check_target_name(name: Any) -> str:
    """Check that ``name`` is a target :func:`parse_target` accepts, without detecting the
    host or a GPU (so a config can be validated on any machine); returns the name."""
    if not isinstance(name, str):
        raise ConfigError(f"a target name must be a string, got {name!r}")
    if name.strip() not in TARGET_NAMES:
        parse_target(name)  # the free forms; raises ConfigError for anything else
    return name


# --------------------------------------------------------------------------------------------
# Host and CUDA detection
# --------------------------------------------------------------------------------------------


def _read_cpuinfo(path: str | os.PathLike[str] = "/proc/cpuinfo") -> tuple[set[str], str]:
    """Return (flags of the first CPU, model name); empty when the file is unreadable."""
    flags: set[str] = set()
    model = ""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return flags, model
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "flags" and not flags:
            flags = set(value.split())
        elif key == "model name" and not model:
            model = value.strip()
        if flags and model:
            break
    return flags, model


#: LLVM CPU names tried for ``host``, most capable first; the first whose instruction set the
#: host has (:func:`_runs_on`) and that LLVM knows wins. AMD and Intel names interleave: Zen 4
#: has AVX-512 (with BF16 and VNNI) but not AMX, AVX512-FP16 or VEX AVX-VNNI, so it must not get
#: ``sapphirerapids`` code.
_MCPU_LADDER = ("sapphirerapids", "znver4", "cooperlake", "cascadelake", "skylake-avx512",
                "znver3", "znver2", "haswell", "x86-64")

#: LLVM x86 features that change the instructions user code may contain, and the
#: ``/proc/cpuinfo`` flag that says the CPU executes them. A feature missing here is not checked
#: (tuning flags such as ``prefer-256-bit``, or system instructions compilers do not emit).
_ISA_FLAGS = {
    "sse3": "pni", "ssse3": "ssse3", "sse4.1": "sse4_1", "sse4.2": "sse4_2", "sse4a": "sse4a",
    "avx": "avx", "avx2": "avx2", "fma": "fma", "fma4": "fma4", "xop": "xop", "f16c": "f16c",
    "bmi": "bmi1", "bmi2": "bmi2", "lzcnt": "abm", "popcnt": "popcnt", "movbe": "movbe",
    "aes": "aes", "pclmul": "pclmulqdq", "vpclmulqdq": "vpclmulqdq", "vaes": "vaes",
    "gfni": "gfni", "sha": "sha_ni", "adx": "adx",
    "avx512f": "avx512f", "avx512bw": "avx512bw", "avx512cd": "avx512cd", "avx512dq": "avx512dq",
    "avx512vl": "avx512vl", "avx512ifma": "avx512ifma", "avx512vbmi": "avx512vbmi",
    "avx512vbmi2": "avx512_vbmi2", "avx512bitalg": "avx512_bitalg", "avx512vnni": "avx512_vnni",
    "avx512vpopcntdq": "avx512_vpopcntdq", "avx512bf16": "avx512_bf16",
    "avx512fp16": "avx512_fp16", "avxvnni": "avx_vnni", "amx-tile": "amx_tile",
    "amx-bf16": "amx_bf16", "amx-int8": "amx_int8",
}


def _missing_isa(mcpu: str, flags: set[str]) -> list[str] | None:
    """The instruction sets code for ``mcpu`` may use that the CPU with ``flags`` lacks
    (LLVM's names, sorted); ``None`` when LLVM cannot say (no LLVM, unknown name)."""
    try:
        import tvm
        from tvm.target import codegen

        features = set(codegen.llvm_get_cpu_features(tvm.target.Target({"kind": "llvm", "mcpu": mcpu})))
    except Exception:  # noqa: BLE001 - no LLVM, or LLVM does not know the name
        return None
    return sorted(f for f in features if f in _ISA_FLAGS and _ISA_FLAGS[f] not in flags)


def _runs_on(mcpu: str, flags: set[str]) -> bool:
    """Whether code compiled for ``mcpu`` only uses instruction sets the CPU with ``flags`` has.

    Why: on AMD Zen 4 (this project's machine) ``sapphirerapids`` code died with SIGILL on a
    ``{vex} vpdpwssd`` (AVX-VNNI) that LLVM emitted in an fp32 transformer kernel.
    """
    return _missing_isa(mcpu, flags) == []


def require_runnable(spec: TargetSpec, cpuinfo_path: str | os.PathLike[str] = "/proc/cpuinfo") -> None:
    """Refuse, in one line, to *run* code for an LLVM target whose instructions this CPU lacks.

    Compiling for such a target is fine (cross-compilation); measuring, verifying or running
    its code here would die with SIGILL, and a measurement would store that crash. Where
    ``/proc/cpuinfo`` lists no flags (not Linux, not x86) nothing is checked.

    :raises ConfigError: naming the target and the missing instruction sets.
    """
    if spec.kind != "llvm" or platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return
    flags, model = _read_cpuinfo(cpuinfo_path)
    if not flags:
        return
    missing = _missing_isa(str(spec.mcpu), flags)
    if missing:
        shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        raise ConfigError(
            f"target {spec.name} ({spec.mcpu}) uses instructions this CPU ({model or 'unknown'}) lacks: "
            f"{shown}; its code would die with SIGILL here. Measure it on a machine that has them, or "
            "choose a target this CPU runs (e.g. host)"
        )


def detect_host_mcpu(cpuinfo_path: str | os.PathLike[str] = "/proc/cpuinfo") -> str:
    """Pick the LLVM CPU name for this machine: the first name of :data:`_MCPU_LADDER` whose
    instruction sets ``/proc/cpuinfo`` lists (``sapphirerapids`` on Sapphire Rapids, ``znver4``
    on Zen 4, ``haswell`` on an AVX2 machine, ...).

    ``FUSION_RL_HOST_MCPU`` overrides it (e.g. to reproduce numbers measured with another
    choice); a name LLVM does not know is a :class:`ConfigError`. Where ``/proc/cpuinfo`` is
    missing or the machine is not x86, LLVM's host CPU name is used.
    """
    override = os.environ.get("FUSION_RL_HOST_MCPU", "").strip()
    if override:
        if not _llvm_accepts(override):
            raise ConfigError(f"FUSION_RL_HOST_MCPU={override!r}: LLVM in this TVM build does not "
                              "know that CPU; see tvm.target.codegen.llvm_get_cpu_archlist()")
        return override
    flags, _ = _read_cpuinfo(cpuinfo_path)
    if not flags or platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        try:
            from tvm.target import codegen

            cpu = str(codegen.llvm_get_system_cpu())
            if cpu and cpu != "generic" and _llvm_accepts(cpu):
                return cpu
        except Exception:  # noqa: BLE001 - any TVM failure here means "unknown"; fall back
            pass
        return "x86-64" if platform.machine().lower() in ("x86_64", "amd64") else "generic"
    for candidate in _MCPU_LADDER:
        if _llvm_accepts(candidate) and _runs_on(candidate, flags):
            return candidate
    return "x86-64"


def host_num_threads() -> int:
    """Cores this process may run on (respects ``taskset``/cgroup CPU affinity)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def host_spec() -> TargetSpec:
    """The ``host`` target: detected CPU model, all usable cores."""
    return TargetSpec(name="host", kind="llvm", mcpu=detect_host_mcpu(), num_threads=host_num_threads())


def cuda_available() -> bool:
    """Whether this TVM build has CUDA support and sees a device."""
    try:
        import tvm

        return bool(tvm.runtime.enabled("cuda")) and bool(tvm.cuda(0).exist)
    except Exception:  # noqa: BLE001 - a broken driver counts as "no GPU", not as a crash
        return False


def cuda_spec() -> TargetSpec:
    """The ``cuda`` target for device 0, with ``arch`` from its compute capability.

    :raises ConfigError: where no CUDA device is visible to TVM.
    """
    if not cuda_available():
        raise ConfigError(
            "target 'cuda' needs a CUDA device and a TVM built with CUDA, and none is visible; "
            "use a CPU target (e.g. 'host') or 'cuda:sm_<XY>' to compile without a device"
        )
    import tvm

    major, _, minor = str(tvm.cuda(0).compute_version).partition(".")
    return TargetSpec(name="cuda", kind="cuda", arch=f"sm_{major}{minor}", num_threads=host_num_threads())


def _llvm_triple() -> str:
    from tvm.target import codegen

    return str(codegen.llvm_get_system_triple())


def _llvm_accepts(mcpu: str) -> bool:
    """Whether the bundled LLVM knows ``mcpu`` (TVM itself silently falls back to generic)."""
    try:
        from tvm.target import codegen

        return bool(codegen.llvm_is_valid_cpu(mcpu, _llvm_triple()))
    except Exception:  # noqa: BLE001 - no LLVM in this TVM build
        return False


def _llvm_vector_lanes(mcpu: str) -> int:
    from tvm.target import Target, codegen

    target = Target({"kind": "llvm", "mcpu": mcpu})
    for feature, lanes in (("avx512f", 16), ("avx2", 8), ("avx", 8)):
        if codegen.llvm_cpu_has_features([feature], target):
            return lanes
    return 4


# --------------------------------------------------------------------------------------------
# Threads
# --------------------------------------------------------------------------------------------
#
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

    :raises ConfigError: when this process's TVM pool already exists with fewer threads than
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


# --------------------------------------------------------------------------------------------
# Hardware features
# --------------------------------------------------------------------------------------------


def _parse_size(text: str) -> int:
    """'32K' / '1024K' / '32M' / '32768' -> bytes."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMG]?)i?B?\s*", text, flags=re.IGNORECASE)
    if not m:
        return 0
    scale = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2).upper()]
    return int(m.group(1)) * scale


def cache_sizes(sysfs: str | os.PathLike[str] = "/sys/devices/system/cpu/cpu0/cache") -> dict[str, int]:
    """L1d, L2 and L3 sizes in bytes of CPU 0 (0 where unknown).

    Read from sysfs; falls back to ``os.sysconf`` (glibc) when sysfs is unavailable.
    """
    sizes = {"l1d": 0, "l2": 0, "l3": 0}
    root = Path(sysfs)
    for index in sorted(root.glob("index*")) if root.is_dir() else []:
        try:
            level = int((index / "level").read_text().strip())
            kind = (index / "type").read_text().strip()
            size = _parse_size((index / "size").read_text())
        except (OSError, ValueError):
            continue
        if level == 1 and kind in ("Data", "Unified"):
            sizes["l1d"] = size
        elif level in (2, 3) and kind in ("Unified", "Data"):
            sizes[f"l{level}"] = size
    for name, conf in (("l1d", "SC_LEVEL1_DCACHE_SIZE"), ("l2", "SC_LEVEL2_CACHE_SIZE"), ("l3", "SC_LEVEL3_CACHE_SIZE")):
        if not sizes[name]:
            try:
                sizes[name] = max(0, int(os.sysconf(conf)))
            except (ValueError, OSError, AttributeError):
                pass
    return sizes


# The micro-benchmark runs in a fresh interpreter so that the BLAS thread count (fixed when
# numpy loads OpenBLAS) matches the target's thread count, whatever the caller has loaded.
_BENCH_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    from concurrent.futures import ThreadPoolExecutor
    import numpy as np
    threads, seconds = int(sys.argv[1]), float(sys.argv[2])

    def best_of(fn):
        fn()  # warm-up: page faults, BLAS thread start
        best, start = float("inf"), time.perf_counter()
        while time.perf_counter() - start < seconds:
            t0 = time.perf_counter(); fn(); best = min(best, time.perf_counter() - t0)
        return best

    n = 1024
    rng = np.random.default_rng(0)
    a = rng.random((n, n), dtype=np.float32); b = rng.random((n, n), dtype=np.float32)
    c = np.empty_like(a)
    gflops = 2.0 * n**3 / best_of(lambda: np.matmul(a, b, out=c)) / 1e9

    src = np.ones(1 << 24, dtype=np.float32)  # 64 MiB: larger than any L3 we expect
    dst = np.empty_like(src)
    bounds = np.linspace(0, src.size, threads + 1).astype(int)
    parts = [slice(int(lo), int(hi)) for lo, hi in zip(bounds[:-1], bounds[1:])]
    with ThreadPoolExecutor(threads) as pool:  # numpy copies release the GIL
        copy = lambda: list(pool.map(lambda s: np.copyto(dst[s], src[s]), parts))
        bandwidth = 2.0 * src.nbytes / best_of(copy) / 1e9  # read + write bytes
    print(json.dumps({"peak_gflops": gflops, "mem_bw_gbs": bandwidth}))
    """
)


def run_microbenchmark(num_threads: int, seconds: float = 0.25) -> dict[str, float]:
    """Measure fp32 GFLOP/s (numpy sgemm 1024³) and copy bandwidth (GB/s, 64 MiB, read+write).

    Best-of over ``seconds`` each, with ``num_threads`` BLAS and copy threads, in a fresh
    process. These are achievable rates with a tuned library, not theoretical peaks.

    :raises MeasurementError: if the benchmark process fails or times out.
    """
    cmd = [sys.executable, "-c", _BENCH_SCRIPT, str(num_threads), str(seconds)]
    try:
        proc = subprocess.run(
            cmd, env=worker_env(num_threads), capture_output=True, text=True, timeout=60 + 10 * seconds
        )
    except subprocess.TimeoutExpired as exc:
        raise MeasurementError(f"hardware micro-benchmark timed out after {exc.timeout:.0f} s; is the machine overloaded?") from exc
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        raise MeasurementError(f"hardware micro-benchmark failed (exit {proc.returncode}): {tail[0]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {k: float(result[k]) for k in ("peak_gflops", "mem_bw_gbs")}


@dataclasses.dataclass(frozen=True)
class HardwareFeatures:
    """Raw hardware description of a target on this machine; :meth:`as_vector` normalizes it.

    Sizes are bytes, rates come from :func:`run_microbenchmark` (see :func:`hardware_features`
    for how ``peak_gflops`` accounts for the target ISA); 0 means unknown.
    """

    target_key: str
    vector_lanes: int
    num_threads: int
    num_cores: int
    l1d_bytes: int
    l2_bytes: int
    l3_bytes: int
    peak_gflops: float
    mem_bw_gbs: float
    measured_gflops: float = 0.0
    is_gpu: bool = False
    hostname: str = ""
    cpu_model: str = ""

    #: Order of :meth:`as_vector`. Each entry is ``log2(1 + x) / scale`` (0 stays 0 = unknown)
    #: with a fixed scale that maps typical values to about 0..1.5, except ``is_gpu`` (0/1).
    FEATURE_NAMES: ClassVar[tuple[str, ...]] = (
        "log_vector_lanes",     # lanes 4/8/16 -> 0.46/0.63/0.82 (scale 5)
        "log_num_threads",      # threads used by TVM (scale 6)
        "log_num_cores",        # cores of the machine (scale 6)
        "log_l1d_kib",          # L1 data cache, KiB (scale 10)
        "log_l2_kib",           # L2 per core, KiB (scale 10)
        "log_l3_kib",           # L3, KiB (scale 10)
        "log_peak_gflops",      # measured fp32 GFLOP/s, scaled to the target ISA (scale 10)
        "log_mem_bw_gbs",       # measured copy bandwidth, GB/s (scale 10)
        "log_machine_balance",  # FLOP per byte = peak / bandwidth: roofline ridge (scale 6)
        "is_gpu",
    )
    _SCALES: ClassVar[tuple[float, ...]] = (5, 6, 6, 10, 10, 10, 10, 10, 6)

    def as_vector(self) -> np.ndarray:
        """Fixed-length float32 vector in the order of :attr:`FEATURE_NAMES`."""
        balance = self.peak_gflops / self.mem_bw_gbs if self.mem_bw_gbs > 0 else 0.0
        raw = (
            self.vector_lanes, self.num_threads, self.num_cores,
            self.l1d_bytes / 1024, self.l2_bytes / 1024, self.l3_bytes / 1024,
            self.peak_gflops, self.mem_bw_gbs, balance,
        )
        values = [math.log2(1.0 + max(0.0, float(x))) / s for x, s in zip(raw, self._SCALES)]
        values.append(1.0 if self.is_gpu else 0.0)
        return np.asarray(values, dtype=np.float32)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HardwareFeatures:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in fields})


def default_hw_cache_dir() -> Path:
    """``$FUSION_RL_CACHE/hw``, else ``~/.cache/fusion_rl/hw``."""
    root = os.environ.get("FUSION_RL_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "fusion_rl") / "hw"


def _cache_file(cache_dir: Path, stem: str, hostname: str, cpu_model: str) -> Path:
    # The name stays readable; the digest keeps machines with the same hostname but another CPU
    # (e.g. a re-provisioned VM) apart.
    digest = hashlib.sha256(f"{stem}|{hostname}|{cpu_model}".encode()).hexdigest()[:12]
    safe_host = re.sub(r"[^A-Za-z0-9_.-]", "_", hostname)[:40]
    return cache_dir / f"{stem}-{safe_host}-{digest}.json"


def _host_identity() -> tuple[str, str]:
    _, cpu_model = _read_cpuinfo()
    return socket.gethostname(), cpu_model or platform.processor() or platform.machine()


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # missing, unreadable or half-written: treat as a cache miss
    return data if isinstance(data, dict) else None


def measured_rates(
    num_threads: int, cache_dir: str | os.PathLike[str] | None = None, *, refresh: bool = False
) -> dict[str, float]:
    """Machine GFLOP/s and GB/s at ``num_threads``, measured once per machine and cached.

    Cached per thread count (not per target): the micro-benchmark does not depend on the LLVM
    CPU model, and sharing one measurement keeps targets with equal threads consistent instead
    of differing by whatever load the machine had at each measurement.
    """
    directory = Path(cache_dir) if cache_dir is not None else default_hw_cache_dir()
    hostname, cpu_model = _host_identity()
    path = _cache_file(directory, f"rates-t{num_threads}", hostname, cpu_model)
    cached = None if refresh else _read_json(path)
    if cached is not None and {"peak_gflops", "mem_bw_gbs"} <= cached.keys():
        return {k: float(cached[k]) for k in ("peak_gflops", "mem_bw_gbs")}
    rates = run_microbenchmark(num_threads)
    _write_json_atomic(path, {**rates, "num_threads": num_threads, "hostname": hostname,
                              "cpu_model": cpu_model, "measured_at": time.time()})
    return rates


def hardware_features(
    spec: TargetSpec | str, cache_dir: str | os.PathLike[str] | None = None, *, refresh: bool = False
) -> HardwareFeatures:
    """Hardware features of ``spec`` on this machine, measured once and cached as JSON.

    Files in ``cache_dir`` (default :func:`default_hw_cache_dir`) are keyed by target key (or
    thread count, for the raw rates) + hostname + CPU model, so a home directory shared across
    machines does not mix their numbers. ``refresh=True`` measures again.

    ``peak_gflops`` is the measured numpy sgemm rate scaled by ``target lanes / host lanes``
    (at most 1): numpy runs the host's best ISA whatever the target, while code compiled for
    ``x86-64`` (SSE2) can reach only a quarter of an AVX-512 host's rate. ``measured_gflops``
    keeps the raw number. Bandwidth does not depend on the ISA and is not scaled.

    For ``cuda`` targets, lanes = warp size and cores = SM count; rates are not measured yet
    (0 = unknown).
    """
    spec = parse_target(spec)
    directory = Path(cache_dir) if cache_dir is not None else default_hw_cache_dir()
    hostname, cpu_model = _host_identity()
    path = _cache_file(directory, spec.key, hostname, cpu_model)
    cached = None if refresh else _read_json(path)
    if cached is not None:
        try:
            return HardwareFeatures.from_dict(cached)
        except TypeError:
            pass  # stale format: measure again and overwrite

    if spec.kind == "cuda":
        features = _cuda_features(spec, hostname, cpu_model)
    else:
        caches = cache_sizes()
        rates = measured_rates(spec.num_threads, directory, refresh=refresh)
        host_lanes = TargetSpec(name="host", kind="llvm", mcpu=detect_host_mcpu()).vector_lanes
        isa_scale = min(1.0, spec.vector_lanes / host_lanes)
        features = HardwareFeatures(
            target_key=spec.key,
            vector_lanes=spec.vector_lanes,
            num_threads=spec.num_threads,
            num_cores=host_num_threads(),
            l1d_bytes=caches["l1d"],
            l2_bytes=caches["l2"],
            l3_bytes=caches["l3"],
            peak_gflops=rates["peak_gflops"] * isa_scale,
            mem_bw_gbs=rates["mem_bw_gbs"],
            measured_gflops=rates["peak_gflops"],
            hostname=hostname,
            cpu_model=cpu_model,
        )
    _write_json_atomic(path, {**features.to_dict(), "measured_at": time.time()})
    return features


def _cuda_features(spec: TargetSpec, hostname: str, cpu_model: str) -> HardwareFeatures:
    if not cuda_available():
        raise ConfigError(f"target {spec.name!r}: hardware features of a CUDA target need a visible GPU")
    import tvm

    dev = tvm.cuda(0)
    return HardwareFeatures(
        target_key=spec.key,
        vector_lanes=32,
        num_threads=int(dev.max_threads_per_block),
        num_cores=int(dev.multi_processor_count),
        l1d_bytes=int(dev.max_shared_memory_per_block),
        l2_bytes=0,
        l3_bytes=0,
        peak_gflops=0.0,
        mem_bw_gbs=0.0,
        is_gpu=True,
        hostname=hostname,
        cpu_model=str(dev.device_name),
    )


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write through :func:`fusion_rl.io.write_atomic` so a concurrent reader never sees half a file."""
    from fusion_rl.errors import OutputError
    from fusion_rl.io import write_atomic

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(data, indent=1, sort_keys=True), what="hardware cache file")
    except (OSError, OutputError):
        # The cache is an optimization: an unwritable cache dir means measuring next time,
        # not failing the caller.
        pass
