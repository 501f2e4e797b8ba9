"""``FusionEnv.validate()``: re-verify a plan, after CompilerGym's ``env.validate()``.

CompilerGym replays an episode's state and checks that its reward still holds. Here the state is
a fusion plan, and what must hold is what made it count in the first place:

1. it is legal (:func:`fusion_rl.fusion.legality.check_plan`; the env keeps this invariant, so a
   failure here is a bug, not a user error);
2. a fresh build, never served from the measurement store, produces the reference outputs
   (ONNX Runtime) within the verification tolerance (:mod:`fusion_rl.compiler.verify`); the build
   runs isolated when the env spec says so, so a crash is a status, not a dead process;
3. optionally, its stored latency still holds under the criterion of ``fusion-rl validate``
   (:func:`fusion_rl.compiler.result.holds`): re-timed with the env's protocol.
"""

from __future__ import annotations

from dataclasses import dataclass

from fusion_rl.compiler.measure import Measurer
from fusion_rl.compiler.result import Verdict, holds
from fusion_rl.compiler.store import MeasurementRecord
from fusion_rl.compiler.target import TargetSpec
from fusion_rl.compiler.timing import TimingProtocol
from fusion_rl.env.spec import EnvSpec
from fusion_rl.fusion.legality import check_plan
from fusion_rl.fusion.plan import FusionPlan
from fusion_rl.graph.model import Model

#: Verification only needs one run; timing it properly is the latency check's job.
_VERIFY_PROTOCOL = TimingProtocol(repeat=1, min_repeat_ms=0, number=1, warmup=0)


@dataclass(frozen=True)
class ValidationResult:
    """The outcome of :func:`validate_plan`; :meth:`okay` is the one-word answer."""

    model: str
    target: str
    plan_hash: str
    legal: bool
    violations: tuple[str, ...]  #: legality errors (empty when legal)
    status: str | None  #: the fresh build's status ("ok", "wrong_output", ...); None if not built
    error: str | None = None
    #: The latency check (``check_latency=True``), or None when not asked or nothing was stored.
    latency: Verdict | None = None

    def okay(self) -> bool:
        """Legal, built and verified, and (when checked) the stored latency holds."""
        return self.legal and self.status == "ok" and (self.latency is None or self.latency.holds)

    def __str__(self) -> str:
        what = f"{self.model} on {self.target}, plan {self.plan_hash[:12]}"
        if not self.legal:
            return f"INVALID: {what}: illegal plan: {'; '.join(self.violations)}"
        if self.status != "ok":
            return f"INVALID: {what}: fresh build {self.status}: {self.error}"
        text = f"VALID: {what}: legal, outputs verified against the reference"
        return text if self.latency is None else f"{text}; {self.latency.line('latency')}"


def validate_plan(model: Model, plan: FusionPlan, target: TargetSpec, spec: EnvSpec,
                  stored: MeasurementRecord | None = None,
                  check_latency: bool = False) -> ValidationResult:
    """Check ``plan`` of ``model`` on ``target`` as the module docstring says.

    Parameters
    ----------
    model, plan, target
        What to validate.
    spec
        The env spec: schedule provider, isolation, timeout and (for the latency) protocol.
    stored
        The plan's stored measurement, compared with a fresh one when ``check_latency``.
    check_latency
        Also re-time the plan with ``spec.protocol`` and apply the ``fusion-rl validate``
        criterion to ``stored`` (skipped when nothing ``ok`` was stored).

    Returns
    -------
    ValidationResult
    """
    report = check_plan(model.graph, plan)
    base = dict(model=model.name, target=target.key, plan_hash=plan.hash)
    if not report.legal:
        return ValidationResult(**base, legal=False, violations=tuple(map(str, report.errors)),
                                status=None)
    compare = check_latency and stored is not None and stored.status == "ok"
    with Measurer(target=target, schedule=spec.schedule, schedule_kwargs=dict(spec.schedule_kwargs),
                  store=None, protocol=spec.protocol if compare else _VERIFY_PROTOCOL,
                  isolate=spec.isolate, timeout_s=spec.timeout_s) as measurer:
        fresh = measurer.measure(model, plan)
    verdict = None
    if compare and fresh.status == "ok":
        assert stored is not None and stored.median_ms is not None and fresh.median_ms is not None
        verdict = holds(stored.median_ms, stored.spread_ms or 0.0, fresh.median_ms,
                        fresh.spread_ms or 0.0)
    return ValidationResult(**base, legal=True, violations=(), status=fresh.status,
                            error=fresh.error, latency=verdict)
