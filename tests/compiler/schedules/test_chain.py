"""fusion_rl/compiler/schedules/chain.py: a pointwise convolution computed in the channel blocks
of the depthwise or grouped convolution it feeds, verified against ONNX Runtime."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fusion_rl.compiler.build import compile_plan
from fusion_rl.compiler.kernel_table import plan_kernels
from fusion_rl.compiler.schedules import make_schedule
from fusion_rl.compiler.schedules.chain import pointwise_block
from fusion_rl.compiler.schedules.rules import RulesSchedule
from fusion_rl.compiler.target import parse_target
from fusion_rl.compiler.verify import verify_executable
from fusion_rl.fusion.rules import make_plan
from fusion_rl.graph.model import load_model


class _ExpandDepthwise(nn.Module):
    """MobileNetV2's expand -> depthwise: conv k x k + BN + ReLU6, then depthwise 3x3 + BN + ReLU6."""

    def __init__(self, ci: int, hidden: int, stride: int, k: int = 1) -> None:
        super().__init__()
        self.expand = nn.Conv2d(ci, hidden, k, 1, k // 2, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.dw = nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False)
        self.bn2 = nn.BatchNorm2d(hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.relu6(self.bn1(self.expand(x)))
        return nn.functional.relu6(self.bn2(self.dw(y)))


class _ExpandGrouped(nn.Module):
    """RegNetX's 1x1 -> grouped 3x3: conv 1x1 + BN + ReLU, then a grouped 3x3 of ``width``
    channels per group + BN + ReLU."""

    def __init__(self, ci: int, hidden: int, stride: int, width: int = 8) -> None:
        super().__init__()
        self.expand = nn.Conv2d(ci, hidden, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.grouped = nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden // width, bias=False)
        self.bn2 = nn.BatchNorm2d(hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.relu(self.bn1(self.expand(x)))
        return nn.functional.relu(self.bn2(self.grouped(y)))


class _RegNetStage(nn.Module):
    """Two RegNetX blocks (1x1 -> grouped 3x3 -> 1x1, residual) of 16 and 24 channels in
    groups of 8, a 1x1 transition between them (two distinct pair kernels)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleList([_ExpandGrouped(w, w, 1), nn.Conv2d(w, w, 1, bias=False),
                                                   nn.BatchNorm2d(w)]) for w in (16, 24))
        self.transition = nn.Conv2d(16, 24, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, (pair, project, bn) in enumerate(self.blocks):
            x = nn.functional.relu(x + bn(project(pair(x))))
            if i == 0:
                x = self.transition(x)
        return x


def _model(tmp_path, name: str, module: nn.Module, shape: tuple[int, ...]):
    torch.manual_seed(0)
    module = module.eval()
    for bn in (m for m in module.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    path = tmp_path / f"{name}.onnx"
    torch.onnx.export(module, (torch.randn(*shape),), str(path), input_names=["input"], dynamo=False)
    return load_model(str(path))


@pytest.mark.parametrize("target_name", ["host", "haswell-t1"])
@pytest.mark.parametrize("ci, hidden, stride, size", [
    (8, 48, 1, 12),   # 12 columns: register tiles of 4 pixels
    (8, 48, 2, 14),   # stride 2 (the depthwise copy pads one side only)
    (4, 16, 1, 7),    # 7 columns (MobileNetV2's last stage), one channel block per 8
    (8, 96, 1, 7),    # AVX-512: 16 channels per step (two depthwise blocks, one full vector)
    (8, 192, 2, 14),  # AVX-512: 32 channels per step (two vectors), stride 2
    (8, 96, 1, 8),    # AVX2: 16 channels per step, tiles of 4 pixels x two vectors
])
def test_expand_then_depthwise_is_one_tile_and_matches_onnx_runtime(tmp_path, target_name, ci, hidden, stride, size):
    model = _model(tmp_path, "ed", _ExpandDepthwise(ci, hidden, stride), (1, ci, size, size))
    target = parse_target(target_name).to_tvm()
    plan = make_plan("aggressive", model.mod, model.graph)  # both convolutions in one kernel
    compiled = compile_plan(model, plan, target, make_schedule("rules"))
    verify_executable(compiled.executable, model, f"expand-depthwise/{target_name}")  # raises if wrong
    assert list(compiled.schedules.values()) == ["chain"], compiled.schedules
    # Apart, each convolution keeps its own micro-kernel.
    compiled = compile_plan(model, make_plan("tvm", model.mod, model.graph), target, make_schedule("rules"))
    verify_executable(compiled.executable, model, "expand-depthwise/tvm")
    assert set(compiled.schedules.values()) == {"microkernel"}, compiled.schedules


def test_a_3x3_producer_is_not_a_pointwise_pair(tmp_path):
    # The 3x3 producer needs a halo of its consumer's rows: not the pointwise pair, so the
    # kernel is scheduled anchor by anchor, and still right.
    model = _model(tmp_path, "cd", _ExpandDepthwise(4, 16, 1, k=3), (1, 4, 10, 10))
    target = parse_target("host").to_tvm()
    compiled = compile_plan(model, make_plan("aggressive", model.mod, model.graph), target, make_schedule("rules"))
    verify_executable(compiled.executable, model, "conv3x3-depthwise")
    assert list(compiled.schedules.values()) == ["microkernel"], compiled.schedules


@pytest.mark.parametrize("target_name", ["host", "haswell-t1"])
@pytest.mark.parametrize("ci, hidden, stride, size", [
    (8, 24, 1, 12),   # three groups of 8
    (8, 16, 2, 14),   # stride 2, as RegNetX's first block of a stage
    (16, 16, 1, 7),   # two groups, 7 columns (RegNetX's last stage)
])
def test_expand_then_grouped_is_one_tile_and_matches_onnx_runtime(tmp_path, target_name, ci, hidden, stride, size):
    model = _model(tmp_path, "eg", _ExpandGrouped(ci, hidden, stride), (1, ci, size, size))
    target = parse_target(target_name).to_tvm()
    plan = make_plan("aggressive", model.mod, model.graph)
    compiled = compile_plan(model, plan, target, make_schedule("rules"))
    verify_executable(compiled.executable, model, f"expand-grouped/{target_name}")
    assert list(compiled.schedules.values()) == ["chain"], compiled.schedules


def test_groups_wider_than_a_channel_block_are_not_a_pair(tmp_path):
    # 16 channels per group: a block of 8 output channels would need all 16 pointwise channels,
    # so the kernel runs anchor by anchor, and is still right.
    model = _model(tmp_path, "eg16", _ExpandGrouped(8, 32, 1, width=16), (1, 8, 10, 10))
    compiled = compile_plan(model, make_plan("aggressive", model.mod, model.graph),
                            parse_target("host").to_tvm(), make_schedule("rules"))
    verify_executable(compiled.executable, model, "expand-grouped16")
    assert list(compiled.schedules.values()) == ["microkernel"], compiled.schedules


@pytest.mark.parametrize("name, pairs", [("mobilenet_tiny", 3), ("regnet", 2)])
def test_the_rules_provider_declares_the_pairs_it_schedules_as_one_tile(model_cache, tmp_path, name, pairs):
    """The declaration is what the provider does: every group that the declared shapes let
    past one anchor (the ``aggressive_shapes`` plan) is scheduled as one shared tile, and the
    plan is right."""
    model = (model_cache(name) if name != "regnet"
             else _model(tmp_path, name, _RegNetStage(), (1, 16, 12, 12)))
    plan = make_plan("aggressive_shapes", model.mod, model.graph)
    found = [g for g in plan.groups if sum(model.graph.nodes[n].is_mac_anchor for n in g) == 2]
    assert len(found) == pairs, plan.groups
    compiled = compile_plan(model, plan, parse_target("host").to_tvm(), make_schedule("rules"))
    verify_executable(compiled.executable, model, f"{name}/aggressive_shapes")
    assert list(compiled.schedules.values()).count("chain") == pairs, compiled.schedules


@pytest.mark.parametrize("channels, size, registers, lanes, block", [
    (960, 7, 32, 16, 32),    # MobileNetV2's last stage: two full vectors per pixel
    (96, 7, 32, 16, 16),     # 32 would leave 3 steps for the threads
    (144, 56, 32, 16, 16),   # not a multiple of 32; 16 channels of 56 x 56 still fit the L2
    (96, 112, 32, 16, 8),    # 16 channels of 112 x 112 would not: one depthwise block
    (96, 7, 16, 8, 8),       # AVX2, 7 columns: 7 pixels x two vectors would not fit 16 registers
    (96, 8, 16, 8, 16),      # AVX2, 8 columns: tiles of 4 pixels x two vectors do
    (100, 7, 32, 16, 8),     # no block of 16 divides the channels
])
def test_a_step_covers_as_many_channels_as_vectors_cache_and_threads_allow(channels, size, registers, lanes, block):
    assert pointwise_block(channels, size * size * 4, size, registers, lanes) == block


def test_pairs_are_keyed_by_the_version_that_changed_their_schedule(tmp_path):
    model = _model(tmp_path, "ed", _ExpandDepthwise(8, 96, 1), (1, 8, 7, 7))
    provider = RulesSchedule()
    pair = plan_kernels(model, make_plan("aggressive", model.mod, model.graph), provider.kernel_key)
    apart = plan_kernels(model, make_plan("tvm", model.mod, model.graph), provider.kernel_key)
    assert [s.schedule for s in pair] == ["rules:v18"]
    # Apart, the depthwise convolution keeps the key (and table times) of an earlier version;
    # the pointwise one reads its input itself since v19 (test_blocks).
    assert sorted(s.schedule for s in apart) == ["rules:v17", "rules:v19"]
    grouped = _model(tmp_path, "eg", _ExpandGrouped(8, 16, 1), (1, 8, 16, 16))
    kernels = plan_kernels(grouped, make_plan("aggressive", grouped.mod, grouped.graph), provider.kernel_key)
    assert [s.schedule for s in kernels] == ["rules:v13"]  # v18 left the grouped pairs as they were
    # One with 7-wide rows keeps v17's key, the last version that changed its schedule.
    grouped = _model(tmp_path, "eg7", _ExpandGrouped(8, 16, 1), (1, 8, 7, 7))
    kernels = plan_kernels(grouped, make_plan("aggressive", grouped.mod, grouped.graph), provider.kernel_key)
    assert [s.schedule for s in kernels] == ["rules:v17"]
