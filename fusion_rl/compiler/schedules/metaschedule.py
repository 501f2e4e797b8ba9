"""MetaSchedule, made to work here: the workarounds the ``tuned`` provider runs on.

* **In-process builder and runner** (:class:`InProcessBuilder`, :class:`InProcessRunner`):
  ``LocalBuilder``/``LocalRunner`` start popen workers that each import
  ``tvm.s_tir.tensor_intrin`` and time out (about 34 s to start on 2 shared cores). Building with
  ``default_build`` and timing with ``run_evaluator_common`` in this process keeps each
  ``runtime.Module`` in memory.
* **A cheap ``inspect.stack``** (:func:`cheap_stack`, installed only around
  :func:`import_tensor_intrin`): that import parses ~500 TVMScript functions, each calling
  ``inspect.stack()``, which scans ``sys.modules`` for every frame (about two minutes with torch
  loaded; seconds with the patch).
* **Anchor counting and kernel checks** (:func:`count_anchors`, :func:`kernel_matches`):
  multi-anchor kernels are tuned alone and checked against their naive kernel, because
  MetaSchedule sometimes produced wrong multi-anchor schedules (see ``docs/design.md``).
"""

from __future__ import annotations

import inspect
import linecache
import sys
import threading

import logging

import numpy as np
import tvm
from tvm.s_tir import meta_schedule as ms
from tvm.ir.utils import derived_object
from tvm.s_tir.meta_schedule.builder import BuilderInput, BuilderResult, PyBuilder
from tvm.s_tir.meta_schedule.builder.local_builder import default_build
from tvm.s_tir.meta_schedule.runner import (
    EvaluatorConfig,
    PyRunner,
    RunnerFuture,
    RunnerInput,
    RunnerResult,
)
from tvm.s_tir.meta_schedule.runner.utils import alloc_argument_common, run_evaluator_common

from fusion_rl.errors import first_line

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- fix 2: inspect


def cheap_stack(context: int = 1) -> list[inspect.FrameInfo]:
    """``inspect.stack`` without ``getmodule``: source lines come straight from ``linecache``.

    TVMScript's parser only reads ``frame``, ``lineno`` and ``code_context[0]`` of the top frames;
    the stock version resolves every frame's module by scanning ``sys.modules``.
    """
    frame = sys._getframe(1)  # noqa: SLF001 - skip this function's own frame, like inspect.stack
    out: list[inspect.FrameInfo] = []
    while frame is not None:
        filename = frame.f_code.co_filename
        line = linecache.getline(filename, frame.f_lineno) if context > 0 else ""
        out.append(
            inspect.FrameInfo(
                frame, filename, frame.f_lineno, frame.f_code.co_name,
                [line] if line else None, 0 if line else None, positions=None,
            )
        )
        frame = frame.f_back
    return out


def import_tensor_intrin() -> None:
    """Import ``tvm.s_tir.tensor_intrin`` once, with ``inspect.stack`` patched only meanwhile."""
    if "tvm.s_tir.tensor_intrin" in sys.modules:
        return
    original = inspect.stack
    inspect.stack = cheap_stack  # type: ignore[assignment]
    try:
        import tvm.s_tir.tensor_intrin  # noqa: F401  # pylint: disable=import-outside-toplevel
    finally:
        inspect.stack = original


# ----------------------------------------------------------------------------- fix 1: in-process


class ModuleCache:
    """Built modules keyed by a fake artifact path; the runner pops them (thread-safe)."""

    def __init__(self) -> None:
        self._mods: dict[str, tvm.runtime.Module] = {}
        self._lock = threading.Lock()
        self._next = 0

    def put(self, mod: tvm.runtime.Module) -> str:
        with self._lock:
            key = f"inprocess://{self._next}"
            self._next += 1
            self._mods[key] = mod
        return key

    def pop(self, key: str) -> tvm.runtime.Module | None:
        with self._lock:
            return self._mods.pop(key, None)


@derived_object
class InProcessBuilder(PyBuilder):
    """Build candidates in this process with ``LocalBuilder``'s own ``default_build``."""

    def __init__(self, cache: ModuleCache) -> None:
        super().__init__()
        self.cache = cache

    def build(self, build_inputs: list[BuilderInput]) -> list[BuilderResult]:
        results = []
        for inp in build_inputs:
            try:
                rt_mod = default_build(inp.mod, inp.target, None)
                results.append(BuilderResult(self.cache.put(rt_mod), None))
            except Exception as err:  # noqa: BLE001 - a failed candidate is data, not a crash
                results.append(BuilderResult(None, f"in-process build failed: {err}"))
        return results


@derived_object
class InProcessRunner(PyRunner):
    """Time built candidates in this process with MetaSchedule's own evaluator helper."""

    def __init__(self, cache: ModuleCache, config: EvaluatorConfig) -> None:
        super().__init__()
        self.cache = cache
        self.config = config
        random_fill = tvm.get_global_func("tvm.contrib.random.random_fill_for_measure")

        def fill(arr: tvm.runtime.Tensor) -> None:
            # MetaSchedule's runners random-fill *every* buffer, index tensors included: a
            # gather (``take`` of an embedding, in gpt_tiny) then reads out of bounds and the
            # process segfaults (TVM warns "Fast mode segfaults when there are out-of-bounds
            # indices"). Integer buffers get zeros, always in range, as in kernel_matches.
            if str(arr.dtype).startswith(("float", "bfloat")):
                random_fill(arr)
            else:
                arr.copyfrom(np.zeros([int(d) for d in arr.shape], dtype=str(arr.dtype)))

        self._fill = fill

    def run(self, runner_inputs: list[RunnerInput]) -> list[RunnerFuture]:
        futures = []
        dev = tvm.cpu()
        for inp in runner_inputs:
            rt_mod = self.cache.pop(inp.artifact_path)
            try:
                if rt_mod is None:
                    raise RuntimeError(f"no built module for {inp.artifact_path}")
                args = alloc_argument_common(
                    self._fill, dev, [a.as_json() for a in inp.args_info], 1
                )
                res = RunnerResult(run_evaluator_common(rt_mod, dev, self.config, args), None)
            except Exception as err:  # noqa: BLE001
                res = RunnerResult(None, f"in-process run failed: {err}")
            # Bind ``res`` now: the future is polled later, after the loop has moved on.
            futures.append(RunnerFuture(lambda: True, lambda r=res: r))
        return futures


# ----------------------------------------------------------------------------- anchors


def has_mul(expr: tvm.tirx.Expr) -> bool:
    """Whether a reduction update is a sum of products (through adds, subs and casts)."""
    if isinstance(expr, tvm.tirx.Mul):
        return True
    if isinstance(expr, (tvm.tirx.Add, tvm.tirx.Sub)):
        return has_mul(expr.a) or has_mul(expr.b)
    if isinstance(expr, tvm.tirx.Cast):
        return has_mul(expr.value)
    return False


def count_anchors(prim_func: tvm.tirx.PrimFunc) -> int:
    """Number of multiply-accumulate reduction blocks (conv, matmul, dense) in ``prim_func``.

    Plain reductions (sum, max of a softmax or a pooling) are not anchors: MetaSchedule's
    anchor-trace replay handles those, and FuseOps also never puts two MAC blocks in one group.
    """
    try:
        sch = tvm.s_tir.Schedule(tvm.IRModule({"main": prim_func}))
        stack = list(sch.get_child_blocks(sch.get_sblock("root")))
    except Exception:  # noqa: BLE001 - already lowered (no root block): nothing to schedule
        return 0
    count = 0
    while stack:
        rv = stack.pop()
        block = sch.get(rv)
        stack.extend(sch.get_child_blocks(rv))
        reduces = any(iv.iter_type == tvm.tirx.IterVar.CommReduce for iv in block.iter_vars)
        body = block.body
        if reduces and isinstance(body, tvm.tirx.BufferStore) and has_mul(body.value):
            count += 1
    return count


# ----------------------------------------------------------------------------- verification


def kernel_matches(naive: tvm.tirx.PrimFunc, scheduled: tvm.tirx.PrimFunc,
                    target: tvm.target.Target, seed: int, rounds: int = 2) -> bool:
    """Run both kernels on the same random arguments and compare every buffer afterwards.

    Why: MetaSchedule never checks values, and a tuned multi-anchor kernel can leave part of an
    intermediate (a conv's zero border) unwritten. Whether that shows depends on what the
    reused workspace memory held before, so the kernels alternate for ``rounds`` rounds, each
    reusing memory the other one dirtied. Integer buffers are zero-filled (in-range indices).
    """
    try:
        return kernels_agree(naive, scheduled, target, seed, rounds)
    except Exception as err:  # noqa: BLE001 - a kernel that cannot even run is not "correct"
        log.warning("tuned: verifying a kernel failed (%s)", first_line(err))
        return False


def kernels_agree(naive: tvm.tirx.PrimFunc, scheduled: tvm.tirx.PrimFunc,
                     target: tvm.target.Target, seed: int, rounds: int) -> bool:
    libs = [tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}),
                        target=target)["main"] for f in (naive, scheduled)]
    infos = [info.as_json() for info in ms.arg_info.ArgInfo.from_prim_func(naive)]
    rng = np.random.default_rng(seed)
    for _ in range(rounds):
        host = [rng.uniform(-1.0, 1.0, [int(d) for d in shape]).astype(str(dtype))
                if str(dtype).startswith("float") else np.zeros([int(d) for d in shape], str(dtype))
                for _, dtype, shape in infos]
        outs = []
        for lib in libs:
            args = [tvm.runtime.tensor(a.copy()) for a in host]
            lib(*args)
            outs.append([a.numpy() for a in args])
        for ref, got in zip(*outs):
            scale = max(float(np.max(np.abs(ref))) if ref.size else 0.0, 1.0)
            if not np.allclose(got, ref, rtol=1e-3, atol=1e-4 * scale, equal_nan=True):
                return False
    return True
