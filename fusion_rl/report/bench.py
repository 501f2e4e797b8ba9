"""The bench report (``experiments/bench/``): markdown tables, a plot, kernel classes, peak."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

#: Kernel classes, in report order: where the time of a model goes.
CLASSES = ("conv", "matmul", "norm/softmax/pool", "other")


def kernel_class(name: str) -> str:
    """The class of a TVM kernel, from its (fused) name: the anchor decides."""
    if "conv2d" in name:
        return "conv"
    if "matmul" in name or "dense" in name:
        return "matmul"
    if any(k in name for k in ("softmax", "layer_norm", "rms", "mean", "variance", "pool", "sum")):
        return "norm/softmax/pool"
    return "other"


def ort_op_class(op_type: str) -> str:
    """The class of an ONNX Runtime node (fused contrib ops included)."""
    if "Conv" in op_type:
        return "conv"
    if any(k in op_type for k in ("MatMul", "Gemm", "Attention")):
        return "matmul"
    if any(k in op_type for k in ("Norm", "Softmax", "Pool", "Reduce")):
        return "norm/softmax/pool"
    return "other"


def fp32_peak_gflops(spec: Any) -> tuple[float, str]:
    """This machine's fp32 FMA peak for ``spec``'s threads, and how it was computed.

    Peak = threads x FMA lanes per cycle x 2 FLOP x clock. FMA lanes per cycle: 32 on Intel
    AVX-512 cores and AMD Zen 5 (CPU family 26: two 512-bit FMA pipes), 16 on AVX2 cores and
    on AMD Zen 4 (two 256-bit pipes; 512-bit instructions are split). The clock is ``cpu MHz``
    of /proc/cpuinfo: a VM reports its nominal clock, and boost clocks run above it, so a
    system can exceed 100% of this peak.
    """
    vendor, mhz, flags, family = "", 0.0, set(), 0
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "vendor_id" and not vendor:
                    vendor = value.strip()
                elif key == "cpu MHz" and not mhz:
                    mhz = float(value)
                elif key == "flags" and not flags:
                    flags = set(value.split())
                elif key == "cpu family" and not family:
                    family = int(value)
    except OSError:
        pass
    full512 = "avx512f" in flags and (vendor == "GenuineIntel" or (vendor == "AuthenticAMD" and family >= 26))
    lanes = 32 if full512 else 16 if "fma" in flags else 8
    peak = spec.num_threads * lanes * 2 * mhz / 1e3
    note = (f"{spec.num_threads} threads x {lanes} fp32 FMA lanes/cycle x 2 FLOP x {mhz / 1e3:.2f} GHz, "
            f"nominal ({vendor or 'unknown vendor'} family {family}, {'AVX-512' if 'avx512f' in flags else 'AVX2' if 'avx2' in flags else 'SSE'})")
    return peak, note


def ort_class_times(model: Any, threads: int, runs: int = 10) -> dict[str, float]:
    """ONNX Runtime (all graph optimizations) per-node time by class, ms per inference."""
    import onnxruntime as ort

    if model.onnx_model is None:
        return {}
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        opts.profile_file_prefix = os.path.join(tmp, "ort")
        sess = ort.InferenceSession(model.onnx_model.SerializeToString(), opts,
                                    providers=["CPUExecutionProvider"])
        feeds = dict(zip([i.name for i in sess.get_inputs()], model.inputs))
        for _ in range(runs + 1):
            sess.run(None, feeds)
        events = json.loads(Path(sess.end_profiling()).read_text())
    # The first run pays one-time allocations: count the ``runs`` after it only.
    starts = sorted(ev["ts"] for ev in events if ev.get("name") == "model_run")
    cutoff = starts[1] if len(starts) > 1 else 0
    totals: dict[str, float] = {}
    for ev in events:
        if ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time") \
                and ev.get("ts", 0) >= cutoff:
            cls = ort_op_class(ev.get("args", {}).get("op_name", ""))
            totals[cls] = totals.get(cls, 0.0) + ev.get("dur", 0) / 1e3
    return {k: v / runs for k, v in totals.items()}


def _fmt(x: float | None, digits: int = 2) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def schedule_note(results: dict[str, Any]) -> str:
    """The schedule the rows were measured under: one key, or each row's where an ``--update``
    re-measured some rows under a newer schedule than the others."""
    main = results["schedule"]
    other: dict[str, list[str]] = {}
    for m in results["models"]:
        if m.get("schedule", main) != main:
            other.setdefault(str(m["schedule"]), []).append(m["model"])
    return f"`{main}`" + "".join(f" (`{k}` for {', '.join(v)})" for k, v in other.items())


def write_markdown(results: dict[str, Any], path: Path) -> None:
    """results.md: latency, GFLOP/s and % of peak per system; head-to-head speedups; classes."""
    peak = results["peak_gflops"]
    # The first rule set of the config: every paired speedup is over it (results written before
    # the field existed all used ``unfused``).
    baseline = results.get("baseline", "unfused")
    order = [baseline] + [r for r in ("unfused", "tvm", "tensorrt", "aggressive") if r != baseline]
    # Rule sets outside ``order`` keep their first appearance (a set's order changes per process).
    rules = sorted(dict.fromkeys(r for m in results["models"] for r in m["tvm"]),
                   key=lambda r: order.index(r) if r in order else len(order))
    runtimes = sorted({r for m in results["models"] for r in m["runtimes"]})
    lines = [
        "# Bench suite: deployment sizes, default schedule",
        "",
        f"Machine: {results['machine']}; target `{results['target']}`; schedule "
        f"{schedule_note(results)}; protocol `{results['protocol']}`; TVM plans timed head to head "
        f"in {results['rounds']} interleaved rounds. fp32 peak {peak:.0f} GFLOP/s "
        f"({results['peak_note']}).",
        "",
        f"Command: `{results['command']}` (generated; do not edit).",
        "",
        "## Latency (median ms, IQR in brackets)",
        "",
        "| model | GFLOP | " + " | ".join(f"TVM {r}" for r in rules) + " | " + " | ".join(runtimes)
        + " | best TVM / ORT |",
        "|---|---|" + "---|" * (len(rules) + len(runtimes) + 1),
    ]
    paired = [m for m in results["models"] if m.get("vs_ort")]
    for m in results["models"]:
        cells = [f"{_fmt(m['tvm'][r]['latency_ms'])} ({_fmt(m['tvm'][r]['spread_ms'])})"
                 if r in m["tvm"] else "failed" for r in rules]
        rt = [f"{_fmt(m['runtimes'][r]['latency_ms'])} ({_fmt(m['runtimes'][r]['spread_ms'])})"
              if m["runtimes"].get(r, {}).get("status") == "ok" else m["runtimes"].get(r, {}).get("status", "—")
              for r in runtimes]
        ort = m["runtimes"].get("ort", {}).get("latency_ms")
        best = m["tvm"].get(m.get("best_rules", ""), {}).get("latency_ms")
        ratio = f"{best / ort:.2f}x ({m['best_rules']})" if best and ort else "—"
        lines.append(f"| {m['model']} | {m['gflop']:.2f} | " + " | ".join(cells) + " | "
                     + " | ".join(rt) + f" | {ratio} |")
    if paired:
        lines += ["", "## Head to head: TVM's best rule set vs ONNX Runtime", "",
                  "Both in one process, in interleaved rounds; speedup = median of the paired "
                  "per-repeat ratios ORT time / TVM time (above 1: TVM is faster), IQR in brackets. "
                  "The latency columns above come from separate runs and drift apart on a shared "
                  "machine; this comparison does not.", "",
                  "| model | rule set | TVM ms | ORT ms | speedup over ORT | repeats |",
                  "|---|---|---|---|---|---|"]
        for m in paired:
            v = m["vs_ort"]
            lines.append(f"| {m['model']} | {m['best_rules']} | {v['tvm_ms']:.2f} | "
                         f"{v['runtime_ms']:.2f} | {v['speedup']:.3f} ({v['speedup_spread']:.3f}) | "
                         f"{v['repeats']} |")
    lines += ["", f"## Head to head: speedup over `{baseline}` (median of paired per-repeat ratios, IQR)", "",
              "| model | " + " | ".join(rules[1:]) + " |", "|---|" + "---|" * (len(rules) - 1)]
    for m in results["models"]:
        cells = [f"{m['tvm'][r]['speedup_vs_unfused']:.3f} ({m['tvm'][r]['speedup_spread']:.3f})"
                 if r in m["tvm"] else "—" for r in rules[1:]]
        lines.append(f"| {m['model']} | " + " | ".join(cells) + " |")
    lines += ["", f"## Throughput: GFLOP/s and % of the {peak:.0f} GFLOP/s peak", "",
              "| model | best TVM | " + " | ".join(runtimes) + " |", "|---|---|" + "---|" * len(runtimes)]
    for m in results["models"]:
        def rate(ms: float | None) -> str:
            if not ms:
                return "—"
            g = m["gflop"] / (ms / 1e3)
            return f"{g:.0f} ({100 * g / peak:.0f}%)" if peak else f"{g:.0f}"
        best = m["tvm"].get(m.get("best_rules", ""), {}).get("latency_ms")
        lines.append(f"| {m['model']} | {rate(best)} | " + " | ".join(
            rate(m["runtimes"].get(r, {}).get("latency_ms") if m["runtimes"].get(r, {}).get("status") == "ok" else None)
            for r in runtimes) + " |")
    lines += where_time_goes(results)
    lines += ["", "## Preparation (one time per model) and fallbacks", "",
              "| model | ops | export + import s | head-to-head wall s | new plan: compile + verify + time s | kernels without a schedule |",
              "|---|---|---|---|---|---|"]
    for m in results["models"]:
        fb = [k for k, v in (m.get("kernel_schedules") or {}).items() if v.startswith("fallback")]
        lines.append(f"| {m['model']} | {m['ops']} | {m['prep_s']:.1f} | {_fmt(m.get('compare_s'), 0)} | "
                     f"{_fmt(m.get('new_plan_s'), 1)} ({m.get('new_plan_status', '—')}) | {len(fb)} |")
    path.write_text("\n".join(lines) + "\n")


def _class_ms(by_class: dict[str, float] | None, cls: str) -> float | None:
    """ms of one class (``"all"``: their sum); None where nothing was measured."""
    if not by_class:
        return None
    return sum(by_class.values()) if cls == "all" else by_class.get(cls)


def where_time_goes(results: dict[str, Any]) -> list[str]:
    """The kernel-class table: TVM's best plan's kernels alone, hot and cold, beside ONNX
    Runtime's node profile. Rows measured before cold times existed show their hot re-run only."""
    schedules = sorted({str(m["classes_schedule"]) for m in results["models"] if m.get("classes_schedule")})
    lines = ["", "## Where the time goes: TVM's best plan vs ONNX Runtime, ms per class", "",
             "Each distinct kernel of TVM's best plan alone, times its launches: *hot* repeats it "
             "on the same arguments, with its weights and output in the caches (as the kernel "
             "table times it); *cold* is one call after its weights and output were flushed from "
             "the caches, as in a model's run, where they were last touched one inference ago. "
             "ONNX Runtime's times are its node profile in the model's run, so cold is the like "
             "for like comparison. None of them adds up to end-to-end time exactly; the last "
             "column has both systems' end-to-end latencies (the latency table's), and where "
             "ORT's node sum exceeds its latency, its profile carries overhead of its own."
             + (f" Kernels scheduled by {', '.join(f'`{k}`' for k in schedules)}" if schedules else "")
             + (f"; command: `{results['classes_command']}`." if results.get("classes_command") else "."),
             "",
             "| model | " + " | ".join(f"{c}: hot / cold / ORT" for c in CLASSES + ("all",))
             + " | end to end: TVM / ORT |",
             "|---|" + "---|" * (len(CLASSES) + 2)]
    for m in results["models"]:
        hot = m.get("tvm_classes_hot_ms", m.get("tvm_classes_ms", {}))
        cold, ort = m.get("tvm_classes_cold_ms"), m.get("ort_classes_ms", {})
        cells = [" / ".join(_fmt(_class_ms(d, c)) for d in (hot, cold, ort)) for c in CLASSES + ("all",)]
        e2e = (m["tvm"].get(m.get("best_rules", ""), {}).get("latency_ms"),
               m["runtimes"].get("ort", {}).get("latency_ms"))
        lines.append(f"| {m['model']} | " + " | ".join(cells) + f" | {_fmt(e2e[0])} / {_fmt(e2e[1])} |")
    return lines


def write_plot(results: dict[str, Any], path: Path) -> None:
    """bench.png: every system's latency relative to ONNX Runtime (lower is faster)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in results["models"] if m["runtimes"].get("ort", {}).get("latency_ms")]
    baseline = results.get("baseline", "unfused")
    systems = [f"TVM {baseline}", "TVM best rule set", "ORT no graph opts", "torch eager", "torch.compile"]
    keys = [("tvm", baseline), ("tvm", None), ("runtimes", "ort-noopt"),
            ("runtimes", "torch-eager"), ("runtimes", "torch-compile")]
    fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(models) + 3), 5))
    width = 0.8 / len(systems)
    for k, (label, (kind, key)) in enumerate(zip(systems, keys)):
        vals = []
        for m in models:
            ort = m["runtimes"]["ort"]["latency_ms"]
            entry = m[kind].get(key if key else m.get("best_rules", ""), {})
            ms = entry.get("latency_ms") if (kind == "tvm" or entry.get("status") == "ok") else None
            vals.append(ms / ort if ms else float("nan"))
        ax.bar([i + (k - len(systems) / 2 + 0.5) * width for i in range(len(models))], vals, width,
               label=label)
    ax.axhline(1.0, color="black", lw=1, ls="--", label="ONNX Runtime (all graph opts) = 1")
    ax.set_xticks(range(len(models)))
    ax.set_xticklabels([m["model"].removeprefix("bench_") for m in models], rotation=20, ha="right")
    ax.set_ylabel("latency / ONNX Runtime latency (log scale; lower is faster)")
    ax.set_yscale("log")
    ax.set_title(f"Bench suite, batch 1, {results['target']}, schedule {results['schedule']}")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
