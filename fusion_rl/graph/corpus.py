"""The import corpus: real ``transformers`` architectures exported as a user would export them.

The zoo (:mod:`fusion_rl.graph.zoo`) holds models shaped for the fusion study; this corpus holds
architectures chosen for what their *exports* contain, to check that any real ONNX file imports:
TensorFlow-style "same" padding computed from shapes, depthwise and grouped convolutions,
squeeze-excite, RMSNorm, rotary embeddings, grouped-query attention and causal masks. Each is
built from a ``transformers`` config with random weights (no download) and exported with both
of torch's exporters (:data:`EXPORTERS`). The entries reuse the zoo's builders and seeding, but
are not in the zoo's listing: they are test inputs, not models to train on.

Every entry has ``tiny`` sizes (tests; a second or so per export) and some have ``real`` ones
(the published widths at 224x224), which ``scripts/onnx_corpus.py`` exports too.

Example
-------
>>> from fusion_rl.graph import corpus
>>> path = corpus.export("llama", "dynamo")  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fusion_rl.errors import ConfigError, ModelImportError, first_line
from fusion_rl.graph import zoo
from fusion_rl.graph.zoo import hf
from fusion_rl.graph.zoo.blocks import Built, HFTensorOutput, ZooEntry, image_input, make_entry
from fusion_rl.io import output_dir, write_atomic

if TYPE_CHECKING:
    from fusion_rl.graph.model import Model

#: torch's two ONNX exporters: ``torch.onnx.export(dynamo=False)`` (TorchScript tracing) and
#: ``dynamo=True`` (torch.export + onnxscript), the one torch now recommends.
EXPORTERS = ("torchscript", "dynamo")
#: The dynamo exporter's own lowest opset; asking for 17 makes it convert down, a step that
#: users do not take and that would hide what its graphs really contain.
DYNAMO_OPSET = 18
#: The size presets of an entry.
SIZES = ("tiny", "real")


def build_hf_efficientnet(
    batch: int, image_size: int, width_percent: int, depth_percent: int
) -> Built:
    """EfficientNet: MBConv blocks with depthwise convs, squeeze-excite and SiLU, and the TF
    "same" padding of the published checkpoints (a ZeroPad2d computed per strided block)."""
    import transformers
    from transformers.models.efficientnet import modeling_efficientnet

    config = transformers.EfficientNetConfig(
        num_channels=3, image_size=image_size, width_coefficient=width_percent / 100.0,
        depth_coefficient=depth_percent / 100.0,
    )
    # The top conv widens to round_filters(1280) but its BatchNorm takes hidden_dim: the two
    # agree only if hidden_dim is set to match (B0's 1280 at width 1.0).
    config.hidden_dim = modeling_efficientnet.round_filters(config, 1280)
    model = HFTensorOutput(transformers.EfficientNetModel(config), "pooler_output")
    return model, (image_input(batch, image_size),)


@dataclass(frozen=True)
class CorpusEntry:
    """One architecture of the corpus.

    Attributes
    ----------
    name:
        The corpus name (``"llama"``); the zoo entry is ``corpus_<name>``, which no zoo model is.
    entry:
        The model as a :class:`~fusion_rl.graph.zoo.ZooEntry` (builder, ``tiny`` sizes as its
        defaults, input names), so the zoo's seeding and cache keys apply unchanged.
    covers:
        The export features this architecture is here for (``"tf_padding"``, ``"rope"``...).
    real:
        Published sizes, or None where the architecture is only in the corpus at tiny size.
    """

    name: str
    entry: ZooEntry
    covers: tuple[str, ...]
    real: Mapping[str, Any] | None = field(default=None)

    def sizes(self, preset: str) -> dict[str, Any]:
        """The builder's sizes for ``preset`` (one of :data:`SIZES`)."""
        if preset == "tiny":
            return dict(self.entry.defaults)
        if preset == "real" and self.real is not None:
            return dict(self.real)
        raise ConfigError(f"corpus model {self.name!r} has no {preset!r} sizes")


def _entry(name: str, builder, tiny: Mapping[str, Any], covers: tuple[str, ...],
           real: Mapping[str, Any] | None = None, text: bool = False) -> CorpusEntry:
    inputs = ("input_ids",) if text else ("input",)
    zoo_entry = make_entry(f"corpus_{name}", "hf", f"import corpus: {name}", builder, tiny,
                           source="transformers", input_names=inputs)
    return CorpusEntry(name, zoo_entry, covers, real)


_DECODER = {"batch": 1, "seq": 16, "vocab": 64, "hidden": 32, "heads": 4, "kv_heads": 2,
            "ff": 64, "layers": 1}
_ENTRIES = (
    _entry("mobilenet_v2", hf.build_hf_mobilenet_v2,
           {"batch": 1, "image_size": 32, "width_percent": 35},
           ("tf_padding", "depthwise_conv"),
           real={"batch": 1, "image_size": 224, "width_percent": 100}),
    _entry("efficientnet", build_hf_efficientnet,
           {"batch": 1, "image_size": 32, "width_percent": 25, "depth_percent": 25},
           ("tf_padding", "depthwise_conv", "squeeze_excite"),
           # EfficientNet-B0 (the config's defaults are B7's).
           real={"batch": 1, "image_size": 224, "width_percent": 100, "depth_percent": 100}),
    _entry("resnet", hf.build_hf_resnet,
           {"batch": 1, "image_size": 32, "embedding_size": 8, "hidden_sizes": (8, 16),
            "depths": (1, 1)},
           ("residual",)),
    _entry("regnetx", hf.build_hf_regnet,
           {"batch": 1, "image_size": 32, "embedding_size": 8, "hidden_sizes": (16, 32),
            "depths": (1, 1), "groups_width": 8},
           ("grouped_conv",)),
    _entry("regnety", hf.build_hf_regnet,
           {"batch": 1, "image_size": 32, "embedding_size": 8, "hidden_sizes": (16, 32),
            "depths": (1, 1), "groups_width": 8, "layer_type": "y"},
           ("grouped_conv", "squeeze_excite")),
    _entry("convnext", hf.build_hf_convnext,
           {"batch": 1, "image_size": 32, "hidden_sizes": (8, 16), "depths": (1, 1)},
           ("depthwise_conv", "layer_norm")),
    _entry("vit", hf.build_hf_vit,
           {"batch": 1, "image_size": 32, "patch": 8, "hidden": 32, "heads": 4, "ff": 64,
            "layers": 1},
           ("patch_embedding", "attention")),
    _entry("bert", hf.build_hf_bert,
           {"batch": 1, "seq": 16, "vocab": 64, "hidden": 32, "heads": 4, "ff": 64, "layers": 1},
           ("embedding", "attention", "layer_norm"), text=True),
    _entry("gpt2", hf.build_hf_gpt2,
           {"batch": 1, "seq": 16, "vocab": 64, "hidden": 32, "heads": 4, "layers": 1},
           ("causal_mask", "attention"), text=True),
    _entry("llama", hf.build_hf_llama, _DECODER,
           ("rms_norm", "rope", "gqa", "causal_mask"), text=True),
    _entry("mistral", hf.build_hf_llama, {**_DECODER, "model_type": "mistral"},
           ("rms_norm", "rope", "gqa", "causal_mask"), text=True),
    _entry("qwen2", hf.build_hf_llama, {**_DECODER, "model_type": "qwen2"},
           ("rms_norm", "rope", "gqa", "causal_mask", "qkv_bias"), text=True),
)
#: The corpus by name, in a stable order.
CORPUS: dict[str, CorpusEntry] = {e.name: e for e in _ENTRIES}


def get(name: str) -> CorpusEntry:
    """The corpus entry called ``name``; ConfigError naming the valid names otherwise."""
    try:
        return CORPUS[name]
    except KeyError:
        raise ConfigError(
            f"unknown corpus model {name!r}; valid names: {', '.join(CORPUS)}"
        ) from None


def default_cache_dir() -> Path:
    """``corpus`` beside the zoo's cache: ``$FUSION_RL_CACHE/corpus``."""
    return zoo.default_cache_dir().with_name("corpus")


def export(
    name: str, exporter: str, preset: str = "tiny", cache_dir: str | Path | None = None,
    seed: int = 0,
) -> Path:
    """Export corpus model ``name`` with ``exporter`` (one of :data:`EXPORTERS`); the path.

    Cached like :func:`fusion_rl.graph.zoo.export_onnx` (the key adds the exporter and, for
    dynamo, the onnxscript version). The file is what the exporter wrote, untouched: the point
    is to import it as a user's file.

    Raises
    ------
    ModelImportError
        The exporter failed; the message is its first line.
    """
    item = get(name)
    if exporter not in EXPORTERS:
        raise ConfigError(f"unknown exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}")
    sizes = item.sizes(preset)
    extra: dict[str, Any] = {"exporter": exporter}
    if exporter == "dynamo":
        import onnxscript

        extra["onnxscript"] = onnxscript.__version__
    directory = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    key = zoo.cache_key(item.entry, sizes, seed, **extra)
    path = directory / f"{name}-{preset}-{exporter}-s{seed}-{key}.onnx"
    if path.is_file():
        return path
    output_dir(directory, "corpus cache folder")
    module, inputs = zoo.build_entry(item.entry, sizes, seed)

    def write(tmp: Path) -> None:
        if exporter == "torchscript":
            zoo.write_torchscript_onnx(module, inputs, tmp, item.entry.input_names)
        else:
            _write_dynamo_onnx(module, inputs, tmp, item.entry.input_names)

    try:
        write_atomic(path, write, what="corpus cache file")
    except Exception as exc:  # the exporters raise whatever their internals raise
        raise ModelImportError(f"{exporter} export of {name} failed: {first_line(exc)}") from None
    return path


def example_inputs(name: str, preset: str = "tiny", seed: int = 0) -> dict[str, np.ndarray]:
    """The inputs the export was traced with, by ONNX input name (token ids lie inside the
    vocabulary, which random inputs drawn from the ONNX signature would not)."""
    item = get(name)
    _, inputs = zoo.build_entry(item.entry, item.sizes(preset), seed)
    return {n: t.numpy() for n, t in zip(item.entry.input_names, inputs)}


def load(
    name: str, exporter: str, preset: str = "tiny", cache_dir: str | Path | None = None,
    seed: int = 0,
) -> "Model":
    """Export (or find cached) and import corpus model ``name`` the way a user's ONNX file is
    imported (:func:`fusion_rl.graph.model.load_onnx_model`), with the traced inputs."""
    from fusion_rl.graph.model import load_onnx_model

    path = export(name, exporter, preset, cache_dir, seed)
    model = load_onnx_model(path, seed=seed)
    model.name = f"{name}/{exporter}"
    model.inputs = [np.ascontiguousarray(a) for a in example_inputs(name, preset, seed).values()]
    return model


def _write_dynamo_onnx(
    module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], path: Path,
    input_names: tuple[str, ...],
) -> None:
    """Export with the dynamo exporter as its documentation shows, into one file (weights
    inside, as TVM's frontend reads no external data here), static shapes."""
    # onnxscript's optimizer print()s notes ("Evaluation failed: ...") for constants it leaves
    # alone; they would land in the middle of a caller's output.
    with warnings.catch_warnings(), torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # deprecation notes of transformers' tracing paths
        program = torch.onnx.export(
            module, inputs, dynamo=True, opset_version=DYNAMO_OPSET,
            input_names=list(input_names), output_names=["output"], verbose=False,
        )
        program.save(str(path), external_data=False)
