"""The timing protocol: warm-up, ``min_repeat_ms``, repeats, median and spread.

End-to-end time uses the VM's ``time_evaluator`` on a saved closure (inputs bound once, so input
conversion is not timed). Per-kernel times use ``vm.set_instrument``: TVM 0.27 has no VM
profiler, so in the *before* hook each kernel is re-run on its live arguments and timed
(docs/design.md §7; the per-kernel sums matched end-to-end within 1-3 % there).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

import tvm
from tvm import relax

from fusion_rl.compiler.regime import fork_join_us


@dataclass(frozen=True)
class TimingProtocol:
    """How a latency is measured; part of every measurement's key.

    Each of ``repeat`` repeats runs ``main`` ``number`` times, and ``number`` is raised until a
    repeat lasts at least ``min_repeat_ms`` (so fast models are not timer-resolution noise).
    ``warmup`` untimed runs come first (first-touch page faults, thread-pool start).
    """

    repeat: int = 7
    min_repeat_ms: int = 50
    number: int = 1
    warmup: int = 2

    def __post_init__(self) -> None:
        from fusion_rl.errors import ConfigError

        fields = (self.repeat, self.min_repeat_ms, self.number, self.warmup)
        if any(isinstance(v, bool) or not isinstance(v, int) for v in fields):
            raise ConfigError(f"invalid timing protocol {self}: every field must be an integer")
        # Upper bounds keep a config from asking for a measurement that never ends.
        if not (1 <= self.repeat <= 1000 and 1 <= self.number <= 10**6 and 0 <= self.min_repeat_ms <= 60_000
                and 0 <= self.warmup <= 1000):
            raise ConfigError(f"invalid timing protocol {self}: need 1 <= repeat <= 1000, 1 <= number <= 1e6, "
                              "0 <= min_repeat_ms <= 60000, 0 <= warmup <= 1000")

    @property
    def key(self) -> str:
        return f"n{self.number}r{self.repeat}m{self.min_repeat_ms}w{self.warmup}"

    @classmethod
    def quick(cls) -> "TimingProtocol":
        """For tests: few repeats, short."""
        return cls(repeat=3, min_repeat_ms=5, number=1, warmup=1)


@dataclass(frozen=True)
class Timing:
    times_ms: tuple[float, ...]
    #: microseconds of the host's fork-join probe taken before each repeat
    #: (:mod:`fusion_rl.compiler.regime`); empty when not probed
    fork_join_us: tuple[float, ...] = ()

    @property
    def median_ms(self) -> float:
        return float(np.median(self.times_ms))

    @property
    def spread_ms(self) -> float:
        """Interquartile range (75th - 25th percentile) of the repeats, in ms."""
        q25, q75 = np.percentile(self.times_ms, [25, 75])
        return float(q75 - q25)


def time_executable(
    ex: "relax.VMExecutable",
    inputs: Sequence[np.ndarray],
    protocol: TimingProtocol = TimingProtocol(),
    device: tvm.runtime.Device | None = None,
) -> Timing:
    dev = device or tvm.cpu()
    vm = relax.VirtualMachine(ex, dev)
    args = [tvm.runtime.tensor(a, dev) for a in inputs]
    vm.save_function("main", "main_saved", *args)
    for _ in range(protocol.warmup):
        vm["main_saved"]()
    evaluator = vm.time_evaluator(
        "main_saved",
        dev,
        number=protocol.number,
        repeat=protocol.repeat,
        min_repeat_ms=protocol.min_repeat_ms,
    )
    result = evaluator()
    return Timing(tuple(float(t) * 1e3 for t in result.results))


def time_interleaved(
    executables: Sequence["relax.VMExecutable"],
    inputs: Sequence[np.ndarray],
    protocol: TimingProtocol = TimingProtocol(),
    device: tvm.runtime.Device | None = None,
    probe: bool = True,
) -> list[Timing]:
    """Time several builds of one model *repeat by repeat*: repeat ``r`` of every executable
    runs before repeat ``r + 1`` of any, in an order that flips every repeat. With ``probe``,
    each repeat starts with :func:`~fusion_rl.compiler.regime.fork_join_us` (a few ms), and every
    returned :class:`Timing` carries those probes, so each repeat can be labelled with the
    host's regime.

    Why: on a shared 2-vCPU machine the speed of the whole machine drifts between regimes that
    last seconds. Timed one after the other, two plans can land in different regimes; timed
    this way, repeat ``r`` of each plan is at most a few ``min_repeat_ms`` apart, so the
    per-repeat ratios compare the plans under the same conditions.
    """
    dev = device or tvm.cpu()
    evaluators, vms = [], []
    for ex in executables:
        vm = relax.VirtualMachine(ex, dev)
        vm.save_function("main", "main_saved", *[tvm.runtime.tensor(a, dev) for a in inputs])
        for _ in range(protocol.warmup):
            vm["main_saved"]()
        vms.append(vm)  # keep every VM alive while its evaluator runs
        evaluators.append(vm.time_evaluator("main_saved", dev, number=protocol.number, repeat=1,
                                            min_repeat_ms=protocol.min_repeat_ms))
    times: list[list[float]] = [[] for _ in executables]
    probes: list[float] = []
    if probe:
        fork_join_us()  # compiles the probe once per process, here rather than before a timed repeat
    order = list(range(len(executables)))
    for r in range(protocol.repeat):
        if probe:
            probes.append(fork_join_us())
        for i in order if r % 2 == 0 else order[::-1]:
            times[i].append(float(evaluators[i]().results[0]) * 1e3)
    return [Timing(tuple(t), tuple(probes)) for t in times]


def time_kernels(
    funcs: dict[str, "tvm.tirx.PrimFunc"],
    arg_specs: dict[str, Sequence[tuple[tuple[int, ...], str]]],
    target: tvm.target.Target,
    protocol: TimingProtocol = TimingProtocol(),
    seed: int = 0,
) -> dict[str, list[float]]:
    """Time each scheduled PrimFunc alone: ms of every repeat, by the key of ``funcs``.

    All are compiled in one module (one LLVM build). ``arg_specs[key]`` lists each parameter's
    (shape, dtype), inputs then outputs, as the Relax call site passes them. Float arguments
    are uniform in [-1, 1]; integer and bool ones are zero, so index inputs (gathers) stay in
    range. Each kernel runs ``protocol.warmup`` times untimed, then ``protocol.repeat`` repeats
    of at least ``protocol.min_repeat_ms``: *hot*, its arguments in the caches from the call
    before (:func:`time_kernels_hot_cold` also times them cold).
    """
    lib, rng = _compile(funcs, target), np.random.default_rng(seed)
    # Each kernel's arguments are made just before it runs, so a plan's are never all alive.
    return {key: _time_kernel(lib, key, _arguments(arg_specs[key], rng), protocol, cold=False)
            for key in funcs}


def time_kernels_hot_cold(
    funcs: dict[str, "tvm.tirx.PrimFunc"],
    arg_specs: dict[str, Sequence[tuple[tuple[int, ...], str]]],
    target: tvm.target.Target,
    protocol: TimingProtocol = TimingProtocol(),
    rounds: int = 1,
    seed: int = 0,
) -> dict[str, tuple[list[float], list[float]]]:
    """:func:`time_kernels` hot and cold, ``(hot, cold)`` repeats by key, from one build. A cold
    repeat is one call after every argument but the first was flushed from the caches (TVM's
    ``cache_flush_cpu_non_first_arg``: the weights and the output, as in a model's run, where
    the kernel before has just written the input). Each kernel's hot and cold repeats are taken
    back to back, ``rounds`` times over all the kernels, so that the host's slow regimes
    (seconds to minutes) fall on both alike."""
    lib, rng = _compile(funcs, target), np.random.default_rng(seed)
    args = {key: _arguments(arg_specs[key], rng) for key in funcs}
    out: dict[str, tuple[list[float], list[float]]] = {key: ([], []) for key in funcs}
    for _ in range(rounds):
        for key in funcs:
            out[key][0].extend(_time_kernel(lib, key, args[key], protocol, cold=False))
            out[key][1].extend(_time_kernel(lib, key, args[key], protocol, cold=True))
    return out


def _compile(funcs: dict[str, "tvm.tirx.PrimFunc"], target: tvm.target.Target) -> Any:
    mod = tvm.IRModule({key: f.with_attr("global_symbol", key) for key, f in funcs.items()})
    return tvm.compile(mod, target=target).jit()


def _arguments(specs: Sequence[tuple[tuple[int, ...], str]], rng: np.random.Generator) -> list:
    return [tvm.runtime.tensor(rng.uniform(-1.0, 1.0, shape).astype(dtype)
                               if dtype.startswith("float") else np.zeros(shape, dtype), tvm.cpu())
            for shape, dtype in specs]


def _time_kernel(lib: Any, key: str, args: list, protocol: TimingProtocol, cold: bool) -> list[float]:
    dev = tvm.cpu()
    for _ in range(protocol.warmup):
        lib[key](*args)
    if cold:
        evaluator = lib.time_evaluator(key, dev, number=1, repeat=protocol.repeat,
                                       f_preproc="cache_flush_cpu_non_first_arg")
    else:
        evaluator = lib.time_evaluator(key, dev, number=protocol.number, repeat=protocol.repeat,
                                       min_repeat_ms=protocol.min_repeat_ms)
    return [float(t) * 1e3 for t in evaluator(*args).results]


def kernel_times(
    ex: "relax.VMExecutable",
    inputs: Sequence[np.ndarray],
    runs: int = 10,
    device: tvm.runtime.Device | None = None,
) -> dict[str, float]:
    """Median ms of each kernel (by PrimFunc name; repeated calls are summed)."""
    dev = device or tvm.cpu()
    vm = relax.VirtualMachine(ex, dev)
    times: dict[str, list[float]] = {}

    def instrument(func, name, before_run, ret_value, *args):
        if not before_run or name.startswith("vm.builtin") or not _is_kernel(name):
            return 0  # VMInstrumentReturnKind.NO_OP
        # Each kernel is pure w.r.t. its inputs (DPS outputs are overwritten), so re-running
        # it on the live arguments is safe and times exactly what the model runs.
        samples = []
        for _ in range(runs):
            t0 = time.perf_counter()
            func(*args)
            dev.sync()
            samples.append((time.perf_counter() - t0) * 1e3)
        times.setdefault(name, []).append(float(np.median(samples)))
        return 0

    vm.set_instrument(instrument)
    vm["main"](*[tvm.runtime.tensor(a, dev) for a in inputs])
    return {name: float(sum(ts)) for name, ts in times.items()}


def _is_kernel(name: str) -> bool:
    # VM builtins (alloc, shape checks, kill) are not kernels.
    return not (name.startswith("vm.") or name.startswith("relax.") or name == "main")
