"""The seed's comparison: every rule set under every schedule provider, beside other compile
libraries (ONNX Runtime with and without graph optimizations, torch eager, torch.compile), on
one model and machine, in one run. Produces rows, a markdown table and a PNG bar chart.
"""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from fusion_rl.baselines.runtimes import RUNTIMES, run_runtime
from fusion_rl.compiler.measure import Measurer
from fusion_rl.compiler.paired import HeadToHead
from fusion_rl.compiler.regime import NearFloor, settle_reference
from fusion_rl.compiler.store import MeasurementStore
from fusion_rl.compiler.target import TargetSpec, parse_target
from fusion_rl.compiler.timing import TimingProtocol
from fusion_rl.fusion.metrics import plan_metrics
from fusion_rl.fusion.plan import FusionPlan
from fusion_rl.fusion.rules import RULE_SETS, make_plan
from fusion_rl.graph.model import Model
from fusion_rl.io import dumps_json, output_dir, write_atomic


@dataclass
class CompareRow:
    model: str
    system: str  #: "tvm[rules=tvm, schedule=rules]" or a runtime name
    rules: str | None
    schedule: str | None
    status: str
    latency_ms: float | None
    spread_ms: float | None  #: IQR of the repeats
    repeats: int
    kernels: int | None = None
    intermediate_kib: float | None = None
    setup_s: float | None = None  #: tuning/compile time (TVM: schedule + build; torch.compile)
    error: str | None = None


def compare_model(
    model: Model,
    schedules: Sequence[tuple[str, dict[str, Any]]] = (("naive", {}), ("rules", {})),
    target: str = "host",
    store: MeasurementStore | None = None,
    protocol: TimingProtocol = TimingProtocol(),
    runtimes: Sequence[str] = RUNTIMES,
    plans: dict[str, FusionPlan] | None = None,
    progress: Callable[[int, int | None, str], None] | None = None,
    tuning: Callable[[int, int | None, str], None] | None = None,
) -> list[CompareRow]:
    """Rows for every plan (default: every rule set) under every schedule, then runtimes.

    ``progress(done, total, label)``, if given, is called after each row (a plan under a
    schedule, or a runtime); ``tuning`` gets the ``tuned`` provider's per-task progress (see
    :class:`~fusion_rl.compiler.measure.Measurer`). The CLI draws bars with them.
    """
    rows: list[CompareRow] = []
    if plans is None:
        plans = {r: make_plan(r, model.mod, model.graph) for r in RULE_SETS}
    spec = parse_target(target)
    total = len(schedules) * len(plans) + len(runtimes)

    def done(label: str) -> None:
        if progress is not None:
            progress(len(rows), total, label)

    for schedule, kwargs in schedules:
        with Measurer(spec, schedule, dict(kwargs), store=store, protocol=protocol,
                      progress=tuning) as measurer:
            for rules, plan in plans.items():
                rec = measurer.measure(model, plan)
                metrics = plan_metrics(model.graph, plan)
                rows.append(
                    CompareRow(
                        model=model.name,
                        system=f"tvm[{rules} / {schedule}]",
                        rules=rules,
                        schedule=schedule,
                        status=rec.status,
                        latency_ms=rec.median_ms,
                        spread_ms=rec.spread_ms,
                        repeats=rec.repeats,
                        kernels=rec.num_kernels,
                        intermediate_kib=metrics.intermediate_bytes / 1024,
                        setup_s=rec.wall_s,
                        error=rec.error,
                    )
                )
                done(rows[-1].system)
    for runtime in runtimes:
        res = run_runtime(runtime, model, protocol, threads=spec.num_threads)
        rows.append(
            CompareRow(
                model=model.name,
                system=runtime,
                rules=None,
                schedule=None,
                status=res.status,
                latency_ms=res.median_ms,
                spread_ms=res.spread_ms,
                repeats=len(res.timing.times_ms) if res.timing else 0,
                setup_s=res.setup_s,
                error=res.error,
            )
        )
        done(runtime)
    return rows


def time_systems(model: Model, plans: Mapping[str, FusionPlan], runtimes: Sequence[str], spec: TargetSpec,
                 protocol: TimingProtocol, rounds: int) -> HeadToHead:
    """Plans (default schedule) and runtimes timed head to head in this process.

    Every plan is compiled and verified and every runtime is verified against the model's
    reference first; then all run in ``rounds`` interleaved rounds
    (:func:`~fusion_rl.baselines.runtimes.time_paired`), so repeat ``i`` of two systems ran
    seconds apart and :meth:`HeadToHead.verdict` gives their paired ratio. Plans are under their
    label, runtimes under their name; ``num_kernels`` has the plans' kernel counts, and
    ``fork_join_us`` the host's regime probe per repeat, judged against the host's floor as
    :func:`~fusion_rl.compiler.paired.head_to_head` judges them (``reference_us``). Two labels with
    the same plan share one build. Raises if a plan or a runtime computes a wrong output.
    """
    import tvm
    from tvm import relax

    from fusion_rl.baselines.runtimes import runtime_callable, time_paired
    from fusion_rl.compiler.build import compile_plan
    from fusion_rl.compiler.schedules import DEFAULT_SCHEDULE, make_schedule
    from fusion_rl.compiler.target.threads import threads_env
    from fusion_rl.compiler.verify import verify_executable

    fns: dict[str, Callable[[], object]] = {}
    out = HeadToHead(rounds)
    built: dict[str, tuple[Callable[[], object], int]] = {}  # plan hash -> (run, kernels)
    with threads_env(spec):
        dev = tvm.cpu()
        for label, plan in plans.items():
            if plan.hash not in built:
                compiled = compile_plan(model, plan, spec.to_tvm(), make_schedule(DEFAULT_SCHEDULE))
                verify_executable(compiled.executable, model, label)
                vm = relax.VirtualMachine(compiled.executable, dev)
                vm.save_function("main", "timed", *[tvm.runtime.tensor(a, dev) for a in model.inputs])
                built[plan.hash] = (vm["timed"], compiled.num_kernels)
            fns[label], out.num_kernels[label] = built[plan.hash]
        for runtime in runtimes:
            fns[runtime] = runtime_callable(runtime, model, spec.num_threads)
        times = time_paired(fns, protocol, rounds, probes_us=out.fork_join_us)
    out.reference_us = settle_reference(out.fork_join_us, NearFloor.for_target(spec))
    for label, ms in times.items():
        out.pooled_ms[label] = ms
        out.round_medians[label] = [float(np.median(r)) for r in np.array_split(ms, rounds)]
    return out


def to_markdown(rows: Sequence[CompareRow], title: str = "") -> str:
    lines = [f"### {title}", ""] if title else []
    lines.append("| system | status | median ms | IQR ms | kernels | intermediate KiB | setup s |")
    lines.append("|---|---|---|---|---|---|---|")
    for r in rows:
        fmt = lambda v, f: "" if v is None else format(v, f)  # noqa: E731
        lines.append(
            f"| {r.system} | {r.status} | {fmt(r.latency_ms, '.3f')} | {fmt(r.spread_ms, '.3f')} | "
            f"{fmt(r.kernels, 'd')} | {fmt(r.intermediate_kib, '.1f')} | {fmt(r.setup_s, '.1f')} |"
        )
    return "\n".join(lines) + "\n"


def bar_chart(rows: Sequence[CompareRow], path: str | Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ok = [r for r in rows if r.status == "ok" and r.latency_ms is not None]
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(ok) + 1.6))
    names = [r.system for r in ok]
    colors = ["tab:orange" if r.rules == "learned" else "tab:blue" if r.rules else "tab:gray" for r in ok]
    ax.barh(names, [r.latency_ms for r in ok], xerr=[r.spread_ms or 0 for r in ok], color=colors)
    ax.invert_yaxis()
    ax.set_xscale("log")
    # Labels at 1, 2 and 5 x 10^k in plain numbers: matplotlib's labelled minor ticks ran into
    # each other.
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("median latency, ms (log scale; error bar = IQR; shorter is faster)")
    ax.set_title(title or "Latency by system")
    kinds = [("TVM, a rule set's plan", "tab:blue"), ("TVM, the learned policy's plan", "tab:orange"),
             ("another runtime", "tab:gray")]
    ax.legend(handles=[Patch(color=c, label=k) for k, c in kinds if c in colors], fontsize=8, loc="lower right")
    fig.tight_layout()
    path = Path(path)
    try:
        write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"), what="chart")
    finally:
        plt.close(fig)
    return path


def machine_description(threads: int) -> str:
    import os

    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as cpuinfo:  # closed on break too (a ResourceWarning otherwise)
            for line in cpuinfo:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores visible, {threads} threads, {platform.platform()}"


def write_report(rows: Sequence[CompareRow], out_dir: str | Path, name: str, header: str) -> tuple[Path, Path]:
    out = output_dir(out_dir, "--out folder")
    md = out / f"{name}.md"
    write_atomic(md, header + "\n" + to_markdown(rows, name), what="report")
    write_atomic(out / f"{name}.json", dumps_json([asdict(r) for r in rows], indent=1), what="report")
    png = bar_chart(rows, out / f"{name}.png", name)
    return md, png


#: Keys of an experiment config (experiments/compile_libraries, experiments/fusion_effects).
EXPERIMENT_KEYS = frozenset(
    {"models", "schedules", "tuned_models", "tuned_rules", "trials_per_task", "target",
     "repeat", "min_repeat_ms", "timeout_s", "confirm_rounds", "policy"}
)


def load_experiment(path: str | Path) -> tuple[dict[str, Any], Any, TimingProtocol, list[tuple[str, dict[str, Any]]]]:
    """An experiment config: (the mapping, its TargetSpec, TimingProtocol, [(schedule, kwargs)]).

    Unknown keys are a :class:`~fusion_rl.errors.ConfigError` naming them.
    """
    from fusion_rl.errors import ConfigError
    from fusion_rl.io import read_yaml

    path = Path(path)
    cfg = read_yaml(path, "experiment config")
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: expected a mapping of {sorted(EXPERIMENT_KEYS)}")
    unknown = set(cfg) - EXPERIMENT_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)}; allowed {sorted(EXPERIMENT_KEYS)}")
    rounds = cfg.get("confirm_rounds", 0)
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0 or rounds == 1:
        raise ConfigError(f"{path}: confirm_rounds must be 0 (off) or an int >= 2, got {rounds!r}")
    spec = parse_target(cfg["target"])
    protocol = TimingProtocol(repeat=cfg["repeat"], min_repeat_ms=cfg["min_repeat_ms"])
    schedules = [(s, {"trials_per_task": cfg["trials_per_task"]} if s == "tuned" else {})
                 for s in cfg["schedules"]]
    return cfg, spec, protocol, schedules
