"""The learned policy on held-out bench families: the summary, the learning curves, the report.

What ``scripts/learn_bench.py`` measured arrives as rows, one per (held-out model, plan label):
the fixed rules' plans, each seed's plan (label ``seed N``) and each search's best plan, all timed
head to head in one comparison per model. Each row carries ``vs``: its paired speedup (median of
per-repeat ratios, IQR) over every fixed rule and every search, so no two numbers from different
runs are ever divided.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from fusion_rl.compiler.paired import check_rounds, split_by_regime
from fusion_rl.compiler.regime import FAR_FACTOR, near_reference_us, probes_by_regime
from fusion_rl.evaluate import geomean, learning_curve, read_episodes, t_interval
from fusion_rl.io import write_atomic
from fusion_rl.report.transfer import fmt

__all__ = ["best_fixed_rule", "by_regime", "headroom", "plot_curves", "regime_counts", "render", "rounds_text",
           "run_reference", "summarize", "unstable_models"]

#: A model whose ``tvm`` plan's IQR exceeds this fraction of its median is flagged in the report.
#: At 2 threads the IQR of a plan is normally 8-9% of its median here; some models (MobileNetV2 at
#: 224) also switch between two speeds for tens of seconds, unevenly across plans, which pairing
#: does not cancel (docs/design.md, timing protocol).
UNSTABLE_SPREAD = 0.25


def _rows_by(rows: Sequence[dict[str, Any]], label: str) -> dict[str, dict[str, Any]]:
    return {r["model"]: r for r in rows if r["label"] == label}


def best_fixed_rule(rows: Sequence[dict[str, Any]], rules: Sequence[str]) -> str | None:
    """The rule with the best geomean paired speedup over ``tvm`` across the held-out models.

    One rule for the whole split (what a user deploys without measuring each model); a rule
    counts only if it was timed on every model. Choosing the best of several noisy rules on the
    same timings favours the rule, so a policy is judged against a slightly flattering bar.
    """
    models = {r["model"] for r in rows}
    scores = {}
    for rule in rules:
        own = _rows_by(rows, rule)
        if set(own) == models and all(r.get("vs", {}).get("tvm") for r in own.values()):
            scores[rule] = geomean(r["vs"]["tvm"][0] for r in own.values())
    return max(scores, key=scores.__getitem__) if scores else None


def headroom(rows: Sequence[dict[str, Any]], best: str | None) -> dict[str, Any] | None:
    """The most any plan timed here reached: per held-out model, the label with the highest paired
    speedup over ``tvm`` among every plan of its comparison (rules, searches, seeds), and the
    geomean of those over the models, against ``tvm`` and against the ``best`` rule.

    A policy that picked the fastest of these per model would score the geomeans; they bound what
    a choice among the plans found here can show. Taking each model's maximum of noisy ratios
    favours the bound (a winner's curse), so it is an optimistic reading. ``None`` when a model
    has no plan timed against ``tvm``.
    """
    per_model: dict[str, dict[str, Any]] = {}
    for r in rows:
        v = r.get("vs", {})
        if v.get("tvm") and (r["model"] not in per_model or v["tvm"][0] > per_model[r["model"]]["vs_tvm"]):
            per_model[r["model"]] = {"label": r["label"], "vs_tvm": v["tvm"][0],
                                     "vs_best_rule": v[best][0] if best and v.get(best) else None}
    if not per_model or len(per_model) != len({r["model"] for r in rows}):
        return None
    to_best = [m["vs_best_rule"] for m in per_model.values()]
    return {"per_model": per_model, "vs_tvm": geomean(m["vs_tvm"] for m in per_model.values()),
            "vs_best_rule": geomean(to_best) if None not in to_best else None}


def summarize(rows: Sequence[dict[str, Any]], rules: Sequence[str], seeds: Sequence[int],
              searches: Sequence[str] = (), goal: str | None = None) -> dict[str, Any]:
    """Per seed and over seeds: geomean over held-out models of the policy's paired speedup over
    ``tvm``, the best fixed rule and each search (``searches``: their labels; ``goal``: the one
    the policy is judged against); and whether the policy only reproduces a rule.

    A seed whose plan equals one rule's on every held-out model is ``collapsed_to`` that rule:
    its speedups are then the rule's, and the report says so.
    """
    best = best_fixed_rule(rows, rules)
    models = sorted({r["model"] for r in rows})
    plans = {(r["model"], r["label"]): r.get("plan_hash") for r in rows}
    per_seed = []
    for seed in seeds:
        own = _rows_by(rows, f"seed {seed}")
        if set(own) != set(models):
            continue

        def over(ref: str | None) -> float | None:
            if ref is None or not all(r.get("vs", {}).get(ref) for r in own.values()):
                return None
            return geomean(r["vs"][ref][0] for r in own.values())

        collapsed = next((rule for rule in rules if all(
            plans.get((m, rule)) is not None and plans[(m, rule)] == own[m]["plan_hash"] for m in models)), None)
        per_seed.append({"seed": seed, "vs_tvm": over("tvm"), "vs_best_rule": over(best),
                         "vs_search": over(goal), "vs_searches": {label: over(label) for label in searches},
                         "collapsed_to": collapsed,
                         "per_model": {m: own[m]["vs"].get("tvm", [None])[0] for m in models}})

    def interval(key: str, label: str | None = None) -> dict[str, float] | None:
        values = [v for s in per_seed if (v := (s[key] if label is None else s[key][label])) is not None]
        if not values:
            return None
        mean, low, high = t_interval(values)
        return {"mean": mean, "low": low, "high": high, "n": len(values)}

    best_seed = max(per_seed, key=lambda s: s["vs_tvm"] or 0.0)["seed"] if per_seed else None
    return {"models": models, "best_rule": best, "search": goal, "searches": list(searches), "per_seed": per_seed,
            "vs_tvm": interval("vs_tvm"), "vs_best_rule": interval("vs_best_rule"),
            "vs_search": interval("vs_search"),
            "vs_searches": {label: interval("vs_searches", label) for label in searches}, "best_seed": best_seed,
            "rule_vs_tvm": {rule: geomean(r["vs"]["tvm"][0] for r in _rows_by(rows, rule).values()
                                          if r.get("vs", {}).get("tvm")) for rule in rules}}


def plot_curves(runs: Sequence[Path], window: int, rule_speedup: dict[str, float], out: Path) -> list[dict[str, Any]]:
    """Rolling estimated speedup of training episodes over ``tvm`` and over the best fixed rule
    (``rule_speedup``: that rule's estimated speedup over ``tvm`` per training model), one line
    per seed; returns each seed's final rolling values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    finals = []
    for run in runs:
        seed = json.loads((run / "config.json").read_text())["seed"]
        curve = learning_curve(run, window)
        episodes = read_episodes(run)
        ratios = [(e.get("speedup_vs_tvm") or 0.0) / rule_speedup.get(e.get("model"), math.nan) for e in episodes]
        rolling = [float(np.nanmean(ratios[max(0, i + 1 - window):i + 1])) for i in range(len(ratios))]
        axes[0].plot(curve["step"], curve["rolling"], label=f"seed {seed}")
        axes[1].plot(curve["step"], rolling, label=f"seed {seed}")
        finals.append({"seed": seed, "episodes": len(episodes),
                       "vs_tvm": curve["rolling"][-1] if curve["rolling"] else None,
                       "vs_best_rule": rolling[-1] if rolling else None})
    for ax, ref in zip(axes, ("tvm rules", "the best fixed rule")):
        ax.axhline(1.0, color="k", ls="--", lw=0.8, label=ref)
        ax.set_xlabel("env steps")
        ax.set_ylabel(f"estimated speedup vs {ref}\n(rolling mean, {window} episodes)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Learning curves on the training families (kernel-table estimates)")
    fig.tight_layout()
    write_atomic(out, lambda tmp: fig.savefig(tmp, dpi=110, format="png"), what="chart")
    plt.close(fig)
    return finals


def unstable_models(rows: Sequence[dict[str, Any]], limit: float = UNSTABLE_SPREAD) -> dict[str, float]:
    """Models whose ``tvm`` row's IQR is more than ``limit`` of its median: model -> that fraction."""
    return {r["model"]: r["spread_ms"] / r["latency_ms"] for r in rows
            if r["label"] == "tvm" and r.get("latency_ms") and r["spread_ms"] / r["latency_ms"] > limit}


def _unstable_note(rows: Sequence[dict[str, Any]]) -> list[str]:
    found = unstable_models(rows)
    if not found:
        return []
    return ["", "**Unstable timings:** " + ", ".join(f"{m} (`tvm`'s IQR {100 * f:.0f}% of its median)"
                                                    for m, f in found.items())
            + ". Their paired speedups are loose: some models switch between two speeds for tens of "
            "seconds on this machine, and the switch does not slow every plan alike (docs/design.md, "
            "timing protocol)."]


def run_reference(rows: Sequence[dict[str, Any]]) -> float | None:
    """The near reference of a run: the lowest of its probes and of the references its
    comparisons were judged by (the host's floor among them), or ``None`` without probes. Every
    regime label of the report uses it, so a model timed wholly in the far regime is labelled far."""
    return near_reference_us([p for r in rows for p in r.get("fork_join_us") or []],
                             *(r["reference_us"] for r in rows if r.get("fork_join_us") and r.get("reference_us")))


def _model_probes(rows: Sequence[dict[str, Any]]) -> tuple[dict[str, list[float]], float | None]:
    """Each model's host probes (every row of a model carries the same) and :func:`run_reference`."""
    return {r["model"]: r["fork_join_us"] for r in rows if r.get("fork_join_us")}, run_reference(rows)


def by_regime(rows: Sequence[dict[str, Any]], regime: str) -> list[dict[str, Any]]:
    """``rows`` with each ``vs`` recomputed over the repeats of one host ``regime`` only
    (``"near"`` or ``"far"``, :mod:`fusion_rl.compiler.regime`), as ``[speedup, IQR, repeats]``,
    against :func:`run_reference`. Rows without raw repeats (results written before they were
    kept) are left out; a ``vs`` entry is left out where the model has no repeat in ``regime``.
    """
    _, reference = _model_probes(rows)
    if reference is None:
        return []
    series = {(r["model"], r["label"]): r.get("repeat_ms") for r in rows}
    out = []
    for r in rows:
        if not r.get("repeat_ms"):
            continue
        vs = {}
        for ref in r.get("vs", {}):
            ref_ms = series.get((r["model"], ref))
            split = split_by_regime(ref_ms, r["repeat_ms"], r["fork_join_us"], reference).get(regime) if ref_ms else None
            if split:
                vs[ref] = [split["paired_speedup"], split["paired_spread"], split["repeats"]]
        out.append({**r, "vs": vs})
    return out


def regime_counts(rows: Sequence[dict[str, Any]]) -> dict[str, int] | None:
    """Paired repeats in each host regime over the models of ``rows``, against
    :func:`run_reference`; ``None`` if no row kept probes."""
    series, reference = _model_probes(rows)
    if reference is None:
        return None
    split = [probes_by_regime(probes, reference) for probes in series.values()]
    return {regime: sum(len(s[regime]) for s in split) for regime in ("near", "far")}


def _regime_section(rows: Sequence[dict[str, Any]], seeds: Sequence[int], best: str | None) -> list[str]:
    """Per model, the share of repeats in each host regime; then the headline within each."""
    series, reference = _model_probes(rows)
    if reference is None:
        return []
    lines = ["", "## By host regime", "",
             "Before every repeat the worker times a parallel launch of a near-empty kernel (the host's "
             "fork-join cost, `fusion_rl/compiler/regime.py`). A repeat is *far* when that probe exceeds "
             f"{FAR_FACTOR}x the run's reference ({reference:.2f} us: the lowest of its probes and of the "
             "references its comparisons were judged by, the host's floor among them): the host then hands "
             "work between threads several times slower, which costs plans of many small kernels more than plans of "
             "few, so a paired ratio holds within a regime, not across them. Below, every ratio is "
             "recomputed over one regime's repeats.", "",
             "| model | repeats near / far | probe us, median near / far |", "|---|---|---|"]
    models = sorted({r["model"] for r in rows})
    for model in models:
        near, far = probes_by_regime(series.get(model, []), reference).values()
        lines.append(f"| {model} | {len(near)} / {len(far)} | "
                     f"{fmt(float(np.median(near)) if near else None, '.2f')} / "
                     f"{fmt(float(np.median(far)) if far else None, '.2f')} |")
    lines += ["", "| repeats | policy vs tvm [95% CI] | policy vs `" + str(best) + "` [95% CI] | "
              "`" + str(best) + "` vs tvm |", "|---|---|---|---|"]
    for regime in ("near", "far"):
        sub = by_regime(rows, regime)
        summary = summarize(sub, [best] if best else [], seeds)
        own = [r["vs"].get("tvm") for r in sub if r["label"] == best]
        rule = geomean(v[0] for v in own) if own and all(own) and len(own) == len(models) else None
        lines.append(f"| {regime} | {_interval(summary['vs_tvm'])} | {_interval(summary['vs_best_rule'])} | "
                     f"{fmt(rule, '.3f')} |")
    lines += ["", "A cell is empty where some model has no repeat in that regime. The best rule is the "
              "one of the headline, not re-chosen per regime."]
    return lines


def _heldout_target(name: str, held: dict[str, Any], cfg: dict[str, Any]) -> list[str]:
    """The section of one held-out target: headline against ``tvm`` and per-model rows."""
    summary = held["summary"]
    x = summary["vs_tvm"]
    met = "—" if x is None else ("yes" if x["mean"] >= 1.05 and x["low"] > 1.0 else "no")
    lines = ["", f"## Held-out target `{name}` (`{held['key']}`)", "",
             "A target no training episode ran on; each seed decides with this target's hardware vector. "
             f"Same protocol ({rounds_text(cfg)}, paired speedups); "
             f"best fixed rule on these timings: `{summary['best_rule']}`.", "",
             "| policy vs | geomean speedup [95% CI] | goal | met |", "|---|---|---|---|",
             f"| `tvm` rules | {_interval(x)} | ≥ 1.05, CI above 1 | {met} |",
             f"| best fixed rule (`{summary['best_rule']}`) | {_interval(summary['vs_best_rule'])} | | |", "",
             "| seed | vs tvm | vs best rule | plans equal to a rule on every held-out model |", "|---|---|---|---|"]
    for s in summary["per_seed"]:
        lines.append(f"| {s['seed']} | {fmt(s['vs_tvm'], '.3f')} | {fmt(s['vs_best_rule'], '.3f')} | "
                     f"{s['collapsed_to'] or 'no'} |")
    lines += ["", "| model | plan | ms (IQR) | kernels | vs tvm |", "|---|---|---|---|---|"]
    for r in held["rows"]:
        v = r.get("vs", {}).get("tvm")
        ms = "failed" if r.get("latency_ms") is None else f"{r['latency_ms']:.2f} ({r['spread_ms']:.2f})"
        lines.append(f"| {r['model']} | {r['label']} | {ms} | {r.get('num_kernels') or '—'} | "
                     f"{'—' if not v else f'{v[0]:.3f} ({v[1]:.3f})'} |")
    return lines + _unstable_note(held["rows"]) + _shapes_section(held.get("shapes_formed"), cfg.get("rules", ()),
                                                                   f"### Group shapes formed on `{name}`")


def _shapes_section(formed: dict[str, Any] | None, rules: Sequence[str],
                    title: str = "## Group shapes formed") -> list[str]:
    """Which instances of each declared group shape every plan forms, per model (on the training
    models, the seeds' plans only): where the policy's choice differs from the rules'. And which
    plans hold groups the training mask forbids (``past_mask``), which no policy can plan."""
    formed = {model: entry for model, entry in (formed or {}).items()
              if entry["shapes"] or any((entry.get("past_mask") or {}).values())}
    if not formed:  # no instance anywhere, or results written before this was recorded
        return []
    lines = ["", title, "",
             "Each instance of a declared group shape in graph order, `1` where the plan holds its two "
             "anchors in one group; the maps are the first anchors' output widths. Rule sets that form "
             "no instance are left out."]
    for model, entry in formed.items():
        past = {label: n for label, n in (entry.get("past_mask") or {}).items() if n}
        if past:
            lines += ["", f"{model}: groups the training mask forbids (more conv/matmul anchors than its cap, "
                      "and no declared shape): " + ", ".join(f"{label} {n}" for label, n in past.items()) + "."]
        for shape, found in entry["shapes"].items():
            lines += ["", f"{model} ({'training' if entry['training'] else 'held out'}), `{shape}`, "
                      f"{len(found['maps'])} instances on maps {' '.join(str(m) for m in found['maps'])}:", "",
                      "| plan | formed | count |", "|---|---|---|"]
            lines += [f"| {label} | `{bits}` | {bits.count('1')} |" for label, bits in found["plans"].items()
                      if label not in rules or "1" in bits]
    return lines


def rounds_text(cfg: dict) -> str:
    """The config's head-to-head protocol in words (scripts/learn_bench.py's ``parse_rounds``)."""
    text = f"{cfg['rounds']} interleaved rounds x {cfg['repeat']} repeats"
    if cfg.get("min_near_repeats"):
        cap = check_rounds(cfg["rounds"], cfg["min_near_repeats"], cfg.get("max_rounds"))
        text += (f", more rounds (up to {cap}) until "
                 f"{cfg['min_near_repeats']} repeats of a model ran in the near regime")
    return text


def _interval(x: dict[str, float] | None) -> str:
    if x is None:
        return "—"
    return f"{x['mean']:.3f} [{fmt(x['low'], '.3f')}, {fmt(x['high'], '.3f')}]"


def render(cfg: dict[str, Any], result: dict[str, Any], commands: Sequence[str]) -> str:
    """The report's markdown from ``results.json``'s ``result``: headline against the goals,
    per-model table, regimes, group shapes formed, held-out targets, training, search."""
    summary, rows, header = result["summary"], result["rows"], result["header"]
    training, searches, finals = result["training"], result["searches"], result["finals"]
    best = summary["best_rule"]
    other_best = best != "tvm"  # its own column only when it is not tvm's
    search = summary["search"]
    lines = ["# Learned fusion on held-out bench families", "", header, "",
             "Commands (generated; do not edit):", ""]
    lines += [f"    {c}" for c in commands]
    fam = cfg["families"]
    train_models = [m for m in fam if m not in cfg["heldout_models"]]
    lines += ["", "Split by family: training " + ", ".join(f"{m} ({fam[m]})" for m in train_models)
              + "; held out " + ", ".join(f"{m} ({fam[m]})" for m in cfg["heldout_models"]) + "."]
    if result.get("group_shapes"):  # absent in results written before it was recorded
        lines += ["", "Group shapes the decision mask admits past one anchor, with their instances in the "
                  "training models: " + "; ".join(
                      f"`{shape}` " + (", ".join(f"{m} {n}" for m, n in found.items()) or "**none**")
                      for shape, found in result["group_shapes"].items()) + "."]
    lines += ["", "## Headline (held-out families, head to head)", "",
              "Geomean over the held-out models of the paired speedup (median of per-repeat ratios); "
              f"mean over {len(summary['per_seed'])} seeds with its 95% t-interval. Best fixed rule on "
              f"these timings: `{best}`.", "",
              "| policy vs | geomean speedup [95% CI] | goal | met |", "|---|---|---|---|"]

    def met(x: dict[str, float] | None, goal: float) -> str:
        if x is None:
            return "—"
        return "yes" if x["mean"] >= goal and x["low"] > 1.0 else "no"

    lines.append(f"| `tvm` rules | {_interval(summary['vs_tvm'])} | ≥ 1.10, CI above 1 | {met(summary['vs_tvm'], 1.10)} |")
    lines.append(f"| best fixed rule (`{best}`) | {_interval(summary['vs_best_rule'])} | ≥ 1.05, CI above 1 | "
                 f"{met(summary['vs_best_rule'], 1.05)} |")
    if search:
        x = summary["vs_search"]
        lines.append(f"| {search} (kernel table) | {_interval(x)} | ≥ 0.95 | "
                     f"{'—' if x is None else ('yes' if x['mean'] >= 0.95 else 'no')} |")
    room = headroom(rows, best)
    if room:
        lines += ["", "Headroom: the fastest plan timed here on each held-out model ("
                  + ", ".join(f"{m}: {x['label']} {x['vs_tvm']:.3f}" for m, x in room["per_model"].items())
                  + f") gives a geomean of {room['vs_tvm']:.3f} over `tvm` and {fmt(room['vs_best_rule'], '.3f')} "
                  f"over `{best}`: what a per-model choice among these plans could show (optimistic: the "
                  "maximum of noisy ratios)."]
    lines += ["", f"| seed | vs tvm | vs best rule | vs {search or 'search'} | plans equal to a rule on every held-out model |",
              "|---|---|---|---|---|"]
    for s in summary["per_seed"]:
        lines.append(f"| {s['seed']} | {fmt(s['vs_tvm'], '.3f')} | {fmt(s['vs_best_rule'], '.3f')} | "
                     f"{fmt(s['vs_search'], '.3f')} | {s['collapsed_to'] or 'no'} |")
    lines += ["", "Fixed rules, geomean paired speedup over `tvm`: "
              + ", ".join(f"`{r}` {fmt(v, '.3f')}" for r, v in summary["rule_vs_tvm"].items()) + ".", "",
              "## Per held-out model", "",
              "Every distinct plan of a model built, verified and timed in one head-to-head comparison "
              f"({rounds_text(cfg)}); speedups are paired "
              "(IQR in brackets).", "",
              f"| model | plan | ms (IQR) | kernels | vs tvm |{f' vs {best} |' if other_best else ''} estimate ms |",
              "|---|---|---|---|---|" + ("---|" if other_best else "") + "---|"]
    for r in rows:
        def vs(ref: str | None) -> str:
            v = r.get("vs", {}).get(ref) if ref else None
            return "—" if not v else f"{v[0]:.3f} ({v[1]:.3f})"
        ms = "failed" if r.get("latency_ms") is None else f"{r['latency_ms']:.2f} ({r['spread_ms']:.2f})"
        lines.append(f"| {r['model']} | {r['label']} | {ms} | {r.get('num_kernels') or '—'} | {vs('tvm')} | "
                     + (f"{vs(best)} | " if other_best else "") + f"{fmt(r.get('estimate_ms'), '.2f')} |")
    lines += _unstable_note(rows)
    lines += _regime_section(rows, [s["seed"] for s in summary["per_seed"]], best)
    lines += _shapes_section(result.get("shapes_formed"), cfg.get("rules", ()))
    for name, held in (result.get("heldout_targets") or {}).items():
        lines += _heldout_target(name, held, cfg)
    fine_tuned = any("fine_tuned" in t for t in training)
    lines += ["", "## Training", "", "![learning curves](curves.png)", "",
              "| seed | env steps | episodes | kernels timed (training) | warm start imitated | "
              + ("fine-tuned on (after PPO) | " if fine_tuned else "")
              + "wall s | final rolling est. vs tvm | vs best rule |",
              "|---|---|---|---|---|" + ("---|" if fine_tuned else "") + "---|---|---|"]
    finals_by = {f["seed"]: f for f in finals}
    for t in training:
        f = finals_by.get(t["seed"], {})
        lines.append(f"| {t['seed']} | {t['steps']} | {t['episodes']} | {t['measurements']} | "
                     f"{t.get('imitated', '—')} | " + (f"{t.get('fine_tuned', '—')} | " if fine_tuned else "")
                     + f"{fmt(t['wall_s'], '.0f')} | {fmt(f.get('vs_tvm'), '.3f')} | "
                     f"{fmt(f.get('vs_best_rule'), '.3f')} |")
    if fine_tuned:
        lines += ["", "The learning curves and the final rolling estimates are PPO's episodes, before fine-tuning."]
    if searches:
        by_label: dict[str, list[dict[str, Any]]] = {}
        for s in searches:
            by_label.setdefault(s["label"], []).append(s)
        n_models = len({r["model"] for r in rows})
        lines += ["", "## Search over the kernel table (held-out models)", "",
                  "Every search is seeded with the fixed rules' plans: random search measures them first, "
                  "greedy merging and annealing start from the fastest of them (by kernel-table estimate). "
                  "Its best plan is then re-timed head to head with the policy's plans above. The policy "
                  "decides with zero measurements (asserted); a search spends the kernels it times alone "
                  "(kernels the table already held are free).", "",
                  "| search | policy vs search, mean of seeds [95% CI] | search's best vs tvm (geomean, re-timed) "
                  "| kernels timed (sum over models) | wall s (sum) |", "|---|---|---|---|---|"]
        for label, runs in by_label.items():
            own = [r for r in rows if r["label"] == label and r.get("vs", {}).get("tvm")]
            vs_tvm = geomean(r["vs"]["tvm"][0] for r in own) if own and len(own) == n_models else None
            lines.append(f"| {label} | {_interval(summary.get('vs_searches', {}).get(label))} | {fmt(vs_tvm, '.3f')} | "
                         f"{sum(s['kernels_timed'] for s in runs)} | {sum(s['wall_s'] for s in runs):.0f} |")
        lines += ["", "| model | search | evaluations | kernels timed | best estimate ms | wall s |",
                  "|---|---|---|---|---|---|"]
        for s in searches:
            lines.append(f"| {s['model']} | {s['label']} | {s['evaluations']} | {s['kernels_timed']} | "
                         f"{fmt(s['estimate_ms'], '.2f')} | {s['wall_s']:.0f} |")
    return "\n".join(lines) + "\n"
