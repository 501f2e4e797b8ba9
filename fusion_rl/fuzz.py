"""Plan fuzzing: compile many plans, compare each with the reference, keep reproducers.

Two fuzzers live here.

**Plan fuzzer** (:func:`fuzz_plans`). For each model it generates random *legal* plans from
three sources, so that small groups, large groups and plans at the legality boundary are all
covered:

- ``sweep``: :func:`~fusion_rl.fusion.random_plans.random_plan` with ``merge_prob`` swept over
  [0, 1] (near-unfused to near-maximal groups);
- ``boundary``: a plan grown until *no* further merge is legal (:func:`boundary_plan`); every
  one-step extension of it is illegal;
- ``mutant:<rules>``: one to three :func:`~fusion_rl.fusion.random_plans.mutate_plan` steps
  from each hand-written rule set's plan (its legal neighbourhood).

Each plan is compiled, run and compared with the reference
(:func:`fusion_rl.compiler.verify.verify_executable`) under every schedule provider asked for.

*Isolation, and why.* Plans go through :class:`fusion_rl.compiler.measure.Measurer` with
``isolate=True`` and no store: one persistent worker per provider, so a TVM segfault or hang
costs one plan (recorded as ``crashed``/``timeout``), not the fuzzer. The price: one worker
start per provider (TVM + torch import, seconds, once), a pipe round trip per plan (sub-ms), and
one extra run of the model per plan, because the Measurer also times (``FUZZ_PROTOCOL``: one
repeat, no warm-up). In-process compilation would save that, but a single TVM crash would end a
1,000-plan run, and a fuzzer exists to find exactly such plans. Rejected plans forced through
the build (below) run in their own supervised child for the same reason.

A plan whose status is not ``ok`` (wrong output, build failure, crash, timeout) is a *finding*
and gets a reproducer folder ``<repro_dir>/<model>-<planhash>-<provider>/`` (see
:func:`save_reproducer` and docs/reproducers.md): the ONNX model, the plan JSON, the inputs,
the expected (reference) and actual outputs, ``meta.json`` and ``repro.sh``.

**Legality fuzzer** (:func:`fuzz_legality`). It draws *arbitrary* partitions (random labels,
contiguous runs in program order, random pairs merged into a legal plan, and the illegal
one-step extensions of boundary plans) and checks the checker both ways:

- every plan :func:`~fusion_rl.fusion.legality.check_plan` accepts must compile and verify
  (through the Measurer, as above);
- every plan it rejects is *forced* through the plan pass without the legality check
  (:func:`fusion_rl.fusion.apply._group_module` + ``FuseTIR`` + build + verify) in a supervised
  child process (:func:`force_plans`), and the stage at which it fails is recorded. A rejected
  plan that builds and verifies shows the rule to be conservative for that case.

Run it with ``scripts/fuzz_plans.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from fusion_rl import paths
from fusion_rl.compiler.timing import TimingProtocol
from fusion_rl.fusion.legality import check_plan
from fusion_rl.fusion.plan import FusionPlan
from fusion_rl.fusion.random_plans import mutate_plan, random_plan
from fusion_rl.graph.opgraph import OpGraph

#: The cheapest timing protocol: the fuzzer wants outputs, not latencies.
FUZZ_PROTOCOL = TimingProtocol(repeat=1, min_repeat_ms=0, number=1, warmup=0)
#: The zoo models that the fuzzer covers by default: every one (they compile in about a second
#: each). A fixed subset once hid a legality-checker crash on the ``hf_*`` graphs (issue 16).
def default_models() -> tuple[str, ...]:
    """Every model of the built-in zoo, in registration order."""
    from fusion_rl.graph.zoo import list_models

    return tuple(entry.name for entry in list_models())


DEFAULT_SCHEDULES = ("naive", "rules")
#: Rule sets whose neighbourhoods are fuzzed (``mutant:<name>``).
RULE_NAMES = ("unfused", "tvm", "tensorrt", "aggressive")

#: Stages at which a forced (rejected) plan can fail, in pipeline order.
FORCE_STAGES = ("group", "well_formed", "fusetir", "build", "run", "wrong_output", "crashed", "timeout")


# ---- plan generation ---------------------------------------------------------------------


def boundary_plan(graph: OpGraph, rng: np.random.Generator, max_anchors: int | None = None) -> FusionPlan:
    """A random *maximal* legal plan: grown until no edge can be contracted legally.

    One pass of :func:`random_plan` with ``merge_prob=1`` can reject a merge that becomes legal
    after later merges (a diamond closes), so passes repeat until a fixed point.
    """
    plan = random_plan(graph, rng, merge_prob=1.0, max_anchors=max_anchors)
    while True:
        grown = random_plan(graph, rng, merge_prob=1.0, start=plan, max_anchors=max_anchors)
        if grown.hash == plan.hash:
            return plan.with_name("boundary")
        plan = grown


def illegal_extensions(graph: OpGraph, plan: FusionPlan) -> list[FusionPlan]:
    """Every plan one edge-contraction past ``plan`` that legality rejects (the boundary)."""
    owner = plan.group_of()
    out: dict[str, FusionPlan] = {}
    for e in graph.edges:
        a, b = owner[e.src], owner[e.dst]
        if a == b:
            continue
        labels = [a if owner[n] == b else owner[n] for n in range(len(graph))]
        cand = FusionPlan.from_assignment(labels, graph.fingerprint, "boundary+1")
        if not check_plan(graph, cand).legal:
            out.setdefault(cand.hash, cand)
    return list(out.values())


def generate_plans(
    graph: OpGraph,
    rule_plans: dict[str, FusionPlan],
    n: int,
    rng: np.random.Generator,
) -> list[tuple[FusionPlan, str]]:
    """Up to ``n`` distinct legal plans as (plan, source); see the module docstring.

    Sources rotate sweep / boundary / mutant so that every kind is present even for small ``n``;
    duplicates are dropped (small graphs have few distinct plans), so fewer than ``n`` may come
    back after ``20 n`` attempts.
    """
    plans: dict[str, tuple[FusionPlan, str]] = {}
    rules = [r for r in RULE_NAMES if r in rule_plans]
    attempts = 0
    i = 0
    while len(plans) < n and attempts < 20 * max(n, 1):
        attempts += 1
        kind = i % 3
        i += 1
        if kind == 0:
            p = float(((i // 3) * 0.618034) % 1.0)  # low-discrepancy sweep over [0, 1)
            if (i // 3) % 7 == 6:
                p = 1.0
            plan, source = random_plan(graph, rng, merge_prob=p), f"sweep:p={p:.2f}"
        elif kind == 1:
            cap = 1 if rng.uniform() < 0.5 else None
            plan, source = boundary_plan(graph, rng, max_anchors=cap), "boundary" + ("-1anchor" if cap else "")
        else:
            if not rules:
                continue
            rule = rules[(i // 3) % len(rules)]
            plan = rule_plans[rule]
            for _ in range(int(rng.integers(1, 4))):
                plan = mutate_plan(graph, plan, rng)
            source = f"mutant:{rule}"
        if not check_plan(graph, plan).legal:  # generators promise legality: check it
            raise AssertionError(f"generator {source} made an illegal plan {plan.hash}")
        plans.setdefault(plan.hash, (plan.with_name(source.split(":")[0]), source))
    return list(plans.values())


def arbitrary_partitions(
    graph: OpGraph,
    legal_seeds: Sequence[FusionPlan],
    n: int,
    rng: np.random.Generator,
) -> list[tuple[FusionPlan, str]]:
    """``n`` distinct arbitrary (not necessarily legal) partitions, as (plan, source).

    - ``labels``: each node gets one of ``k`` random labels (mostly non-convex);
    - ``runs``: contiguous runs of program order (always convex, often *disconnected* groups,
      and the only source that puts opaque ops into groups at random);
    - ``pair``: a legal plan with two random groups merged;
    - ``boundary+1``: an illegal one-step extension of a maximal legal plan;
    - ``cross``: two edges ``u1 -> v1`` and ``u2 -> v2`` on parallel branches grouped as
      ``{u1, v2}`` and ``{u2, v1}``: each group is convex, but they depend on each other (the
      ``cycle`` rule, which the other sources almost never reach without ``non_convex``).
    """
    N = len(graph)
    out: dict[str, tuple[FusionPlan, str]] = {}
    attempts = 0
    while len(out) < n and attempts < 20 * max(n, 1):
        attempts += 1
        kind = attempts % 5
        if kind == 4:
            plan = _cross_plan(graph, rng)
            if plan is None:
                continue
            source = "cross"
        elif kind == 0:
            k = int(rng.integers(1, max(2, N)))
            plan = FusionPlan.from_assignment(rng.integers(0, k, size=N).tolist(), graph.fingerprint)
            source = "labels"
        elif kind == 1:
            cuts = sorted(set(rng.choice(np.arange(1, N), size=int(rng.integers(0, max(1, N // 2))), replace=False).tolist())) if N > 1 else []
            labels = np.zeros(N, dtype=int)
            for c in cuts:
                labels[c:] += 1
            plan = FusionPlan.from_assignment(labels.tolist(), graph.fingerprint)
            source = "runs"
        elif kind == 2 and legal_seeds:
            base = legal_seeds[int(rng.integers(len(legal_seeds)))]
            if base.num_groups < 2:
                continue
            a, b = rng.choice(base.num_groups, size=2, replace=False)
            groups = [g for gi, g in enumerate(base.groups) if gi not in (a, b)]
            groups.append(base.groups[a] + base.groups[b])
            plan, source = FusionPlan.from_groups(groups, N, graph.fingerprint), "pair"
        else:
            # Capping anchors stops growth early in CNNs, whose uncapped maximal plan is often
            # the whole graph in one group (and then has no extension at all).
            cap = 1 if rng.uniform() < 0.5 else None
            ext = illegal_extensions(graph, boundary_plan(graph, rng, max_anchors=cap))
            if not ext:
                continue
            plan, source = ext[int(rng.integers(len(ext)))], "boundary+1"
        out.setdefault(plan.hash, (plan.with_name(source), source))
    return list(out.values())


def _cross_plan(graph: OpGraph, rng: np.random.Generator, tries: int = 3000) -> FusionPlan | None:
    """Groups ``{u1, v2}`` and ``{u2, v1}`` from two edges, each group convex (see above).

    Edge pairs are tried in random order (at most ``tries``); in a transformer most pairs are
    connected through residuals, so the convex ones are rare and must be searched for.
    """
    from fusion_rl.fusion.legality import is_convex

    edges = graph.edges
    if len(edges) < 2:
        return None
    pairs = [(i, j) for i in range(len(edges)) for j in range(len(edges)) if i < j]
    order = rng.permutation(len(pairs))[:tries]
    for k in order:
        i, j = pairs[int(k)]
        if rng.uniform() < 0.5:
            i, j = j, i
        e1, e2 = edges[i], edges[j]
        nodes = {e1.src, e1.dst, e2.src, e2.dst}
        if len(nodes) < 4:
            continue
        a, b = {e1.src, e2.dst}, {e2.src, e1.dst}
        if not (is_convex(a, graph) and is_convex(b, graph)):
            continue
        rest = [[n] for n in range(len(graph)) if n not in nodes]
        return FusionPlan.from_groups([sorted(a), sorted(b), *rest], len(graph), graph.fingerprint)
    return None


# ---- results -----------------------------------------------------------------------------


@dataclass
class FuzzResult:
    """The outcome of one (model, plan, provider)."""

    model: str
    plan_hash: str
    provider: str
    source: str
    status: str  #: Measurer status: ok, wrong_output, failed, crashed, timeout
    num_groups: int
    largest_group: int
    error: str | None = None
    max_abs_err: float | None = None
    reproducer: str | None = None
    wall_s: float = 0.0


@dataclass
class LegalityResult:
    """The outcome of one arbitrary partition through the legality checker and the build."""

    model: str
    plan_hash: str
    source: str
    accepted: bool
    rules: list[str]  #: rules broken (empty if accepted)
    outcome: str  #: accepted: Measurer status; rejected: failing stage or "ok" (conservative)
    error: str | None = None
    reproducer: str | None = None


@dataclass
class FuzzReport:
    """Everything a fuzz run found; :meth:`write` saves ``summary.json`` and ``summary.md``."""

    command: str
    seed: int
    models: list[str]
    providers: list[str]
    results: list[FuzzResult] = field(default_factory=list)
    legality: list[LegalityResult] = field(default_factory=list)
    skipped_models: dict[str, str] = field(default_factory=dict)
    wall_s: float = 0.0
    stopped_early: bool = False

    @property
    def findings(self) -> list[FuzzResult]:
        return [r for r in self.results if r.status != "ok"]

    @property
    def legality_holes(self) -> list[LegalityResult]:
        """Accepted plans that did not compile and verify: the checker let a bad plan through."""
        return [r for r in self.legality if r.accepted and r.outcome != "ok"]

    @property
    def conservative(self) -> list[LegalityResult]:
        """Rejected plans that compiled and verified when forced: the rule is stricter than TVM."""
        return [r for r in self.legality if not r.accepted and r.outcome == "ok"]

    def counts(self) -> dict[str, Any]:
        plans = {(r.model, r.plan_hash) for r in self.results}
        rejected = [r for r in self.legality if not r.accepted]
        by_rule: dict[str, Counter] = {}
        for r in rejected:
            key = "+".join(sorted(set(r.rules)))
            by_rule.setdefault(key, Counter())[r.outcome] += 1
        return {
            "plans": len(plans),
            "compiles": len(self.results),
            "models": len({r.model for r in self.results}),
            "providers": list(self.providers),
            "by_status": dict(Counter(r.status for r in self.results)),
            "by_source": dict(Counter(r.source.split(":")[0] for r in self.results)),
            "mismatches": sum(r.status == "wrong_output" for r in self.results),
            "findings": len(self.findings),
            "legality": {
                "partitions": len(self.legality),
                "accepted": sum(r.accepted for r in self.legality),
                "accepted_ok": sum(r.accepted and r.outcome == "ok" for r in self.legality),
                "accepted_failed": len(self.legality_holes),
                "rejected": len(rejected),
                "rejected_confirmed": sum(r.outcome != "ok" for r in rejected),
                "rejected_but_built": len(self.conservative),
                "rejected_by_rule": {k: dict(v) for k, v in sorted(by_rule.items())},
                "by_source": dict(Counter(r.source for r in self.legality)),
            },
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "command": self.command,
            "seed": self.seed,
            "models": self.models,
            "providers": self.providers,
            "wall_s": round(self.wall_s, 1),
            "stopped_early": self.stopped_early,
            "skipped_models": self.skipped_models,
            "counts": self.counts(),
            "findings": [asdict(r) for r in self.findings],
            "legality_holes": [asdict(r) for r in self.legality_holes],
            "conservative": [asdict(r) for r in self.conservative],
            "results": [asdict(r) for r in self.results],
            "legality_results": [asdict(r) for r in self.legality],
        }

    def markdown(self) -> str:
        c = self.counts()
        lg = c["legality"]
        lines = [
            "# Plan fuzzing report",
            "",
            f"Reproduce: `{self.command}`",
            "",
            f"- plans: {c['plans']} on {c['models']} models ({', '.join(self.models)}), "
            f"providers {', '.join(self.providers)}: {c['compiles']} compiles in {self.wall_s:.0f} s"
            + (" (stopped early: time budget)" if self.stopped_early else ""),
            f"- statuses: {c['by_status']}; sources: {c['by_source']}",
            f"- **mismatches (wrong output): {c['mismatches']}**; all findings: {c['findings']}",
            "",
            "## Legality checker",
            "",
            f"- arbitrary partitions: {lg['partitions']} ({lg['by_source']})",
            f"- accepted: {lg['accepted']}, of which compiled and verified: {lg['accepted_ok']}, "
            f"**failed: {lg['accepted_failed']}**",
            f"- rejected: {lg['rejected']}, confirmed failing when forced: {lg['rejected_confirmed']}, "
            f"**built and verified anyway (rule conservative): {lg['rejected_but_built']}**",
            "",
            "| rules broken | forced outcome counts |",
            "|---|---|",
        ]
        for rule, outcomes in lg["rejected_by_rule"].items():
            lines.append(f"| {rule} | {', '.join(f'{k}: {v}' for k, v in sorted(outcomes.items()))} |")
        if self.skipped_models:
            lines += ["", "Skipped models: " + ", ".join(f"{k} ({v})" for k, v in self.skipped_models.items())]
        if self.findings:
            lines += ["", "## Findings", "", "| model | plan | provider | source | status | error | reproducer |",
                      "|---|---|---|---|---|---|---|"]
            for r in self.findings:
                lines.append(f"| {r.model} | {r.plan_hash} | {r.provider} | {r.source} | {r.status} | "
                             f"{(r.error or '')[:120]} | {r.reproducer or ''} |")
        if self.legality_holes:
            lines += ["", "## Accepted plans that failed", ""]
            lines += [f"- {r.model} {r.plan_hash} ({r.source}): {r.outcome}: {r.error}" for r in self.legality_holes]
        return "\n".join(lines) + "\n"

    def write(self, out: str | os.PathLike) -> tuple[Path, Path]:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        js, md = out / "summary.json", out / "summary.md"
        js.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        md.write_text(self.markdown())
        return js, md


# ---- reproducers -------------------------------------------------------------------------


def save_reproducer(
    root: str | os.PathLike,
    model: Any,
    plan: FusionPlan,
    provider: str,
    status: str,
    error: str | None,
    source: str = "",
    forced: bool = False,
    actual_timeout_s: float = 300.0,
) -> Path:
    """Write ``<root>/<model>-<planhash>-<provider>/`` and return it (see docs/reproducers.md).

    The actual outputs are computed by running the reproducer itself in a child process
    (``python -m fusion_rl.fuzz reproduce DIR``), so a crashing plan cannot take the fuzzer down;
    if it crashes, ``meta.json`` says so and there is no ``actual.npz``.
    """
    from fusion_rl.compiler.verify import reference_outputs
    from fusion_rl.graph.importer import input_specs

    folder = Path(root) / f"{model.name}-{plan.hash}-{provider}"
    folder.mkdir(parents=True, exist_ok=True)
    if model.onnx_model is not None:
        (folder / "model.onnx").write_bytes(model.onnx_model.SerializeToString())
    plan.save(folder / "plan.json")
    names = [s[0] for s in input_specs(model.mod)]
    np.savez(folder / "inputs.npz", **{n: a for n, a in zip(names, model.inputs)})
    expected, reference = reference_outputs(model)
    np.savez(folder / "expected.npz", *expected)
    meta = {
        "model": model.name, "model_ref": {"kind": model.ref.kind, "spec": model.ref.spec, "seed": model.ref.seed},
        "fingerprint": model.fingerprint, "plan_hash": plan.hash, "provider": provider,
        "status": status, "error": error, "source": source, "reference": reference,
        "forced": forced, "created": time.time(),
    }
    (folder / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    cmd = '"${PYTHON:-python}" -m fusion_rl.fuzz reproduce "$(dirname "$0")"'
    (folder / "repro.sh").write_text(
        "#!/bin/sh\n# Recompiles the plan and compares with expected.npz; exit 1 if the mismatch "
        "reproduces.\n# Run from the repository root; PYTHON defaults to `python` (set it to the "
        "venv's, e.g. PYTHON=.venv/bin/python).\n" + cmd + (" --force" if forced else "") + "\n"
    )
    (folder / "repro.sh").chmod(0o755)
    (folder / "README.md").write_text(
        f"# {model.name} / plan {plan.hash} / schedule {provider}\n\n"
        f"Status: **{status}** ({source}). Error: {error}\n\n"
        f"Reproduce from the repository root: `PYTHON=.venv/bin/python sh {folder}/repro.sh` "
        f"(or `python -m fusion_rl.fuzz reproduce {folder}{' --force' if forced else ''}`).\n"
    )
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "fusion_rl.fuzz", "reproduce", str(folder), "--write-actual"]
            + (["--force"] if forced else []),
            capture_output=True, text=True, timeout=actual_timeout_s,
            env=_child_env(),
        )
        meta["reproduce_exit"] = proc.returncode
        meta["reproduce_verdict"] = (proc.stdout.strip().splitlines() or [""])[-1]
    except subprocess.TimeoutExpired:
        meta["reproduce_exit"] = None
        meta["reproduce_verdict"] = f"timed out after {actual_timeout_s:.0f} s"
    (folder / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return folder


def reproduce(folder: str | os.PathLike, write_actual: bool = False, force: bool = False) -> tuple[bool, str]:
    """Rebuild a reproducer's plan and compare with its ``expected.npz``.

    Returns ``(reproduced, verdict)``: ``reproduced`` is True if the plan still fails (wrong
    output, or an error while compiling). ``force`` skips the legality check (for plans found
    by the legality fuzzer).
    """
    from fusion_rl.compiler.verify import compare, run_executable
    from fusion_rl.compiler.target import parse_target
    from fusion_rl.graph.model import load_model

    folder = Path(folder)
    meta = json.loads((folder / "meta.json").read_text())
    model = load_model(folder / "model.onnx")
    with np.load(folder / "inputs.npz") as data:
        model.inputs = [np.ascontiguousarray(data[k]) for k in data.files]
    with np.load(folder / "expected.npz") as data:
        expected = [data[k] for k in sorted(data.files, key=lambda s: int(s.split("_")[1]))]
    plan = FusionPlan.load(folder / "plan.json")
    try:
        ex = _compile(model, plan, meta["provider"], parse_target("host").to_tvm(), force=force)
        actual = run_executable(ex, model.inputs)
    except Exception as exc:  # noqa: BLE001 - any failure here is the reproduced finding
        return True, f"REPRODUCED: compile/run failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    if write_actual:
        np.savez(folder / "actual.npz", *actual)
    report = compare(actual, expected, meta.get("reference", ""))
    if report.ok:
        return False, f"NOT reproduced: outputs match (max abs err {report.max_abs_err:.3g})"
    return True, f"REPRODUCED: wrong output, max abs err {report.max_abs_err:.3g} (max rel {report.max_rel_err:.3g})"


def _compile(model: Any, plan: FusionPlan, provider: str, target: Any, force: bool) -> Any:
    from fusion_rl.compiler.build import compile_module, compile_plan
    from fusion_rl.compiler.schedules import make_schedule

    if not force:
        return compile_plan(model, plan, target, make_schedule(provider)).executable
    fused = force_fuse(model, plan)[0]
    return compile_module(fused, target, make_schedule(provider))[0]


def _child_env() -> dict[str, str]:
    root = str(paths.IMPORT_ROOT)
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("TVM_NUM_THREADS", "1")
    return env


# ---- forcing rejected plans --------------------------------------------------------------


def force_fuse(model: Any, plan: FusionPlan) -> tuple[Any, str]:
    """Apply ``plan`` *without* the legality check; returns (fused module, stage reached).

    Raises ``_ForceFailure(stage, message)`` at the first stage that fails:

    - ``group``: :func:`fusion_rl.fusion.apply._group_module` cannot emit it;
    - ``well_formed``: emitted anyway (a non-convex group is called in program order, so the
      group's function reads a value computed from its own output) and TVM's
      ``relax.analysis.well_formed`` rejects the module;
    - ``fusetir``: ``FuseTIR`` fails.
    """
    import tvm
    from tvm import relax

    from fusion_rl.fusion import apply as apply_mod

    original = apply_mod._item_order

    def program_order(items: list, reads: dict, item_of_var: dict) -> list:
        try:
            return original(items, reads, item_of_var)
        except Exception:  # the grouped items form a cycle: emit in program order anyway
            return sorted(items, key=lambda it: it.position)

    try:
        apply_mod._item_order = program_order
        try:
            grouped = apply_mod._group_module(model.mod, plan, model.graph)
        finally:
            apply_mod._item_order = original
    except Exception as exc:  # noqa: BLE001
        raise _ForceFailure("group", _first_line(exc)) from None
    try:
        # TVM 0.27 raises for an ill-formed module (and returns None, not True, otherwise).
        ok = relax.analysis.well_formed(grouped)
    except Exception as exc:  # noqa: BLE001
        raise _ForceFailure("well_formed", _first_line(exc)) from None
    if ok is False:
        raise _ForceFailure("well_formed", "relax.analysis.well_formed rejected the grouped module")
    try:
        fused = relax.transform.FuseTIR()(grouped)
        fused = relax.transform.DeadCodeElimination()(fused)
    except Exception as exc:  # noqa: BLE001
        raise _ForceFailure("fusetir", _first_line(exc)) from None
    del tvm
    return fused, "fusetir"


class _ForceFailure(Exception):
    def __init__(self, stage: str, message: str) -> None:
        super().__init__(f"{stage}: {message}")
        self.stage = stage
        self.message = message


def _force_one(model: Any, plan: FusionPlan, provider: str, target: Any) -> dict[str, Any]:
    from fusion_rl.compiler.build import compile_module
    from fusion_rl.compiler.schedules import make_schedule
    from fusion_rl.compiler.verify import compare, reference_outputs, run_executable

    try:
        fused, _ = force_fuse(model, plan)
    except _ForceFailure as exc:
        return {"outcome": exc.stage, "error": exc.message}
    try:
        ex = compile_module(fused, target, make_schedule(provider))[0]
    except Exception as exc:  # noqa: BLE001
        return {"outcome": "build", "error": _first_line(exc)}
    try:
        actual = run_executable(ex, model.inputs)
    except Exception as exc:  # noqa: BLE001
        return {"outcome": "run", "error": _first_line(exc)}
    expected, ref = reference_outputs(model)
    report = compare(actual, expected, ref)
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
                env=_child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
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


def _force_child(batch: str, out: str, provider: str) -> None:
    from fusion_rl.compiler.target import parse_target
    from fusion_rl.graph.model import load_model

    models: dict[str, Any] = {}
    target = parse_target("host").to_tvm()
    with open(out, "a") as f:
        for spec, plan_dict in json.loads(Path(batch).read_text()):
            if spec not in models:
                models[spec] = load_model(spec)
            f.write(json.dumps(_force_one(models[spec], FusionPlan.from_dict(plan_dict), provider, target)) + "\n")
            f.flush()


# ---- the fuzz loops ----------------------------------------------------------------------


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


def _first_line(exc: BaseException) -> str:
    from fusion_rl.graph.importer import _first_line as first

    return first(exc)


def _main(argv: Sequence[str]) -> int:
    """Internal entry points: ``reproduce DIR [--write-actual] [--force]`` and ``force ...``."""
    if argv and argv[0] == "force" and len(argv) == 4:
        _force_child(*argv[1:])
        return 0
    if argv and argv[0] == "reproduce" and len(argv) >= 2:
        reproduced, verdict = reproduce(argv[1], "--write-actual" in argv, "--force" in argv)
        print(verdict)
        return 1 if reproduced else 0
    print("usage: python -m fusion_rl.fuzz reproduce DIR [--write-actual] [--force]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
