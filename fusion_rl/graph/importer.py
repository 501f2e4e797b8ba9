"""Import a model (ONNX file or ``torch.nn.Module``) into a legalized TVM Relax module.

After :func:`legalize`, ``main`` holds one dataflow block in which every operator is a
``R.call_tir`` to a PrimFunc annotated with its TVM pattern kind (``op_pattern``). That block is
what :mod:`fusion_rl.graph.opgraph` turns into an operator graph and what
:mod:`fusion_rl.fusion` partitions.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import math
import os
import re
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnx
import tvm
from tvm import relax

from fusion_rl.errors import ConfigError, DynamicShapeError, ModelImportError, UnsupportedOperatorError, first_line
from fusion_rl.graph.fast_math import FAST_MATH_LEGALIZE

#: Passes that turn an imported Relax module into one ``call_tir`` per operator, with pattern
#: kinds, constants folded. This is the prefix of TVM's CPU pipeline *before* FuseOps.
LEGALIZE_PASSES = (
    relax.transform.DecomposeOpsForInference,
    # Transcendentals as vectorizable approximations (see fusion_rl.graph.fast_math).
    functools.partial(relax.transform.LegalizeOps, FAST_MATH_LEGALIZE),
    relax.transform.AnnotateTIROpPattern,
    relax.transform.FoldConstant,
    # Drops alias bindings (``gv = lv``) the ONNX frontend leaves after a final LayerNorm.
    relax.transform.CanonicalizeBindings,
    relax.transform.DeadCodeElimination,
)


def legalize(mod: tvm.IRModule) -> tvm.IRModule:
    """Lower high-level Relax ops to ``call_tir`` and annotate PrimFunc pattern kinds."""
    seq = tvm.transform.Sequential([p() for p in LEGALIZE_PASSES], name="fusion_rl.Legalize")
    try:
        with tvm.transform.PassContext(opt_level=3):
            mod = seq(mod)
    except Exception as exc:  # TVM raises its own internal error types
        raise UnsupportedOperatorError(
            f"TVM could not legalize the model: {first_line(exc)}"
        ) from None
    check_legalized(mod)
    return mod


#: Refuse models whose inputs and weights alone need more than this share of free memory.
MEMORY_FRACTION = 0.5


def check_size(model: onnx.ModelProto, shape_dict: Mapping[str, Sequence[int]]) -> None:
    """Refuse, up front and in one line, a model too large for this machine's memory."""
    import psutil

    dtype_bytes = {1: 4, 2: 1, 3: 1, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 16: 2}
    elem = {i.name: dtype_bytes.get(i.type.tensor_type.elem_type, 4) for i in model.graph.input}
    need = sum(math.prod(s) * elem.get(n, 4) for n, s in shape_dict.items())
    need += sum(
        math.prod(t.dims) * dtype_bytes.get(t.data_type, 4) for t in model.graph.initializer
    )
    free = psutil.virtual_memory().available
    if need > MEMORY_FRACTION * free:
        raise ModelImportError(
            f"the model's inputs and weights need {need / 2**30:.1f} GiB, more than half the "
            f"{free / 2**30:.1f} GiB of free memory; use smaller --input-shape values"
        )


def load_onnx(path: str | os.PathLike) -> onnx.ModelProto:
    """Read and check an ONNX file, with a one-line error for anything malformed."""
    path = Path(path)
    try:
        os.stat(path)
    except FileNotFoundError:
        raise ModelImportError(f"ONNX file not found: {path}") from None
    except OSError as exc:  # a symlink loop, a file where a folder should be, no permission
        raise ModelImportError(f"cannot read ONNX file {path}: {exc.strerror or exc}") from None
    if not path.is_file():
        raise ModelImportError(f"ONNX file not found: {path} (it is not a file)")
    if path.stat().st_size == 0:
        raise ModelImportError(f"ONNX file is empty: {path}")
    try:
        model = onnx.load(str(path))
    except Exception as exc:
        raise ModelImportError(f"{path} is not a valid ONNX file: {first_line(exc)}") from None
    if not model.graph.node:
        raise ModelImportError(f"{path} has no operators (empty or non-ONNX protobuf)")
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise ModelImportError(f"{path} is malformed ONNX: {first_line(exc)}") from None
    return model


def fold_static_shapes(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Write to ``dst`` a copy of ONNX file ``src`` with its static shape subgraphs folded.

    An exporter that computes padding or reshapes from tensor shapes (``Shape -> Gather ->
    ... -> Pad``, as TensorFlow-style "same" padding does) leaves subgraphs that TVM's ONNX
    frontend imports as dynamic and rejects ("Dynamic pads are not supported yet"), although
    every shape is static. ONNX Runtime's *basic* graph optimizations fold them into constants:
    constant folding, redundant-node elimination and semantics-preserving fusions (such as a
    constant Pad into the next Conv's pads), all of which emit standard ONNX operators only.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.optimized_model_filepath = str(dst)
    opts.intra_op_num_threads = 1
    try:
        ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelImportError(f"ONNX Runtime could not fold the shapes of {src}: {first_line(exc)}") from None


def onnx_input_shapes(
    model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]] | None = None
) -> dict[str, tuple[int, ...]]:
    """The concrete shape of each graph input; dynamic dims must be given in ``shapes``."""
    shapes = dict(shapes or {})
    initializers = {i.name for i in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in initializers]
    unknown = sorted(set(shapes) - set(inputs))
    if unknown:
        raise ConfigError(
            f"--input-shape names unknown input(s) {', '.join(unknown)}; the inputs are {', '.join(inputs)}"
        )
    result: dict[str, tuple[int, ...]] = {}
    for inp in model.graph.input:
        if inp.name in initializers:
            continue
        if inp.name in shapes:
            result[inp.name] = tuple(int(d) for d in shapes[inp.name])
            continue
        dims = inp.type.tensor_type.shape.dim
        if any(not d.HasField("dim_value") or d.dim_value <= 0 for d in dims):
            shown = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]
            raise DynamicShapeError(
                f"input '{inp.name}' has dynamic shape {shown}; give concrete shapes, "
                f"e.g. --input-shape {inp.name}=1,3,224,224"
            )
        result[inp.name] = tuple(d.dim_value for d in dims)
    return result


def from_onnx(
    model: onnx.ModelProto | str | os.PathLike,
    shapes: Mapping[str, Sequence[int]] | None = None,
) -> tvm.IRModule:
    """Import an ONNX model into a legalized Relax module (weights become constants)."""
    if not isinstance(model, onnx.ModelProto):
        model = load_onnx(model)
    shape_dict = onnx_input_shapes(model, shapes)
    check_size(model, shape_dict)
    check_opsets(model)
    unsupported = _unsupported_onnx_ops(model)
    if unsupported:
        raise UnsupportedOperatorError(
            f"unsupported ONNX operator(s): {', '.join(sorted(unsupported))} (TVM's ONNX "
            f"frontend has no converter for them)"
        )
    try:
        blob = model.SerializeToString()
    except ValueError:  # over protobuf's 2 GB: imported every time, never kept
        blob = b""
    key = (hashlib.sha256(blob).hexdigest(), tuple(sorted(shape_dict.items()))) if blob else None
    if key in _IMPORTED:
        _IMPORTED.move_to_end(key)
        return _IMPORTED[key][0]
    from tvm.relax.frontend.onnx import from_onnx as _tvm_from_onnx

    # The frontend print()s "Error converting operator <op>, with inputs: ..." before it
    # re-raises, to stdout (which would corrupt --json output); its exception never names the
    # op. Capture the print and put the op into the one-line error instead.
    printed = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(printed):
            warnings.simplefilter("ignore")  # the frontend warns about every renamed input
            mod = _tvm_from_onnx(model, shape_dict=shape_dict, keep_params_in_input=False)
    except Exception as exc:
        failed = re.search(r"Error converting operator (\S+?), with inputs", printed.getvalue())
        where = f" on operator {failed.group(1)}" if failed else ""
        raise ModelImportError(f"TVM's ONNX frontend failed{where}: {first_line(exc)}") from None
    mod = legalize(mod)
    if key is None:
        return mod
    _IMPORTED[key] = (mod, len(blob))
    while len(_IMPORTED) > 1 and sum(size for _, size in _IMPORTED.values()) > IMPORT_MEMO_BYTES:
        _IMPORTED.popitem(last=False)
    return mod


#: Legalized modules (and the size of their ONNX bytes) by (digest of those bytes, input
#: shapes), least recently used first. Importing and legalizing takes from half a second (tiny
#: models) to 20 s (bench sizes), and one process often loads a model several times: the CLI,
#: the env and the pass each load it. Relax modules are immutable, so every caller can share
#: one. The memo holds modules of at most this many ONNX bytes (their weights, about), and
#: always the newest.
_IMPORTED: OrderedDict[tuple, tuple[tvm.IRModule, int]] = OrderedDict()
IMPORT_MEMO_BYTES = 512 * 2**20


#: Operators whose output depends only on their inputs' *shapes*: with static input shapes they
#: are constants, whatever the values.
SHAPE_OPS = frozenset({"Shape", "Size"})


def has_static_subgraphs(model: onnx.ModelProto) -> bool:
    """True if some operator of ``model``'s main graph computes a constant: all its inputs are
    initializers, ``Constant`` outputs, shapes (:data:`SHAPE_OPS`) or such computed constants.

    Exporters leave these where they compute an attribute from shapes or from constants they
    could not fold (the TorchScript exporter leaves TF "same" padding as ``ConstantOfShape ->
    Concat -> Slice -> ... -> Pad``, since it folds no ``Slice`` with steps other than 1), and
    TVM's frontend imports them as dynamic. :func:`fold_for_import` turns them into constants.
    """
    static = {init.name for init in model.graph.initializer}
    for node in model.graph.node:  # ONNX graphs are stored in topological order
        if node.op_type == "Constant":
            static.update(node.output)
        elif node.op_type in SHAPE_OPS or (
            node.input and all(not i or i in static for i in node.input)
        ):
            return True
    return False


def fold_for_import(
    model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]] | None = None
) -> onnx.ModelProto:
    """A copy of ``model`` with its inputs fixed to concrete shapes and its shape subgraphs
    folded by ONNX Runtime (:func:`fold_static_shapes`), for TVM to import.

    The inputs are fixed first because ONNX Runtime folds ``Shape`` only where the shape is
    known; a file exported with dynamic axes, imported at ``shapes``, then folds as well.
    The caller keeps ``model`` itself as the reference that verifies compiled plans.
    """
    import tempfile

    shape_dict = onnx_input_shapes(model, shapes)
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for inp in fixed.graph.input:
        if inp.name in shape_dict:
            dims = inp.type.tensor_type.shape.dim
            del dims[:]
            for d in shape_dict[inp.name]:
                dims.add().dim_value = d
    with tempfile.TemporaryDirectory(prefix="fusion_rl-fold-") as tmp:
        src, dst = Path(tmp) / "model.onnx", Path(tmp) / "folded.onnx"
        onnx.save(fixed, str(src))
        fold_static_shapes(src, dst)
        return onnx.load(str(dst))


def from_torch(module: "torch.nn.Module", example_inputs: Sequence["torch.Tensor"]) -> tvm.IRModule:
    """Import a ``torch.nn.Module`` by exporting it to ONNX in memory (static shapes).

    ONNX is the one import path we verify against a second runtime (ONNX Runtime), so torch
    models go through it too rather than through ``relax.frontend.torch``.
    """
    return from_onnx(torch_to_onnx(module, example_inputs))


def torch_to_onnx(module: "torch.nn.Module", example_inputs: Sequence["torch.Tensor"]) -> onnx.ModelProto:
    """Export a module to an in-memory ONNX model with the legacy (static-shape) exporter."""
    import torch

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                module.eval(), tuple(example_inputs), buf, dynamo=False, opset_version=17
            )
        except Exception as exc:
            raise ModelImportError(f"torch.onnx.export failed: {first_line(exc)}") from None
    return onnx.load_from_string(buf.getvalue())


def input_specs(mod: tvm.IRModule) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, dtype) of each parameter of ``main``."""
    specs = []
    for param in mod["main"].params:
        sinfo = param.ty
        specs.append((param.name, tuple(int(d) for d in sinfo.shape), str(sinfo.dtype)))
    return specs


def random_inputs(mod: tvm.IRModule, seed: int = 0) -> list[np.ndarray]:
    """Deterministic random inputs matching ``main``'s signature."""
    rng = np.random.default_rng(seed)
    arrays = []
    for _, shape, dtype in input_specs(mod):
        if dtype.startswith("int"):
            arrays.append(rng.integers(0, 8, size=shape).astype(dtype))
        else:
            arrays.append(rng.standard_normal(shape, dtype=np.float32).astype(dtype, copy=False))
    return arrays


# --------------------------------------------------------------------------------------------


#: The standard ONNX domain (both spellings).
_STANDARD_DOMAINS = ("", "ai.onnx")
#: Operators of ONNX Runtime's contrib domain that TVM's frontend converts as such; every other
#: operator of that domain is refused like any unknown domain.
_CONTRIB_OPS = {"com.microsoft": frozenset(
    {"BiasGelu", "EmbedLayerNormalization", "FastGelu", "MatMulInteger16", "SkipLayerNormalization"})}


def check_opsets(model: onnx.ModelProto) -> None:
    """Refuse an opset newer than the installed ``onnx`` defines (TVM would silently pick the
    newest converter it has, which may mean something else), naming it."""
    newest = onnx.defs.onnx_opset_version()
    for opset in model.opset_import:
        if opset.domain in _STANDARD_DOMAINS and not 1 <= opset.version <= newest:
            raise UnsupportedOperatorError(
                f"the model imports ONNX opset {opset.version}, but this onnx ({onnx.__version__}) "
                f"and TVM support opsets 1..{newest}; re-export it with an older opset"
            )


def _unsupported_onnx_ops(model: onnx.ModelProto) -> set[str]:
    """Operators TVM cannot convert, and every operator outside the standard domain that is not
    a known contrib op: TVM's frontend ignores the domain, so ``com.evil:Relu`` would become
    the standard ``Relu``."""
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    known = set(_get_convert_map())
    bad = set()
    for node in model.graph.node:
        if node.domain in _STANDARD_DOMAINS:
            if node.op_type not in known or node.op_type in _CONTRIB_OPS["com.microsoft"]:
                bad.add(node.op_type)
        elif node.op_type not in _CONTRIB_OPS.get(node.domain, ()) or node.op_type not in known:
            bad.add(f"{node.domain}:{node.op_type} (domain {node.domain!r} is not imported)")
    return bad


def check_legalized(mod: tvm.IRModule) -> None:
    """``main`` must exist and be ``call_tir`` ops plus tuple glue (what legalization makes)."""
    if "main" not in [gv.name_hint for gv in mod.get_global_vars()]:
        raise ModelImportError("the module has no 'main' function")
    main = mod["main"]
    call_tir = tvm.ir.Op.get("relax.call_tir")
    has_op = False
    for block in getattr(main.body, "blocks", []):
        for binding in block.bindings:
            value = binding.value
            if isinstance(value, relax.Call) and value.op == call_tir:
                has_op = True
                continue
            if isinstance(value, (relax.TupleGetItem, relax.Tuple, relax.Var, tvm.ir.expr.Constant)):
                continue
            if isinstance(binding, relax.MatchCast):
                raise DynamicShapeError(
                    "the model has a shape-dependent MatchCast after import; give concrete "
                    "input shapes"
                )
            op = value.op.name if isinstance(value, relax.Call) and hasattr(value.op, "name") else type(value).__name__
            raise UnsupportedOperatorError(
                f"operator '{op}' has no TIR lowering (LegalizeOps left it as a Relax op)"
            )
    if not has_op:
        raise ModelImportError("the model has no operators left to fuse after legalization")

