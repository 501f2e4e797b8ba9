"""Forcing plans that legality rejects through the build, to find the stage at which they fail.

A rejected plan is grouped without the legality check (:func:`fusion_rl.fusion.apply.group_module`
with ``program_order_on_cycle=True``), then fused, built, run and verified, in a supervised child
process (``python -m fusion_rl.fuzz force ...``): a TVM crash or hang costs one plan, not the run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from fusion_rl import paths
from fusion_rl.errors import first_line
from fusion_rl.fusion.plan import FusionPlan

#: Stages at which a forced (rejected) plan can fail, in pipeline order.
FORCE_STAGES = ("group", "well_formed", "fusetir", "build", "run", "wrong_output", "crashed", "timeout")


def child_env() -> dict[str, str]:
    """The environment of a fuzzer child: this checkout first on ``PYTHONPATH``, one TVM thread by default."""
    root = str(paths.IMPORT_ROOT)
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("TVM_NUM_THREADS", "1")
    return env


def force_fuse(model: Any, plan: FusionPlan) -> tuple[Any, str]:
    """Apply ``plan`` *without* the legality check; returns (fused module, stage reached).

    Raises ``ForceFailure(stage, message)`` at the first stage that fails:

    - ``group``: :func:`fusion_rl.fusion.apply.group_module` cannot emit it;
    - ``well_formed``: emitted anyway (a non-convex group is called in program order, so the
      group's function reads a value computed from its own output) and TVM's
      ``relax.analysis.well_formed`` rejects the module;
    - ``fusetir``: ``FuseTIR`` fails.
    """
    from tvm import relax

    from fusion_rl.fusion.apply import group_module

    try:
        # A non-convex group makes the grouped items cyclic: emit them in program order anyway,
        # so that the build shows where such a plan really fails.
        grouped = group_module(model.mod, plan, model.graph, program_order_on_cycle=True)
    except Exception as exc:  # noqa: BLE001
        raise ForceFailure("group", first_line(exc)) from None
    try:
        # TVM 0.27 raises for an ill-formed module (and returns None, not True, otherwise).
        ok = relax.analysis.well_formed(grouped)
    except Exception as exc:  # noqa: BLE001
        raise ForceFailure("well_formed", first_line(exc)) from None
    if ok is False:
        raise ForceFailure("well_formed", "relax.analysis.well_formed rejected the grouped module")
    try:
        fused = relax.transform.FuseTIR()(grouped)
        fused = relax.transform.DeadCodeElimination()(fused)
    except Exception as exc:  # noqa: BLE001
        raise ForceFailure("fusetir", first_line(exc)) from None
    return fused, "fusetir"


class ForceFailure(Exception):
    """A forced plan failed at ``stage`` (one of :data:`FORCE_STAGES`)."""

    def __init__(self, stage: str, message: str) -> None:
        super().__init__(f"{stage}: {message}")
        self.stage = stage
        self.message = message


def force_one(model: Any, plan: FusionPlan, provider: str, target: Any) -> dict[str, Any]:
    """Force one plan in this process; returns ``{"outcome": stage or "ok", "error": ...}``."""
    from fusion_rl.compiler.build import compile_module
    from fusion_rl.compiler.schedules import make_schedule
    from fusion_rl.compiler.verify import compare_outputs, reference_outputs, run_executable

    try:
        fused, _ = force_fuse(model, plan)
    except ForceFailure as exc:
        return {"outcome": exc.stage, "error": exc.message}
    try:
        ex = compile_module(fused, target, make_schedule(provider))[0]
    except Exception as exc:  # noqa: BLE001
        return {"outcome": "build", "error": first_line(exc)}
    try:
        actual = run_executable(ex, model.inputs)
    except Exception as exc:  # noqa: BLE001
        return {"outcome": "run", "error": first_line(exc)}
    expected, ref = reference_outputs(model)
    report = compare_outputs(actual, expected, ref)
    if not report.ok:
        return {"outcome": "wrong_output", "error": f"max abs err {report.max_abs_err:.3g}"}
    return {"outcome": "ok", "error": None}


def force_plans(
    tasks: Sequence[tuple[str, FusionPlan]],
    provider: str = "naive",
    timeout_s: float = 300.0,
) -> list[dict[str, Any]]:
    """Force each (model spec, plan) through grouping + FuseTIR + build + verify, in one
    supervised child process (models are loaded once each).

    The child (``python -m fusion_rl.fuzz force``) writes one JSON line per plan; if it dies, or
    makes no progress for ``timeout_s``, the plan it was on is recorded as ``crashed`` /
    ``timeout`` and a new child resumes after it. Returns one dict per task, in order, with
    ``outcome`` (a :data:`FORCE_STAGES` entry, or ``ok``) and ``error``.
    """
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="frl_force_") as tmp:
        todo = list(tasks)
        while todo:
            batch = Path(tmp) / "plans.json"
            batch.write_text(json.dumps([[spec, plan.to_dict()] for spec, plan in todo]))
            out = Path(tmp) / "results.jsonl"
            out.write_text("")
            proc = subprocess.Popen(
                [sys.executable, "-m", "fusion_rl.fuzz", "force", str(batch), str(out), provider],
                env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            timed_out = False
            deadline = time.monotonic() + timeout_s
            done = 0
            while True:
                try:
                    proc.wait(timeout=0.5)
                    break
                except subprocess.TimeoutExpired:
                    n = len(out.read_text().splitlines())
                    if n > done:
                        done, deadline = n, time.monotonic() + timeout_s
                    if time.monotonic() > deadline:
                        proc.kill()
                        proc.wait()
                        timed_out = True
                        break
            lines = [json.loads(ln) for ln in out.read_text().splitlines() if ln.strip()]
            results.extend(lines)
            todo = todo[len(lines):]
            if todo:  # the child stopped on todo[0]: that plan crashed or hung
                what = "timeout" if timed_out else "crashed"
                results.append({"outcome": what, "error": f"forced build {what} (child exit {proc.returncode})"})
                todo = todo[1:]
    return results


def force_child(batch: str, out: str, provider: str) -> None:
    """The child of :func:`force_plans`: one JSON line per plan of ``batch`` appended to ``out``."""
    from fusion_rl.compiler.target import parse_target
    from fusion_rl.graph.model import load_model

    models: dict[str, Any] = {}
    target = parse_target("host").to_tvm()
    with open(out, "a") as f:
        for spec, plan_dict in json.loads(Path(batch).read_text()):
            if spec not in models:
                models[spec] = load_model(spec)
            f.write(json.dumps(force_one(models[spec], FusionPlan.from_dict(plan_dict), provider, target)) + "\n")
            f.flush()
