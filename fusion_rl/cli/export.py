"""``fusion-rl export | compile | run``: ship a policy, compile a model with it, run the result."""

from __future__ import annotations

import argparse
import io
import json
import shlex
import sys
from pathlib import Path

import numpy as np

from fusion_rl.compiler.schedules import DEFAULT_SCHEDULE
from fusion_rl.cli.common import add_json, add_model_args, add_output, load, nonnegative, plan_for, positive
from fusion_rl.cli.progress import add_no_progress, bar
from fusion_rl.errors import ConfigError, ModelImportError
from fusion_rl.io import check_output, dumps_json, read_json, write_atomic

#: Element types a library's inputs may have (what the zoo and ONNX importer produce).
_INPUT_DTYPES = ("float16", "float32", "float64", "int8", "int32", "int64", "uint8", "bool")


def cmd_export(args: argparse.Namespace) -> int:
    from fusion_rl.errors import require_extra
    from fusion_rl.export.exporter import export_run

    # A run directory holds SB3 zips; a shipped policy folder itself needs neither.
    require_extra("fusion-rl export", "train", "stable_baselines3", "sb3_contrib")

    evaluation = {}
    if args.evaluation:
        evaluation = read_json(args.evaluation, "--evaluation file", ConfigError, 1 << 20)
        if not isinstance(evaluation, dict):
            raise ConfigError(f"--evaluation {args.evaluation}: expected a JSON object of results")
    command = "fusion-rl " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    out = export_run(args.run_dir, args.output, evaluation, command, args.train_command or "")
    card = json.loads((out / "card.json").read_text())
    if not args.json:
        print(f"exported {args.run_dir} -> {out} (content hash {card['content_hash'][:16]})")
    from fusion_rl.policy.tracking import log_policy_artifact

    artifact = log_policy_artifact(args.run_dir, out, args.wandb)
    if args.json:
        print(dumps_json({"run_dir": str(args.run_dir), "output": str(out),
                          "content_hash": card["content_hash"],
                          "artifact": None if artifact is None else str(artifact)}))
    elif artifact is not None:
        print(f"logged {out} to the run's W&B run as artifact {artifact}")
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    from fusion_rl.compiler.build import compile_plan
    from fusion_rl.compiler.schedules import make_schedule
    from fusion_rl.compiler.target import parse_target, require_runnable
    from fusion_rl.compiler.verify import verify_executable
    from fusion_rl.fusion.metrics import plan_metrics
    from fusion_rl.graph.importer import input_specs

    out = Path(args.output)
    check_output(out, "-o")  # before the compile, not after it
    check_output(f"{out}.json", "-o sidecar")
    model = load(args)
    spec = parse_target(args.target)
    require_runnable(spec)  # the library is verified by running it here
    plan = plan_for(args, model)
    kwargs = {"trials_per_task": args.trials} if args.schedule == "tuned" and args.trials else {}
    provider = make_schedule(args.schedule, **kwargs)
    with bar(args, "tuning", unit="task") as tuning:
        if hasattr(provider, "progress"):  # tuned: minutes per task
            provider.progress = tuning
        compiled = compile_plan(model, plan, spec.to_tvm(), provider)
    report = verify_executable(compiled.executable, model, plan.name or "plan")
    # The temp path keeps the .so extension, which export_library reads to pick the format.
    write_atomic(out, lambda tmp: compiled.executable.export_library(str(tmp)), what="-o")
    sidecar = {
        "model": model.name,
        "fingerprint": model.fingerprint,
        "target": spec.key,
        "schedule": args.schedule,
        "plan": plan.to_dict(),
        "inputs": [{"name": n, "shape": list(s), "dtype": d} for n, s, d in input_specs(model.mod)],
    }
    write_atomic(f"{out}.json", json.dumps(sidecar, indent=1), what="-o sidecar")
    m = plan_metrics(model.graph, plan)
    if args.json:
        print(dumps_json({
            "model": model.name, "fingerprint": model.fingerprint, "target": spec.key,
            "schedule": args.schedule, "plan_hash": plan.hash, "ops": len(model.graph),
            "num_kernels": compiled.num_kernels, "fused_groups": m.fused_groups,
            "intermediate_bytes": m.intermediate_bytes, "verified_against": report.reference,
            "max_abs_err": report.max_abs_err, "library": str(out), "sidecar": f"{out}.json",
        }))
        return 0
    print(
        f"{model.name}: {len(model.graph)} ops -> {compiled.num_kernels} kernels "
        f"({m.fused_groups} fused groups, {m.intermediate_bytes / 1024:.1f} KiB intermediates) "
        f"for {spec.key} with the {args.schedule} schedule; verified against {report.reference} "
        f"(max abs err {report.max_abs_err:.2g}).\nwrote {out} and {out}.json"
    )
    return 0


def _sidecar_inputs(path: Path) -> list[dict] | None:
    """The input specs in a library's ``.so.json``, checked: names, positive integer shapes,
    known dtypes, and a total size that fits in memory (random inputs are allocated from it)."""
    import math

    import psutil

    if not path.is_file():
        return None
    data = read_json(path, "library sidecar", ConfigError, 1 << 20)
    inputs = data.get("inputs") if isinstance(data, dict) else None
    if not isinstance(inputs, list) or not 1 <= len(inputs) <= 1024:
        raise ConfigError(f"{path}: 'inputs' must be a list of input specs (made by `fusion-rl compile`)")
    need = 0
    for i, spec in enumerate(inputs):
        shape = spec.get("shape") if isinstance(spec, dict) else None
        dtype = spec.get("dtype") if isinstance(spec, dict) else None
        if not isinstance(shape, list) or len(shape) > 16 or not all(
                isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape):
            raise ConfigError(f"{path}: input {i} needs a shape of at most 16 positive integers")
        if dtype not in _INPUT_DTYPES:
            raise ConfigError(f"{path}: input {i} has dtype {str(dtype)[:40]!r}, not one of {', '.join(_INPUT_DTYPES)}")
        need += math.prod(shape) * np.dtype(dtype).itemsize
    free = psutil.virtual_memory().available
    if need > free // 2:
        raise ConfigError(f"{path}: its inputs need {need / 2**30:.1f} GiB, more than half the "
                          f"{free / 2**30:.1f} GiB of free memory")
    return inputs


def _load_input(path: str, want: dict | None) -> np.ndarray:
    """A ``.npy`` array (never a pickle), mapped first so a header claiming a huge shape is
    compared with the library's before anything is read into memory."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise ConfigError(f"--input {path} is not a .npy array: {str(exc).splitlines()[0][:200]}") from None
    if not isinstance(array, np.ndarray):
        raise ConfigError(f"--input {path} is not a single .npy array")
    if want is not None and (list(array.shape) != want["shape"] or str(array.dtype) != want["dtype"]):
        raise ConfigError(f"--input {path} is {str(array.dtype)}{list(array.shape)}, the library takes "
                          f"{want['dtype']}{want['shape']}")
    return np.ascontiguousarray(array)


def cmd_run(args: argparse.Namespace) -> int:
    import tvm
    from tvm import relax

    lib_path = Path(args.library)
    if not lib_path.is_file():
        raise ModelImportError(f"library not found: {lib_path}")
    sidecar_path = Path(f"{lib_path}.json")
    specs = _sidecar_inputs(sidecar_path)
    if args.input:
        if specs is not None and len(args.input) != len(specs):
            raise ConfigError(f"give {len(specs)} --input files, one per input of the library; got {len(args.input)}")
        arrays = [_load_input(p, specs[i] if specs else None) for i, p in enumerate(args.input)]
    elif specs is not None:
        rng = np.random.default_rng(args.seed)
        arrays = [rng.standard_normal(s["shape"]).astype(s["dtype"]) if "float" in s["dtype"]
                  else rng.integers(0, 8, s["shape"]).astype(s["dtype"]) for s in specs]
    else:
        raise ConfigError(f"give --input files: {sidecar_path} (input shapes) is missing")
    if args.output:
        check_output(_npy_name(args.output), "--output")
    try:
        lib = tvm.runtime.load_module(str(lib_path))
    except Exception as exc:
        raise ModelImportError(f"{lib_path} is not a compiled fusion_rl/TVM library: {str(exc).splitlines()[0][:200]}") from None
    vm = relax.VirtualMachine(lib, tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(a) for a in arrays])
    outs = [out.numpy()] if hasattr(out, "numpy") else [o.numpy() for o in out]
    if args.output:
        buffer = io.BytesIO()
        np.save(buffer, outs[0], allow_pickle=False)
        write_atomic(_npy_name(args.output), buffer.getvalue(), what="--output")
    summary = [{"shape": list(o.shape), "dtype": str(o.dtype), "mean": float(o.mean()),
                "max": float(o.max())} for o in outs]
    if args.json:
        print(dumps_json({"library": str(lib_path), "outputs": summary,
                          "saved": str(_npy_name(args.output)) if args.output else None}))
        return 0
    for i, o in enumerate(summary):
        print(f"output {i}: shape {tuple(o['shape'])} dtype {o['dtype']} mean {o['mean']:.6g} "
              f"max {o['max']:.6g}")
    return 0


def _npy_name(path: Path) -> Path:
    """``np.save``'s naming: ``.npy`` is appended unless the name has it."""
    return path if str(path).endswith(".npy") else Path(f"{path}.npy")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a training run as a policy folder")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a training run directory (runs/...)")
    add_output(p, "policy folder to write, e.g. policies/NAME", required=True, metavar="DIR")
    p.add_argument("--evaluation", type=Path, help="a JSON file of evaluation results for the card")
    p.add_argument("--train-command", help="the command that trained the run, for the card")
    p.add_argument("--wandb", choices=("offline", "online", "disabled"), default=None,
                   help="log the policy as a W&B artifact of the run (default: the run's own mode)")
    add_json(p, "the exported folder, its content hash and artifact")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("compile", help="compile a model with a fusion policy (or rules) to a .so")
    add_model_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--policy", type=Path, metavar="DIR", help="an exported policy folder")
    src.add_argument("--rules", metavar="R", help="a rule set instead of a policy")
    src.add_argument("--plan", type=Path, metavar="P.json", help="a plan JSON file instead of a policy")
    p.add_argument("--target", default="host",
                   help="target: host, {x86-64,haswell,sapphirerapids}-t{1,2} or llvm:MCPU:tN (default host)")
    p.add_argument("--schedule", default=DEFAULT_SCHEDULE,
                   help=f"naive, rules or tuned (default {DEFAULT_SCHEDULE})")
    p.add_argument("--trials", type=positive(), default=None, help="trials per task for tuned")
    add_output(p, "output library, e.g. model.so (and its sidecar model.so.json)", required=True,
               metavar="LIB.so")
    add_json(p, "what was compiled and verified")
    add_no_progress(p)
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("run", help="run a library made by `fusion-rl compile`")
    p.add_argument("library", type=Path, metavar="LIBRARY",
                   help="a .so made by `fusion-rl compile` (its .so.json sidecar names the inputs)")
    p.add_argument("--input", action="append", help=".npy file per input, in order (default: random)")
    p.add_argument("--seed", type=nonnegative(), default=0, help="seed of random inputs (default 0)")
    add_output(p, "save the first output as .npy")
    add_json(p, "the outputs' shapes, dtypes and summary values")
    p.set_defaults(func=cmd_run)
