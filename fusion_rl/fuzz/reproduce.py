"""Reproducer folders: everything needed to rebuild one failing plan, and the command that does it.

See docs/reproducers.md for the folder layout.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from fusion_rl.fusion.plan import FusionPlan
from fusion_rl.fuzz.force import child_env, force_fuse
from fusion_rl.io import dumps_json, output_dir, write_atomic


def save_reproducer(
    root: str | os.PathLike,
    model: Any,
    plan: FusionPlan,
    provider: str,
    status: str,
    error: str | None,
    source: str = "",
    forced: bool = False,
    actual_timeout_s: float = 300.0,
) -> Path:
    """Write ``<root>/<model>-<planhash>-<provider>/`` and return it (see docs/reproducers.md).

    The actual outputs are computed by running the reproducer itself in a child process
    (``python -m fusion_rl.fuzz reproduce DIR``), so a crashing plan cannot take the fuzzer down;
    if it crashes, ``meta.json`` says so and there is no ``actual.npz``.
    """
    from fusion_rl.compiler.verify import reference_outputs
    from fusion_rl.graph.importer import input_specs

    folder = output_dir(Path(root) / f"{model.name}-{plan.hash}-{provider}", "reproducer folder")
    if model.onnx_model is not None:
        write_atomic(folder / "model.onnx", model.onnx_model.SerializeToString(), what="reproducer")
    plan.save(folder / "plan.json", what="reproducer")
    names = [s[0] for s in input_specs(model.mod)]
    _write_npz(folder / "inputs.npz", **{n: a for n, a in zip(names, model.inputs)})
    expected, reference = reference_outputs(model)
    _write_npz(folder / "expected.npz", *expected)
    meta = {
        "model": model.name, "model_ref": {"kind": model.ref.kind, "spec": model.ref.spec, "seed": model.ref.seed},
        "fingerprint": model.fingerprint, "plan_hash": plan.hash, "provider": provider,
        "status": status, "error": error, "source": source, "reference": reference,
        "forced": forced, "created": time.time(),
    }
    write_atomic(folder / "meta.json", dumps_json(meta, indent=1) + "\n", what="reproducer")
    cmd = '"${PYTHON:-python}" -m fusion_rl.fuzz reproduce "$(dirname "$0")"'
    write_atomic(folder / "repro.sh", (
        "#!/bin/sh\n# Recompiles the plan and compares with expected.npz; exit 1 if the mismatch "
        "reproduces.\n# Run from the repository root; PYTHON defaults to `python` (set it to the "
        "venv's, e.g. PYTHON=.venv/bin/python).\n" + cmd + (" --force" if forced else "") + "\n"
    ), what="reproducer")
    (folder / "repro.sh").chmod(0o755)
    write_atomic(folder / "README.md", 
        f"# {model.name} / plan {plan.hash} / schedule {provider}\n\n"
        f"Status: **{status}** ({source}). Error: {error}\n\n"
        f"Reproduce from the repository root: `PYTHON=.venv/bin/python sh {folder}/repro.sh` "
        f"(or `python -m fusion_rl.fuzz reproduce {folder}{' --force' if forced else ''}`).\n",
        what="reproducer")
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "fusion_rl.fuzz", "reproduce", str(folder), "--write-actual"]
            + (["--force"] if forced else []),
            capture_output=True, text=True, timeout=actual_timeout_s,
            env=child_env(),
        )
        meta["reproduce_exit"] = proc.returncode
        meta["reproduce_verdict"] = (proc.stdout.strip().splitlines() or [""])[-1]
    except subprocess.TimeoutExpired:
        meta["reproduce_exit"] = None
        meta["reproduce_verdict"] = f"timed out after {actual_timeout_s:.0f} s"
    write_atomic(folder / "meta.json", dumps_json(meta, indent=1) + "\n", what="reproducer")
    return folder


def _write_npz(path: Path, *arrays: np.ndarray, **named: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, *arrays, **named)
    write_atomic(path, buffer.getvalue(), what="reproducer")


def reproduce(folder: str | os.PathLike, write_actual: bool = False, force: bool = False) -> tuple[bool, str]:
    """Rebuild a reproducer's plan and compare with its ``expected.npz``.

    Returns ``(reproduced, verdict)``: ``reproduced`` is True if the plan still fails (wrong
    output, or an error while compiling). ``force`` skips the legality check (for plans found
    by the legality fuzzer).
    """
    from fusion_rl.compiler.verify import compare_outputs, run_executable
    from fusion_rl.compiler.target import parse_target
    from fusion_rl.graph.model import load_model

    folder = Path(folder)
    meta = json.loads((folder / "meta.json").read_text())
    model = load_model(folder / "model.onnx")
    with np.load(folder / "inputs.npz") as data:
        model.inputs = [np.ascontiguousarray(data[k]) for k in data.files]
    with np.load(folder / "expected.npz") as data:
        expected = [data[k] for k in sorted(data.files, key=lambda s: int(s.split("_")[1]))]
    plan = FusionPlan.load(folder / "plan.json")
    try:
        ex = _compile(model, plan, meta["provider"], parse_target("host").to_tvm(), force=force)
        actual = run_executable(ex, model.inputs)
    except Exception as exc:  # noqa: BLE001 - any failure here is the reproduced finding
        return True, f"REPRODUCED: compile/run failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    if write_actual:
        _write_npz(folder / "actual.npz", *actual)
    report = compare_outputs(actual, expected, meta.get("reference", ""))
    if report.ok:
        return False, f"NOT reproduced: outputs match (max abs err {report.max_abs_err:.3g})"
    return True, f"REPRODUCED: wrong output, max abs err {report.max_abs_err:.3g} (max rel {report.max_rel_err:.3g})"


def _compile(model: Any, plan: FusionPlan, provider: str, target: Any, force: bool) -> Any:
    from fusion_rl.compiler.build import compile_module, compile_plan
    from fusion_rl.compiler.schedules import make_schedule

    if not force:
        return compile_plan(model, plan, target, make_schedule(provider)).executable
    fused = force_fuse(model, plan)[0]
    return compile_module(fused, target, make_schedule(provider))[0]
