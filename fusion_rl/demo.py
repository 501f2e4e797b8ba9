"""``make demo``: the main job on the built-in default (a small zoo, the local CPU).

It compiles zoo models with the shipped learned policy (``policies/default``) and shows the
result beside TVM's own fusion rules, no fusion, ONNX Runtime and torch on this machine: all
verified against ONNX Runtime and timed with the same protocol. The models include ones the
policy never saw in training. Without a shipped policy it compares the rule sets alone.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from fusion_rl import paths
from fusion_rl.compare import compare_model
from fusion_rl.compiler.store import MeasurementStore, default_store_path
from fusion_rl.compiler.timing import TimingProtocol
from fusion_rl.fusion.rules import make_plan
from fusion_rl.graph.model import load_model
from fusion_rl.io import dumps_json

DEFAULT_POLICY = paths.DEFAULT_POLICY
DEMO_MODELS = ("resnet_tiny", "se_cnn", "mixer_tiny")


def run_demo(quick: bool = False, models: tuple[str, ...] = DEMO_MODELS, policy: Path = DEFAULT_POLICY,
             as_json: bool = False,
             progress: Callable[[int, int | None, str], None] | None = None,
             log: Callable[[str], None] = print) -> int:
    """Print the demo's table (or, with ``as_json``, its rows as one JSON object); returns 0.

    ``progress(done, total, label)``, if given, is called after each row (a system on a model);
    the table's lines go to ``log`` (the CLI's prints them above its progress bar).
    """
    models = models[:1] if quick else models
    protocol = TimingProtocol(repeat=3, min_repeat_ms=5) if quick else TimingProtocol()
    say = (lambda *a, **k: None) if as_json else log  # noqa: E731 - JSON: stdout holds only the result
    planner = None
    trained_on: list[str] = []
    if (policy / "card.json").is_file():
        from fusion_rl.export import LearnedPlanner

        planner = LearnedPlanner(policy, "host")
        trained_on = planner.card.get("training", {}).get("models", [])
        say(f"policy: {policy} (trained on {', '.join(trained_on) or '?'})")
    else:
        say(f"no shipped policy at {policy}: comparing rule sets only")
    t0 = time.perf_counter()
    runtimes = ["ort"] if quick else ["ort", "ort-noopt", "torch-eager"]
    systems = 2 + (planner is not None) + len(runtimes)
    total, done = systems * len(models), 0
    out_rows: list[dict] = []
    header = f"{'model':14s} {'system':28s} {'kernels':>7s} {'median ms':>10s} {'IQR':>7s}  vs tvm rules"
    with MeasurementStore(default_store_path()) as store:
        say(f"store: {store.path}\n\n{header}\n{'-' * len(header)}")
        for name in models:
            model = load_model(name)
            plans = {r: make_plan(r, model.mod, model.graph) for r in ("unfused", "tvm")}
            if planner is not None:
                plans["learned"] = planner.plan(model.graph)

            def row_done(_done: int, _total: int | None, label: str, name: str = name) -> None:
                nonlocal done
                done += 1
                if progress is not None:
                    progress(done, total, f"{name}: {label}")

            rows = compare_model(model, [("rules", {})], "host", store, protocol, runtimes, plans,
                                 progress=row_done)
            tvm_ms = next(r.latency_ms for r in rows if r.rules == "tvm")
            for r in rows:
                speedup = tvm_ms / r.latency_ms if r.status == "ok" and tvm_ms and r.latency_ms else None
                out_rows.append({**asdict(r), "speedup_vs_tvm": speedup})
                if r.status != "ok":
                    say(f"{name:14s} {r.system:28s} {r.status}: {r.error}")
                    continue
                kernels = "" if r.kernels is None else str(r.kernels)
                versus = f"{speedup:5.2f}x" if speedup is not None else "    -"
                say(f"{name:14s} {r.system:28s} {kernels:>7s} {r.latency_ms:10.3f} "
                    f"{r.spread_ms:7.3f}  {versus}")
    if as_json:
        print(dumps_json({"policy": str(policy) if planner is not None else None,
                          "trained_on": trained_on, "rows": out_rows}))
    say(f"\nall outputs verified against ONNX Runtime; tvm[...] rows use the rules schedule; "
        f"{time.perf_counter() - t0:.0f} s")
    return 0
