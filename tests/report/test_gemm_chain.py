"""scripts/gemm_chain.py (experiments/gemm_chain): finding an MLP's two matmuls, joining their
groups, the per-block prototype schedule checked against the unscheduled kernel, and the report
on a tiny ConvNeXt."""

from __future__ import annotations

import json

import pytest
import tvm
import yaml

from conftest import load_script
from fusion_rl.errors import ConfigError
from fusion_rl.fusion.apply import apply_plan
from fusion_rl.fusion.rules import make_plan
from fusion_rl.graph.model import load_model

gemm_chain = load_script("gemm_chain")


@pytest.fixture(scope="module")
def convnext():
    """convnext_tiny (8x8 px, width 32, MLP 32 -> 128 -> 32, two blocks; the second's MLP is
    fused with the head's pooling and layer norm under ``aggressive_shapes``)."""
    model = load_model("convnext_tiny")
    base = make_plan("aggressive_shapes", model.mod, model.graph)
    joined, chains = gemm_chain.merge_chains(model.graph, base, gemm_chain.mlp_chains(model.graph))
    return model, base, joined, chains


def test_chains_are_the_mlps_and_join_legally(convnext):
    model, base, joined, chains = convnext
    graph = model.graph
    assert len(chains) == 2
    for a, b in chains:
        assert graph.nodes[a].op == graph.nodes[b].op == "matmul"
        assert graph.nodes[a].shapes[0][-1] == 4 * graph.nodes[b].shapes[0][-1]  # the MLP's 4C
        assert joined.group_of()[a] == joined.group_of()[b]
        assert base.group_of()[a] != base.group_of()[b]
    assert joined.num_groups == base.num_groups - 2


def test_chains_skip_attention():
    """Attention's batched matmuls (scores @ V, then the output projection) have no 2-D weight:
    only the feed-forward MLP is a chain."""
    graph = load_model("transformer_encoder").graph
    chains = gemm_chain.mlp_chains(graph)
    assert len(chains) == 1
    assert all(len(graph.nodes[n].arg_shapes[1]) == 2 for n in chains[0])


def test_prototype_computes_the_kernel_and_refuses_blocks_across_rows(convnext, target):
    model, _, joined, chains = convnext
    mod = apply_plan(model.mod, joined, model.graph)
    func = mod[gemm_chain.kernel_of(mod, model.graph, joined, chains[0][0])]
    dev = tvm.cpu()
    inputs = gemm_chain._inputs(func, 1)
    reference = gemm_chain._output(gemm_chain._compile(func, "llvm"), inputs, dev)
    for rows in (8, 16, 64):  # a row, two rows, the whole image: all whole rows of 8
        for chain in (False, True):
            out = gemm_chain._output(gemm_chain._compile(gemm_chain.prototype(func, rows, chain), target), inputs, dev)
            err = gemm_chain.relative_error(reference, out)
            assert err < 1e-5, (rows, chain, err)
    assert gemm_chain.relative_error(reference, 1.01 * reference) > 1e-5  # the check can fail
    with pytest.raises(ValueError, match="not whole rows of 8"):
        gemm_chain.prototype(func, 12, True)
    # The second MLP carries the head's reductions: not a chain the tile computes.
    last = mod[gemm_chain.kernel_of(mod, model.graph, joined, chains[1][0])]
    with pytest.raises(ValueError, match="reduces more than its two matmuls"):
        gemm_chain.prototype(last, 8, True)


def test_report_on_a_tiny_convnext(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"model": "convnext_tiny", "block_rows": [16, 12],
                                      "repeat": 2, "number": 1}))
    assert gemm_chain.main([str(config)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    variants = [r["variant"] for r in results["rows"]]
    # 12 does not divide the 64 rows: not timed.
    assert variants == ["rules (2 kernels)", "whole H 16", "chain 16"]
    assert all(r["relative_error"] < 1e-4 for r in results["rows"][1:])
    assert all(len(r["times_ms"]) == 2 and r["ms"][0] > 0 for r in results["rows"])
    assert list(results["skipped"].values()) == ["the kernel reduces more than its two matmuls"]
    report = (tmp_path / "results.md").read_text()
    assert "| chain 16 |" in report and "in all:" in report and results["meta"]["command"] in report
    (tmp_path / "results.md").unlink()
    assert gemm_chain.main([str(config), "--render"]) == 0  # from results.json alone
    assert (tmp_path / "results.md").read_text() == report


@pytest.mark.unit
@pytest.mark.parametrize("cfg, match", [
    ({"block_rows": [56]}, "'model'"),
    ({"model": "convnext_tiny", "block_rows": [0]}, "positive integers"),
    ({"model": "convnext_tiny", "rows": [56]}, "keys among"),
])
def test_config_refuses(tmp_path, cfg, match):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match=match):
        gemm_chain.load_config(config)
