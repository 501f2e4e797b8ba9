"""Host and CUDA detection: which LLVM CPU model this machine runs, its cores, its GPU.

Also the guard against running code whose instructions this CPU lacks (:func:`require_runnable`).
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

from fusion_rl.compiler.target.spec import TargetSpec, llvm_accepts
from fusion_rl.errors import ConfigError



def read_cpuinfo(path: str | os.PathLike[str] = "/proc/cpuinfo") -> tuple[set[str], str]:
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
#: host has (:func:`runs_on`) and that LLVM knows wins. AMD and Intel names interleave: Zen 4
#: has AVX-512 (with BF16 and VNNI) but not AMX, AVX512-FP16 or VEX AVX-VNNI, so it must not get
#: ``sapphirerapids`` code.
MCPU_LADDER = ("sapphirerapids", "znver4", "cooperlake", "cascadelake", "skylake-avx512",
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


def missing_isa(mcpu: str, flags: set[str]) -> list[str] | None:
    """The instruction sets code for ``mcpu`` may use that the CPU with ``flags`` lacks
    (LLVM's names, sorted); ``None`` when LLVM cannot say (no LLVM, unknown name)."""
    try:
        import tvm
        from tvm.target import codegen

        features = set(codegen.llvm_get_cpu_features(tvm.target.Target({"kind": "llvm", "mcpu": mcpu})))
    except Exception:  # noqa: BLE001 - no LLVM, or LLVM does not know the name
        return None
    return sorted(f for f in features if f in _ISA_FLAGS and _ISA_FLAGS[f] not in flags)


def runs_on(mcpu: str, flags: set[str]) -> bool:
    """Whether code compiled for ``mcpu`` only uses instruction sets the CPU with ``flags`` has.

    Why: on AMD Zen 4 (this project's machine) ``sapphirerapids`` code died with SIGILL on a
    ``{vex} vpdpwssd`` (AVX-VNNI) that LLVM emitted in an fp32 transformer kernel.
    """
    return missing_isa(mcpu, flags) == []


def require_runnable(spec: TargetSpec, cpuinfo_path: str | os.PathLike[str] = "/proc/cpuinfo") -> None:
    """Refuse, in one line, to *run* code for an LLVM target whose instructions this CPU lacks.

    Compiling for such a target is fine (cross-compilation); measuring, verifying or running
    its code here would die with SIGILL, and a measurement would store that crash. Where
    ``/proc/cpuinfo`` lists no flags (not Linux, not x86) nothing is checked.

    Raises
    ------
    ConfigError
        naming the target and the missing instruction sets.
    """
    if spec.remote is not None:
        return  # the device runs it; this machine only compiles
    if spec.kind == "llvm" and spec.mtriple and not spec.mtriple.startswith(platform.machine().lower()):
        raise ConfigError(
            f"target {spec.name} is compiled for {spec.mtriple}, and this machine is {platform.machine()}; "
            f"run it on such a device through a tracker: rpc://HOST:PORT/KEY:{spec.name}"
        )
    if spec.kind != "llvm" or platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return
    flags, model = read_cpuinfo(cpuinfo_path)
    if not flags:
        return
    missing = missing_isa(str(spec.mcpu), flags)
    if missing:
        shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        raise ConfigError(
            f"target {spec.name} ({spec.mcpu}) uses instructions this CPU ({model or 'unknown'}) lacks: "
            f"{shown}; its code would die with SIGILL here. Measure it on a machine that has them, or "
            "choose a target this CPU runs (e.g. host)"
        )


def detect_host_mcpu(cpuinfo_path: str | os.PathLike[str] = "/proc/cpuinfo") -> str:
    """Pick the LLVM CPU name for this machine: the first name of :data:`MCPU_LADDER` whose
    instruction sets ``/proc/cpuinfo`` lists (``sapphirerapids`` on Sapphire Rapids, ``znver4``
    on Zen 4, ``haswell`` on an AVX2 machine, ...).

    ``FUSION_RL_HOST_MCPU`` overrides it (e.g. to reproduce numbers measured with another
    choice); a name LLVM does not know is a :class:`ConfigError`. Where ``/proc/cpuinfo`` is
    missing or the machine is not x86, LLVM's host CPU name is used.
    """
    override = os.environ.get("FUSION_RL_HOST_MCPU", "").strip()
    if override:
        if not llvm_accepts(override):
            raise ConfigError(f"FUSION_RL_HOST_MCPU={override!r}: LLVM in this TVM build does not "
                              "know that CPU; see tvm.target.codegen.llvm_get_cpu_archlist()")
        return override
    flags, _ = read_cpuinfo(cpuinfo_path)
    if not flags or platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        try:
            from tvm.target import codegen

            cpu = str(codegen.llvm_get_system_cpu())
            if cpu and cpu != "generic" and llvm_accepts(cpu):
                return cpu
        except Exception:  # noqa: BLE001 - any TVM failure here means "unknown"; fall back
            pass
        return "x86-64" if platform.machine().lower() in ("x86_64", "amd64") else "generic"
    for candidate in MCPU_LADDER:
        if llvm_accepts(candidate) and runs_on(candidate, flags):
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

    Raises
    ------
    ConfigError
        where no CUDA device is visible to TVM.
    """
    if not cuda_available():
        raise ConfigError(
            "target 'cuda' needs a CUDA device and a TVM built with CUDA, and none is visible; "
            "use a CPU target (e.g. 'host') or 'cuda:sm_<XY>' to compile without a device"
        )
    import tvm

    major, _, minor = str(tvm.cuda(0).compute_version).partition(".")
    return TargetSpec(name="cuda", kind="cuda", arch=f"sm_{major}{minor}", num_threads=host_num_threads())
