"""Transcendentals are legalized to vectorizable approximations, and still verify."""

import pytest
import tvm

from fusion_rl.compiler.build import compile_plan
from fusion_rl.compiler.schedules import make_schedule
from fusion_rl.compiler.target import parse_target
from fusion_rl.compiler.verify import verify_executable
from fusion_rl.fusion.rules import make_plan
from fusion_rl.graph.model import load_model

pytestmark = pytest.mark.integration

# GELU (erf), softmax (exp), GPT's tanh GELU, squeeze-excite's sigmoid.
MODELS = {"transformer_encoder": "erf", "gpt_tiny": "tanh", "se_cnn": "sigmoid"}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_no_libm_transcendental_is_left_and_outputs_verify(name: str) -> None:
    model = load_model(name)
    scripts = [f.script() for _, f in model.mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    # T.exp / T.erf / T.tanh / T.sigmoid / T.pow lower to one libm call per vector lane on LLVM.
    for call in ("T.exp(", "T.erf(", "T.tanh(", "T.sigmoid(", "T.pow("):
        assert not any(call in s for s in scripts), call
    assert any("fast" in s for s in scripts)  # the TOPI approximation is there instead
    target = parse_target("host").to_tvm()
    for rules in ("unfused", "tvm"):
        compiled = compile_plan(model, make_plan(rules, model.mod, model.graph), target,
                                make_schedule("rules"))
        verify_executable(compiled.executable, model, f"{name}/{rules}")  # raises if wrong


def test_small_integer_powers_become_products_and_others_stay(tmp_path) -> None:
    import torch

    class Powers(torch.nn.Module):
        def forward(self, x):
            return x ** 3 + x ** 2 + torch.abs(x) ** 0.5

    path = tmp_path / "powers.onnx"
    torch.onnx.export(Powers(), (torch.randn(2, 16),), str(path), input_names=["x"], dynamo=False)
    model = load_model(str(path))
    scripts = [f.script() for gv, f in model.mod.functions_items() if "power" in gv.name_hint]
    assert len(scripts) == 3
    assert sum("T.pow(" in s for s in scripts) == 1  # x ** 0.5 keeps TOPI's power
    target = parse_target("host").to_tvm()
    compiled = compile_plan(model, make_plan("unfused", model.mod, model.graph), target,
                            make_schedule("rules"))
    verify_executable(compiled.executable, model, "powers")  # raises if wrong
