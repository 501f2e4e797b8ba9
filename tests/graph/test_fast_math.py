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
    # T.exp / T.erf / T.tanh / T.sigmoid lower to one libm call per vector lane on LLVM.
    for call in ("T.exp(", "T.erf(", "T.tanh(", "T.sigmoid("):
        assert not any(call in s for s in scripts), call
    assert any("fast" in s for s in scripts)  # the TOPI approximation is there instead
    target = parse_target("host").to_tvm()
    for rules in ("unfused", "tvm"):
        compiled = compile_plan(model, make_plan(rules, model.mod, model.graph), target,
                                make_schedule("rules"))
        verify_executable(compiled.executable, model, f"{name}/{rules}")  # raises if wrong
