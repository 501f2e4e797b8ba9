"""The built-in models: random, seeded weights, exported to ONNX and cached; no downloads.

Two suites (:data:`SUITES`), one registry:

- ``tiny`` (:data:`ZOO`): small models for tests, demos and training. Sizes are constructor
  parameters with small defaults, so that tests can compile each model several times with TVM's
  unscheduled ("naive") loops: each has 10-100 ``call_tir`` ops after legalization, compiles in
  about a second and runs in a few milliseconds.
- ``bench`` (:data:`BENCH`, names ``bench_*``): real architectures at deployment sizes (batch 1,
  224x224 images, 128-token sequences) for experiments; see :mod:`.bench`.

Each entry is a ``torch.nn.Module`` (or a ``transformers`` model built from a config with random
weights) plus example inputs. The catalogues live by family in :mod:`.mlp`, :mod:`.cnn`,
:mod:`.transformer`, :mod:`.hf` and :mod:`.bench`; shared layers in :mod:`.blocks`.

Every tiny model has been checked to import into TVM Relax through the ONNX frontend, to
legalize into ``call_tir`` bindings only, and to match ONNX Runtime numerically (see
``tests/graph/test_zoo.py``). That constraint shaped some choices: attention is written by hand (plain
MatMul/Softmax, no fused or SDPA ops), HF models use eager attention and, for decoders, a
prepared causal mask, and exports use static shapes only.

Example
-------
>>> from fusion_rl.graph.zoo import build_torch, export_onnx, list_models
>>> [e.name for e in list_models("tiny")][:3]  # doctest: +SKIP
['mlp_tiny', 'mixer_tiny', 'cnn_plain']
>>> path = export_onnx("resnet_tiny", cache_dir="/tmp/zoo")  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fusion_rl import paths
from fusion_rl.errors import ConfigError, OutputError, UnknownModelError
from fusion_rl.io import output_dir, write_atomic
from fusion_rl.graph.zoo import bench, cnn, hf, mlp, transformer
from fusion_rl.graph.zoo.blocks import SUITES, HFTensorOutput, ZooEntry, randomize_norm_stats

__all__ = [
    "BENCH",
    "MODELS",
    "ONNX_OPSET",
    "SUITES",
    "ZOO",
    "HFTensorOutput",
    "ZooEntry",
    "build_entry",
    "build_torch",
    "cache_key",
    "default_cache_dir",
    "example_inputs",
    "export_onnx",
    "flops",
    "get_entry",
    "import_path",
    "list_models",
    "resolve_sizes",
    "write_torchscript_onnx",
]

#: ONNX opset used for every export (17 has ``LayerNormalization``, which TVM imports as one op).
ONNX_OPSET = 17

#: The tiny suite by name, in a stable order: what tests, demos and training configs use.
ZOO: dict[str, ZooEntry] = {
    e.name: e for e in (*mlp.ENTRIES, *cnn.ENTRIES, *transformer.ENTRIES, *hf.ENTRIES)
}
#: The bench suite by name (deployment sizes; experiments only).
BENCH: dict[str, ZooEntry] = {e.name: e for e in bench.ENTRIES}
#: Every model of every suite by name: what a MODEL argument may name.
MODELS: dict[str, ZooEntry] = {**ZOO, **BENCH}


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def list_models(suite: str | None = None) -> list[ZooEntry]:
    """Every entry of ``suite`` (``"tiny"`` or ``"bench"``; ``None``: all), in registration order.

    Raises
    ------
    ConfigError
        If ``suite`` is not one of :data:`SUITES`.
    """
    if suite is not None and suite not in SUITES:
        raise ConfigError(f"unknown zoo suite {suite!r}; choose one of {', '.join(SUITES)}")
    return [e for e in MODELS.values() if suite is None or e.suite == suite]


def get_entry(name: str) -> ZooEntry:
    """Return the entry called ``name``.

    Raises
    ------
    UnknownModelError
        If ``name`` is not in the zoo; the message lists the valid names.
    """
    try:
        return MODELS[name]
    except KeyError:
        raise UnknownModelError(
            f"unknown zoo model {name!r}; valid names: {', '.join(sorted(MODELS))}"
        ) from None


def resolve_sizes(entry: ZooEntry, sizes: Mapping[str, Any]) -> dict[str, Any]:
    """Merge ``sizes`` over the entry's defaults, rejecting unknown keys."""
    unknown = sorted(set(sizes) - set(entry.defaults))
    if unknown:
        raise ConfigError(
            f"zoo model {entry.name!r} has no size parameter(s) {', '.join(unknown)}; "
            f"valid: {', '.join(sorted(entry.defaults))}"
        )
    for key, value in sizes.items():
        if not _all_positive_ints(value, entry.defaults[key]):
            raise ConfigError(
                f"zoo model {entry.name!r}: size {key}={value!r} must have the form of its "
                f"default {entry.defaults[key]!r} with positive integers"
            )
    merged = dict(entry.defaults)
    merged.update({k: _normalize_size(v) for k, v in sizes.items()})
    return merged


def _normalize_size(value: Any) -> Any:
    """Lists to tuples and numpy ints to ``int``, so equal sizes build and hash identically."""
    if isinstance(value, (tuple, list)):
        return tuple(_normalize_size(v) for v in value)
    return int(value)


def _all_positive_ints(value: Any, default: Any) -> bool:
    """True if ``value`` is shaped like ``default`` (int or nested sequence) with ints > 0.

    Every zoo size is a count or a width; zero or negative values would build degenerate
    (zero-channel) models that export without error but mean nothing.
    """
    if isinstance(default, (tuple, list)):
        return (
            isinstance(value, (tuple, list))
            and len(value) > 0
            and all(_all_positive_ints(v, default[0]) for v in value)
        )
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value > 0


def build_torch(
    name: str, seed: int = 0, **sizes: Any
) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Build zoo model ``name`` with deterministic random weights and example inputs.

    Parameters
    ----------
    name:
        A zoo entry name (see :func:`list_models`).
    seed:
        Seeds weights and inputs; the same (name, seed, sizes) always gives the same tensors.
    **sizes:
        Overrides of the entry's :attr:`ZooEntry.defaults`.

    Returns
    -------
    (module, inputs)
        The module in ``eval()`` mode and a tuple of example input tensors.

    Raises
    ------
    UnknownModelError
        Unknown ``name``.
    ConfigError
        A size keyword the entry does not have, or an inconsistent combination of sizes.
    """
    entry = get_entry(name)
    return build_entry(entry, resolve_sizes(entry, sizes), seed)


def build_entry(
    entry: ZooEntry, sizes: Mapping[str, Any], seed: int = 0
) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Build ``entry`` at complete, already validated ``sizes``: what :func:`build_torch` does
    once the name is looked up. Also builds entries outside the registry (the import corpus,
    :mod:`fusion_rl.graph.corpus`) with the same seeding."""
    # fork_rng so seeding here does not disturb the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            module, inputs = entry.builder(**sizes)
        except (ValueError, TypeError, RuntimeError) as exc:
            raise ConfigError(
                f"zoo model {entry.name!r} cannot be built with sizes {dict(sizes)}: {exc}"
            ) from exc
        randomize_norm_stats(module)
    module.eval()
    return module, tuple(inputs)


def example_inputs(name: str, seed: int = 0, **sizes: Any) -> dict[str, np.ndarray]:
    """Example inputs of ``name`` as numpy arrays keyed by ONNX input name.

    Token-id inputs are only valid inside the vocabulary, so callers that verify a compiled
    model should use these rather than drawing random inputs from the ONNX input shapes.
    """
    entry = get_entry(name)
    _, inputs = build_torch(name, seed=seed, **sizes)
    return {n: t.numpy() for n, t in zip(entry.input_names, inputs)}


def default_cache_dir() -> Path:
    """Directory of cached ONNX exports: ``$FUSION_RL_CACHE/zoo`` or ``~/.cache/fusion_rl/zoo``."""
    root = os.environ.get("FUSION_RL_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "fusion_rl"
    return base / "zoo"


@functools.lru_cache(maxsize=1)
def _zoo_source_digest() -> str:
    """Digest of every source file of ``fusion_rl/graph`` (this package included), so editing
    any builder or shared layer invalidates old exports automatically.

    A hand-maintained format version is easy to forget to bump, and a stale cached graph would
    silently disagree with :func:`build_torch`. The whole graph package, not only the catalogue:
    builders import layers from sibling modules, and an edit there changes the export as much.
    """
    root = paths.PACKAGE_DIR / "graph"
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def cache_key(entry: ZooEntry, sizes: Mapping[str, Any], seed: int, **extra: Any) -> str:
    """Hash of everything that changes the exported bytes; ``extra`` adds what a caller's export
    depends on besides (the import corpus adds its exporter)."""
    payload: dict[str, Any] = {
        "name": entry.name,
        "sizes": {k: sizes[k] for k in sorted(sizes)},
        "seed": seed,
        "torch": torch.__version__,
        "opset": ONNX_OPSET,
        "zoo_source": _zoo_source_digest(),
    }
    if entry.source == "transformers":
        import transformers

        payload["transformers"] = transformers.__version__
    payload.update(extra)
    blob = json.dumps(payload, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def export_onnx(
    name: str, cache_dir: str | Path | None = None, seed: int = 0, **sizes: Any
) -> Path:
    """Export zoo model ``name`` to ONNX (static shapes, opset 17) and return the file path.

    The file is cached under ``cache_dir`` (default :func:`default_cache_dir`) by a key of
    (name, sizes, seed, torch version, opset, transformers version for HF models, and a digest
    of the ``fusion_rl.graph`` package's source); a second call with the same key returns the cached
    path without exporting again. The file is written with :func:`fusion_rl.io.write_atomic`
    (temp file, rename), so an interrupted export never leaves a truncated model behind.
    """
    entry = get_entry(name)
    merged = resolve_sizes(entry, sizes)
    directory = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = directory / f"{name}-s{seed}-{cache_key(entry, merged, seed)}.onnx"
    if path.is_file():
        return path

    try:
        output_dir(directory, "model cache folder")
    except OutputError as exc:
        raise ConfigError(f"{exc}; point FUSION_RL_CACHE at a writable folder") from None
    module, inputs = build_torch(name, seed=seed, **merged)

    def export(tmp: Path) -> None:
        write_torchscript_onnx(module, inputs, tmp, entry.input_names)

    # A temp file renamed into place (also on KeyboardInterrupt no temp file is left).
    write_atomic(path, export, what="model cache file")
    return path


def write_torchscript_onnx(
    module: nn.Module, inputs: tuple[torch.Tensor, ...], path: Path, input_names: tuple[str, ...]
) -> None:
    """Export ``module`` to ``path`` with the TorchScript exporter: static shapes, opset
    :data:`ONNX_OPSET`, constants folded, one output named ``output``."""
    with warnings.catch_warnings(), torch.no_grad():
        # The legacy (TorchScript) exporter is deprecated but is faster and yields plain
        # static graphs, which is what the TVM importer handles best.
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        # TF-style padding slices with steps != 1, which the exporter leaves unfolded.
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")
        torch.onnx.export(
            module,
            inputs,
            str(path),
            dynamo=False,
            opset_version=ONNX_OPSET,
            input_names=list(input_names),
            output_names=["output"],
            do_constant_folding=True,
        )


def import_path(name: str, cache_dir: str | Path | None = None, seed: int = 0, **sizes: Any) -> Path:
    """The ONNX file TVM should import for zoo model ``name``.

    That is :func:`export_onnx`'s file, except for entries with ``fold_shapes``: for those, a
    copy whose static shape subgraphs ONNX Runtime folded
    (:func:`fusion_rl.graph.importer.fold_static_shapes`), cached beside the export under a name
    that records the ONNX Runtime version. The export itself stays the reference that verifies
    compiled plans, so the folding is checked too.
    """
    path = export_onnx(name, cache_dir=cache_dir, seed=seed, **sizes)
    if not get_entry(name).fold_shapes:
        return path
    import onnxruntime

    from fusion_rl.graph.importer import fold_static_shapes

    folded = path.with_name(f"{path.stem}-ort{onnxruntime.__version__}.onnx")
    if folded.is_file():
        return folded
    write_atomic(folded, lambda tmp: fold_static_shapes(path, tmp), what="folded model cache file")
    return folded


def flops(name: str, **sizes: Any) -> int:
    """Floating-point operations of one forward pass of ``name``: 2 x the multiply-accumulates
    of its convolutions and matrix products (torch's ``FlopCounterMode``).

    Elementwise ops, normalizations and softmax are not counted: this is the convention behind
    GFLOP/s and "% of peak" figures. The model is built on torch's ``meta`` device (shapes only,
    no weights), so this costs well under a second even for bench models.
    """
    entry = get_entry(name)
    merged = resolve_sizes(entry, sizes)
    return _flops(name, tuple(sorted(merged.items())))


@functools.lru_cache(maxsize=None)
def _flops(name: str, sizes: tuple[tuple[str, Any], ...]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    entry = get_entry(name)
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        try:
            module, inputs = entry.builder(**dict(sizes))
        except (ValueError, TypeError, RuntimeError) as exc:
            raise ConfigError(f"zoo model {name!r} cannot be built with sizes {dict(sizes)}: "
                              f"{exc}") from exc
    module.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*inputs)
    return int(counter.get_total_flops())
