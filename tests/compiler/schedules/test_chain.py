"""fusion_rl/compiler/schedules/chain.py: a pointwise convolution computed in the channel blocks
of the depthwise convolution it feeds, verified against ONNX Runtime."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fusion_rl.compiler.build import compile_plan
from fusion_rl.compiler.schedules import make_schedule
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


def test_the_rules_provider_declares_the_pairs_it_schedules_as_one_tile(model_cache):
    """The declaration is what the provider does: on a MobileNet with three expand -> depthwise
    pairs, every group that the declared shapes let past one anchor (the ``aggressive_shapes``
    plan) is scheduled as one shared tile, and the plan is right."""
    from fusion_rl.compiler.schedules.rules import RulesSchedule

    assert RulesSchedule.group_shapes == ("pointwise_depthwise",)
    model = model_cache("mobilenet_tiny")
    plan = make_plan("aggressive_shapes", model.mod, model.graph)
    pairs = [g for g in plan.groups if sum(model.graph.nodes[n].is_mac_anchor for n in g) == 2]
    assert len(pairs) == 3, plan.groups
    compiled = compile_plan(model, plan, parse_target("host").to_tvm(), make_schedule("rules"))
    verify_executable(compiled.executable, model, "mobilenet_tiny/aggressive_shapes")
    assert list(compiled.schedules.values()).count("chain") == len(pairs), compiled.schedules
