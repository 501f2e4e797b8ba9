"""Compile a (model, plan, target, schedule) to a Relax VM executable, without re-fusing.

``tvm.compile``'s default Relax pipeline runs FuseOps again and destroys a custom partition
(36 kernels became 8 in one test), so we hand it a lowering-only pipeline: the
``dataflow_lower_passes`` and ``finalize_passes`` of the CPU backend.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import tvm
from tvm import relax

from fusion_rl.compiler.schedules.base import ScheduleProvider, schedule_report
from fusion_rl.errors import CompileError, FusionRLError, first_line
from fusion_rl.fusion.apply import apply_plan
from fusion_rl.fusion.plan import FusionPlan
from fusion_rl.graph.model import Model

_CALL_TIR = tvm.ir.Op.get("relax.call_tir")


def lowering_pipeline(target: tvm.target.Target) -> tvm.transform.Pass:
    """The Relax pipeline after fusion: lower dataflow, plan memory, finalize. No FuseOps."""
    if target.kind.name == "cuda":
        from tvm.relax.backend.gpu_generic import pipeline as backend
    else:
        from tvm.relax.backend.cpu_generic import pipeline as backend
    return tvm.transform.Sequential(
        backend.dataflow_lower_passes(target) + backend.finalize_passes(target),
        name="fusion_rl.LowerOnly",
    )


def num_kernels(fused: tvm.IRModule) -> int:
    """Kernels ``main`` launches: its ``call_tir`` bindings after fusion, less the pure
    reshapes that the lowering pipeline turns into views (``RewriteDataflowReshape``)."""
    lowered = relax.transform.RewriteDataflowReshape()(fused)
    return sum(
        1
        for block in lowered["main"].body.blocks
        for b in block.bindings
        if isinstance(b.value, relax.Call) and b.value.op == _CALL_TIR
    )


@dataclass
class CompiledPlan:
    executable: "relax.VMExecutable"
    fused: tvm.IRModule  #: after plan + FuseTIR, before scheduling
    num_kernels: int
    schedule_s: float  #: time spent by the schedule provider (tuning included)
    build_s: float
    #: kernel name -> the schedule it got (:func:`~fusion_rl.compiler.schedules.base.schedule_report`)
    schedules: dict[str, str]


def compile_module(
    mod: tvm.IRModule, target: tvm.target.Target, schedule: ScheduleProvider
) -> tuple["relax.VMExecutable", float, float, dict[str, str]]:
    """Schedule and build an already-fused module.

    Returns (executable, schedule_s, build_s, kernel name -> schedule it got).
    """
    t0 = time.perf_counter()
    try:
        scheduled = schedule.schedule(mod, target)
    except FusionRLError:
        raise
    except Exception as exc:
        raise CompileError(f"schedule provider '{schedule.name}' failed: {first_line(exc)}") from exc
    t1 = time.perf_counter()
    try:
        with target:
            ex = tvm.compile(scheduled, target=target, relax_pipeline=lowering_pipeline(target))
    except Exception as exc:
        raise CompileError(f"TVM build failed: {first_line(exc)}") from exc
    return ex, t1 - t0, time.perf_counter() - t1, schedule_report(scheduled)


def compile_plan(
    model: Model, plan: FusionPlan, target: tvm.target.Target, schedule: ScheduleProvider
) -> CompiledPlan:
    """Apply ``plan`` to ``model`` (legality checked first), schedule and build it."""
    fused = apply_plan(model.mod, plan, model.graph)
    ex, schedule_s, build_s, schedules = compile_module(fused, target, schedule)
    return CompiledPlan(ex, fused, num_kernels(fused), schedule_s, build_s, schedules)

