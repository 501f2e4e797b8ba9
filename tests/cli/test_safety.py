"""Issue 12: a file from elsewhere never runs code, every input is bounded, no output clobbers.

One test per case of the issue's hostile-input sweep, numbered as there. Each builds its crafted
input here, asserts that no marker file appeared where code execution was the risk, and that the
answer is one ``error:`` line with exit status 2 (a measurement failure served from the store is
exit 1, as every measurement failure is). Commands run in-process where the outcome does not depend
on the interpreter (``fusion_rl.cli.main``), in a child where it does: the working folder on the
import path, the real stdout encoding, an address-space limit, the environment.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import sqlite3
import zipfile
from pathlib import Path

import onnx
import pytest
import torch
from onnx import TensorProto, helper

from fusion_rl.compiler.schedules import DEFAULT_SCHEDULE
from fusion_rl.errors import ConfigError

from conftest import REPO_ROOT, child_error, cli_child, one_line_error, run_cli

FEATURES = {"hidden": 8, "heads": 2, "num_layers": 1, "hw_hidden": 4}


# ---- helpers ---------------------------------------------------------------------------------


class _Marker:
    """Unpickling this creates ``path`` (``open(path, "w")``): proof that a pickle ran."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _card(folder: Path) -> dict:
    return json.loads((folder / "card.json").read_text())


def _write_card(folder: Path, card: dict) -> None:
    """Rewrite the card with a recomputed content hash: anyone can (it is no signature)."""
    from fusion_rl.export.artifact import content_hash

    card["content_hash"] = content_hash(card, (folder / "weights.safetensors").read_bytes())
    (folder / "card.json").write_text(json.dumps(card))


@pytest.fixture
def policy(tmp_path) -> Path:
    """A valid tiny policy folder, made as `fusion-rl export` makes one."""
    from fusion_rl.env.spaces import EDGE_DIM, NODE_DIM
    from fusion_rl.export.artifact import PolicyCard, save_artifact
    from fusion_rl.graph.features import feature_schema
    from fusion_rl.policy.network import PolicyNetwork

    torch.manual_seed(0)
    net = PolicyNetwork(dict(node_dim=NODE_DIM, edge_dim=EDGE_DIM, hw_dim=10, **FEATURES), [8])
    card = PolicyCard(architecture={"class": "fusion_rl.policy.network.PolicyNetwork", "kwargs": net.config},
                      feature_schema=feature_schema(), observation={"max_nodes": 64, "max_edges": 128, "hw_dim": 10},
                      decisions={"max_mac_anchors": 1})
    return save_artifact(tmp_path / "policy", net, card)


def _sb3_zip(path: Path, marker: Path) -> None:
    """An SB3 model zip whose ``data`` entry holds a pickle that creates ``marker``."""
    payload = base64.b64encode(pickle.dumps(_Marker(marker))).decode()
    data = {"policy_class": {":type:": "<class 'type'>", ":serialized:": payload}}
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("data", json.dumps(data))
        z.writestr("_stable_baselines3_version", "2.0.0")


def _run_folder(tmp_path: Path, marker: Path) -> Path:
    """A run folder of the old layout: config.json and a crafted final_model.zip only."""
    from fusion_rl.policy.training import TrainConfig

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    config = TrainConfig(env_spec=str(REPO_ROOT / "envs" / "tiny.yaml"), wandb="disabled").to_dict()
    (run / "config.json").write_text(json.dumps(config))
    _sb3_zip(run / "final_model.zip", marker)
    _sb3_zip(run / "checkpoints" / "step_64.zip", marker)
    return run


def _onnx(path: Path, domain: str = "", opset: int = 17) -> Path:
    node = helper.make_node("Relu", ["x"], ["y"], domain=domain)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])])
    imports = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    onnx.save(helper.make_model(graph, opset_imports=imports), path)
    return path


def _plan_file(tmp_path: Path, **fields) -> Path:
    plan = {"format": 1, "name": "p", "fingerprint": "", "num_nodes": 1, "groups": [[0]], **fields}
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    return path


# ---- 1. a crafted policy folder runs nothing ------------------------------------------------


def test_1_card_cannot_import_a_module_from_the_working_folder(tmp_path, policy):
    """``resolve_class`` named as the network class imported any module (here from the cwd)."""
    marker = tmp_path / "imported"
    (tmp_path / "evil_mod.py").write_text(f"open({str(marker)!r}, 'w').close()\nX = 1\n")
    card = _card(policy)
    card["architecture"] = {"class": "fusion_rl.policy.policy.resolve_class",
                            "kwargs": {"path": "evil_mod.X", "base": "x"}}
    _write_card(policy, card)
    proc = cli_child("plan", "mlp_tiny", "--policy", str(policy), cwd=tmp_path)
    assert not marker.exists()
    child_error(proc, "network class")


def test_1_card_cannot_read_a_file(capsys, tmp_path, policy):
    """``load_config`` named as the class opened any file and printed its keys."""
    secret = tmp_path / "secret.yaml"
    secret.write_text("SECRET_TOKEN_123: 1\n")
    card = _card(policy)
    card["architecture"] = {"class": "fusion_rl.policy.training.load_config", "kwargs": {"path": str(secret)}}
    _write_card(policy, card)
    code, _, err = run_cli(capsys, "plan", "mlp_tiny", "--policy", str(policy))
    assert "SECRET_TOKEN_123" not in err
    one_line_error(code, err, "network class")


def test_1_card_cannot_start_training(capsys, tmp_path, policy, monkeypatch):
    """``train`` named as the class created folders and started a run."""
    monkeypatch.chdir(tmp_path)  # old code: the default env spec is not found here, so it stops early
    runs = tmp_path / "marker_runs"
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # old code got as far as this
    card = _card(policy)
    card["architecture"] = {"class": "fusion_rl.policy.training.train",
                            "kwargs": {"runs_dir": str(runs), "wandb_mode": "disabled", "progress": False}}
    _write_card(policy, card)
    code, _, err = run_cli(capsys, "plan", "mlp_tiny", "--policy", str(policy))
    assert not runs.exists()
    one_line_error(code, err, "network class")


def test_1_card_kwargs_are_checked_against_the_schema(capsys, policy):
    card = _card(policy)
    card["architecture"]["kwargs"]["features"]["bidirectional"] = "no"  # truthy: silently True before
    _write_card(policy, card)
    one_line_error(*run_cli(capsys, "plan", "mlp_tiny", "--policy", str(policy))[::2], "bidirectional")


# ---- 2. export and evaluate never unpickle a run folder -------------------------------------


def test_2_export_never_unpickles_the_run(capsys, tmp_path):
    marker = tmp_path / "unpickled"
    run_dir = _run_folder(tmp_path, marker)
    code, _, err = run_cli(capsys, "export", str(run_dir), "-o", str(tmp_path / "out"))
    assert not marker.exists() and not (tmp_path / "out").exists()
    assert "pickle" in one_line_error(code, err, "--resume")


def test_2_evaluate_never_unpickles_the_run(capsys, tmp_path):
    marker = tmp_path / "unpickled"
    run_dir = _run_folder(tmp_path, marker)
    code, _, err = run_cli(capsys, "evaluate", str(run_dir), "--models", "mlp_tiny")
    assert not marker.exists()
    one_line_error(code, err, "--resume")


def test_2_export_reads_the_safe_snapshot_not_the_zip(capsys, tmp_path):
    """A run with the safetensors + JSON snapshot exports from it; the crafted zip is never read."""
    from safetensors.torch import save

    from fusion_rl.env.spaces import EDGE_DIM, NODE_DIM
    from fusion_rl.policy.network import PolicyNetwork

    marker = tmp_path / "unpickled"
    run_dir = _run_folder(tmp_path, marker)
    net = PolicyNetwork(dict(node_dim=NODE_DIM, edge_dim=EDGE_DIM, hw_dim=10, **FEATURES), [8])
    (run_dir / "final_model.safetensors").write_bytes(save(net.state_dict()))
    (run_dir / "final_model.json").write_text(json.dumps({
        "format": 1, "network": {"class": "fusion_rl.policy.network.PolicyNetwork", "kwargs": net.config},
        "observation": {"max_nodes": 64, "max_edges": 128, "hw_dim": 10}, "num_timesteps": 64}))
    code, _, err = run_cli(capsys, "export", str(run_dir), "-o", str(tmp_path / "out"))
    assert not marker.exists()
    assert code == 0 and (tmp_path / "out" / "card.json").is_file(), err


def test_2_resume_warns_that_the_run_must_be_trusted(capsys, tmp_path, monkeypatch):
    from sb3_contrib import MaskablePPO

    from fusion_rl.policy.training import train

    run_dir = _run_folder(tmp_path, tmp_path / "unpickled")

    def refuse(*args, **kwargs):
        raise RuntimeError("stop before loading")

    monkeypatch.setattr(MaskablePPO, "load", refuse)
    threads = torch.get_num_threads()
    try:
        with pytest.raises(RuntimeError, match="stop before loading"):
            train(resume=run_dir, wandb_mode="disabled", progress=False)
    finally:
        torch.set_num_threads(threads)  # train() sets the run's thread count
    err = capsys.readouterr().err
    assert "warning: --resume" in err and "trust" in err


# ---- 3. outputs never clobber ---------------------------------------------------------------


def test_3_output_through_a_symlink_writes_its_target(capsys, tmp_path):
    real, link = tmp_path / "real.json", tmp_path / "link.json"
    real.write_text("old\n")
    link.symlink_to(real.name)
    code, _, err = run_cli(capsys, "plan", "mlp_tiny", "--rules", "tvm", "-o", str(link))
    assert code == 0, err
    assert link.is_symlink() and json.loads(real.read_text())["name"] == "tvm"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.json", "real.json"]


def test_3_output_never_replaces_a_non_regular_file(capsys, tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)  # stands in for /dev/full, which only root could replace
    one_line_error(*run_cli(capsys, "plan", "mlp_tiny", "--rules", "tvm", "-o", str(fifo))[::2], "not a regular file")
    assert fifo.exists() and not fifo.is_file()
    assert os.listdir(tmp_path) == ["pipe"]


@pytest.mark.parametrize("where, words", [("folder", "is a folder"), ("missing/p.json", "does not exist")])
def test_3_output_folder_or_missing_folder_is_one_line(capsys, tmp_path, where, words):
    (tmp_path / "folder").mkdir()
    one_line_error(*run_cli(capsys, "plan", "mlp_tiny", "--rules", "tvm", "-o", str(tmp_path / where))[::2], words)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder"]  # no .tmp left behind
    assert os.listdir(tmp_path / "folder") == []


def test_3_an_illegal_plan_is_never_written(capsys, tmp_path, model_cache):
    from fusion_rl.fusion.legality import check_plan
    from fusion_rl.fusion.plan import FusionPlan

    model = model_cache("cnn_plain")
    groups = [[0, 2]] + [[i] for i in range(len(model.graph)) if i not in (0, 2)]
    plan = FusionPlan.from_groups(groups, len(model.graph), model.fingerprint, "bad")
    assert not check_plan(model.graph, plan).legal
    src, out = tmp_path / "bad.json", tmp_path / "out.json"
    src.write_text(json.dumps(plan.to_dict()))
    code, _, err = run_cli(capsys, "plan", "cnn_plain", "--plan", str(src), "-o", str(out))
    one_line_error(code, err)
    assert not out.exists()


def test_3_compile_checks_its_output_before_compiling(capsys, tmp_path, monkeypatch):
    from fusion_rl.graph import model as model_mod

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before -o was checked")

    monkeypatch.setattr(model_mod, "load_model", no_model)
    one_line_error(*run_cli(capsys, "compile", "mlp_tiny", "--rules", "tvm", "--schedule", "naive",
                        "-o", str(tmp_path))[::2], "is a folder")


# ---- 4. a tiny plan file cannot exhaust memory -----------------------------------------------


def test_4_huge_num_nodes_is_refused_before_allocating(tmp_path):
    plan = _plan_file(tmp_path, num_nodes=10**12)
    child_error(cli_child("plan", "mlp_tiny", "--plan", str(plan), limit_gb=6), "nodes")


def test_4_dev_zero_as_a_plan(tmp_path):
    child_error(cli_child("plan", "mlp_tiny", "--plan", "/dev/zero", limit_gb=6), "larger than")


# ---- 5. one bad run does not poison the store -----------------------------------------------


def test_5_a_short_timeout_does_not_poison_later_runs(tmp_path, model_cache):
    from fusion_rl.compiler.measure import Measurer
    from fusion_rl.compiler.store import MeasurementStore
    from fusion_rl.compiler.timing import TimingProtocol
    from fusion_rl.fusion.rules import make_plan

    model = model_cache("mlp_tiny")
    plan = make_plan("tvm", model.mod, model.graph)
    quick = TimingProtocol(repeat=2, min_repeat_ms=1, warmup=0)
    with MeasurementStore(tmp_path / "m.sqlite") as store:
        with Measurer("host", "naive", store=store, protocol=quick, timeout_s=0.001) as hurried:
            assert hurried.measure(model, plan).status == "timeout"
        with Measurer("host", "naive", store=store, protocol=quick, isolate=False) as m:
            record = m.measure(model, plan)
        assert record.status == "ok" and m.stats.hits == 0  # measured, not the stored timeout


def test_5_a_served_failure_names_the_store_and_retry(capsys, tmp_path, model_cache):
    from fusion_rl.compiler.measure import Measurer
    from fusion_rl.compiler.store import MeasurementRecord, MeasurementStore
    from fusion_rl.fusion.rules import make_plan

    model = model_cache("mlp_tiny")
    plan = make_plan("tvm", model.mod, model.graph)
    path = tmp_path / "m.sqlite"
    with MeasurementStore(path) as store:
        m = Measurer("host", DEFAULT_SCHEDULE, store=store)  # the CLI's defaults
        key = m.key(model, plan)
        keys = {key, m.failure_key(key)} if hasattr(m, "failure_key") else {key}
        store.put_many([MeasurementRecord(key=k, status="crashed", error="worker died (signal SIGSEGV)") for k in keys])
    line = one_line_error(*run_cli(capsys, "measure", "mlp_tiny", "--rules", "tvm", "--store", str(path))[::2],
                          "store", "--retry crashed", status=3)  # a crash is an internal error (README exit codes)
    assert "SIGSEGV" in line


def test_5_a_worker_killed_from_outside_is_not_stored(tmp_path, model_cache, monkeypatch):
    import signal

    from fusion_rl.compiler import worker as worker_mod
    from fusion_rl.compiler.measure import Measurer
    from fusion_rl.compiler.store import MeasurementStore
    from fusion_rl.fusion.rules import make_plan

    real_run = worker_mod.Worker.run

    def killed_first(self, job, timeout_s):  # the OOM killer, before the job is even read
        os.kill(self._proc.pid, signal.SIGKILL)
        self._proc.wait()
        return real_run(self, job, timeout_s)

    monkeypatch.setattr(worker_mod.Worker, "run", killed_first)
    model = model_cache("mlp_tiny")
    with MeasurementStore(tmp_path / "m.sqlite") as store:
        with Measurer("host", DEFAULT_SCHEDULE, store=store) as m:
            record = m.measure(model, make_plan("tvm", model.mod, model.graph))
        assert record.status == "crashed" and "SIGKILL" in record.error
        assert len(store) == 0


def test_5_a_model_swapped_mid_measurement_is_not_stored(tmp_path):
    from fusion_rl.compiler.measure import Measurer
    from fusion_rl.compiler.store import MeasurementStore
    from fusion_rl.compiler.timing import TimingProtocol
    from fusion_rl.fusion.plan import FusionPlan
    from fusion_rl.graph.model import load_model

    path = _onnx(tmp_path / "m.onnx")
    model = load_model(path)
    plan = FusionPlan.singletons(len(model.graph), model.fingerprint)
    # Another model behind the same path before the worker loads it.
    node = helper.make_node("Sigmoid", ["x"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    with MeasurementStore(tmp_path / "s.sqlite") as store:
        with Measurer("host", "naive", store=store, protocol=TimingProtocol(repeat=2, min_repeat_ms=1)) as m:
            record = m.measure(model, plan)
        assert record.status != "ok" and len(store) == 0


# ---- 6. unknown operators are refused at import ---------------------------------------------


def test_6_custom_domain_is_refused_naming_the_op(capsys, tmp_path):
    path = _onnx(tmp_path / "evil.onnx", domain="com.evil")
    one_line_error(*run_cli(capsys, "plan", str(path), "--rules", "tvm")[::2], "com.evil:Relu")


def test_6_unknown_opset_is_refused(capsys, tmp_path):
    path = _onnx(tmp_path / "future.onnx", opset=999)
    one_line_error(*run_cli(capsys, "plan", str(path), "--rules", "tvm")[::2], "opset 999")


# ---- 7. internal errors that must be one error: line, exit 2 ---------------------------------


def test_7_symlink_loop_as_model(capsys, tmp_path):
    loop = tmp_path / "loop.onnx"
    loop.symlink_to(loop.name)
    one_line_error(*run_cli(capsys, "plan", str(loop), "--rules", "tvm")[::2], "symbolic links")


def test_7_integer_of_5000_digits_in_a_plan(capsys, tmp_path):
    path = tmp_path / "plan.json"
    path.write_text('{"format": 1, "num_nodes": ' + "9" * 5000 + ', "groups": [[0]]}')
    one_line_error(*run_cli(capsys, "plan", "mlp_tiny", "--plan", str(path))[::2], "out of range")


def test_7_lone_surrogate_in_a_plan_name(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text('{"format": 1, "name": "\\ud800", "num_nodes": 1, "groups": [[0]]}')
    child_error(cli_child("plan", "mlp_tiny", "--plan", str(path)), "surrogate")


def test_7_deeply_nested_card(capsys, policy):
    (policy / "card.json").write_text("[" * 100_000 + "]" * 100_000)
    one_line_error(*run_cli(capsys, "plan", "mlp_tiny", "--policy", str(policy))[::2], "card")


def test_7_pickle_as_the_weights_file(capsys, tmp_path, policy):
    marker = tmp_path / "unpickled"
    (policy / "weights.safetensors").write_bytes(pickle.dumps({"w": _Marker(marker)}))
    _write_card(policy, _card(policy))
    code, _, err = run_cli(capsys, "plan", "mlp_tiny", "--policy", str(policy))
    assert not marker.exists()
    one_line_error(code, err, "safetensors")


def test_7_huge_observation_size_in_the_card(capsys, policy):
    card = _card(policy)
    card["observation"]["max_nodes"] = 10**12
    _write_card(policy, card)
    one_line_error(*run_cli(capsys, "plan", "mlp_tiny", "--policy", str(policy))[::2], "max_nodes")


def test_7_non_utf8_yaml(capsys, tmp_path):
    config = tmp_path / "train.yaml"
    config.write_bytes(b"exp_name: \xff\xfe\n")
    one_line_error(*run_cli(capsys, "train", "--config", str(config), "--runs-dir", str(tmp_path / "runs"))[::2],
                   "UTF-8")
    assert not (tmp_path / "runs").exists()


def test_7_fusion_rl_cache_that_is_a_file(tmp_path):
    cache = tmp_path / "cache"
    cache.write_text("not a folder\n")
    child_error(cli_child("plan", "mlp_tiny", "--rules", "tvm", env={"FUSION_RL_CACHE": str(cache)}), "FUSION_RL_CACHE")


def test_7_store_record_holding_invalid_json(capsys, tmp_path, model_cache):
    from fusion_rl.compiler.measure import Measurer
    from fusion_rl.compiler.store import MeasurementRecord, MeasurementStore
    from fusion_rl.fusion.rules import make_plan

    model = model_cache("mlp_tiny")
    path = tmp_path / "m.sqlite"
    with MeasurementStore(path) as store:
        key = Measurer("host", DEFAULT_SCHEDULE, store=store).key(model, make_plan("tvm", model.mod, model.graph))
        store.put(MeasurementRecord.from_times(key, [1.0, 1.1]))
    with sqlite3.connect(path) as db:
        db.execute("UPDATE measurements SET times_ms = '{oops'")
    one_line_error(*run_cli(capsys, "measure", "mlp_tiny", "--rules", "tvm", "--store", str(path))[::2], "store")


def test_7_huge_shape_in_a_library_sidecar(capsys, tmp_path):
    lib = tmp_path / "model.so"
    lib.write_bytes(b"\x7fELF not really")
    Path(f"{lib}.json").write_text(json.dumps({"inputs": [{"name": "x", "shape": [10**5] * 3, "dtype": "float32"}]}))
    one_line_error(*run_cli(capsys, "run", str(lib))[::2], "memory")


# ---- 8. the rest ------------------------------------------------------------------------------


def test_8_plan_name_with_escapes_cannot_fake_lines(capsys, tmp_path):
    path = _plan_file(tmp_path, name="\x1b[32mlegal\x1b[0m\nerror: fake")
    code, out, err = run_cli(capsys, "plan", "mlp_tiny", "--plan", str(path))
    one_line_error(code, err, "plan 'name'")
    assert "\x1b" not in out and "fake" not in out


def _missing_isa_target() -> str | None:
    """A named target whose instructions this CPU lacks, if any."""
    from fusion_rl.compiler.target import read_cpuinfo, runs_on

    flags, _ = read_cpuinfo()
    for mcpu in ("sapphirerapids", "znver4", "skylake-avx512", "haswell"):
        if flags and not runs_on(mcpu, flags):
            return f"llvm:{mcpu}:t1"
    return None


def test_8_target_the_cpu_cannot_run_is_refused_up_front(capsys, tmp_path):
    from fusion_rl.compiler.store import MeasurementStore

    target = _missing_isa_target()
    if target is None:
        pytest.skip("this CPU runs every target tried")
    store = tmp_path / "m.sqlite"
    one_line_error(*run_cli(capsys, "measure", "mlp_tiny", "--rules", "unfused", "--target", target, "--schedule",
                        "rules", "--store", str(store), "--repeat", "2", "--min-repeat-ms", "1")[::2], "SIGILL")
    with MeasurementStore(store) as s:
        assert len(s) == 0  # nothing stored


@pytest.mark.parametrize("text, key", [
    ("timeout_s: .inf\n", "timeout_s"),
    ("schedule: tuned\nschedule_kwargs: {trials_per_task: -5}\n", "trials_per_task"),
    ("max_nodes: 1000000000000\n", "max_nodes"),
    ("targets: [pentium-t9]\n", "pentium-t9"),
    ("schedule: fastest\n", "fastest"),
])
def test_8_env_spec_refuses_values_that_fail_later(tmp_path, text, key):
    from fusion_rl.env.spec import EnvSpec

    path = tmp_path / "env.yaml"
    path.write_text("models: [mlp_tiny]\n" + text)
    with pytest.raises(ConfigError, match=key) as info:
        EnvSpec.from_yaml(path)
    assert "\n" not in str(info.value)


def test_8_measure_json_is_always_valid_json(capsys, tmp_path, model_cache):
    from fusion_rl.compiler.measure import Measurer
    from fusion_rl.compiler.store import MeasurementRecord, MeasurementStore
    from fusion_rl.fusion.rules import make_plan

    model = model_cache("mlp_tiny")
    path = tmp_path / "m.sqlite"
    with MeasurementStore(path) as store:
        key = Measurer("host", DEFAULT_SCHEDULE, store=store).key(model, make_plan("tvm", model.mod, model.graph))
        record = MeasurementRecord.from_times(key, [1.0, 1.2])
        record.spread_ms = float("inf")
        store.put(record)
    code, out, err = run_cli(capsys, "measure", "mlp_tiny", "--rules", "tvm", "--store", str(path), "--json")
    assert code == 0, err

    def strict(name: str):
        raise ValueError(f"{name} is not JSON")

    data = json.loads(out, parse_constant=strict)
    assert data["cached"] and data["spread_ms"] is None


# ---- the shared output helper ------------------------------------------------------------------


def test_write_atomic_leaves_no_temp_file_on_failure(tmp_path):
    from fusion_rl.errors import OutputError
    from fusion_rl.io import write_atomic

    target = tmp_path / "out.bin"
    target.write_bytes(b"old")

    def failing(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OutputError, match="No space left"):
        write_atomic(target, failing)
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["out.bin"]
    write_atomic(target, b"new")
    assert target.read_bytes() == b"new" and os.listdir(tmp_path) == ["out.bin"]
