"""Weights packed at compile time: the packed copy is what the kernel reads, only constants are
packed, and a model with packed weights still matches ONNX Runtime."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from tvm import relax, tirx
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

from fusion_rl.compiler.build import compile_plan
from fusion_rl.compiler.schedules import make_schedule, prepack
from fusion_rl.compiler.schedules.prepack import WeightPack, packed_arg_specs, weight_packs
from fusion_rl.compiler.target import parse_target
from fusion_rl.compiler.verify import verify_executable
from fusion_rl.fusion.apply import apply_plan
from fusion_rl.fusion.rules import make_plan
from fusion_rl.graph.model import load_model


@I.ir_module(s_tir=True)
class _Kernels:
    """Two kernels equal but for their names (Q and K projections); ``q`` is called twice, the
    second time with ``v``, which the tests bind as a constant or leave computed."""

    @T.prim_func(private=True, s_tir=True)
    def q(A: T.Buffer((32, 64), "float32"), B: T.Buffer((64, 64), "float32"),
          C: T.Buffer((32, 64), "float32")):
        for i, j, k in T.grid(32, 64, 64):
            with T.sblock("C"):
                vi, vj, vk = T.axis.remap("SSR", [i, j, k])
                with T.init():
                    C[vi, vj] = T.float32(0)
                C[vi, vj] = C[vi, vj] + A[vi, vk] * B[vk, vj]

    @T.prim_func(private=True, s_tir=True)
    def k(A: T.Buffer((32, 64), "float32"), B: T.Buffer((64, 64), "float32"),
          C: T.Buffer((32, 64), "float32")):
        for i, j, k in T.grid(32, 64, 64):
            with T.sblock("C"):
                vi, vj, vk = T.axis.remap("SSR", [i, j, k])
                with T.init():
                    C[vi, vj] = T.float32(0)
                C[vi, vj] = C[vi, vj] + A[vi, vk] * B[vk, vj]

    @R.function
    def main(x: R.Tensor((32, 64), "float32"), wq: R.Tensor((64, 64), "float32"),
             wk: R.Tensor((64, 64), "float32"), v: R.Tensor((64, 64), "float32")):
        cls = _Kernels
        with R.dataflow():
            a = R.call_tir(cls.q, (x, wq), out_ty=R.Tensor((32, 64), "float32"))
            b = R.call_tir(cls.k, (a, wk), out_ty=R.Tensor((32, 64), "float32"))
            c = R.call_tir(cls.q, (b, v), out_ty=R.Tensor((32, 64), "float32"))
            R.output(c)
        return c


def _weights(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.standard_normal((64, 64)).astype("float32") for _ in range(n)]


def test_equal_kernels_keep_their_names_and_weights() -> None:
    """Per-kernel times map back to plan groups by kernel name: packing must not merge two
    equal kernels (a bench_vit plan lost its K projection that way, and its kernels could not
    be timed)."""
    wq, wk, v = _weights(3)
    mod = relax.transform.BindParams("main", {"wq": wq, "wk": wk, "v": v})(_Kernels)
    out = make_schedule("rules").schedule(mod, parse_target("host").to_tvm())
    names = {gv.name_hint for gv, f in out.functions_items() if isinstance(f, tirx.PrimFunc)}
    assert names == {"q", "k"} and all(weight_packs(out[n]) for n in names)
    calls = [(c.args[0].name_hint, c.args[1].fields[1].value.numpy())
             for c in (b.value for blk in out["main"].body.blocks for b in blk.bindings)]
    pack = weight_packs(out["q"])[1]
    assert [n for n, _ in calls] == ["q", "k", "q"]
    for (_, got), w in zip(calls, (wq, wk, v)):
        np.testing.assert_array_equal(got, pack.pack(w))


def test_layout_free_needs_a_constant_at_every_call_site() -> None:
    wq, wk, v = _weights(3)
    everywhere = relax.transform.BindParams("main", {"wq": wq, "wk": wk, "v": v})(_Kernels)
    once = relax.transform.BindParams("main", {"wq": wq, "wk": wk})(_Kernels)
    assert list(prepack.mark_layout_free(everywhere)["q"].attrs[prepack.LAYOUT_FREE_ATTR]) == [1]
    marked = prepack.mark_layout_free(once)["q"]
    assert marked.attrs is None or prepack.LAYOUT_FREE_ATTR not in marked.attrs
    # ... and a kernel without layout-free parameters keeps its weights' layout.
    scheduled = make_schedule("rules").schedule(once, parse_target("host").to_tvm())
    assert not weight_packs(scheduled["q"]) and weight_packs(scheduled["k"])


@pytest.mark.parametrize("shape,dim,vec", [((6, 32), 1, 8), ((32, 3, 2, 2), 0, 16), ((4, 24, 5), 1, 8)])
def test_pack_is_what_the_index_map_reads(shape, dim, vec) -> None:
    pack = WeightPack(dim, vec)
    array = np.random.default_rng(0).standard_normal(shape).astype("float32")
    packed = pack.pack(array)
    assert packed.shape == pack.packed_shape(shape)
    index_map = pack.index_map(len(shape))
    for index in np.ndindex(*shape):
        mapped = [int(e) for e in index_map.map_indices([tirx.const(i, "int64") for i in index])]
        assert packed[tuple(mapped)] == array[index]


class _DenseConv(nn.Module):
    """conv + BN + ReLU, then a dense layer over the channels: both anchors with constant
    weights, at sizes whose output channels fill whole vectors."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 32, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(32)
        self.dense = nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.conv(x)))
        return self.dense(y.permute(0, 2, 3, 1))


def test_constant_weights_are_packed_and_match_onnx_runtime(tmp_path, monkeypatch) -> None:
    torch.manual_seed(0)
    module = _DenseConv().eval()
    module.bn.running_mean.uniform_(-0.5, 0.5)
    module.bn.running_var.uniform_(0.5, 2.0)
    path = tmp_path / "dense_conv.onnx"
    torch.onnx.export(module, (torch.randn(1, 8, 8, 8),), str(path), input_names=["input"],
                      dynamo=False)
    model = load_model(str(path))
    target = parse_target("host").to_tvm()
    plan = make_plan("tvm", model.mod, model.graph)
    fused = apply_plan(model.mod, plan, model.graph)

    scheduled = make_schedule("rules").schedule(fused, target)
    packed = {gv.name_hint: weight_packs(f) for gv, f in scheduled.functions_items()
              if isinstance(f, tirx.PrimFunc) and weight_packs(f)}
    assert any("conv2d" in n for n in packed) and any("matmul" in n for n in packed), packed
    # Every call site passes a constant already in the kernel's packed parameter shape.
    for block in scheduled["main"].body.blocks:
        for binding in block.bindings:
            call = binding.value
            if isinstance(call, relax.Call) and call.args[0].name_hint in packed:
                name = call.args[0].name_hint
                for i in packed[name]:
                    arg = call.args[1].fields[i]
                    original = [f for f in _call_args(fused, name)][i]
                    assert tuple(arg.value.numpy().shape) == packed[name][i].packed_shape(
                        tuple(original.value.numpy().shape))
                    np.testing.assert_array_equal(
                        arg.value.numpy(), packed[name][i].pack(original.value.numpy()))
                specs = tuple((tuple(int(d) for d in a.ty.shape.values), "float32")
                              for a in _call_args(fused, name))
                got = packed_arg_specs(scheduled[name], specs)
                assert got[0] == specs[0] and all(
                    got[i][0] == tuple(call.args[1].fields[i].value.numpy().shape)
                    for i in packed[name])

    compiled = compile_plan(model, plan, target, make_schedule("rules"))
    verify_executable(compiled.executable, model, "packed weights")  # raises if wrong

    # Without layout-free parameters nothing is packed: the check above can fail.
    monkeypatch.setattr(prepack, "mark_layout_free", lambda mod: mod)
    unpacked = make_schedule("rules").schedule(fused, target)
    assert not any(weight_packs(f) for _, f in unpacked.functions_items()
                   if isinstance(f, tirx.PrimFunc))


def _call_args(mod, name: str) -> list:
    for block in mod["main"].body.blocks:
        for binding in block.bindings:
            call = binding.value
            if isinstance(call, relax.Call) and call.args[0].name_hint == name:
                return list(call.args[1].fields)
    raise AssertionError(f"no call of {name}")
