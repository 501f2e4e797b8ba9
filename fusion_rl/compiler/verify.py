"""Check a compiled plan's outputs against a reference before its latency may count.

A wrong output is an error, never a latency: MetaSchedule has produced numerically wrong
kernels for multi-anchor groups here (docs/design.md §12), so every compiled plan is verified.

The reference is ONNX Runtime on the model's ONNX graph (an independent implementation), or,
where there is no ONNX graph, the unfused module with naive loops.

Tolerance: elementwise ``|actual - ref| <= atol + rtol * |ref|`` with ``rtol = 1e-3`` and
``atol = 1e-4 * max(1, max|ref|)``. fp32 reductions reordered by a schedule move results by
~1e-6 relative; the failures seen here were off by 1e2 to 1e9.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

import tvm
from tvm import relax

from fusion_rl.errors import VerificationError
from fusion_rl.graph.model import Model

if TYPE_CHECKING:
    from fusion_rl.compiler.schedules.base import ScheduleProvider

RTOL = 1e-3
ATOL = 1e-4


@dataclass(frozen=True)
class VerifyReport:
    ok: bool
    max_abs_err: float
    max_rel_err: float
    reference: str  #: "onnxruntime" or "tvm-unfused"

    def to_dict(self) -> dict:
        return {
            "ok": self.ok,
            "max_abs_err": self.max_abs_err,
            "max_rel_err": self.max_rel_err,
            "reference": self.reference,
        }


def run_executable(
    ex: "relax.VMExecutable", inputs: Sequence[np.ndarray], device: tvm.runtime.Device | None = None
) -> list[np.ndarray]:
    """Run ``main`` once and return its outputs flattened to a list of arrays."""
    dev = device or tvm.cpu()
    vm = relax.VirtualMachine(ex, dev)
    out = vm["main"](*[tvm.runtime.tensor(a, dev) for a in inputs])
    return flatten_outputs(out)


def reference_outputs(model: Model) -> tuple[list[np.ndarray], str]:
    """The reference outputs of ``model`` on its example inputs (cached on the model)."""
    if model.reference is not None:
        return model.reference
    if model.onnx_model is not None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        sess = ort.InferenceSession(
            model.onnx_model.SerializeToString(), opts, providers=["CPUExecutionProvider"]
        )
        names = [i.name for i in sess.get_inputs()]
        result = ([np.asarray(o) for o in sess.run(None, dict(zip(names, model.inputs)))], "onnxruntime")
    else:
        from fusion_rl.compiler.build import compile_module
        from fusion_rl.compiler.schedules.base import NaiveSchedule

        target = tvm.target.Target({"kind": "llvm"})
        ex = compile_module(model.mod, target, NaiveSchedule())[0]
        result = (run_executable(ex, model.inputs), "tvm-unfused")
    model.reference = result
    return result


def compare_outputs(actual: Sequence[np.ndarray], expected: Sequence[np.ndarray], reference: str = "") -> VerifyReport:
    """Check ``actual`` outputs against ``expected`` ones (count, shapes, then values within tolerance).

    ``reference`` names where ``expected`` came from (``"onnxruntime"``, ``"tvm-unfused"``) and is
    carried into the report.
    """
    if len(actual) != len(expected):
        return VerifyReport(False, float("inf"), float("inf"), reference)
    ok = True
    max_abs = 0.0
    max_rel = 0.0
    for a, e in zip(actual, expected):
        a = np.asarray(a, dtype=np.float64)
        e = np.asarray(e, dtype=np.float64)
        if a.shape != e.shape or not np.all(np.isfinite(a) == np.isfinite(e)):
            return VerifyReport(False, float("inf"), float("inf"), reference)
        finite = np.isfinite(e)
        diff = np.abs(a[finite] - e[finite])
        scale = max(1.0, float(np.max(np.abs(e[finite]), initial=0.0)))
        if diff.size:
            max_abs = max(max_abs, float(diff.max()))
            max_rel = max(max_rel, float((diff / (np.abs(e[finite]) + 1e-12)).max()))
            ok &= bool(np.all(diff <= ATOL * scale + RTOL * np.abs(e[finite])))
    return VerifyReport(ok, max_abs, max_rel, reference)


def verify_executable(ex: "relax.VMExecutable", model: Model, what: str = "plan") -> VerifyReport:
    """Run ``ex`` on the model's inputs and compare with the reference; raise if wrong."""
    expected, reference = reference_outputs(model)
    report = compare_outputs(run_executable(ex, model.inputs), expected, reference)
    if not report.ok:
        raise VerificationError(
            f"{what} on {model.name} gives wrong output: max abs error {report.max_abs_err:.3g} "
            f"(max rel {report.max_rel_err:.3g}) against {reference}"
        )
    return report


def flatten_outputs(out) -> list[np.ndarray]:
    """A VM result (a tensor or nested tuples of them) as a flat list of numpy arrays."""
    if isinstance(out, tvm.runtime.Tensor):
        return [out.numpy()]
    if isinstance(out, (list, tuple)) or hasattr(out, "__len__"):
        flat = []
        for o in out:
            flat.extend(flatten_outputs(o))
        return flat
    return [np.asarray(out)]


def verify_rule_sets(
    model: Model,
    target: tvm.target.Target,
    schedule: "ScheduleProvider",
    rule_sets: Sequence[str] | None = None,
) -> dict[str, VerifyReport | str]:
    """Compile the plan of every rule set and check each against the reference.

    What ``fusion-rl plan --rules R`` checks, for all rule sets at once. Rule sets that give
    the same partition (on small graphs several do) are compiled once.

    Parameters
    ----------
    model:
        The model; its reference is ONNX Runtime on its ONNX graph where it has one.
    target, schedule:
        What to compile for and with (``naive`` is cheapest: it only checks correctness).
    rule_sets:
        Names of :data:`fusion_rl.fusion.rules.RULE_SETS`; default all.

    Returns
    -------
    dict
        Rule set -> its :class:`VerifyReport`, or the one-line error that stopped it (no plan,
        no build, or wrong output), so that one failure does not hide the others.
    """
    from fusion_rl.compiler.build import compile_plan
    from fusion_rl.errors import FusionRLError
    from fusion_rl.fusion.rules import RULE_SETS, make_plan

    results: dict[str, VerifyReport | str] = {}
    by_hash: dict[str, VerifyReport | str] = {}
    for rules in rule_sets or list(RULE_SETS):
        try:
            plan = make_plan(rules, model.mod, model.graph)
            if plan.hash not in by_hash:
                compiled = compile_plan(model, plan, target, schedule)
                by_hash[plan.hash] = verify_executable(compiled.executable, model, f"rules {rules}")
            results[rules] = by_hash[plan.hash]
        except FusionRLError as exc:
            results[rules] = str(exc).splitlines()[0]
    return results
