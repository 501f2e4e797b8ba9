"""Tests of the ``tuned`` schedule provider (MetaSchedule, in-process, on-disk database).

Tiny budgets and a tiny conv net keep the file quick; the tuning tests are marked ``slow``.
"""

from __future__ import annotations

import os

os.environ.setdefault("TVM_NUM_THREADS", "2")  # same thread count for tuning and timing

from pathlib import Path

import numpy as np
import pytest
import tvm
from tvm import relax

from fusion_rl.compiler.schedules.metaschedule import count_anchors
from fusion_rl.compiler.schedules.tuned import TunedSchedule
from fusion_rl.compiler.target import parse_target
from fusion_rl.errors import ConfigError, StoreError

# The detected host: a fixed AVX-512 target dies with SIGILL on a CPU without it.
TARGET = parse_target("host").to_tvm()
TRIALS = 4


def _legalized() -> tvm.IRModule:
    """conv-bias-relu-conv-relu on 1x3x16x16, legalized and pattern-annotated, not fused."""
    rng = np.random.default_rng(0)
    w1 = relax.const(rng.uniform(-0.5, 0.5, (8, 3, 3, 3)).astype("float32"))
    b1 = relax.const(rng.uniform(-0.5, 0.5, (1, 8, 1, 1)).astype("float32"))
    w2 = relax.const(rng.uniform(-0.5, 0.5, (8, 8, 3, 3)).astype("float32"))
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 3, 16, 16), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.relu(relax.op.add(relax.op.nn.conv2d(x, w1, padding=1), b1)))
            z = bb.emit_output(relax.op.nn.relu(relax.op.nn.conv2d(y, w2, padding=1)))
        bb.emit_func_output(z)
    seq = [relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
           relax.transform.FoldConstant()]
    return tvm.transform.Sequential(seq)(bb.get())


def _fuse(mod: tvm.IRModule) -> tvm.IRModule:
    seq = [relax.transform.FuseOps(), relax.transform.FuseTIR(),
           relax.transform.DeadCodeElimination()]
    return tvm.transform.Sequential(seq)(mod)


def _two_conv_group(mod: tvm.IRModule) -> tvm.IRModule:
    """One kernel holding both convs: mark them elementwise so FuseOps chains them."""
    out = mod.clone()
    for gv, func in mod.functions.items():
        if isinstance(func, tvm.tirx.PrimFunc) and gv.name_hint.startswith("conv2d"):
            out[gv] = func.with_attr("op_pattern", 0)
    return _fuse(out)


def _run(mod: tvm.IRModule, x: np.ndarray) -> np.ndarray:
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    lower_only = tvm.transform.Sequential(cpu.dataflow_lower_passes(TARGET)
                                          + cpu.finalize_passes(TARGET))
    vm = relax.VirtualMachine(tvm.compile(mod, target=TARGET, relax_pipeline=lower_only), tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy()


def _kernels(mod: tvm.IRModule) -> dict[str, tvm.tirx.PrimFunc]:
    return {gv.name_hint: f for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}


def _scheduled(mod: tvm.IRModule) -> int:
    return sum(bool(f.attrs.get("tirx.is_scheduled", False)) for f in _kernels(mod).values())


def _record_count(root: Path) -> int:
    return sum(len(p.read_text().splitlines()) for p in root.rglob("records.json"))


@pytest.fixture(scope="module")
def models() -> dict[str, tvm.IRModule]:
    legal = _legalized()
    return {"unfused": legal, "fused": _fuse(legal), "twoconv": _two_conv_group(legal)}


@pytest.fixture(scope="module")
def x() -> np.ndarray:
    return np.random.default_rng(1).standard_normal((1, 3, 16, 16)).astype("float32")


@pytest.fixture(scope="module")
def db_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tuning")


# ----------------------------------------------------------------------------- fast


@pytest.mark.parametrize("bad", [0, -3])
def test_budget_must_be_positive(bad: int, tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        TunedSchedule(trials_per_task=bad, database_dir=tmp_path)


def test_unwritable_database_dir_rejected(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    # A path below a regular file: unwritable even for root, unlike chmod.
    with pytest.raises(StoreError):
        TunedSchedule(trials_per_task=4, database_dir=blocker / "db")


def test_budget_and_name(tmp_path: Path) -> None:
    provider = TunedSchedule(trials_per_task=7, database_dir=tmp_path)
    assert provider.budget == 7 and provider.name == "tuned"
    # The store keys on everything that changes the schedules: task granularity and seed.
    assert provider.key == "tuned:structural:rules"
    assert TunedSchedule(7, tmp_path, module_equality="anchor-block").key == "tuned:anchor-block:rules"
    assert TunedSchedule(7, tmp_path, seed=3, fallback="naive").key == "tuned:structural:naive:s3"
    with pytest.raises(ConfigError, match="fallback"):
        TunedSchedule(7, tmp_path, fallback="dlight")


def test_count_anchors(models: dict[str, tvm.IRModule]) -> None:
    unfused = _kernels(models["unfused"])
    assert sorted(count_anchors(f) for f in unfused.values()) == [0] * (len(unfused) - 2) + [1, 1]
    assert sorted(count_anchors(f) for f in _kernels(models["fused"]).values()) == [1, 1]
    assert [count_anchors(f) for f in _kernels(models["twoconv"]).values()] == [2]


# ----------------------------------------------------------------------------- tuning


@pytest.mark.slow
@pytest.mark.parametrize("equality", ["structural", "anchor-block"])
def test_tuned_output_matches_naive_and_database_is_reused(
        models: dict[str, tvm.IRModule], x: np.ndarray, db_dir: Path, equality: str) -> None:
    reference = _run(models["unfused"], x)
    first = TunedSchedule(trials_per_task=TRIALS, database_dir=db_dir, module_equality=equality)
    fused = models["fused"]
    before = fused.script()
    scheduled = first.schedule(fused, TARGET)
    assert fused.script() == before, "schedule() must not modify its input"
    assert _scheduled(scheduled) == len(_kernels(fused))
    assert first.trials_run > 0
    np.testing.assert_allclose(_run(scheduled, x), reference, rtol=1e-4, atol=1e-4)

    records = _record_count(db_dir)
    second = TunedSchedule(trials_per_task=TRIALS, database_dir=db_dir,
                           module_equality=equality)  # a later run
    again = second.schedule(fused, TARGET)
    assert second.trials_run == 0 and _record_count(db_dir) == records
    assert _scheduled(again) == len(_kernels(fused))


@pytest.mark.slow
def test_multi_anchor_kernel_is_safe(models: dict[str, tvm.IRModule], x: np.ndarray,
                                     db_dir: Path) -> None:
    reference = _run(models["unfused"], x)
    scheduled = TunedSchedule(trials_per_task=TRIALS, database_dir=db_dir).schedule(
        models["twoconv"], TARGET)
    # Tuned and verified, or given the fallback schedule: either way the values must be right.
    np.testing.assert_allclose(_run(scheduled, x), reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fallback", ["rules", "naive"])
def test_kernels_that_cannot_be_tuned_get_the_fallback(models: dict[str, tvm.IRModule], x: np.ndarray,
                                                       tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       fallback: str) -> None:
    """Tuning that fails for every kernel (as MetaSchedule's design space generator does on a
    matmul+softmax kernel) leaves rules-scheduled kernels, or naive ones, never wrong ones."""
    monkeypatch.setattr(TunedSchedule, "_tune_if_missing", lambda self, *a, **k: False)
    fused = models["fused"]
    scheduled = TunedSchedule(trials_per_task=TRIALS, database_dir=tmp_path, fallback=fallback).schedule(
        fused, TARGET)
    assert _scheduled(scheduled) == (len(_kernels(fused)) if fallback == "rules" else 0)
    np.testing.assert_allclose(_run(scheduled, x), _run(models["unfused"], x), rtol=1e-4, atol=1e-4)


def test_database_folder_is_locked_while_tuning(tmp_path):
    """A second process cannot tune into a folder another one holds (it would corrupt it)."""
    import fcntl
    import threading

    from fusion_rl.compiler.schedules.tuned import exclusive

    folder = tmp_path / "db"
    entered = threading.Event()
    with exclusive(folder):
        with open(folder / ".lock", "a") as other:
            with pytest.raises(BlockingIOError):
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with open(folder / ".lock", "a") as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free again after the block
        entered.set()
    assert entered.is_set()


_GATHER_SCRIPT = """
import sys
import tvm
from tvm import relax, topi
from fusion_rl.compiler.schedules.tuned import TunedSchedule

bb = relax.BlockBuilder()
table = relax.Var("table", relax.TensorType((1000, 64), "float32"))
idx = relax.Var("idx", relax.TensorType((256,), "int64"))
with bb.function("main", [table, idx]):
    with bb.dataflow():
        out = bb.emit_output(bb.emit_te(topi.take, table, idx, axis=0))
    bb.emit_func_output(out)
from fusion_rl.compiler.target import parse_target
target = parse_target("host").to_tvm()
provider = TunedSchedule(trials_per_task=4, database_dir=sys.argv[1])
provider.schedule(bb.get(), target)
print("trials", provider.trials_run)
"""


@pytest.mark.slow
def test_tuning_a_gather_does_not_read_out_of_bounds(tmp_path: Path) -> None:
    """MetaSchedule random-fills index buffers; an embedding lookup then segfaulted (gpt_tiny).

    Run in a subprocess: the failure this guards against kills the process.
    """
    import subprocess
    import sys

    env = dict(os.environ, TVM_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, "-c", _GATHER_SCRIPT, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "trials" in proc.stdout and not proc.stdout.strip().endswith("trials 0")
