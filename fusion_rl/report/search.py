"""The table-search report: search baselines over the kernel table, re-timed head to head.

``scripts/table_search.py`` writes the rows; :func:`render` turns them into ``results.md``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from fusion_rl.compare import machine_description
from fusion_rl.evaluate import geomean

__all__ = ["render"]


def _ms(v: float | None) -> str:
    return "—" if v is None or not math.isfinite(v) else f"{v:.4g}"


def render(cfg: dict[str, Any], rows: Sequence[dict[str, Any]], spec: Any, schedule: str, protocol: Any,
           kprotocol: Any, launch_ms: float, config: Path) -> str:
    """Markdown: per model and search, the estimate, evaluations, kernels timed and wall time;
    then the re-timed plans against ``tvm`` (paired speedup and its IQR) and their geomean."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    searches = [r for r in rows if r["algo"] != "retime"]
    retimed = [r for r in rows if r["algo"] == "retime"]
    labels = list(dict.fromkeys(r["label"] for r in retimed if r["label"] != "tvm"))
    L = [
        "# Search baselines over the kernel table\n",
        f"Machine: {machine_description(spec.num_threads)}; target `{spec.key}`; schedule `{schedule}`; "
        f"kernel protocol `{kprotocol.key}`; re-timing protocol `{protocol.key}`, {cfg.get('rounds', 3)} "
        f"interleaved rounds.  ",
        f"Command: `TVM_NUM_THREADS={spec.num_threads} python scripts/table_search.py {config}` (generated; do not edit).\n",
        "A search evaluates a plan by its kernel-table estimate (sum of its kernels, each timed alone "
        f"once, + launches x {launch_ms:.5f} ms); what it spends is the kernels it had to time (a plan whose "
        "kernels are all in the table costs nothing). At most "
        f"{cfg.get('max_anchors')} conv/matmul per group. Seed {cfg.get('seed', 0)}.\n",
        "## The searches (estimates)\n",
        "| model | search | evaluations | kernels timed | best estimate ms | wall s |",
        "|---|---|---|---|---|---|",
    ]
    for r in searches:
        L.append(f"| {r['model']} | {r['algo']}@{r['budget']} | {r['evaluations']} | {r['kernels_timed']} | "
                 f"{_ms(r['estimate_ms'])} | {r['wall_s']:.0f} |")
    L += [
        "",
        f"## Re-timed end to end, head to head with `tvm` rules (budget {cfg.get('retime_budget')})\n",
        "Cell: median ms of the pooled repeats, and the paired speedup over `tvm` (median of per-repeat "
        "ratios, IQR in brackets). Every plan was built and verified against ONNX Runtime.\n",
        "| model | tvm ms (estimate) | " + " | ".join(labels) + " |",
        "|---|---|" + "---|" * len(labels),
    ]
    for m in models:
        by = {r["label"]: r for r in retimed if r["model"] == m}
        if not by:
            continue
        t = by.get("tvm", {})
        cells = []
        for label in labels:
            r = by.get(label)
            if r is None:
                cells.append("—")
            elif r.get("status") != "ok":
                cells.append(f"failed ({(r.get('error') or '')[:60]})")
            else:
                cells.append(f"{_ms(r['latency_ms'])} ({r['speedup_vs_tvm']:.3f}× [{r['speedup_spread']:.3f}])")
        L.append(f"| {m} | {_ms(t.get('latency_ms'))} ({_ms(t.get('estimate_ms'))}) | " + " | ".join(cells) + " |")
    geo = {label: geomean(r["speedup_vs_tvm"] for r in retimed if r["label"] == label and r.get("status") == "ok")
           for label in labels}
    L.append("| **geomean** | | " + " | ".join("—" if not math.isfinite(v) else f"**{v:.3f}×**"
                                              for v in geo.values()) + " |")
    L += ["", f"Kernels timed for all searches: {sum(r['kernels_timed'] for r in searches)}; "
              f"search wall time {sum(r['wall_s'] for r in searches):.0f} s; re-timing "
              f"{sum({r['model']: r.get('retime_s', 0.0) for r in retimed}.values()):.0f} s."]
    return "\n".join(L) + "\n"
