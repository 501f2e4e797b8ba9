"""A model ready for fusion: legalized Relax module, OpGraph, example inputs, reference source.

:func:`load_model` accepts what the CLI accepts as MODEL: a zoo name or a path to an ``.onnx``
file. :func:`model_from_torch` takes a ``torch.nn.Module`` with example inputs. Every model
carries a :class:`ModelRef`, a picklable recipe with which a measurement worker loads it again.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnx

import tvm

from fusion_rl.errors import ModelImportError, UnknownModelError, require_extra
from fusion_rl.graph import importer, zoo
from fusion_rl.graph.opgraph import OpGraph, extract_opgraph


@dataclass(frozen=True)
class ModelRef:
    """How to load a model again in another process.

    ``kind`` is ``"zoo"`` (``spec`` = name), ``"onnx"`` (``spec`` = path) or ``"onnx_bytes"``
    (``data`` = a serialized ONNX model, for models built in memory from torch).
    """

    kind: str
    spec: str = ""
    seed: int = 0
    shapes: tuple[tuple[str, tuple[int, ...]], ...] | None = None
    data: bytes | None = field(default=None, repr=False)

    def load(self) -> "Model":
        if self.kind == "zoo":
            return load_zoo_model(self.spec, seed=self.seed)
        if self.kind == "onnx":
            return load_onnx_model(self.spec, shapes=dict(self.shapes or ()), seed=self.seed)
        if self.kind == "onnx_bytes" and self.data is not None:
            return _from_onnx_model(onnx.load_from_string(self.data), self.spec, "torch", self)
        raise ModelImportError(f"cannot load model reference {self}")


@dataclass
class Model:
    """Everything the layers above need to know about one model."""

    name: str
    mod: tvm.IRModule  #: legalized: ``main`` is one dataflow block of ``call_tir``
    graph: OpGraph
    inputs: list[np.ndarray]  #: deterministic example inputs, in ``main``'s parameter order
    ref: ModelRef
    onnx_model: onnx.ModelProto | None = field(default=None, repr=False)
    source: str = "onnx"  #: "zoo", "onnx" or "torch"
    #: Cached reference outputs and where they came from (``"onnxruntime"`` or ``"tvm-unfused"``);
    #: filled by :func:`fusion_rl.compiler.verify.reference_outputs` on first use.
    reference: tuple[list[np.ndarray], str] | None = field(default=None, repr=False, compare=False)

    @property
    def fingerprint(self) -> str:
        return self.graph.fingerprint

    def torch_module(self) -> tuple["torch.nn.Module", tuple] | None:
        """The (module, inputs) this model came from, for torch baselines; None for ONNX files."""
        if self.ref.kind == "zoo":
            return zoo.build_torch(self.ref.spec, seed=self.ref.seed)
        return None


def load_model(
    spec: str | os.PathLike,
    shapes: Mapping[str, Sequence[int]] | None = None,
    seed: int = 0,
) -> Model:
    """Load a zoo model by name, or an ONNX file by path."""
    text = str(spec)
    if text in zoo.MODELS:
        return load_zoo_model(text, seed=seed)
    path = Path(text)
    if path.suffix.lower() == ".onnx" or path.exists():
        return load_onnx_model(path, shapes=shapes, seed=seed)
    raise UnknownModelError(
        f"'{text}' is neither a zoo model nor an existing file; zoo models: "
        f"{', '.join(sorted(zoo.MODELS))}"
    )


def load_zoo_model(name: str, seed: int = 0) -> Model:
    if zoo.get_entry(name).source == "transformers":
        require_extra(f"zoo model {name}", "hf", "transformers")
    onnx_model = importer.load_onnx(zoo.export_onnx(name, seed=seed))
    # TVM may need a shape-folded copy (zoo.import_path); ONNX Runtime keeps the original export
    # as the reference, so the folding is verified with every compiled plan.
    path = zoo.import_path(name, seed=seed)
    tvm_source = importer.load_onnx(path) if zoo.get_entry(name).fold_shapes else onnx_model
    model = _from_onnx_model(onnx_model, name, "zoo", ModelRef("zoo", name, seed),
                             tvm_source=tvm_source)
    # Token ids must lie inside the vocabulary: use the zoo's inputs, not random ones.
    model.inputs = [np.ascontiguousarray(a) for a in zoo.example_inputs(name, seed=seed).values()]
    _check_signature(model)
    return model


def load_onnx_model(
    path: str | os.PathLike, shapes: Mapping[str, Sequence[int]] | None = None, seed: int = 0
) -> Model:
    shapes_key = tuple(sorted((k, tuple(int(d) for d in v)) for k, v in (shapes or {}).items()))
    onnx_model = importer.load_onnx(path)  # first: it refuses a symlink loop, which resolve() raises on
    ref = ModelRef("onnx", str(Path(path).resolve()), seed, shapes_key or None)
    # Exporters compute pads and reshape targets from shapes or leave constant subgraphs
    # unfolded (TF "same" padding), which TVM's frontend imports as dynamic; TVM gets a copy
    # with those folded, and ONNX Runtime verifies against the file itself. Files without
    # such subgraphs are imported as they are, so their operator graphs stay as exported.
    tvm_source = None
    if importer.has_static_subgraphs(onnx_model):
        tvm_source = importer.fold_for_import(onnx_model, shapes)
    return _from_onnx_model(onnx_model, Path(path).stem, "onnx", ref, shapes, tvm_source)


def model_from_torch(
    module: "torch.nn.Module", example_inputs: Sequence["torch.Tensor"], name: str = "torch_model"
) -> Model:
    """Import a ``torch.nn.Module`` (exported to ONNX in memory with static shapes)."""
    onnx_model = importer.torch_to_onnx(module, example_inputs)
    ref = ModelRef("onnx_bytes", name, data=onnx_model.SerializeToString())
    model = _from_onnx_model(onnx_model, name, "torch", ref)
    model.inputs = [t.detach().cpu().numpy() for t in example_inputs]
    _check_signature(model)
    return model


def _from_onnx_model(
    onnx_model: onnx.ModelProto,
    name: str,
    source: str,
    ref: ModelRef,
    shapes: Mapping[str, Sequence[int]] | None = None,
    tvm_source: onnx.ModelProto | None = None,
) -> Model:
    """``tvm_source`` (default ``onnx_model``) is imported into TVM; ``onnx_model`` is kept as
    the model's ONNX graph, which ONNX Runtime runs as the reference."""
    mod = importer.from_onnx(tvm_source if tvm_source is not None else onnx_model, shapes=shapes)
    return Model(
        name=name,
        mod=mod,
        graph=extract_opgraph(mod, name),
        inputs=importer.random_inputs(mod, ref.seed),
        ref=ref,
        onnx_model=onnx_model,
        source=source,
    )


def _check_signature(model: Model) -> None:
    specs = importer.input_specs(model.mod)
    if len(specs) != len(model.inputs) or any(
        tuple(a.shape) != s[1] for a, s in zip(model.inputs, specs)
    ):
        raise ModelImportError(
            f"{model.name}: example inputs {[a.shape for a in model.inputs]} do not match the "
            f"imported signature {[s[1] for s in specs]}"
        )
