"""The transfer report (``experiments/transfer/``): tables, plots and the report text.

:mod:`fusion_rl.transfer` measures; this module only formats what it measured (the rows of
:func:`fusion_rl.evaluate.evaluate` and the runs' logs), so the report can be regenerated, and
tested, from a results file.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np

from fusion_rl.evaluate import RULE_BASELINES, geomean, learning_curve, parity_point, t_interval
from fusion_rl.io import write_atomic
from fusion_rl.paths import relative_to_repo

# --------------------------------------------------------------------------------------------
# cells and the machine
# --------------------------------------------------------------------------------------------


def env_prefix() -> str:
    """The environment a reproduction needs (the host CPU override, when one was set)."""
    mcpu = os.environ.get("FUSION_RL_HOST_MCPU")
    return "FUSION_RL_CACHE=/tmp/frl_cache TVM_NUM_THREADS=2 " + (f"FUSION_RL_HOST_MCPU={mcpu} " if mcpu else "")


def fmt(x: Any, spec: str = ".4f") -> str:
    """``x`` formatted with ``spec``; a dash for None, NaN or infinity."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    return format(x, spec)


def cell(row: dict[str, Any] | None) -> str:
    """``latency (spread) ×speedup`` of one row."""
    if row is None:
        return "—"
    if row["latency_ms"] is None:
        return row["status"]
    return f"{row['latency_ms']:.4f} ±{fmt(row['spread_ms'], '.4f')} ({fmt(row['speedup_vs_tvm'], '.2f')}×)"


def learned_cell(rows: list[dict[str, Any]]) -> str:
    """Median over seeds of the learned plan's latency, the seeds' range, mean speedup."""
    lat = [r["latency_ms"] for r in rows if r["latency_ms"] is not None]
    sp = [r["speedup_vs_tvm"] for r in rows if r["speedup_vs_tvm"] is not None]
    if not lat:
        return ", ".join(r["status"] for r in rows)
    return f"{np.median(lat):.4f} [{min(lat):.4f}–{max(lat):.4f}] ({np.mean(sp):.2f}×)"


def machine() -> str:
    """This machine for a report: CPU, cores, kernel, Python, library versions, threads, load."""
    cpu = platform.processor() or "unknown"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines():
            if line.startswith("Model name"):
                cpu = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    load = os.getloadavg()
    from importlib import metadata

    versions = ", ".join(f"{p} {metadata.version(p)}" for p in ("apache-tvm", "torch", "sb3-contrib"))
    return (f"{cpu}, {os.cpu_count()} cores, Linux {platform.release()}, Python {platform.python_version()}; "
            f"{versions}; TVM_NUM_THREADS={os.environ.get('TVM_NUM_THREADS')}; load average at the end "
            f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}")


# --------------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------------


def plot_curves(runs: list[Path], window: int, out: Path) -> list[dict[str, Any]]:
    """Rolling speedup vs tvm over env steps and over measurements, one line per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    parity = []
    for run in runs:
        seed = json.loads((run / "config.json").read_text())["seed"]
        curve = learning_curve(run, window)
        point = parity_point(curve, window)
        parity.append({"seed": seed, "run": run, "point": point})
        axes[0].plot(curve["step"], curve["rolling"], label=f"seed {seed}")
        axes[1].plot(curve["measurements"], curve["rolling"], label=f"seed {seed}")
    for ax, xlabel in zip(axes, ("env steps", "measurements spent (store misses)")):
        ax.axhline(1.0, color="k", ls="--", lw=0.8, label="tvm rules")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"speedup vs tvm (rolling mean, {window} episodes)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Learning curves (training suite, host, rules schedule)")
    fig.tight_layout()
    write_atomic(out, lambda tmp: fig.savefig(tmp, dpi=110, format="png"), what="chart")
    plt.close(fig)
    return parity


def plot_heldout(rows: list[dict[str, Any]], out: Path) -> None:
    """Per-case speedup vs tvm: learned (mean over seeds, min-max bar) and the rule sets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys((r["model"], r["target"]) for r in rows))
    methods = ["learned"] + [m for m in dict.fromkeys(r["method"] for r in rows) if m in RULE_BASELINES and m != "tvm"]
    fig, ax = plt.subplots(figsize=(max(8, len(cases) * 0.9), 4))
    width = 0.8 / len(methods)
    for k, method in enumerate(methods):
        means, lo, hi = [], [], []
        for case in cases:
            vals = [r["speedup_vs_tvm"] or 0.0 for r in rows if (r["model"], r["target"]) == case and r["method"] == method]
            means.append(float(np.mean(vals)) if vals else 0.0)
            lo.append(means[-1] - (min(vals) if vals else 0.0))
            hi.append((max(vals) if vals else 0.0) - means[-1])
        x = np.arange(len(cases)) + k * width
        ax.bar(x, means, width, label=method, yerr=[lo, hi] if method == "learned" else None, capsize=2)
    ax.axhline(1.0, color="k", ls="--", lw=0.8)
    ax.set_xticks(np.arange(len(cases)) + 0.4 - width / 2)
    # Rotated: model names side by side ran into each other.
    ax.set_xticklabels([f"{m} @ {t}" for m, t in cases], fontsize=8, rotation=35, ha="right")
    ax.set_ylabel("speedup vs tvm (higher is better)")
    ax.set_title("Held-out cases: each plan's speedup over TVM's FuseOps plan (learned: seed mean, min-max bar)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0), title="plan")
    fig.tight_layout()
    write_atomic(out, lambda tmp: fig.savefig(tmp, dpi=110, format="png"), what="chart")
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# reports
# --------------------------------------------------------------------------------------------


def write_report(out_dir: Path, cfg: dict[str, Any], env_spec: Any, runs: list[Path], stats: list[dict[str, Any]],
                 parity: list[dict[str, Any]], budget: dict[str, Any], rows: list[dict[str, Any]],
                 commands: list[str], times: dict[str, float], argv: list[str]) -> None:
    """Write ``README.md`` (the transfer report) and ``summary.json`` into ``out_dir``.

    Parameters
    ----------
    out_dir
        The report folder (``learning_curves.png`` and ``speedups.png`` are linked from it).
    cfg
        The experiment config.
    env_spec
        The training env spec (models, targets, schedule, reward, protocol).
    runs
        One run directory per seed.
    stats
        :func:`fusion_rl.evaluate.training_stats` of each run.
    parity
        What :func:`plot_curves` returned.
    budget
        :func:`fusion_rl.evaluate.equal_budget`'s answer.
    rows
        :func:`fusion_rl.evaluate.evaluate`'s rows (``results.json``).
    commands
        The training commands, shown for reproduction.
    times
        Wall seconds: ``train_s``, ``eval_s``, ``total_s``.
    argv
        This invocation's command line, shown for reproduction.
    """
    seeds = sorted({r["seed"] for r in rows if r["method"] == "learned"})
    cases = list(dict.fromkeys((r["model"], r["target"], r["split"]) for r in rows))
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "learned"]
    by = {(r["model"], r["target"], r["method"]): r for r in rows if r["method"] != "learned"}
    learned = {(m, t): [r for r in rows if r["method"] == "learned" and (r["model"], r["target"]) == (m, t)]
               for m, t, _ in cases}
    run_cmd = env_prefix() + ".venv/bin/python " + " ".join(shlex.quote(a) for a in argv)
    L: list[str] = []
    L.append("# Transfer: a learned fusion policy, zero-shot, on held-out models and a held-out target\n")
    L.append("Generated by `scripts/transfer.py`; do not edit by hand. Reproduce with:\n")
    L.append("```\n" + run_cmd + "\n```\n")
    if commands:
        L.append("Training commands (equivalent; the script calls `fusion_rl.policy.training.train` itself):\n")
        L.append("```\n" + "\n".join(f"{env_prefix()}.venv/bin/{c}" for c in commands) + "\n```\n")
    L.append(f"Machine: {machine()}.\n")
    L.append(f"Setup: training suite {', '.join(env_spec.models)} on `{', '.join(env_spec.targets)}`; schedule provider "
             f"`{env_spec.schedule}`; reward `{env_spec.reward}`; timing protocol {env_spec.protocol.key} "
             f"(repeat={env_spec.protocol.repeat}, min_repeat_ms={env_spec.protocol.min_repeat_ms}); held-out models "
             f"{', '.join(cfg['heldout_models'])}; held-out target(s) {', '.join(cfg['heldout_targets'])}. "
             "Zero-shot: the policy takes its deterministic masked action on every edge; deciding spends 0 "
             "measurements (checked: store misses before/after each decision), and its plan is measured once.\n")
    L.append(f"Wall times: training {fmt(times.get('train_s'), '.0f')} s in total (per seed below), evaluation "
             f"{fmt(times.get('eval_s'), '.0f')} s (measurements already in the store are free, so a rerun is faster), "
             f"report total {fmt(times.get('total_s'), '.0f')} s.\n")

    # Training.
    L.append("## Training runs\n")
    L.append("Seed 0's run is the one to export as the shipped policy.\n")
    L.append("| seed | run dir | steps | episodes | measurements spent | failed episodes | wall s | parity with tvm (rolling mean ≥ 1.0) |")
    L.append("|---|---|---|---|---|---|---|---|")
    for s, p in zip(stats, parity):
        point = p["point"]
        par = (f"step {point['step']:.0f}, after {point['measurements']:.0f} measurements" if point else "not reached")
        L.append(f"| {p['seed']} | `{relative_to_repo(s['run_dir'])}` | "
                 f"{s['steps']} | {s['episodes']} | {s['measurements']} | {s['failures']} | {fmt(s['wall_s'], '.0f')} | {par} |")
    L.append("\nMeasurements are store misses on the shared store, so later seeds spend fewer (plans an earlier "
             f"seed measured are free). Rolling window: {cfg.get('window', 20)} episodes, all {len(env_spec.models)} training "
             "models mixed.\n")
    L.append("![learning curves](learning_curves.png)\n")

    # Budget convention.
    L.append("## Search budget convention\n")
    L.append(f"The policy spends 0 measurements at test time. Its cost is its training: on average "
             f"{np.mean([s['measurements'] for s in stats]):.0f} measurements per seed over {len(env_spec.models)} "
             f"training models, i.e. **{budget['amortized']} per training model** (amortized). The *equal* search budget is "
             f"that number capped at {budget['cap']} for compute: **B = {budget['budget']}** plans per (model, target); the "
             f"larger budget is {cfg['search']['multiplier']}×B = {budget['budget'] * cfg['search']['multiplier']}. "
             + ("Because of the cap, search gets *fewer* measurements than the policy's amortized training cost. "
                if budget['budget'] < budget['amortized'] else "")
             + "Search runs on the training target only; the 10× budget only on "
             f"{', '.join(cfg['search'].get('multiplied_models', [])) or 'no model'}. A search's reported latency is the best "
             "of its noisy measurements (a winner's-curse bias in search's favour). Exhaustive oracle: "
             + ("not run (mlp_tiny has 1,024 legal plans, cnn_plain 4,096: more than this session's compute)."
                if not cfg["search"].get("exhaustive_models") else f"{', '.join(cfg['search']['exhaustive_models'])}.") + "\n")

    # Headline and per-split tables.
    for split, title in (("heldout-model", "Held-out models (training target)"),
                         ("heldout-target", "Held-out target"), ("train", "Training models (training target)")):
        split_cases = [c for c in cases if c[2] == split]
        if not split_cases:
            continue
        L.append(f"## {title}\n")
        L.append("Median latency in ms ± spread (the record's spread), and speedup vs `tvm` rules in parentheses; "
                 f"`learned` is the median over {len(seeds)} seeds [min–max] and the mean speedup.\n")
        cols = ["learned"] + methods
        L.append("| model | target | " + " | ".join(cols) + " |")
        L.append("|---|---|" + "---|" * len(cols))
        for m, t, _ in split_cases:
            cells = [learned_cell(learned[(m, t)])] + [cell(by.get((m, t, meth))) for meth in methods]
            L.append(f"| {m} | {t} | " + " | ".join(cells) + " |")
        L.append("")
        # Kernels and bytes.
        L.append("Kernels launched / intermediate bytes (KiB) of each plan (learned: seed 0; † = plan has a "
                 "multi-anchor group):\n")
        L.append("| model | target | " + " | ".join(cols) + " |")
        L.append("|---|---|" + "---|" * len(cols))
        for m, t, _ in split_cases:
            first = next((r for r in learned[(m, t)] if r["seed"] == seeds[0]), None) if seeds else None
            rs = [first] + [by.get((m, t, meth)) for meth in methods]
            L.append(f"| {m} | {t} | " + " | ".join(
                "—" if r is None or r["num_kernels"] is None else
                f"{r['num_kernels']} / {r['intermediate_bytes'] / 1024:.0f}{' †' if r.get('multi_anchor_groups') else ''}"
                for r in rs) + " |")
        L.append("")

    # Speedup statistics over seeds.
    L.append("## Speedup of the learned policy vs `tvm` rules and vs the best fixed rule, over seeds\n")
    L.append("Per seed: geometric mean over the split's cases of (reference latency / learned latency). Then the "
             "mean over seeds and a 95% confidence interval (Student t, n−1 degrees of freedom). The best fixed "
             "rule is the rule set with the best geomean over the split's cases (one rule for the split, as a user "
             "would deploy it). A seed whose plans equal a rule set's on every case is *collapsed* to it: its "
             "numbers are that rule's, not learned.\n")
    L.append("| split | reference | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | 95% CI | rule sets (geomean vs tvm) |")
    L.append("|---|---|" + "---|" * len(seeds) + "---|---|---|")
    summary: dict[str, Any] = {}
    rule_names = [m for m in methods if m in RULE_BASELINES]
    for split in ("heldout-model", "heldout-target", "train"):
        split_cases = [(m, t) for m, t, s in cases if s == split]
        if not split_cases:
            continue
        rule_gm = {meth: geomean(by[(m, t, meth)]["speedup_vs_tvm"] for m, t in split_cases if (m, t, meth) in by)
                   for meth in rule_names if meth != "tvm"}
        best_rule = next((r["best_rule"] for r in rows if r["split"] == split), None)
        summary[split] = {"rules": rule_gm, "best_rule": best_rule}
        for key, ref in (("speedup_vs_tvm", "tvm"), ("speedup_vs_best_rule", f"best rule ({best_rule})")):
            per_seed = [geomean(r[key] for (m, t) in split_cases for r in learned[(m, t)] if r["seed"] == s)
                        for s in seeds]
            mean, lo, hi = t_interval(per_seed) if per_seed else (math.nan,) * 3
            entry = {"per_seed": per_seed, "mean": mean, "ci": [lo, hi]}
            if key == "speedup_vs_tvm":
                summary[split].update(entry)  # the keys earlier summaries had
            else:
                summary[split]["vs_best_rule"] = entry
            L.append(f"| {split} | {ref} | " + " | ".join(f"{v:.3f}×" for v in per_seed)
                     + f" | **{mean:.3f}×** | [{fmt(lo, '.3f')}, {fmt(hi, '.3f')}] | "
                     + (", ".join(f"{k} {v:.3f}×" for k, v in rule_gm.items()) if key == "speedup_vs_tvm" else "") + " |")
    collapsed = {r["seed"]: r["collapsed_to"] for r in rows if r["method"] == "learned"}
    for seed, rule in collapsed.items():
        if rule is not None:
            L.append(f"\n**Seed {seed} collapsed to `{rule}`**: its plans equal that fixed rule's on all "
                     f"{len(cases)} evaluation cases.\n")
    for label in [m for m in methods if m.startswith("learned-")]:
        for split in summary:
            split_cases = [(m, t) for m, t, s_ in cases if s_ == split]
            g = geomean(by[(m, t, label)]["speedup_vs_tvm"] for m, t in split_cases if (m, t, label) in by)
            summary[split].setdefault("ablations", {})[label] = g
        rule = next((r.get("collapsed_to") for r in rows if r["method"] == label), None)
        L.append(f"\nAblation `{label}` (one seed), geomean speedup vs tvm: "
                 + ", ".join(f"{split} {summary[split]['ablations'][label]:.3f}×" for split in summary)
                 + (f"; collapsed to `{rule}` (its plans equal that rule's on every case)" if rule else "") + ".\n")
    L.append("")

    # Versus search.
    search_rows = [r for r in rows if "@" in r["method"]]
    ratios: dict[int, dict[str, list[float | None]]] = {}
    if search_rows:
        L.append("## Learned policy vs search\n")
        L.append("Ratio = best search latency / learned latency (seed-median); ≥ 0.95 means the policy reaches 95% of "
                 "that search's best plan. `evaluated` = distinct plans the search evaluated (its budget use); `new` = "
                 "measurements it spent in this invocation (0 when the store already held its plans).\n")
        L.append("| model | target | search | budget | evaluated | new | best ms | learned ms | ratio |")
        L.append("|---|---|---|---|---|---|---|---|---|")
        for r in search_rows:
            lat = [x["latency_ms"] for x in learned[(r["model"], r["target"])] if x["latency_ms"] is not None]
            lm = float(np.median(lat)) if lat else None
            ratio = (r["latency_ms"] / lm) if (lm and r["latency_ms"]) else None
            ratios.setdefault(r["budget"], {}).setdefault(r["model"], []).append(ratio)
            L.append(f"| {r['model']} | {r['target']} | {r['algo']} | {r['budget']} | {r['evaluations']} | {r['measurements']} | "
                     f"{fmt(r['latency_ms'])} | {fmt(lm)} | {fmt(ratio, '.3f')} |")
        L.append("")
    L.append("![per-case speedups](speedups.png)\n")

    # Goals.
    gm = summary.get("heldout-model", {}).get("mean", math.nan)
    L.append("## Goals\n")
    L.append(f"- Held-out geomean speedup ≥ 1.10× vs `tvm` rules *under `tuned`*: this table is under `{env_spec.schedule}` "
             f"(mean over seeds {fmt(gm, '.3f')}×); the `tuned` comparison is in [metaschedule.md](metaschedule.md).")
    vs_best = []
    for b, per_model in sorted(ratios.items()):
        # Per model: the best of the searches at this budget (smallest ratio), then the geomean.
        best = [min(v for v in vals if v is not None) for vals in per_model.values() if any(v is not None for v in vals)]
        vs_best.append(f"{geomean(best):.3f} at budget {b} ({len(best)} model{'s' if len(best) != 1 else ''}: {', '.join(per_model)})")
    goal_budget = int(cfg["search"].get("goal_budget", 0))
    at_goal = ratios.get(goal_budget, {})
    if goal_budget and at_goal:
        per = {m: min(v for v in vals if v is not None) for m, vals in at_goal.items()
               if any(v is not None for v in vals)}
        L.append(f"- ≥ 95% of the best plan found by search with {goal_budget} measurements: "
                 + ", ".join(f"{m} {v:.3f}" for m, v in per.items())
                 + f" (best-search latency / learned latency; geomean {geomean(per.values()):.3f}): "
                 + ("**reached**" if per and min(per.values()) >= 0.95 else "**not reached**") + ".")
    else:
        L.append("- ≥ 95% of the best plan found by search with 500 measurements: not run (set search.goal_budget).")
    L.append("- Learned vs the best search at each budget run (geomean over models of best-search latency / "
             "learned latency): " + ("; ".join(vs_best) if vs_best else "no search run") + ".")
    oracle = [r for r in rows if r["method"] == "exhaustive" and r["latency_ms"]]
    for r in oracle:
        lat = [x["latency_ms"] for x in learned[(r["model"], r["target"])] if x["latency_ms"] is not None]
        lm = float(np.median(lat)) if lat else None
        L.append(f"- Oracle on {r['model']} ({r['target']}): best of {r['evaluations']} legal plans "
                 f"{fmt(r['latency_ms'])} ms; learned {fmt(lm)} ms (ratio {fmt(r['latency_ms'] / lm if lm else None, '.3f')}); "
                 f"tvm {fmt(by.get((r['model'], r['target'], 'tvm'), {}).get('latency_ms'))} ms.")
    L.append("")
    L.append("Raw rows (every plan's median, spread, kernels, bytes, plan hash): [results.json](results.json).\n")
    write_atomic(out_dir / "README.md", "\n".join(L), what="report")
    write_atomic(out_dir / "summary.json", json.dumps(
        {"runs": [relative_to_repo(r) for r in runs], "budget": budget, "summary": summary, "times": times,
         "collapsed_to": {str(seed): rule for seed, rule in collapsed.items()},
         "training": [{**st, "run_dir": relative_to_repo(st["run_dir"])} for st in stats], "parity": [{"seed": p["seed"], "point": p["point"]} for p in parity]}, indent=1, default=str), what="report")


def remeasure_section(rows: list[dict[str, Any]], rounds: int, argv: list[str]) -> list[str]:
    """The report's lines on :func:`fusion_rl.transfer.remeasure`'s ``rows`` (``rounds`` rounds)."""
    seeds = sorted({r["seed"] for r in rows if r["method"] == "learned"})
    cases = list(dict.fromkeys((r["model"], r["target"], r["split"]) for r in rows))
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "learned"]
    by = {(r["model"], r["target"], r["method"]): r for r in rows if r["method"] != "learned"}
    L = ["## Re-measured under identical conditions\n",
         f"The tables below come from the store, whose records were taken minutes apart; on this 2-vCPU machine the "
         f"speed of the whole machine drifts between regimes lasting seconds, so records taken apart mix plan effects "
         f"with regime. Here every distinct plan of these cases was timed again without the store, {rounds} rounds; "
         f"each round builds all the case's plans and times them repeat by repeat, interleaved (`Measurer.time_together`). "
         f"The cell is the median of the round medians (± max−min over rounds) and the speedup vs `tvm` in "
         f"parentheses. Search cells re-time the plan each search found (found on the store, so the re-timing also "
         f"removes search's winner's-curse advantage).\n",
         "| model | target | learned (seed median [min–max]) | " + " | ".join(methods) + " |",
         "|---|---|---|" + "---|" * len(methods)]
    for m, t, _ in cases:
        lr = [r for r in rows if r["method"] == "learned" and (r["model"], r["target"]) == (m, t)]
        cells = [learned_cell(lr)] + [cell(by.get((m, t, meth))) for meth in methods]
        L.append(f"| {m} | {t} | " + " | ".join(cells) + " |")
    L.append("")
    for split in dict.fromkeys(c[2] for c in cases):
        split_cases = [(m, t) for m, t, s in cases if s == split]
        per_seed = [geomean(r["speedup_vs_tvm"] for r in rows if r["method"] == "learned" and r["seed"] == s
                            and (r["model"], r["target"]) in split_cases) for s in seeds]
        mean, lo, hi = t_interval(per_seed)
        rule = {meth: geomean(by[(m, t, meth)]["speedup_vs_tvm"] for m, t in split_cases if (m, t, meth) in by)
                for meth in methods}
        vs_best = [geomean(r["speedup_vs_best_rule"] for r in rows if r["method"] == "learned" and r["seed"] == s
                           and (r["model"], r["target"]) in split_cases) for s in seeds]
        best_rule = next((r["best_rule"] for r in rows if r["split"] == split), None)
        L.append(f"- {split}: learned geomean speedup vs tvm per seed "
                 + ", ".join(f"{v:.3f}×" for v in per_seed)
                 + f"; mean **{mean:.3f}×**, 95% CI [{fmt(lo, '.3f')}, {fmt(hi, '.3f')}] (t, n={len(per_seed)}); "
                 + f"vs the best fixed rule ({best_rule}) per seed " + ", ".join(f"{v:.3f}×" for v in vs_best)
                 + ". Others: " + ", ".join(f"{k} {v:.3f}×" for k, v in rule.items() if math.isfinite(v)) + ".")
    L.append("")
    return L


def write_metaschedule(out_dir: Path, cfg: dict[str, Any], env_spec: Any, runs: dict[str, Any],
                       argv: list[str]) -> None:
    """Write ``metaschedule.md``: the table of :func:`fusion_rl.transfer.metaschedule_runs` (``runs``)."""
    ms = cfg["metaschedule"]
    seed, run, trials = runs["seed"], runs["run"], runs["trials"]
    run_cmd = env_prefix() + ".venv/bin/python " + " ".join(shlex.quote(a) for a in argv)
    L = ["# Learned fusion + MetaSchedule vs TVM's fusion rules + MetaSchedule\n",
         "Generated by `scripts/transfer.py --metaschedule`. Reproduce with:\n", "```\n" + run_cmd + "\n```\n",
         f"Machine: {machine()}.\n",
         f"Both columns use MetaSchedule (TVM 0.27's successor of AutoTVM; schedule provider `tuned`) with "
         f"**{trials} trials per task**, on `{ms['target']}`, with the same timing protocol as the transfer report. "
         f"The learned plan is seed {seed}'s policy (`{relative_to_repo(run)}`), "
         f"zero-shot (trained under the `{env_spec.schedule}` provider, never under `tuned`). The tuning database "
         "($FUSION_RL_CACHE/tuning) is shared with other experiments, so tasks tuned before are reused: `tuning+build s` "
         "is the wall time of the measurement job as recorded in the store (tuning the tasks not yet in the database, "
         "building, verifying and timing); `this run s` is what this invocation spent (≈0 when served from the store).\n",
         "`re-timed` compares the two plans again within one run (both built from the filled database, timed "
         f"repeat by repeat, {int(ms.get('retime_rounds', 0))} rounds; `Measurer.time_together`): the median per-repeat "
         "speedup, its IQR, and the repeats the learned plan won. Held-out models are marked *.\n",
         "| model | tvm+MS ms (spread) | learned+MS ms (spread) | learned speedup | re-timed speedup (IQR, won) | "
         "tvm kernels | learned kernels | tvm tuning+build s | learned tuning+build s | this run s (tvm / learned) | "
         "same plan? |",
         "|---|---|---|---|---|---|---|---|---|---|---|"]
    heldout = set(cfg.get("heldout_models", ()))
    speedups: dict[str, list[float]] = {"all": [], "heldout": [], "retimed": [], "retimed-heldout": []}
    for res in runs["models"]:
        name = res["name"]
        (tp, tr, tt, _), (lp, lr, lt, _) = res["tvm"], res["learned"]
        ok = tr.status == "ok" and lr.status == "ok"
        sp = tr.median_ms / lr.median_ms if ok else None
        if sp:
            speedups["all"].append(sp)
            if name in heldout:
                speedups["heldout"].append(sp)
        retimed = "same plan" if tp.hash == lp.hash and ok else "—"
        if "retimed" in res and not res["retimed"].failures:
            v = res["retimed"].verdict("tvm", "learned")
            retimed = f"{v['paired_speedup']:.3f}× ({v['paired_spread']:.3f}, {v['repeats_won']}/{v['repeats']})"
            speedups["retimed"].append(v["paired_speedup"])
            if name in heldout:
                speedups["retimed-heldout"].append(v["paired_speedup"])
        elif tp.hash == lp.hash and ok:
            speedups["retimed"].append(1.0)
            if name in heldout:
                speedups["retimed-heldout"].append(1.0)
        tcell = f"{tr.median_ms:.4f} (±{tr.spread_ms:.4f})" if tr.status == "ok" else tr.status
        lcell = f"{lr.median_ms:.4f} (±{lr.spread_ms:.4f})" if lr.status == "ok" else lr.status
        L.append(f"| {name}{'*' if name in heldout else ''} | {tcell} | {lcell} | {fmt(sp, '.3f')}{'×' if sp else ''} | "
                 f"{retimed} | {res['kernels']['tvm']} | {res['kernels']['learned']} | "
                 f"{fmt(tr.wall_s, '.0f')} | {fmt(lr.wall_s, '.0f')} | {tt:.0f} / {lt:.0f} | {'yes' if tp.hash == lp.hash else 'no'} |")
    L.append("")
    for key, label in (("all", "store records, all models"), ("heldout", "store records, held-out models"),
                       ("retimed", "re-timed, all models"), ("retimed-heldout", "re-timed, held-out models")):
        L.append(f"- Geomean speedup of learned+MS over tvm+MS, {label}: **{fmt(geomean(speedups[key]), '.3f')}×** "
                 f"over {len(speedups[key])} models.")
    L.append(f"\nGoal: ≥ 1.10× on held-out models. Total wall time of this table: {time.time() - runs['started']:.0f} s.\n")
    write_atomic(out_dir / "metaschedule.md", "\n".join(L), what="report")
