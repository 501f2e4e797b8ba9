"""``make demo``: the main job on the built-in default (a small zoo, the local CPU).

It compiles zoo models with the shipped learned policy (``policies/default``) and shows the
result beside TVM's own fusion rules, no fusion, ONNX Runtime and torch on this machine: all
verified against ONNX Runtime and timed with the same protocol. The models include ones the
policy never saw in training. Without a shipped policy it compares the rule sets alone.
"""

from __future__ import annotations

import time
from pathlib import Path

from fusion_rl import paths
from fusion_rl.compare import compare_model
from fusion_rl.compiler.store import MeasurementStore, default_store_path
from fusion_rl.compiler.timing import TimingProtocol
from fusion_rl.fusion.rules import make_plan
from fusion_rl.graph.model import load_model

DEFAULT_POLICY = paths.DEFAULT_POLICY
DEMO_MODELS = ("resnet_tiny", "se_cnn", "mixer_tiny")


def run_demo(quick: bool = False, models: tuple[str, ...] = DEMO_MODELS, policy: Path = DEFAULT_POLICY) -> int:
    models = models[:1] if quick else models
    protocol = TimingProtocol(repeat=3, min_repeat_ms=5) if quick else TimingProtocol()
    planner = None
    if (policy / "card.json").is_file():
        from fusion_rl.export import LearnedPlanner

        planner = LearnedPlanner(policy, "host")
        trained_on = planner.card.get("training", {}).get("models", [])
        print(f"policy: {policy} (trained on {', '.join(trained_on) or '?'})")
    else:
        print(f"no shipped policy at {policy}: comparing rule sets only")
    t0 = time.perf_counter()
    header = f"{'model':14s} {'system':28s} {'kernels':>7s} {'median ms':>10s} {'IQR':>7s}  vs tvm rules"
    with MeasurementStore(default_store_path()) as store:
        print(f"store: {store.path}\n\n{header}\n{'-' * len(header)}")
        for name in models:
            model = load_model(name)
            plans = {r: make_plan(r, model.mod, model.graph) for r in ("unfused", "tvm")}
            if planner is not None:
                plans["learned"] = planner.plan(model.graph)
            runtimes = ["ort"] if quick else ["ort", "ort-noopt", "torch-eager"]
            rows = compare_model(model, [("rules", {})], "host", store, protocol, runtimes, plans)
            tvm_ms = next(r.latency_ms for r in rows if r.rules == "tvm")
            for r in rows:
                if r.status != "ok":
                    print(f"{name:14s} {r.system:28s} {r.status}: {r.error}")
                    continue
                kernels = "" if r.kernels is None else str(r.kernels)
                print(f"{name:14s} {r.system:28s} {kernels:>7s} {r.latency_ms:10.3f} "
                      f"{r.spread_ms:7.3f}  {tvm_ms / r.latency_ms:5.2f}x")
    print(f"\nall outputs verified against ONNX Runtime; tvm[...] rows use the rules schedule; "
          f"{time.perf_counter() - t0:.0f} s")
    return 0
