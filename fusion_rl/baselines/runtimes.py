"""Other compile libraries on the same model and machine: ONNX Runtime and torch.

They are timed with the same protocol as TVM plans (warm-up, repeats lasting at least
``min_repeat_ms``, median and IQR) and the same thread count, and their outputs are checked
against the same reference before a latency counts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from fusion_rl.compiler.timing import Timing, TimingProtocol
from fusion_rl.compiler.verify import compare_outputs, reference_outputs
from fusion_rl.graph.model import Model

RUNTIMES = ("ort", "ort-noopt", "torch-eager", "torch-compile")


@dataclass
class RuntimeResult:
    runtime: str
    status: str  #: "ok", "wrong_output", "failed" or "n/a" (e.g. torch for an ONNX file)
    timing: Timing | None = None
    setup_s: float = 0.0  #: session creation / compilation time
    error: str | None = None

    @property
    def median_ms(self) -> float | None:
        return self.timing.median_ms if self.timing else None

    @property
    def spread_ms(self) -> float | None:
        return self.timing.spread_ms if self.timing else None


def time_callable(fn: Callable[[], object], protocol: TimingProtocol) -> Timing:
    """Time ``fn`` like TVM's time_evaluator: ``number`` grows until a repeat >= min_repeat_ms."""
    for _ in range(max(1, protocol.warmup)):
        fn()
    number = protocol.number
    while True:
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        elapsed = (time.perf_counter() - t0) * 1e3
        if elapsed >= protocol.min_repeat_ms or number >= 1 << 20:
            break
        number = max(number * 2, int(number * protocol.min_repeat_ms / max(elapsed, 1e-3)))
    times = []
    for _ in range(protocol.repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        times.append((time.perf_counter() - t0) * 1e3 / number)
    return Timing(tuple(times))


def run_runtime(
    name: str, model: Model, protocol: TimingProtocol = TimingProtocol(), threads: int = 2
) -> RuntimeResult:
    """Verify and time one external runtime on ``model``'s example inputs."""
    try:
        fn, setup_s = _build(name, model, threads)
    except _NotApplicable as exc:
        return RuntimeResult(name, "n/a", error=str(exc))
    except Exception as exc:
        return RuntimeResult(name, "failed", error=f"{type(exc).__name__}: {exc}".splitlines()[0][:300])
    expected, ref = reference_outputs(model)
    outputs = fn()
    report = compare_outputs([np.asarray(o) for o in outputs], expected, ref)
    if not report.ok:
        return RuntimeResult(name, "wrong_output", setup_s=setup_s, error=f"max abs err {report.max_abs_err:.3g}")
    return RuntimeResult(name, "ok", time_callable(fn, protocol), setup_s)


def time_paired(fns: dict[str, Callable[[], object]], protocol: TimingProtocol,
                rounds: int, probes_us: list[float] | None = None) -> dict[str, list[float]]:
    """Time several systems head to head in this process: ``rounds`` interleaved rounds (the
    order reversed every other round), each a :func:`time_callable` of every system. Repeat
    ``i`` of round ``r`` of two systems ran seconds apart, so their ratio is a *paired* ratio
    that a drifting machine touches alike; returns each system's ms per repeat, in that order.

    Given a list ``probes_us``, one host fork-join probe per repeat is appended to it
    (:mod:`fusion_rl.compiler.regime`): the larger of the probes before and after its round, so
    a round that a regime switch crossed counts as far.
    """
    from fusion_rl.compiler.regime import fork_join_us

    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        before = fork_join_us() if probes_us is not None else 0.0
        for name in names if r % 2 == 0 else names[::-1]:
            times[name].extend(time_callable(fns[name], protocol).times_ms)
        if probes_us is not None:
            probes_us.extend([max(before, fork_join_us())] * protocol.repeat)
    return times


def runtime_callable(name: str, model: Model, threads: int = 2) -> Callable[[], list]:
    """A verified runtime's ``run()`` (raises if it is not applicable or gives wrong output)."""
    fn, _ = _build(name, model, threads)
    expected, ref = reference_outputs(model)
    report = compare_outputs([np.asarray(o) for o in fn()], expected, ref)
    if not report.ok:
        raise ValueError(f"{name} gives wrong output on {model.name}: max abs err {report.max_abs_err:.3g}")
    return fn


class _NotApplicable(Exception):
    pass


def _build(name: str, model: Model, threads: int) -> tuple[Callable[[], list], float]:
    t0 = time.perf_counter()
    if name in ("ort", "ort-noopt"):
        import onnxruntime as ort

        if model.onnx_model is None:
            raise _NotApplicable("no ONNX graph")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = (
            ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            if name == "ort"
            else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        )
        sess = ort.InferenceSession(
            model.onnx_model.SerializeToString(), opts, providers=["CPUExecutionProvider"]
        )
        feeds = dict(zip([i.name for i in sess.get_inputs()], model.inputs))
        return (lambda: sess.run(None, feeds)), time.perf_counter() - t0
    if name in ("torch-eager", "torch-compile"):
        import torch

        source = model.torch_module()
        if source is None:
            raise _NotApplicable("the model does not come from torch")
        module, inputs = source
        torch.set_num_threads(threads)
        if name == "torch-compile":
            module = torch.compile(module)

        def run() -> list:
            with torch.inference_mode():
                out = module(*inputs)
            outs = out if isinstance(out, (tuple, list)) else (out,)
            return [o.detach().numpy() for o in outs]

        run()  # torch.compile compiles on the first call: count it as setup, not latency
        return run, time.perf_counter() - t0
    raise ValueError(f"unknown runtime {name}")
