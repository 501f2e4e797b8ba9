"""The default schedule on every anchor class, at tiny sizes: exact against ONNX Runtime, and
every kernel reports the rule that scheduled it (no silent fallback)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fusion_rl.compiler.build import compile_plan
from fusion_rl.compiler.schedules import make_schedule
from fusion_rl.compiler.schedules.base import fallbacks
from fusion_rl.compiler.target import parse_target
from fusion_rl.compiler.verify import verify_executable
from fusion_rl.fusion.rules import make_plan
from fusion_rl.graph.model import load_model


class _Dense(nn.Module):
    """Linear + bias + GELU, then Linear + residual: dense anchors with epilogues."""

    def __init__(self, d: int = 24, f: int = 48) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(d, f), nn.Linear(f, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(nn.functional.gelu(self.a(x))) + x


class _Attention(nn.Module):
    """An encoder layer: batch_matmul (QK^T, scores x V), softmax and layer_norm tails."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class _Conv(nn.Module):
    """conv + BN + activation (+ residual when the shapes allow)."""

    def __init__(self, ci: int, co: int, k: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ci, co, k, stride, k // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(co)
        self.residual = ci == co and stride == 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.relu6(self.bn(self.conv(x)))
        return y + x if self.residual else y


CASES = {
    # name: (module, input shape, rule expected on the anchors)
    "dense": (lambda: _Dense(), (1, 16, 24), "microkernel"),
    "dense_ragged_rows": (lambda: _Dense(), (1, 7, 24), "microkernel"),  # 7 tokens: padded
    "attention": (lambda: _Attention(), (1, 9, 32), "microkernel"),  # 9 keys: padded
    "conv3x3": (lambda: _Conv(8, 16, 3), (1, 8, 14, 14), "microkernel"),
    "conv3x3_stride2": (lambda: _Conv(8, 16, 3, 2), (1, 8, 14, 14), "microkernel"),
    "conv1x1_residual": (lambda: _Conv(16, 16, 1), (1, 16, 7, 7), "microkernel"),
    "conv_grouped": (lambda: _Conv(16, 16, 3, 1, 4), (1, 16, 8, 8), "microkernel"),
    # 16 channels per group: a whole number of vectors on AVX2 and AVX-512 (RegNet's layout)
    "conv_grouped_vectors": (lambda: _Conv(64, 64, 3, 1, 4), (1, 64, 8, 8), "microkernel"),
    # 8 channels per group on a 7x7 map (RegNetX's last stage), stride 1 and 2: the input's
    # channel index is only seen to ignore the vector axis once simplified
    "conv_grouped_8_ragged": (lambda: _Conv(32, 32, 3, 1, 4), (1, 32, 7, 7), "microkernel"),
    "conv_grouped_8_stride2": (lambda: _Conv(32, 32, 3, 2, 4), (1, 32, 14, 14), "microkernel"),
    "depthwise3x3": (lambda: _Conv(16, 16, 3, 1, 16), (1, 16, 12, 12), "microkernel"),
    "depthwise3x3_stride2": (lambda: _Conv(16, 16, 3, 2, 16), (1, 16, 12, 12), "microkernel"),
    "depthwise7x7": (lambda: _Conv(16, 16, 7, 1, 16), (1, 16, 14, 14), "microkernel"),
}


@pytest.fixture(scope="module")
def target():
    return parse_target("host").to_tvm()


@pytest.mark.parametrize("name", sorted(CASES))
def test_rules_schedule_matches_onnx_runtime(name: str, target, tmp_path) -> None:
    build, shape, anchor_rule = CASES[name]
    torch.manual_seed(0)
    module = build().eval()
    for bn in (m for m in module.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    path = tmp_path / f"{name}.onnx"
    torch.onnx.export(module, (torch.randn(*shape),), str(path), input_names=["input"], dynamo=False)
    model = load_model(str(path))
    for rules in ("unfused", "tvm", "aggressive"):
        plan = make_plan(rules, model.mod, model.graph)
        compiled = compile_plan(model, plan, target, make_schedule("rules"))
        verify_executable(compiled.executable, model, f"{name}/{rules}")  # raises if wrong
        assert not fallbacks(compiled.schedules), compiled.schedules
        anchors = {k: v for k, v in compiled.schedules.items()
                   if any(op in k for op in ("conv2d", "matmul", "dense"))}
        # The rule that scheduled each anchor; the label may add why a wider vector gave way.
        assert anchors and all(v.split(" (")[0] == anchor_rule for v in anchors.values()), anchors


def test_fuzzer_finding_builds_and_verifies(target, model_cache) -> None:
    """A mobilenet_tiny plan from the plan fuzzer (boundary source: most of the network in one
    group) failed to build under rules ("Buffer conv2d_nchw_intermediate is used before its
    definition"): a write-back absorbed one consumer of a buffer that others still read."""
    from pathlib import Path

    from fusion_rl.fusion.plan import FusionPlan

    model = model_cache("mobilenet_tiny")
    plan = FusionPlan.load(Path(__file__).parent / "data" / "mobilenet_tiny_fuzz_684ab2b4.json")
    compiled = compile_plan(model, plan, target, make_schedule("rules"))
    verify_executable(compiled.executable, model, "fuzz finding 684ab2b4")
    assert not fallbacks(compiled.schedules), compiled.schedules
