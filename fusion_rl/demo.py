"""``make demo``: the main job on the built-in default (a small zoo, the local CPU).

Until a trained policy ships, it compares every rule set under the naive and the rules schedule
on three zoo models (a residual CNN, a transformer block, an MLP-mixer), verified and timed on
the host target, with the measurement store making a second run instant.
"""

from __future__ import annotations

import time

from fusion_rl.compiler.measure import Measurer
from fusion_rl.compiler.store import MeasurementStore, default_store_path
from fusion_rl.compiler.timing import TimingProtocol
from fusion_rl.fusion.metrics import plan_metrics
from fusion_rl.fusion.rules import RULE_SETS, make_plan
from fusion_rl.graph.model import load_model

DEMO_MODELS = ("resnet_tiny", "transformer_encoder", "mixer_tiny")
DEMO_SCHEDULES = ("naive", "rules")


def run_demo(quick: bool = False, models: tuple[str, ...] = DEMO_MODELS) -> int:
    models = models[:1] if quick else models
    protocol = TimingProtocol(repeat=3, min_repeat_ms=5) if quick else TimingProtocol()
    t0 = time.perf_counter()
    with MeasurementStore(default_store_path()) as store:
        print(f"fusion_rl demo: rule sets x schedules on {', '.join(models)} (store: {store.path})\n")
        header = f"{'model':20s} {'schedule':8s} {'rules':11s} {'kernels':>7s} {'interm. KiB':>11s} {'ms':>9s} {'IQR':>7s}  vs unfused"
        print(header)
        print("-" * len(header))
        for name in models:
            model = load_model(name)
            plans = {r: make_plan(r, model.mod, model.graph) for r in RULE_SETS}
            for schedule in DEMO_SCHEDULES:
                with Measurer("host", schedule, store=store, protocol=protocol) as measurer:
                    base = None
                    for rules, plan in plans.items():
                        rec = measurer.measure(model, plan)
                        metrics = plan_metrics(model.graph, plan)
                        if rec.status != "ok":
                            print(f"{name:20s} {schedule:8s} {rules:11s} {rec.status}: {rec.error}")
                            continue
                        base = base or rec.median_ms
                        print(
                            f"{name:20s} {schedule:8s} {rules:11s} {rec.num_kernels:7d} "
                            f"{metrics.intermediate_bytes / 1024:11.1f} {rec.median_ms:9.3f} "
                            f"{rec.spread_ms:7.3f}  {base / rec.median_ms:5.2f}x"
                        )
    print(f"\nall outputs verified against ONNX Runtime; {time.perf_counter() - t0:.0f} s")
    return 0
