"""``fusion-rl export | compile | run``: ship a policy, compile a model with it, run the result."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np

from fusion_rl.cli.common import add_model_args, load, plan_for
from fusion_rl.errors import ConfigError, ModelImportError


def cmd_export(args: argparse.Namespace) -> int:
    from fusion_rl.errors import require_extra
    from fusion_rl.export.exporter import export_run

    # A run directory holds SB3 zips; a shipped policy folder itself needs neither.
    require_extra("fusion-rl export", "train", "stable_baselines3", "sb3_contrib")

    evaluation = {}
    if args.evaluation:
        try:
            evaluation = json.loads(Path(args.evaluation).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"--evaluation {args.evaluation}: {exc}") from None
    command = "fusion-rl " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    out = export_run(args.run_dir, args.output, evaluation, command, args.train_command or "")
    card = json.loads((out / "card.json").read_text())
    print(f"exported {args.run_dir} -> {out} (content hash {card['content_hash'][:16]})")
    from fusion_rl.policy.training import log_policy_artifact

    artifact = log_policy_artifact(args.run_dir, out, args.wandb)
    if artifact is not None:
        print(f"logged {out} to the run's W&B run as artifact {artifact}")
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    from fusion_rl.compiler.build import compile_plan
    from fusion_rl.compiler.schedules import make_schedule
    from fusion_rl.compiler.target import parse_target
    from fusion_rl.compiler.verify import verify_executable
    from fusion_rl.fusion.metrics import plan_metrics
    from fusion_rl.graph.importer import input_specs

    model = load(args)
    spec = parse_target(args.target)
    plan = plan_for(args, model)
    kwargs = {"trials_per_task": args.trials} if args.schedule == "tuned" and args.trials else {}
    compiled = compile_plan(model, plan, spec.to_tvm(), make_schedule(args.schedule, **kwargs))
    report = verify_executable(compiled.executable, model, plan.name or "plan")
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    compiled.executable.export_library(str(out))
    sidecar = {
        "model": model.name,
        "fingerprint": model.fingerprint,
        "target": spec.key,
        "schedule": args.schedule,
        "plan": plan.to_dict(),
        "inputs": [{"name": n, "shape": list(s), "dtype": d} for n, s, d in input_specs(model.mod)],
    }
    Path(f"{out}.json").write_text(json.dumps(sidecar, indent=1))
    m = plan_metrics(model.graph, plan)
    print(
        f"{model.name}: {len(model.graph)} ops -> {compiled.num_kernels} kernels "
        f"({m.fused_groups} fused groups, {m.intermediate_bytes / 1024:.1f} KiB intermediates) "
        f"for {spec.key} with the {args.schedule} schedule; verified against {report.reference} "
        f"(max abs err {report.max_abs_err:.2g}).\nwrote {out} and {out}.json"
    )
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    import tvm
    from tvm import relax

    lib_path = Path(args.library)
    if not lib_path.is_file():
        raise ModelImportError(f"library not found: {lib_path}")
    sidecar_path = Path(f"{lib_path}.json")
    specs = json.loads(sidecar_path.read_text())["inputs"] if sidecar_path.is_file() else None
    if args.input:
        arrays = []
        for path in args.input:
            try:
                arrays.append(np.load(path))
            except (OSError, ValueError) as exc:
                raise ConfigError(f"--input {path} is not a .npy array: {exc}") from None
    elif specs is not None:
        rng = np.random.default_rng(args.seed)
        arrays = [rng.standard_normal(s["shape"]).astype(s["dtype"]) if "float" in s["dtype"]
                  else rng.integers(0, 8, s["shape"]).astype(s["dtype"]) for s in specs]
    else:
        raise ConfigError(f"give --input files: {sidecar_path} (input shapes) is missing")
    if specs is not None:
        want = [tuple(s["shape"]) for s in specs]
        if [a.shape for a in arrays] != want:
            raise ConfigError(f"inputs have shapes {[a.shape for a in arrays]}, the model takes {want}")
    try:
        lib = tvm.runtime.load_module(str(lib_path))
    except Exception as exc:
        raise ModelImportError(f"{lib_path} is not a compiled fusion_rl/TVM library: {str(exc).splitlines()[0][:200]}") from None
    vm = relax.VirtualMachine(lib, tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(a) for a in arrays])
    outs = [out.numpy()] if hasattr(out, "numpy") else [o.numpy() for o in out]
    if args.output:
        np.save(args.output, outs[0])
    for i, o in enumerate(outs):
        print(f"output {i}: shape {o.shape} dtype {o.dtype} mean {float(o.mean()):.6g} "
              f"max {float(o.max()):.6g}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a training run as a policy folder")
    p.add_argument("run_dir", type=Path)
    p.add_argument("-o", "--output", type=Path, required=True, help="policy folder, e.g. policies/NAME")
    p.add_argument("--evaluation", type=Path, help="a JSON file of evaluation results for the card")
    p.add_argument("--train-command", help="the command that trained the run, for the card")
    p.add_argument("--wandb", choices=("offline", "online", "disabled"), default=None,
                   help="log the policy as a W&B artifact of the run (default: the run's own mode)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("compile", help="compile a model with a fusion policy (or rules) to a .so")
    add_model_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--policy", type=Path, help="an exported policy folder")
    src.add_argument("--rules", help="a rule set instead of a policy")
    src.add_argument("--plan", type=Path, help="a plan JSON file instead of a policy")
    p.add_argument("--target", default="host")
    p.add_argument("--schedule", default="rules", help="naive, rules or tuned (default rules)")
    p.add_argument("--trials", type=int, default=None, help="trials per task for tuned")
    p.add_argument("-o", "--output", type=Path, required=True, help="output library, e.g. model.so")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("run", help="run a library made by `fusion-rl compile`")
    p.add_argument("library", type=Path)
    p.add_argument("--input", action="append", help=".npy file per input, in order (default: random)")
    p.add_argument("--seed", type=int, default=0, help="seed of random inputs")
    p.add_argument("--output", type=Path, help="save the first output as .npy")
    p.set_defaults(func=cmd_run)
