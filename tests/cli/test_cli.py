"""The CLI end to end, and every bad input of the core issue: one line, non-zero exit."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import torch
from onnx import TensorProto, helper

from fusion_rl.graph.zoo import export_onnx

from _tiny import conv_block
from conftest import cli_child, one_line_error, run_cli


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("onnx")
    good = export_onnx("cnn_plain")
    files = {"good": good}
    (d / "garbage.onnx").write_bytes(b"\x00\x01this is not a protobuf\xff" * 10)
    files["garbage"] = d / "garbage.onnx"
    (d / "empty.onnx").write_bytes(b"")
    files["empty"] = d / "empty.onnx"
    data = good.read_bytes()
    (d / "truncated.onnx").write_bytes(data[: len(data) // 2])
    files["truncated"] = d / "truncated.onnx"
    (d / "notes.onnx").write_text("name,value\na,1\n")
    files["text"] = d / "notes.onnx"
    # A real ONNX operator that TVM's frontend does not implement.
    node = helper.make_node("Det", ["x"], ["y"])
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), d / "det.onnx")
    files["unsupported"] = d / "det.onnx"
    # A dynamic batch dimension.
    module, (x,) = conv_block()
    torch.onnx.export(module, (x,), str(d / "dyn.onnx"), dynamo=False, opset_version=17,
                      input_names=["x"], dynamic_axes={"x": {0: "batch"}})
    files["dynamic"] = d / "dyn.onnx"
    return files


def test_zoo_lists_models(capsys):
    code, out, _ = run_cli(capsys, "zoo", "--json")
    names = [m["name"] for m in json.loads(out)]
    assert code == 0 and "resnet_tiny" in names and len(names) >= 10


def test_plan_json_shows_groups_and_legality(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "plan", "cnn_plain", "--rules", "tvm", "--json", "-o", str(tmp_path / "p.json"))
    data = json.loads(out)
    assert code == 0 and data["legality"]["legal"]
    assert data["groups"][0]["ops"][0] == "conv2d"
    assert json.loads((tmp_path / "p.json").read_text())["hash"] == data["plan"]["hash"]


def test_measure_json_fields(capsys, tmp_path):
    store = str(tmp_path / "m.sqlite")
    argv = ["measure", "cnn_plain", "--rules", "tvm", "--json", "--repeat", "3",
            "--min-repeat-ms", "5", "--store", store]
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    data = json.loads(out)
    for field in ("latency_ms", "spread_ms", "repeats", "verified", "num_kernels", "plan_hash", "target"):
        assert field in data
    assert data["verified"] and data["latency_ms"] > 0 and data["repeats"] == 3
    assert data["spread_kind"] == "iqr" and not data["cached"]
    code, out, _ = run_cli(capsys, *argv)  # the identical request is served from the store
    again = json.loads(out)
    assert again["cached"] and again["latency_ms"] == data["latency_ms"]


def test_measure_a_saved_plan_for_an_onnx_path(capsys, tmp_path, onnx_files):
    plan = tmp_path / "p.json"
    assert run_cli(capsys, "plan", str(onnx_files["good"]), "--rules", "tensorrt", "-o", str(plan))[0] == 0
    code, out, err = run_cli(capsys, "measure", str(onnx_files["good"]), "--plan", str(plan), "--json",
                         "--repeat", "2", "--min-repeat-ms", "1", "--no-store")
    assert code == 0, err and json.loads(out)["verified"]


@pytest.mark.parametrize(
    "kind, words",
    [
        ("garbage", ["not a valid ONNX file"]),
        ("empty", ["empty"]),
        ("truncated", ["not a valid ONNX file"]),
        ("text", ["not a valid ONNX file"]),
        ("unsupported", ["unsupported ONNX operator", "Det"]),
        ("dynamic", ["dynamic shape", "--input-shape x="]),
    ],
)
def test_bad_model_files(capsys, onnx_files, kind, words):
    code, _, err = run_cli(capsys, "plan", str(onnx_files[kind]), "--rules", "tvm")
    one_line_error(code, err, *words)


def test_dynamic_shape_with_given_shape_works(capsys, onnx_files):
    code, out, err = run_cli(capsys, "plan", str(onnx_files["dynamic"]), "--rules", "tvm",
                         "--input-shape", "x=2,3,8,8", "--json")
    assert code == 0, err and json.loads(out)["legality"]["legal"]


def test_illegal_plan_is_named(capsys, tmp_path):
    plan = tmp_path / "bad.json"
    code, out, _ = run_cli(capsys, "plan", "cnn_plain", "--rules", "unfused", "--json")
    data = json.loads(out)["plan"]
    data["groups"] = [[0, 2]] + [[i] for i in range(data["num_nodes"]) if i not in (0, 2)]
    plan.write_text(json.dumps(data))
    code, _, err = run_cli(capsys, "measure", "cnn_plain", "--plan", str(plan), "--no-store")
    one_line_error(code, err, "illegal plan", "group 0", "non_convex")


def test_plan_of_another_model_is_named(capsys, tmp_path):
    plan = tmp_path / "resnet.json"
    run_cli(capsys, "plan", "resnet_tiny", "--rules", "tvm", "-o", str(plan))
    code, _, err = run_cli(capsys, "measure", "cnn_plain", "--plan", str(plan), "--no-store")
    one_line_error(code, err, "plan is for model")


@pytest.mark.parametrize(
    "argv, words",
    [
        (["plan", "no_such_model", "--rules", "tvm"], ["neither a zoo model nor an existing file"]),
        (["plan", "cnn_plain", "--rules", "fastest"], ["unknown rule set 'fastest'"]),
        (["measure", "cnn_plain", "--rules", "tvm", "--target", "llvm-quantum"], ["unknown target"]),
        (["measure", "cnn_plain", "--rules", "tvm", "--schedule", "magic"], ["unknown schedule provider"]),
        (["measure", "cnn_plain", "--rules", "tvm", "--trials", "4"], ["--trials only applies"]),
        (["plan", "cnn_plain", "--rules", "tvm", "--input-shape", "x=1,-3"], ["bad --input-shape"]),
        (["plan", "cnn_plain", "--plan", "/nonexistent/plan.json"], ["plan file not found"]),
    ],
)
def test_bad_options(capsys, argv, words):
    code, _, err = run_cli(capsys, *argv)
    one_line_error(code, err, *words)


def test_argparse_rejects_non_positive_trials():
    proc = cli_child("measure", "cnn_plain", "--rules", "tvm", "--schedule", "tuned", "--trials", "0")
    assert proc.returncode == 2 and "must be > 0" in proc.stderr and "Traceback" not in proc.stderr


# ---- measure: head-to-head comparison of several plans ---------------------------------------

QUICK_COMPARE = ["--rounds", "2", "--repeat", "2", "--min-repeat-ms", "1"]


def test_measure_compares_plans_head_to_head(capsys, tmp_path):
    plan = tmp_path / "agg.json"
    assert run_cli(capsys, "plan", "mlp_tiny", "--rules", "aggressive", "-o", str(plan))[0] == 0
    code, out, err = run_cli(capsys, "measure", "mlp_tiny", "--rules", "tvm,unfused", "--plan", str(plan),
                         "--schedule", "naive", "--json", *QUICK_COMPARE, "--min-near", "4", "--max-rounds", "3")
    assert code == 0, err
    data = json.loads(out)
    assert set(data) == {"model", "schedule", "target", "rounds", "fork_join_us", "reference_us", "plans"}
    # The repeats were judged against this host's floor or their own lowest probe, never above it.
    assert 0 < data["reference_us"] <= min(data["fork_join_us"])
    # 2 repeats a round: a third round only where fewer than 4 of the first 4 ran near.
    assert data["rounds"] in (2, 3) and len(data["fork_join_us"]) == 2 * data["rounds"]
    assert data["model"] == "mlp_tiny" and data["schedule"] == "naive"
    assert [p["name"] for p in data["plans"]] == ["tvm", "unfused", str(plan)]
    repeats = len(data["fork_join_us"])  # one host probe per paired repeat
    assert repeats > 0 and all(us > 0 for us in data["fork_join_us"])
    for p in data["plans"]:
        assert set(p) == {"name", "latency_ms", "spread_ms", "verified", "num_kernels",
                          "speedup_vs_first", "speedup_spread", "speedup_by_regime"}
        assert p["verified"] and p["latency_ms"] > 0 and p["spread_ms"] >= 0 and p["speedup_vs_first"] > 0
        assert sum(v["repeats"] for v in p["speedup_by_regime"].values()) == repeats
    first, unfused, agg = data["plans"]
    # The first plan against itself, repeat by repeat: exactly 1, with no spread.
    assert first["speedup_vs_first"] == 1.0 and first["speedup_spread"] == 0.0
    assert unfused["num_kernels"] > first["num_kernels"] >= agg["num_kernels"] >= 1


def test_measure_keeps_the_command_line_order_of_sources(capsys):
    code, out, err = run_cli(capsys, "measure", "mlp_tiny", "--policy", "policies/default", "--rules", "unfused",
                         "--schedule", "rules", *QUICK_COMPARE)
    assert code == 0, err
    lines = out.splitlines()
    assert "2 interleaved rounds" in lines[0] and "verified" in lines[0]
    assert "speedup vs policies/default" in lines[1]
    assert lines[3].split()[0] == "policies/default" and lines[3].split()[-2] == "1.000x"
    assert lines[4].split()[0] == "unfused"
    assert lines[5].startswith("host fork-join cost: ")


def test_measure_of_one_plan_keeps_its_output(capsys):
    code, out, err = run_cli(capsys, "measure", "mlp_tiny", "--rules", "tvm", "--json", "--no-store",
                         "--repeat", "2", "--min-repeat-ms", "1")
    assert code == 0, err
    data = json.loads(out)
    assert "plans" not in data and data["plan"] == "tvm" and data["repeats"] == 2


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--rules", "tvm,unfused", "--rounds", "1"], ["--rounds: expected an int >= 2"]),
        (["--rules", "tvm", "--rounds", "3"], ["--rounds", "two or more plans"]),
        (["--rules", "tvm", "--min-near", "5"], ["--min-near", "two or more plans"]),
        (["--rules", "tvm,unfused", "--min-near", "-1"], ["--min-near: expected an int >= 0"]),
        (["--rules", "tvm,unfused", "--rounds", "3", "--max-rounds", "2"], ["--max-rounds: expected an int >= 3"]),
        (["--rules", "tvm,unfused", "--per-kernel"], ["--per-kernel"]),
        (["--rules", "tvm,fastest"], ["unknown rule set 'fastest'"]),
        ([], ["give a plan"]),
    ],
)
def test_measure_comparison_bad_options(capsys, argv, words):
    code, _, err = run_cli(capsys, "measure", "mlp_tiny", "--no-store", *argv)
    one_line_error(code, err, *words)


def test_measure_rejects_an_empty_rule_name():
    proc = cli_child("measure", "mlp_tiny", "--rules", "tvm,,unfused")
    assert proc.returncode == 2 and "empty rule-set name" in proc.stderr and "Traceback" not in proc.stderr


def test_zoo_lists_both_suites_with_flops(capsys):
    code, out, _ = run_cli(capsys, "zoo", "--json")
    rows = {m["name"]: m for m in json.loads(out)}
    assert code == 0 and rows["mlp_tiny"]["suite"] == "tiny" and rows["bench_bert"]["suite"] == "bench"
    assert all(isinstance(r["flops"], int) and r["flops"] > 0 for r in rows.values())
    assert rows["bench_bert"]["flops"] > 500 * rows["hf_bert"]["flops"]
    code, out, _ = run_cli(capsys, "zoo", "--suite", "bench")
    assert code == 0 and "bench_vit" in out and "mlp_tiny" not in out and "GFLOPs" in out
