"""scripts/cache_penalty.py (experiments/cache_penalty): kernels alone, hot and cold, against end
to end, on a tiny MobileNet; and the hot/cold timer it uses."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tvm
import yaml
from tvm import te, topi

from conftest import load_script
from fusion_rl.compiler.timing import TimingProtocol, time_kernels, time_kernels_hot_cold
from fusion_rl.errors import ConfigError

cache_penalty = load_script("cache_penalty")
TARGET = tvm.target.Target("llvm")


def _dense(n: int) -> tvm.tirx.PrimFunc:
    x, w = te.placeholder((n, n), name="x"), te.placeholder((n, n), name="w")
    return te.create_prim_func([x, w, topi.nn.relu(topi.matmul(x, w))])


def test_hot_and_cold_repeats_come_from_one_build():
    funcs = {"a": _dense(32), "b": _dense(48)}
    specs = {k: [((n, n), "float32")] * 3 for k, n in (("a", 32), ("b", 48))}
    protocol = TimingProtocol(repeat=3, min_repeat_ms=0, warmup=1)
    both = time_kernels_hot_cold(funcs, specs, TARGET, protocol, rounds=2)
    assert set(both) == {"a", "b"}
    for hot, cold in both.values():
        assert len(hot) == len(cold) == 6 and min(hot) > 0 and min(cold) > 0
    hot = time_kernels(funcs, specs, TARGET, protocol)  # the kernel table's timer, same parts
    assert all(len(ts) == 3 and np.all(np.asarray(ts) > 0) for ts in hot.values())


def test_report_on_a_tiny_mobilenet(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"models": ["mobilenet_tiny"], "rules": ["tvm", "aggressive_shapes"],
                                      "kernel_rounds": 1, "kernel_repeat": 2, "rounds": 2, "repeat": 1,
                                      "min_repeat_ms": 1}))
    assert cache_penalty.main([str(config)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    rows = {r["rules"]: r for r in results["rows"]}
    assert set(rows) == {"tvm", "aggressive_shapes"}
    for r in rows.values():
        assert r["kernels"] > 0 and r["hot_ms"] > 0 and r["cold_ms"] > 0 and r["e2e_ms"] > 0
        assert r["repeats"] == 2 and 0 <= r["far_repeats"] <= 2  # 2 rounds x 1 repeat
    assert rows["tvm"]["hot_vs_ref"] == rows["tvm"]["cold_vs_ref"] == rows["tvm"]["e2e_vs_ref"] == 1.0
    assert rows["aggressive_shapes"]["kernels"] < rows["tvm"]["kernels"]  # fusion launches fewer
    ratio = rows["tvm"]["hot_ms"] / rows["aggressive_shapes"]["hot_ms"]
    assert rows["aggressive_shapes"]["hot_vs_ref"] == pytest.approx(ratio)
    report = (tmp_path / "results.md").read_text()
    assert "| mobilenet_tiny | aggressive_shapes |" in report and results["meta"]["command"] in report
    (tmp_path / "results.md").unlink()
    assert cache_penalty.main([str(config), "--render"]) == 0  # from results.json alone
    assert (tmp_path / "results.md").read_text() == report


@pytest.mark.unit
@pytest.mark.parametrize("cfg, match", [
    ({"rules": ["tvm", "aggressive"]}, "'models'"),
    ({"models": ["mlp_tiny"], "rules": ["tvm"]}, "at least two"),
    ({"models": ["mlp_tiny"], "rules": ["tvm", "fastest"]}, "unknown rule sets"),
    ({"models": ["mlp_tiny"], "rules": ["tvm", "aggressive"], "warmup": 3}, "unknown keys"),
    ({"models": ["mlp_tiny"], "rules": ["tvm", "aggressive"], "rounds": 1}, "rounds"),
])
def test_config_refuses(tmp_path, cfg, match):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match=match):
        cache_penalty.load_config(config)
