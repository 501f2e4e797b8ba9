"""The importer (:mod:`fusion_rl.graph.importer`) on hand-made ONNX graphs of one or two ops.

The CLI's answers to bad files are in ``tests/cli/test_bad_input.py``; these tests call the
functions themselves.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper
from tvm import relax

from fusion_rl.errors import ConfigError, DynamicShapeError, ModelImportError, UnsupportedOperatorError
from fusion_rl.graph import importer


def _model(dims=(2, 4), op: str = "Relu", domain: str = "", opset: int = 17, weight: bool = False,
           dtype=TensorProto.FLOAT) -> onnx.ModelProto:
    """``y = op(x)`` (or ``y = x + w`` with an initializer ``w`` of shape 4x4 when ``weight``)."""
    x = helper.make_tensor_value_info("x", dtype, list(dims))
    y = helper.make_tensor_value_info("y", dtype, list(dims))
    inits = []
    if weight:
        inits = [numpy_helper.from_array(np.ones((4, 4), np.float32), "w")]
        nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
    else:
        nodes = [helper.make_node(op, ["x"], ["y"], domain=domain)]
    imports = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    graph = helper.make_graph(nodes, "g", [x], [y], initializer=inits)
    return helper.make_model(graph, opset_imports=imports)


# ---- input shapes -----------------------------------------------------------------------------


def test_input_shapes_static_overridden_and_initializers_skipped():
    model = _model(weight=True)
    model.graph.input.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [4, 4]))  # old exporters
    assert importer.onnx_input_shapes(model) == {"x": (2, 4)}
    assert importer.onnx_input_shapes(model, {"x": [3, 4]}) == {"x": (3, 4)}


def test_input_shapes_dynamic_dim_needs_a_shape():
    model = _model(dims=("batch", 4))
    with pytest.raises(DynamicShapeError, match=r"input 'x' has dynamic shape \['batch', 4\].*--input-shape x="):
        importer.onnx_input_shapes(model)
    assert importer.onnx_input_shapes(model, {"x": (8, 4)}) == {"x": (8, 4)}


def test_input_shapes_unknown_name_lists_the_inputs():
    with pytest.raises(ConfigError, match="unknown input.*nope; the inputs are x$"):
        importer.onnx_input_shapes(_model(), {"nope": (1,)})


# ---- checks before import ---------------------------------------------------------------------


def test_check_size_counts_inputs_and_weights(monkeypatch):
    """x: 2x4 float (32 bytes) + w: 4x4 float (64 bytes) = 96 bytes, refused above half of free."""
    import psutil

    model = _model(weight=True)
    shapes = importer.onnx_input_shapes(model)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=192))
    importer.check_size(model, shapes)  # 96 <= 0.5 * 192
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=191))
    with pytest.raises(ModelImportError, match="inputs and weights need .* smaller --input-shape"):
        importer.check_size(model, shapes)


def test_check_opsets_refuses_a_future_opset():
    importer.check_opsets(_model(opset=onnx.defs.onnx_opset_version()))
    with pytest.raises(UnsupportedOperatorError, match="opset 999"):
        importer.check_opsets(_model(opset=999))


@pytest.mark.parametrize(
    "op, domain, words",
    [
        ("Relu", "com.evil", "com.evil:Relu (domain 'com.evil' is not imported)"),
        ("NoSuchOp", "", "NoSuchOp"),
    ],
)
def test_from_onnx_refuses_unknown_operators_naming_them(op, domain, words):
    with pytest.raises(UnsupportedOperatorError, match=f"unsupported ONNX operator.*{words}".replace("(", r"\(")
                       .replace(")", r"\)")):
        importer.from_onnx(_model(op=op, domain=domain))


@pytest.mark.parametrize(
    "name, content, words",
    [
        ("missing.onnx", None, "ONNX file not found"),
        ("", None, "it is not a file"),  # the folder itself
        ("empty.onnx", b"", "ONNX file is empty"),
        ("junk.onnx", b"\xff" * 64, "not a valid ONNX file"),
    ],
)
def test_load_onnx_bad_files(tmp_path, name, content, words):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ModelImportError, match=words):
        importer.load_onnx(path)


def test_load_onnx_round_trips_a_good_file(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_model(), path)
    assert [n.op_type for n in importer.load_onnx(path).graph.node] == ["Relu"]


# ---- import and legalization ------------------------------------------------------------------


def _call_tir_count(mod: tvm.IRModule) -> int:
    call_tir = tvm.ir.Op.get("relax.call_tir")
    return sum(isinstance(b.value, relax.Call) and b.value.op == call_tir
               for block in mod["main"].body.blocks for b in block.bindings)


def test_from_onnx_gives_a_legalized_module_with_pattern_kinds():
    mod = importer.from_onnx(_model(weight=True))
    assert importer.input_specs(mod) == [("x", (2, 4), "float32")]  # the weight became a constant
    assert _call_tir_count(mod) == 1
    funcs = [f for _, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert len(funcs) == 1 and "op_pattern" in funcs[0].attrs
    importer.check_legalized(mod)


def test_an_import_is_shared_by_content_and_shapes(monkeypatch):
    """A second import of the same bytes and shapes is the first module (not a re-import); other
    weights, other shapes or another file are imported anew, and the memo stays bounded."""
    monkeypatch.setattr(importer, "_IMPORTED", type(importer._IMPORTED)())
    first = importer.from_onnx(_model(weight=True))
    assert importer.from_onnx(_model(weight=True)) is first
    other = _model(weight=True)
    other.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.full((4, 4), 2, np.float32), "w"))
    assert importer.from_onnx(other) is not first
    dynamic = _model(dims=("batch", 4))
    a, b = importer.from_onnx(dynamic, {"x": (2, 4)}), importer.from_onnx(dynamic, {"x": (3, 4)})
    assert a is not b and importer.input_specs(b) == [("x", (3, 4), "float32")]
    assert importer.from_onnx(dynamic, {"x": (3, 4)}) is b
    # Bounded by bytes: room for two of these models, so the least recently used leaves.
    monkeypatch.setattr(importer, "IMPORT_MEMO_BYTES", 2 * len(dynamic.SerializeToString()) + 1)
    importer.from_onnx(_model(op="Neg"))
    assert len(importer._IMPORTED) <= 2 and importer.from_onnx(_model(weight=True)) is not first


def test_random_inputs_follow_the_signature_and_the_seed():
    mod = importer.from_onnx(_model(dims=(3, 5)))
    a, b, c = importer.random_inputs(mod, 0), importer.random_inputs(mod, 0), importer.random_inputs(mod, 1)
    assert [x.shape for x in a] == [(3, 5)] and a[0].dtype == np.float32
    assert np.array_equal(a[0], b[0]) and not np.array_equal(a[0], c[0])
    ints = importer.random_inputs(importer.from_onnx(_model(dims=(64,), op="Neg", dtype=TensorProto.INT32)))
    assert ints[0].dtype == np.int32 and ints[0].min() >= 0 and ints[0].max() < 8


def test_check_legalized_refuses_a_relax_op_and_a_missing_main():
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 4), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit_output(relax.op.add(x, x))
        bb.emit_func_output(y)
    with pytest.raises(UnsupportedOperatorError, match="operator 'relax.add' has no TIR lowering"):
        importer.check_legalized(bb.get())
    importer.check_legalized(importer.legalize(bb.get()))
    with pytest.raises(ModelImportError, match="no 'main' function"):
        importer.check_legalized(tvm.IRModule({}))


def test_legalize_failure_is_one_unsupported_operator_error(monkeypatch):
    @tvm.transform.module_pass(opt_level=0)
    def boom(mod, ctx):
        raise RuntimeError("InternalError: first line\nsecond line")

    monkeypatch.setattr(importer, "LEGALIZE_PASSES", (lambda: boom,))
    with pytest.raises(UnsupportedOperatorError, match="TVM could not legalize the model: .*first line") as exc:
        importer.legalize(tvm.IRModule({}))
    assert "second line" not in str(exc.value)


def test_from_torch_goes_through_onnx():
    import torch

    mod = importer.from_torch(torch.nn.ReLU(), (torch.zeros(2, 3),))
    assert importer.input_specs(mod)[0][1:] == ((2, 3), "float32") and _call_tir_count(mod) == 1


def test_fold_static_shapes_writes_a_folded_copy(tmp_path):
    """``Shape -> Gather -> Unsqueeze -> Concat -> Reshape``: a static shape subgraph, folded away."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 12])
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", "axes"], ["n1"]),
        helper.make_node("Concat", ["n1", "minus_one"], ["shape"], axis=0),
        helper.make_node("Reshape", ["x", "shape"], ["r"]),
        helper.make_node("Relu", ["r"], ["y"]),
    ]
    inits = [numpy_helper.from_array(np.array(0, np.int64), "zero"),
             numpy_helper.from_array(np.array([0], np.int64), "axes"),
             numpy_helper.from_array(np.array([-1], np.int64), "minus_one")]
    src, dst = tmp_path / "src.onnx", tmp_path / "dst.onnx"
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", [x], [y], initializer=inits),
                                opset_imports=[helper.make_opsetid("", 17)]), src)
    importer.fold_static_shapes(src, dst)
    ops = [n.op_type for n in onnx.load(str(dst)).graph.node]
    assert "Shape" not in ops and ops[-1] == "Relu", ops
    with pytest.raises(ModelImportError, match="could not fold the shapes of"):
        importer.fold_static_shapes(tmp_path / "missing.onnx", dst)


def test_path_types_accepted(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_model(), path)
    assert importer.input_specs(importer.from_onnx(str(path))) == importer.input_specs(importer.from_onnx(Path(path)))
