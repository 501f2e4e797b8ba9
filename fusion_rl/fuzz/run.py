"""The fuzz loops: compile generated plans under each provider, and check the legality checker both ways.

See :mod:`fusion_rl.fuzz` for what is fuzzed and why plans run in isolated workers.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from fusion_rl.compiler.timing import TimingProtocol
from fusion_rl.fusion.legality import check_plan
from fusion_rl.fusion.plan import FusionPlan
from fusion_rl.fuzz.force import force_plans
from fusion_rl.fuzz.generate import RULE_NAMES, arbitrary_partitions, generate_plans
from fusion_rl.fuzz.report import FuzzReport, FuzzResult, LegalityResult
from fusion_rl.fuzz.reproduce import save_reproducer

#: The cheapest timing protocol: the fuzzer wants outputs, not latencies.
FUZZ_PROTOCOL = TimingProtocol(repeat=1, min_repeat_ms=0, number=1, warmup=0)
DEFAULT_SCHEDULES = ("naive", "rules")


def fuzz_model(
    model: Any,
    plans: Sequence[tuple[FusionPlan, str]],
    measurers: dict[str, Any],
    report: FuzzReport,
    repro_root: Path | None,
    deadline: float | None = None,
    log: Callable[[str], None] | None = None,
) -> None:
    """Compile and verify each plan under each provider; append results to ``report``."""
    for plan, source in plans:
        if deadline is not None and time.monotonic() > deadline:
            report.stopped_early = True
            return
        for provider, m in measurers.items():
            record = m.measure(model, plan)
            res = FuzzResult(
                model=model.name, plan_hash=plan.hash, provider=provider, source=source,
                status=record.status, num_groups=plan.num_groups,
                largest_group=max(len(g) for g in plan.groups), error=record.error,
                wall_s=record.wall_s,
            )
            if record.status != "ok" and repro_root is not None:
                res.reproducer = str(save_reproducer(repro_root, model, plan, provider, record.status,
                                                     record.error, source))
            report.results.append(res)
            if log and record.status != "ok":
                log(f"FINDING {model.name} {plan.hash} {provider} {source}: {record.status}: {record.error}")


def fuzz_legality(
    model: Any,
    n: int,
    rng: np.random.Generator,
    measurer: Any,
    report: FuzzReport,
    repro_root: Path | None,
    legal_seeds: Sequence[FusionPlan] = (),
) -> list[tuple[LegalityResult, FusionPlan, str]]:
    """Draw ``n`` arbitrary partitions; accepted ones are compiled now (they must verify).

    Rejected ones are returned, with a placeholder result already in ``report``; pass them to
    :func:`force_rejected` (batched over models: one child process for all of them).
    """
    pending: list[tuple[LegalityResult, FusionPlan, str]] = []
    for plan, source in arbitrary_partitions(model.graph, legal_seeds, n, rng):
        check = check_plan(model.graph, plan)
        if check.legal:
            record = measurer.measure(model, plan)
            res = LegalityResult(model.name, plan.hash, source, True, [], record.status, record.error)
            if record.status != "ok" and repro_root is not None:
                res.reproducer = str(save_reproducer(repro_root, model, plan, measurer.provider.name,
                                                     record.status, record.error, f"legality:{source}"))
        else:
            rules = sorted({v.rule for v in check.errors})
            res = LegalityResult(model.name, plan.hash, source, False, rules, "pending")
            pending.append((res, plan, _model_spec(model)))
        report.legality.append(res)
    return pending


def force_rejected(pending: Sequence[tuple[LegalityResult, FusionPlan, str]], provider: str,
                   timeout_s: float = 300.0) -> None:
    """Force the rejected plans of :func:`fuzz_legality` and fill in their outcomes."""
    if not pending:
        return
    outs = force_plans([(spec, plan) for _, plan, spec in pending], provider, timeout_s)
    for (res, _, _), out in zip(pending, outs):
        res.outcome, res.error = out["outcome"], out.get("error")


def _model_spec(model: Any) -> str:
    return model.ref.spec if model.ref.kind in ("zoo", "onnx") else model.name


def fuzz_plans(
    models: Sequence[str],
    n_plans: int,
    seed: int = 0,
    schedules: Sequence[str] = DEFAULT_SCHEDULES,
    out: str | os.PathLike | None = None,
    n_partitions: int | None = None,
    time_budget_s: float | None = None,
    timeout_s: float = 300.0,
    command: str = "",
    log: Callable[[str], None] | None = None,
    repro_dir: str | os.PathLike | None = None,
) -> FuzzReport:
    """Fuzz ``n_plans`` legal plans in all (spread over ``models``) and ``n_partitions``
    arbitrary partitions (default ``n_plans // 2``) through the legality checker.

    Order: load every model and draw every plan (seeded: ``default_rng([seed, model index])``);
    run the legality fuzz; then compile plans round-robin over the models, so that a run cut
    short by ``time_budget_s`` (``stopped_early`` in the report) still covers every model.
    A model with fewer distinct legal plans than its share passes the rest to the next models.
    Reproducers go to ``repro_dir`` (default ``<out>/reproducers/``); ``summary.json``/``summary.md`` to ``out``
    (rewritten every 25 plans, so a killed run leaves a partial summary). ``out=None`` writes
    nothing.
    """
    from fusion_rl.compiler.measure import Measurer
    from fusion_rl.errors import FusionRLError
    from fusion_rl.fusion.rules import make_plan
    from fusion_rl.graph.model import load_model

    t0 = time.monotonic()
    deadline = t0 + time_budget_s if time_budget_s else None
    report = FuzzReport(command=command, seed=seed, models=list(models), providers=list(schedules))
    if repro_dir is not None:
        repro_root: Path | None = Path(repro_dir)
    else:
        repro_root = Path(out) / "reproducers" if out is not None else None
    n_partitions = n_plans // 2 if n_partitions is None else n_partitions
    per_model = _split(n_plans, len(models))
    per_model_parts = _split(n_partitions, len(models))

    def checkpoint() -> None:
        if out is not None:
            report.wall_s = time.monotonic() - t0
            report.write(out)

    # 1. Models and plans.
    loaded: list[tuple[Any, list[tuple[FusionPlan, str]], dict[str, FusionPlan], np.random.Generator, int]] = []
    carry = 0
    for i, name in enumerate(models):
        rng = np.random.default_rng([seed, i])
        try:
            model = load_model(name)
        except FusionRLError as exc:
            report.skipped_models[name] = str(exc)
            carry += per_model[i]
            continue
        rule_plans = {r: make_plan(r, model.mod, model.graph) for r in RULE_NAMES}
        want = per_model[i] + carry
        plans = generate_plans(model.graph, rule_plans, want, rng)
        carry = want - len(plans)
        loaded.append((model, plans, rule_plans, rng, per_model_parts[i]))
        if log:
            log(f"{name}: {len(model.graph)} ops, {len(plans)} plans x {len(schedules)} providers, "
                f"{per_model_parts[i]} arbitrary partitions")

    measurers = {
        s: Measurer("host", s, store=None, protocol=FUZZ_PROTOCOL, isolate=True, timeout_s=timeout_s)
        for s in schedules
    }
    try:
        # 2. The legality checker, both ways.
        pending: list[tuple[LegalityResult, FusionPlan, str]] = []
        for model, plans, rule_plans, rng, n_parts in loaded:
            if n_parts:
                seeds = [p for p, _ in plans] + list(rule_plans.values())
                pending += fuzz_legality(model, n_parts, rng, measurers[schedules[0]], report,
                                         repro_root, seeds)
        if log:
            log(f"legality: {len(report.legality)} partitions, forcing {len(pending)} rejected ones")
        force_rejected(pending, schedules[0], timeout_s)
        checkpoint()
        # 3. Legal plans, round-robin over models.
        done = 0
        for k in range(max((len(p) for _, p, _, _, _ in loaded), default=0)):
            for model, plans, _, _, _ in loaded:
                if k >= len(plans):
                    continue
                if deadline is not None and time.monotonic() > deadline:
                    report.stopped_early = True
                    break
                fuzz_model(model, [plans[k]], measurers, report, repro_root, None, log)
                done += 1
                if done % 25 == 0:
                    checkpoint()
                    if log:
                        log(f"{done} plans, {len(report.findings)} findings")
            if report.stopped_early:
                break
    finally:
        for m in measurers.values():
            m.close()
    checkpoint()
    report.wall_s = time.monotonic() - t0
    return report


def _split(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, max(parts, 1))
    return [base + (1 if i < extra else 0) for i in range(parts)]
