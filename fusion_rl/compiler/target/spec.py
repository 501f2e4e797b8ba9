"""Target specs: what to compile for, by name (see :mod:`fusion_rl.compiler.target`).

TVM is imported lazily so that parsing a target name is cheap.
"""

from __future__ import annotations

import dataclasses
import re
from typing import TYPE_CHECKING, Any

from fusion_rl.compiler.target.remote import SCHEME, RemoteDevice, split_rpc_target
from fusion_rl.errors import ConfigError

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

#: LLVM triples of the cross targets :func:`parse_target` names (``aarch64:<mcpu>:t<N>``), and the
#: features each always enables (NEON is part of every AArch64 Linux CPU; saying so makes TVM's
#: schedules pick 128-bit vectors).
CROSS_TRIPLES: dict[str, tuple[str, tuple[str, ...]]] = {
    "aarch64": ("aarch64-linux-gnu", ("+neon",)),
}


@dataclasses.dataclass(frozen=True)
class TargetSpec:
    """What to compile for: an LLVM CPU model and thread count, or a CUDA architecture.

    Parameters
    ----------
    name
        The user-facing name (``haswell-t2``, ``host``, ``cuda``, ...).
    kind
        ``"llvm"`` or ``"cuda"``.
    mcpu
        LLVM CPU name (``llvm`` only), e.g. ``"sapphirerapids"``.
    num_threads
        Threads TVM's runtime uses (``TVM_NUM_THREADS``) when tuning and timing
        on the CPU. For ``cuda`` it is the host-side thread count and not part of the key.
    arch
        CUDA architecture, e.g. ``"sm_90"`` (``cuda`` only).
    mtriple
        LLVM triple of a cross target (``"aarch64-linux-gnu"``); ``None`` is this machine's.
    mattr
        LLVM features of a cross target, e.g. ``("+neon",)``.
    remote
        The device that runs the code (``rpc://`` targets); ``None`` runs it here.
    """

    name: str
    kind: str
    mcpu: str | None = None
    num_threads: int = 1
    arch: str | None = None
    mtriple: str | None = None
    mattr: tuple[str, ...] = ()
    remote: RemoteDevice | None = None

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
            cross = f"{self.mtriple}-" if self.mtriple else ""
            base = f"llvm-{cross}{self.mcpu}{''.join(self.mattr)}-t{self.num_threads}"
        else:
            base = f"cuda-{self.arch}"
        # The tracker and device key name the machine that timed the code: records from two
        # device pools never mix, nor with this machine's.
        return f"{SCHEME}{self.remote.address}:{base}" if self.remote else base

    @property
    def local_key(self) -> str:
        """:attr:`key` without the remote device: what the code is compiled for."""
        return dataclasses.replace(self, remote=None).key

    def to_tvm(self) -> tvm.target.Target:
        """Build the ``tvm.target.Target`` (TVM 0.27 accepts only the dict form).

        ``num-cores`` tells MetaSchedule how many parallel jobs to plan for; the runtime thread
        count itself comes from ``TVM_NUM_THREADS`` (see :func:`threads_env`).
        """
        from tvm.target import Target

        if self.kind == "llvm":
            config: dict[str, Any] = {"kind": "llvm", "mcpu": self.mcpu, "num-cores": self.num_threads}
            if self.mtriple:
                config["mtriple"] = self.mtriple
            if self.mattr:
                config["mattr"] = list(self.mattr)
            return Target(config)
        return Target({"kind": "cuda", "arch": self.arch, "host": {"kind": "llvm"}})

    @property
    def vector_lanes(self) -> int:
        """fp32 SIMD lanes of the target: 4 (SSE2), 8 (AVX2), 16 (AVX-512); 32 (a warp) on CUDA."""
        if self.kind == "cuda":
            return 32
        assert self.mcpu is not None
        if self.mtriple and self.mtriple.startswith("aarch64"):
            return 4  # NEON: 128-bit vectors (SVE widths are not targeted here)
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

    Accepted: the names in :data:`TARGET_NAMES`, ``llvm:<mcpu>:t<N>``, ``cuda:sm_<XY>``,
    ``aarch64:<mcpu>:t<N>`` (cross-compiled for AArch64 Linux with NEON; run it through a remote
    device) and ``rpc://HOST:PORT/KEY:<any of these>`` (compiled here, run on a device that
    serves KEY at the tracker HOST:PORT; ``host`` inside it means this machine's CPU, right for
    loopback and for devices of the same kind).

    Raises
    ------
    ConfigError
        for an unknown name (the message lists the valid ones), a CPU name the
        bundled LLVM rejects, or ``cuda`` where no CUDA device is visible.
    """
    if isinstance(name, TargetSpec):
        return name
    text = str(name).strip()
    if text.startswith(SCHEME):
        device, inner = split_rpc_target(text)
        return dataclasses.replace(parse_target(inner), name=text, remote=device)
    if text in NAMED_TARGETS:
        return NAMED_TARGETS[text]
    if text in ("host", "cuda"):
        # Detection lives in .host, which builds TargetSpecs itself; imported here, not at the
        # top, to keep the dependency one way (host -> spec).
        from fusion_rl.compiler.target.host import cuda_spec, host_spec

        return host_spec() if text == "host" else cuda_spec()
    m = re.fullmatch(r"llvm:([A-Za-z0-9_.\-]+):t(\d+)", text)
    if m:
        mcpu, threads = m.group(1), int(m.group(2))
        if threads < 1:
            raise ConfigError(f"target {text!r}: thread count must be >= 1")
        if mcpu not in _VECTOR_LANES and not llvm_accepts(mcpu):
            raise ConfigError(
                f"target {text!r}: LLVM in this TVM build does not know CPU {mcpu!r}; "
                "see tvm.target.codegen.llvm_get_cpu_archlist() for valid names"
            )
        return TargetSpec(name=f"{mcpu}-t{threads}", kind="llvm", mcpu=mcpu, num_threads=threads)
    m = re.fullmatch(r"([a-z0-9_]+):([A-Za-z0-9_.\-]+):t(\d+)", text)
    if m and m.group(1) in CROSS_TRIPLES:
        triple, mattr = CROSS_TRIPLES[m.group(1)]
        mcpu, threads = m.group(2), int(m.group(3))
        if threads < 1:
            raise ConfigError(f"target {text!r}: thread count must be >= 1")
        if not llvm_accepts(mcpu, triple):
            raise ConfigError(f"target {text!r}: LLVM in this TVM build does not know CPU {mcpu!r} for {triple}; "
                              "try 'generic' or a core name such as 'cortex-a72'")
        return TargetSpec(name=text, kind="llvm", mcpu=mcpu, num_threads=threads,
                          mtriple=triple, mattr=mattr)
    m = re.fullmatch(r"cuda:(sm_\d+[a-z]?)", text)
    if m:
        return TargetSpec(name=text, kind="cuda", arch=m.group(1))
    raise ConfigError(
        f"unknown target {text!r}; valid names: {', '.join(TARGET_NAMES)}, "
        "or the forms 'llvm:<mcpu>:t<N>', 'aarch64:<mcpu>:t<N>', 'cuda:sm_<XY>' and "
        "'rpc://HOST:PORT/KEY:<target>'"
    )


def check_target_name(name: Any) -> str:
    """Check that ``name`` is a target :func:`parse_target` accepts, without detecting the
    host or a GPU (so a config can be validated on any machine); returns the name."""
    if not isinstance(name, str):
        raise ConfigError(f"a target name must be a string, got {name!r}")
    if name.strip() not in TARGET_NAMES:
        parse_target(name)  # the free forms; raises ConfigError for anything else
    return name


def _llvm_triple() -> str:
    """LLVM's triple for this machine (the bundled LLVM validates CPU names against it)."""
    from tvm.target import codegen

    return str(codegen.llvm_get_system_triple())


def llvm_accepts(mcpu: str, triple: str | None = None) -> bool:
    """Whether the bundled LLVM knows ``mcpu`` for ``triple`` (default: this machine's); TVM
    itself silently falls back to generic."""
    try:
        from tvm.target import codegen

        return bool(codegen.llvm_is_valid_cpu(mcpu, triple or _llvm_triple()))
    except Exception:  # noqa: BLE001 - no LLVM in this TVM build
        return False


def _llvm_vector_lanes(mcpu: str) -> int:
    from tvm.target import Target, codegen

    target = Target({"kind": "llvm", "mcpu": mcpu})
    for feature, lanes in (("avx512f", 16), ("avx2", 8), ("avx", 8)):
        if codegen.llvm_cpu_has_features([feature], target):
            return lanes
    return 4
