"""What a fuzz run found: one record per compile, one per arbitrary partition, and the summary."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fusion_rl.io import dumps_json, output_dir, write_atomic

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
    machine: str = ""  #: where it ran (the fuzz checks outputs, not speed: any machine will do)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FuzzReport":
        """A report from :meth:`to_dict`'s output (plain data; the counts are recomputed)."""
        return cls(
            command=str(data["command"]), seed=int(data["seed"]), models=list(data["models"]),
            providers=list(data["providers"]),
            results=[FuzzResult(**r) for r in data.get("results", [])],
            legality=[LegalityResult(**r) for r in data.get("legality_results", [])],
            skipped_models=dict(data.get("skipped_models", {})), wall_s=float(data.get("wall_s", 0.0)),
            stopped_early=bool(data.get("stopped_early", False)), machine=str(data.get("machine", "")))

    @classmethod
    def merge(cls, shards: list["FuzzReport"], command: str) -> "FuzzReport":
        """One report from shards run side by side (for example one model per process).

        A plan compiled in two shards counts once in ``plans``; ``wall_s`` is the longest
        shard's, since they ran at the same time.
        """
        models = list(dict.fromkeys(m for s in shards for m in s.models))
        providers = list(dict.fromkeys(p for s in shards for p in s.providers))
        return cls(
            command=command, seed=shards[0].seed if shards else 0, models=models, providers=providers,
            results=[r for s in shards for r in s.results],
            legality=[r for s in shards for r in s.legality],
            skipped_models={k: v for s in shards for k, v in s.skipped_models.items()},
            wall_s=max((s.wall_s for s in shards), default=0.0),
            stopped_early=any(s.stopped_early for s in shards),
            machine="; ".join(dict.fromkeys(s.machine for s in shards if s.machine)))

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
            "machine": self.machine,
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
            *([f"Machine: {self.machine}", ""] if self.machine else []),
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
        lines += ["", "## Per model", "",
                  "| model | plans | compiles | ok | wrong output | failed | partitions: accepted / rejected (with a cycle) |",
                  "|---|---|---|---|---|---|---|"]
        for model in self.models:
            runs = [r for r in self.results if r.model == model]
            parts = [r for r in self.legality if r.model == model]
            status = Counter(r.status for r in runs)
            rejected = [r for r in parts if not r.accepted]
            lines.append(
                f"| {model} | {len({r.plan_hash for r in runs})} | {len(runs)} | {status['ok']} | "
                f"{status['wrong_output']} | {len(runs) - status['ok'] - status['wrong_output']} | "
                f"{len(parts) - len(rejected)} / {len(rejected)} "
                f"({sum('cycle' in r.rules for r in rejected)}) |")
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
        out = output_dir(out, "fuzz report folder")
        js, md = out / "summary.json", out / "summary.md"
        write_atomic(js, dumps_json(self.to_dict(), indent=1) + "\n", what="fuzz summary")
        write_atomic(md, self.markdown(), what="fuzz summary")
        return js, md
