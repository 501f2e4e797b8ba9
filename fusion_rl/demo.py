"""``make demo``: the main job on the built-in default: the shipped policy on bench models.

It plans bench models at deployment sizes with the shipped learned policy (``policies/default``)
and times its plan head to head, in one process, beside TVM's own fusion rules, the best fixed
rule of the policy's evaluation, no fusion and ONNX Runtime: interleaved rounds, paired ratios
(on a shared VM, latencies taken apart drift by more than the differences shown). Every plan and
runtime is verified against the model's reference first. The models include families the policy
never saw in training (its card names the ones it did). Without a shipped policy it compares the
rule sets alone.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from fusion_rl import paths
from fusion_rl.compare import machine_description, time_systems
from fusion_rl.compiler.paired import HeadToHead
from fusion_rl.compiler.regime import regime_labels
from fusion_rl.compiler.target import parse_target
from fusion_rl.compiler.timing import TimingProtocol
from fusion_rl.fusion.rules import make_plan
from fusion_rl.graph.model import load_model
from fusion_rl.io import dumps_json

DEFAULT_POLICY = paths.DEFAULT_POLICY
#: A training family (ResNet) and two held-out ones (MobileNetV2, ViT) of the shipped policy.
DEMO_MODELS = ("bench_resnet18", "bench_mobilenet_v2", "bench_vit")
RUNTIMES = ("ort",)


def _best_rule(card: dict[str, Any]) -> str | None:
    """The best fixed rule of the policy's held-out evaluation (``None``: the card has none)."""
    split = card.get("evaluation", {}).get("splits", {}).get("heldout-model", {})
    return split.get("best_rule")


def run_demo(quick: bool = False, models: tuple[str, ...] = DEMO_MODELS, policy: Path = DEFAULT_POLICY,
             as_json: bool = False,
             progress: Callable[[int, int | None, str], None] | None = None,
             log: Callable[[str], None] = print) -> int:
    """Print the demo's table (or, with ``as_json``, its rows as one JSON object); returns 0.

    ``quick``: the first model only, fewer repeats. ``progress(done, total, label)``, if given, is
    called after each model; the table's lines go to ``log`` (the CLI prints them above its bar).
    """
    models = models[:1] if quick else models
    protocol = TimingProtocol(repeat=3, min_repeat_ms=20) if quick else TimingProtocol(repeat=5, min_repeat_ms=50)
    rounds = 2 if quick else 3
    spec = parse_target("host")
    say = (lambda *a, **k: None) if as_json else log  # noqa: E731 - JSON: stdout holds only the result
    planner = None
    trained_on: list[str] = []
    best_rule = None
    if (policy / "card.json").is_file():
        from fusion_rl.export import LearnedPlanner

        planner = LearnedPlanner(policy, "host")
        trained_on = planner.card.get("training", {}).get("models", [])
        best_rule = _best_rule(planner.card)
        say(f"policy: {policy} (trained on {', '.join(trained_on) or '?'}; best fixed rule of its "
            f"evaluation: {best_rule or '?'})")
    else:
        say(f"no shipped policy at {policy}: comparing rule sets only")
    say(f"machine: {machine_description(spec.num_threads)}; {rounds} interleaved rounds x {protocol.repeat} repeats")
    t0 = time.perf_counter()
    out_rows: list[dict] = []
    header = f"{'model':20s} {'system':28s} {'kernels':>7s} {'median ms':>10s} {'IQR':>7s}  vs tvm rules (IQR)"
    say(f"\n{header}\n{'-' * len(header)}")
    for done, name in enumerate(models, 1):
        model = load_model(name)
        rules = dict.fromkeys(["unfused", "tvm", *([best_rule] if best_rule else [])])
        plans = {f"tvm[{r}]": make_plan(r, model.mod, model.graph) for r in rules}
        if planner is not None:
            plans["learned" + ("" if name in trained_on else " (never seen)")] = planner.plan(model.graph)
        h2h = time_systems(model, plans, RUNTIMES, spec, protocol, rounds)
        for system in h2h.pooled_ms:
            v = h2h.verdict("tvm[tvm]", system)
            speedup, spread = v["paired_speedup"], v["paired_spread"]
            row = {"model": name, "system": system, "kernels": h2h.num_kernels.get(system),
                   "median_ms": h2h.median_ms(system), "iqr_ms": h2h.iqr_ms(system), "speedup_vs_tvm": speedup,
                   "speedup_spread": spread, "plan_hash": plans[system].hash if system in plans else None,
                   "speedup_by_regime": h2h.regime_speedups("tvm[tvm]", system)}
            out_rows.append(row)
            say(f"{name:20s} {system:28s} {'' if row['kernels'] is None else row['kernels']:>7} "
                f"{row['median_ms']:10.3f} {row['iqr_ms']:7.3f}  {speedup:5.3f}x ({spread:.3f})")
        if h2h.fork_join_us:
            say(_regime_line(h2h, [r for r in out_rows if r["model"] == name]))
        same = [s for s in plans if s != "tvm[tvm]" and plans[s].hash == plans["tvm[tvm]"].hash]
        if same:
            say(f"{'':20s} ({', '.join(same)}: the same plan as tvm[tvm])")
        if progress is not None:
            progress(done, len(models), name)
    if as_json:
        print(dumps_json({"policy": str(policy) if planner is not None else None, "trained_on": trained_on,
                          "best_rule": best_rule, "rounds": rounds, "protocol": protocol.key, "rows": out_rows}))
    say(f"\ntvm[...] rows: the rules schedule; every plan and runtime verified against the model's "
        f"reference; {time.perf_counter() - t0:.0f} s")
    return 0


def _regime_line(h2h: HeadToHead, rows: list[dict]) -> str:
    """Where the model's repeats fell in the host's fork-join regime; when some were far, each
    system's speedup in each (fusion_rl/compiler/regime.py: the far regime favours fewer kernels)."""
    labels = regime_labels(h2h.fork_join_us, h2h.reference_us)
    far = labels.count("far")
    if not far:
        return f"{'':20s} (host fork-join regime: all {len(labels)} repeats near)"
    per = "; ".join(f"{r['system']} " + ", ".join(f"{k} {v['paired_speedup']:.3f}x"
                                                  for k, v in r["speedup_by_regime"].items()) for r in rows)
    return f"{'':20s} ({far} of {len(labels)} repeats in the far fork-join regime; vs tvm rules by regime: {per})"
