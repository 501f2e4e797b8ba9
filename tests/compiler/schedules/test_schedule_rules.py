"""Tests of the ``rules`` schedule provider: exact outputs, real schedules, safe fallback."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
torch = pytest.importorskip("torch")
tvm = pytest.importorskip("tvm")

import tvm_ffi  # noqa: E402
from tvm import relax, te, tirx, topi  # noqa: E402
from tvm.relax.backend.cpu_generic import pipeline as cpu_pipeline  # noqa: E402
from tvm.relax.frontend.onnx import from_onnx  # noqa: E402
from tvm.script import tirx as T  # noqa: E402

from fusion_rl.compiler.schedules import blocks, rules, tile  # noqa: E402
from fusion_rl.compiler.schedules.rules import RulesSchedule  # noqa: E402

from fusion_rl.compiler.schedules.base import SCHEDULE_ATTR, fallbacks, schedule_report  # noqa: E402
from fusion_rl.compiler.target import parse_target  # noqa: E402

# The host, detected: a fixed ``sapphirerapids`` target dies with SIGILL on a CPU without AVX-512.
TARGET = parse_target("host").to_tvm()


class _TinyCNN(torch.nn.Module):
    """conv-bn-relu x2 with a residual, then a strided 1x1 conv: pads, epilogues, two anchors."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = torch.nn.BatchNorm2d(8)
        self.c2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.b2 = torch.nn.BatchNorm2d(8)
        self.c3 = torch.nn.Conv2d(8, 16, 1, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.b1(self.c1(x)))
        y = torch.relu(self.b2(self.c2(y)) + y)
        return torch.relu(self.c3(y))


class _TinyBlock(torch.nn.Module):
    """A transformer encoder block: matmuls, softmax, layer norm, GELU chains."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.TransformerEncoderLayer(
            32, 2, 64, dropout=0.0, batch_first=True, activation="gelu"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


Models = tuple[tvm.IRModule, tvm.IRModule, np.ndarray]


def _relax_modules(model: torch.nn.Module, shape: tuple[int, ...]) -> Models:
    """(unfused, FuseOps-fused, input) for a torch model, legalized as fusion_rl does."""
    torch.manual_seed(0)
    model.eval()
    x = torch.randn(*shape)
    buf = io.BytesIO()
    torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=17, input_names=["x"])
    mod = from_onnx(onnx.load_from_string(buf.getvalue()), keep_params_in_input=False)
    mod = relax.transform.DecomposeOpsForInference()(mod)
    mod = tvm.transform.Sequential(
        [
            relax.transform.LegalizeOps(),
            relax.transform.AnnotateTIROpPattern(),
            relax.transform.FoldConstant(),
        ]
    )(mod)
    fused = tvm.transform.Sequential(
        [
            relax.transform.FuseOps(),
            relax.transform.FuseTIR(),
            relax.transform.DeadCodeElimination(),
        ]
    )(mod)
    return mod, fused, x.numpy()


def _run(mod: tvm.IRModule, x: np.ndarray) -> np.ndarray:
    lower_only = tvm.transform.Sequential(
        cpu_pipeline.dataflow_lower_passes(TARGET) + cpu_pipeline.finalize_passes(TARGET)
    )
    ex = tvm.compile(mod, target=TARGET, relax_pipeline=lower_only)
    out = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x))
    return (out if hasattr(out, "numpy") else out[0]).numpy()


def _prim_funcs(mod: tvm.IRModule) -> dict[str, tirx.PrimFunc]:
    return {g.name_hint: f for g, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)}


@pytest.fixture(scope="module")
def cnn() -> Models:
    return _relax_modules(_TinyCNN(), (1, 3, 16, 16))


@pytest.fixture(scope="module")
def block() -> Models:
    return _relax_modules(_TinyBlock(), (1, 8, 32))


@pytest.mark.slow
@pytest.mark.parametrize("model", ["cnn", "block"])
def test_rules_output_matches_naive(model: str, request: pytest.FixtureRequest) -> None:
    unfused, fused, x = request.getfixturevalue(model)
    reference = _run(unfused, x)
    for mod in (unfused, fused):
        scheduled = RulesSchedule().schedule(mod, TARGET)
        np.testing.assert_allclose(_run(scheduled, x), reference, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_rules_schedules_conv_kernels(cnn: Models) -> None:
    unfused, fused, _ = cnn
    for mod in (unfused, fused):
        before = _prim_funcs(mod)
        after = _prim_funcs(RulesSchedule().schedule(mod, TARGET))
        convs = [name for name in after if "conv2d" in name]
        assert convs
        for name in convs:
            script = after[name].script()
            assert "T.vectorized" in script, name
            # Threads only pay off above MIN_PARALLEL_MACS; this net has convs on both sides.
            assert ("T.parallel" in script) == (_anchor_macs(before[name]) >= blocks.MIN_PARALLEL_MACS), name
            assert not tvm_ffi.structural_equal(after[name], before[name])
            assert after[name].attrs["tirx.is_scheduled"]


def _anchor_macs(func: tirx.PrimFunc) -> int:
    """Largest iteration count of a reduction block in ``func`` (its anchor's MACs)."""
    sch = tvm.s_tir.Schedule(func)
    work = [tile.block_work(sch.get(b)) for b in sch.get_child_blocks(sch.get_sblock("root"))
            if blocks.is_mac(sch, b)]
    return max(work, default=0)


def _matmul(m: int, k: int, n: int) -> tirx.PrimFunc:
    """A legalized ``(m, k) @ (k, n)`` kernel, as LegalizeOps emits it."""
    a = relax.Var("a", relax.TensorType((m, k), "float32"))
    b = relax.Var("b", relax.TensorType((k, n), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [a, b]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.matmul(a, b))
        bb.emit_func_output(out)
    mod = relax.transform.LegalizeOps()(bb.get())
    return next(f for _, f in mod.functions_items() if isinstance(f, tirx.PrimFunc))


def test_small_anchor_runs_serially_large_one_in_parallel() -> None:
    ctx = rules._make_ctx(TARGET)
    small = rules.schedule_prim_func(_matmul(1, 64, 128), ctx).script()  # 8K MACs: mlp_tiny's
    large = rules.schedule_prim_func(_matmul(64, 64, 128), ctx).script()  # 512K MACs
    assert "T.vectorized" in small and "T.parallel" not in small
    assert "T.vectorized" in large and "T.parallel" in large


def test_padded_anchor_runs_its_epilogue_at_the_tile() -> None:
    """197 rows do not tile: the anchor runs padded (pad_einsum), and its epilogue reads the
    padded result at the accumulator tile, inside the anchor's nest (ViT's fused dense + GELU
    copied the padded result out and ran its epilogue as two more passes over memory)."""
    m, k, n = 197, 64, 64
    a = relax.Var("a", relax.TensorType((m, k), "float32"))
    b = relax.Var("b", relax.TensorType((k, n), "float32"))
    c = relax.Var("c", relax.TensorType((n,), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [a, b, c]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.nn.relu(relax.op.add(relax.op.matmul(a, b), c)))
        bb.emit_func_output(out)
    fused = tvm.transform.Sequential([relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
                                      relax.transform.FuseOps(), relax.transform.FuseTIR()])(bb.get())
    (name, kernel), = _prim_funcs(fused).items()
    scheduled = rules.schedule_prim_func(kernel, rules._make_ctx(TARGET))
    assert scheduled.attrs[SCHEDULE_ATTR] == "microkernel"
    sch = tvm.s_tir.Schedule(scheduled)
    outermost = {b: sch.get(sch.get_loops(sch.get_sblock(b))[0]) for b in ("matmul_update", "compute")}
    assert outermost["compute"].same_as(outermost["matmul_update"]), scheduled.script()
    rng = np.random.default_rng(0)
    x, w, bias = (rng.standard_normal(s).astype("float32") for s in ((m, k), (k, n), (n,)))
    lib = tvm.compile(tvm.IRModule({"main": scheduled.with_attr("global_symbol", "main")}), target=TARGET)
    res = tvm.runtime.tensor(np.zeros((m, n), "float32"))
    lib["main"](*(tvm.runtime.tensor(v) for v in (x, w, bias)), res)
    np.testing.assert_allclose(res.numpy(), np.maximum(x @ w + bias, 0), rtol=1e-4, atol=1e-4)


def _iterations(script: str, block: str) -> int:
    """How many times ``block`` runs: the product of the loops that enclose it in ``script``."""
    lines = script.splitlines()
    at = next(i for i, line in enumerate(lines) if f'T.sblock("{block}")' in line)
    indent, total = len(lines[at]) - len(lines[at].lstrip()), 1
    for line in reversed(lines[:at]):
        depth = len(line) - len(line.lstrip())
        if depth < indent and line.lstrip().startswith("for "):
            indent = depth
            loop = line.split(" in ", 1)[1].split(", annotations", 1)[0]
            for ext in re.findall(r"(?<![\w.])\d+(?![\w.])", loop):  # not the 64 of T.int64
                total *= int(ext)
    return total


def test_a_norm_fused_with_a_transpose_computes_its_statistics_once() -> None:
    """ConvNeXt's channels-last layer_norm with the transpose back to NCHW in one kernel (a
    policy's plan): the row schedules compute every block per row of the *last* block, here a
    channel, and dlight's did so: each pixel's mean and variance 40 times, 30x slower than
    computing them once. Now each block runs over its own domain, and the output is exact."""
    x = te.placeholder((1, 6, 6, 40), name="x")
    gamma, beta = te.placeholder((40,), name="g"), te.placeholder((40,), name="b")
    out = topi.transpose(topi.nn.layer_norm(x, gamma, beta, axis=[3], epsilon=1e-6), (0, 3, 1, 2))
    kernel = te.create_prim_func([x, gamma, beta, out])
    scheduled = rules.schedule_prim_func(kernel, rules._make_ctx(TARGET))
    script = scheduled.script()
    for block in ("x_sum", "x_var_sum"):
        assert _iterations(script, block) == 6 * 6 * 40, script
    rng = np.random.default_rng(0)
    data, g, b = (rng.standard_normal(s).astype("float32") for s in ((1, 6, 6, 40), (40,), (40,)))
    lib = tvm.compile(tvm.IRModule({"main": scheduled.with_attr("global_symbol", "main")}), target=TARGET)
    res = tvm.runtime.tensor(np.zeros((1, 40, 6, 6), "float32"))
    lib["main"](*(tvm.runtime.tensor(v) for v in (data, g, b)), res)
    norm = (data - data.mean(-1, keepdims=True)) / np.sqrt(data.var(-1, keepdims=True) + 1e-6) * g + b
    np.testing.assert_allclose(res.numpy(), norm.transpose(0, 3, 1, 2), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rms", [False, True])
def test_a_keepdims_row_mean_runs_per_row_and_is_exact(rms: bool) -> None:
    """Llama's RMSNorm: a keepdims mean (alone, its last block has no loop of its own: v6
    vectorized the parallel row loop and it did not build) and the whole norm (v6 counted the
    kept unit axis as a row and recomputed the mean for every element, 0.63x end to end). The
    parallel loop runs over the 128 rows."""
    x = relax.Var("x", relax.TensorType((1, 128, 768), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            mean = relax.op.mean(relax.op.multiply(x, x) if rms else x, axis=[-1], keepdims=True)
            out = bb.emit_output(relax.op.multiply(x, relax.op.rsqrt(mean)) if rms else mean)
        bb.emit_func_output(out)
    data = np.random.default_rng(0).standard_normal((1, 128, 768)).astype("float32")
    if rms:  # the mean, the rsqrt and the scaling fused, as the tvm rule set makes them
        mod = tvm.transform.Sequential([relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
                                        relax.transform.FuseOps(), relax.transform.FuseTIR()])(bb.get())
        scheduled_mod = RulesSchedule().schedule(mod, TARGET)
        scheduled = next(f for n, f in _prim_funcs(scheduled_mod).items() if "mean" in n)
        result = _run(scheduled_mod, data)
        expected = data / np.sqrt((data * data).mean(-1, keepdims=True))
    else:
        (name, kernel), = _prim_funcs(relax.transform.LegalizeOps()(bb.get())).items()
        scheduled = rules.schedule_prim_func(kernel, rules._make_ctx(TARGET))
        lib = tvm.compile(tvm.IRModule({"main": scheduled.with_attr("global_symbol", "main")}), target=TARGET)
        res = tvm.runtime.tensor(np.zeros((1, 128, 1), "float32"))
        lib["main"](tvm.runtime.tensor(data), res)
        result, expected = res.numpy(), data.mean(-1, keepdims=True)
    assert scheduled.attrs[SCHEDULE_ATTR] == "reduction"
    assert "T.parallel(T.int64(128))" in scheduled.script()
    np.testing.assert_allclose(result, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["convnext_tiny", "transformer_encoder"])
def test_row_reductions_fused_after_an_anchor_run_as_rows(name: str) -> None:
    """A layer norm (or softmax) in one kernel with the conv or matmul before it (a one-anchor
    plan: ConvNeXt's depthwise conv + transpose + layer norm, an encoder's matmul + residual +
    layer norm, attention's scores + softmax): its statistics run as vectorized partial results
    per row, as they do in a kernel of their own, not as one scalar chain of strided loads from
    the anchor's output (v14). Those kernels, and only those, are kept under v15's key (v16's
    where the kernel also transposes the anchor's output); the plan's output is exact."""
    from conftest import load_cached

    from fusion_rl.compiler.build import compile_module
    from fusion_rl.compiler.verify import verify_executable
    from fusion_rl.fusion.apply import apply_plan
    from fusion_rl.fusion.rules import make_plan

    model = load_cached(name)
    provider = RulesSchedule()
    keys = {}
    for rule_set in ("tvm", "aggressive_1anchor"):
        fused = apply_plan(model.mod, make_plan(rule_set, model.mod, model.graph), model.graph)
        keys[rule_set] = {n: provider.kernel_key(f) for n, f in _prim_funcs(fused).items()}
    fused_rows = [n for n, key in keys["aggressive_1anchor"].items()
                  if key in ("rules:v15", "rules:v16", "rules:v17")]
    # tvm's plan has no such kernel: v12, v16 for its pooled head's one-row layer norm
    # (test_ragged_rows), v17 for its short rows (test_pad_epilogue).
    assert fused_rows and "rules:v15" not in set(keys["tvm"].values())
    scheduled = _prim_funcs(provider.schedule(fused, TARGET))
    # Every such kernel of a row per pixel (ConvNeXt) or per token: not the pooled head's one
    # row, which has nothing to run in parallel.
    many_rows = [n for n in fused_rows if "conv2d" in n or "layer_norm" in n and "mean" not in n
                 or "softmax" in n]
    assert many_rows
    for kernel in many_rows:
        func = scheduled[kernel]
        assert func.attrs[SCHEDULE_ATTR] == "microkernel", kernel
        sch = tvm.s_tir.Schedule(func)
        partial = [b for b in sch.get_child_blocks(sch.get_sblock("root"))
                   if sch.get(b).name_hint.endswith("_rf")]
        assert partial, f"{kernel}: no row reduction factored\n{func.script()}"
        for block in partial:
            loops = sch.get_loops(block)
            assert sch.get(loops[-1]).kind == tirx.ForKind.VECTORIZED
            assert sch.get(loops[0]).kind == tirx.ForKind.PARALLEL  # one row per iteration
    ex, *_ = compile_module(fused, TARGET, provider)
    verify_executable(ex, model)


def test_a_kernel_of_several_anchors_and_a_pooling_keeps_the_v12_schedule() -> None:
    """``aggressive`` on resnet_tiny: one kernel of every conv, the residual adds and the
    pooling. v14's materialized epilogues left a buffer used before its allocation there (the
    build failed); kernels of several anchors are scheduled anchor by anchor, as v12 did, and
    keep v12's key. Exact."""
    from conftest import load_cached

    from fusion_rl.compiler.build import compile_module
    from fusion_rl.compiler.verify import verify_executable
    from fusion_rl.fusion.apply import apply_plan
    from fusion_rl.fusion.rules import make_plan

    model = load_cached("resnet_tiny")
    provider = RulesSchedule()
    whole = apply_plan(model.mod, make_plan("aggressive", model.mod, model.graph), model.graph)
    assert [provider.kernel_key(f) for f in _prim_funcs(whole).values()] == ["rules:v12"]
    ex, *_ = compile_module(whole, TARGET, provider)
    verify_executable(ex, model)


def test_an_epilogue_fused_before_a_pooling_window_runs_once_per_element() -> None:
    """EfficientNet-B0's head in a one-anchor plan: conv + swish + its pooling, whose window
    (transformers' ``AvgPool2d(1280, ceil_mode=True)``) is far larger than the 7x7 map. Inlined
    into the window, the swish ran inside it per channel (3.5 ms for the kernel, 0.2 ms for the
    pooling alone); under v14 it is computed once per element at the conv's tile, and the
    pooling reads the result. Exact against numpy."""
    x = te.placeholder((1, 16, 7, 7), name="x")
    w = te.placeholder((32, 16, 1, 1), name="w")
    b = te.placeholder((1, 32, 1, 1), name="b")
    y = topi.add(topi.nn.conv2d_nchw(x, w, 1, 0, 1), b)
    out = topi.nn.pool2d(topi.multiply(y, topi.sigmoid(y)), (64, 64), (64, 64), (1, 1), (0, 0, 0, 0),
                         "avg", ceil_mode=True, layout="NCHW", count_include_pad=False)
    kernel = te.create_prim_func([x, w, b, out])
    # Keyed anew under v15; under v17's key then, for its 7-wide rows (test_pad_epilogue), and
    # under v19's since its 1x1 conv reads the input itself (test_blocks).
    assert RulesSchedule().kernel_key(kernel) == "rules:v19"
    scheduled = rules.schedule_prim_func(kernel, rules._make_ctx(TARGET))
    assert scheduled.attrs[SCHEDULE_ATTR] == "microkernel"
    sch = tvm.s_tir.Schedule(scheduled)
    pooling = str(sch.get(sch.get_sblock("pool_sum")).body)
    assert "sigmoid" not in pooling and "T_multiply" in pooling, pooling
    rng = np.random.default_rng(0)
    args = [rng.standard_normal(s).astype("float32") for s in ((1, 16, 7, 7), (32, 16, 1, 1), (1, 32, 1, 1))]
    lib = tvm.compile(tvm.IRModule({"main": scheduled.with_attr("global_symbol", "main")}), target=TARGET)
    res = tvm.runtime.tensor(np.zeros((1, 32, 1, 1), "float32"))
    lib["main"](*(tvm.runtime.tensor(a) for a in args), res)
    conv = np.einsum("nchw,kc->nkhw", args[0], args[1][:, :, 0, 0]) + args[2]
    swish = conv / (1 + np.exp(-conv))
    np.testing.assert_allclose(res.numpy(), swish.mean((2, 3), keepdims=True), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_rules_does_not_modify_input(block: Models) -> None:
    _, fused, _ = block
    snapshot = fused.clone()
    RulesSchedule().schedule(fused, TARGET)
    assert tvm_ffi.structural_equal(fused, snapshot)


def test_unschedulable_prim_func_is_left_as_is() -> None:
    """A kernel the rules cannot handle (here: no root block at all) comes back unchanged."""

    @T.prim_func(private=True)
    def lowered(a: T.Buffer((16,), "float32"), b: T.Buffer((16,), "float32")) -> None:
        for i in range(16):
            b[i] = a[i] + T.float32(1)

    mod = tvm.IRModule({"lowered": lowered})
    out = RulesSchedule().schedule(mod, TARGET)
    assert tvm_ffi.structural_equal(out["lowered"].body, lowered.body)
    reasons = fallbacks(schedule_report(out))
    assert list(reasons) == ["lowered"] and "microkernel" in reasons["lowered"], reasons


@pytest.mark.slow
def test_failing_rule_falls_back_per_kernel(
    cnn: Models, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If every anchor rule raises, conv kernels stay naive and say why in the schedule report;
    the others are still scheduled; nothing raises."""
    _, fused, x = cnn

    def broken(*_args: object, **_kwargs: object) -> set[str]:
        raise RuntimeError("simulated schedule failure")

    monkeypatch.setattr(tile, "schedule_anchor", broken)
    monkeypatch.setattr(rules.microkernel, "schedule_anchor", broken)
    out = RulesSchedule().schedule(fused, TARGET)
    before, after = _prim_funcs(fused), _prim_funcs(out)
    report = schedule_report(out)
    for name, func in after.items():
        if "conv2d" in name:
            assert tvm_ffi.structural_equal(func.body, before[name].body)
            # Every attempt named with the vector width it tried (AVX-512 hosts try 256 bits too).
            attempts = report[name].removeprefix("fallback: ").split("; ")
            assert attempts[0].startswith("microkernel at ") and attempts[-1].startswith("tile at "), report[name]
            assert all(a.endswith(" bits: simulated schedule failure") for a in attempts), report[name]
        else:
            assert not report[name].startswith("fallback"), (name, report[name])
    monkeypatch.undo()
    np.testing.assert_allclose(_run(out, x), _run(fused, x), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_micro_kernel_failure_falls_back_to_the_tile_rule_and_says_so(
    cnn: Models, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kernel the micro-kernel rule cannot take still gets the register-tile rule, and the
    report names both the rule used and why the better one failed."""
    _, fused, x = cnn

    def broken(*_args: object, **_kwargs: object) -> set[str]:
        raise RuntimeError("no fit")

    monkeypatch.setattr(rules.microkernel, "schedule_anchor", broken)
    out = RulesSchedule().schedule(fused, TARGET)
    report = schedule_report(out)
    convs = [n for n in report if "conv2d" in n]
    assert convs and all(report[n].startswith("tile (microkernel at ") and report[n].endswith(" bits: no fit)")
                         for n in convs), report
    assert not fallbacks(report)
    monkeypatch.undo()
    np.testing.assert_allclose(_run(out, x), _run(fused, x), rtol=1e-4, atol=1e-4)


def test_every_kernel_is_labelled() -> None:
    """Each PrimFunc carries the rule that scheduled it (microkernel for a large matmul)."""
    out = RulesSchedule().schedule(tvm.IRModule({"mm": _matmul(64, 64, 128)}), TARGET)
    assert schedule_report(out) == {"mm": "microkernel"}
    assert out["mm"].attrs[SCHEDULE_ATTR] == "microkernel"
