"""What every zoo catalogue shares: the entry record, layers used by several families, inputs.

The catalogues (:mod:`.mlp`, :mod:`.cnn`, :mod:`.transformer`, :mod:`.hf`, :mod:`.bench`) each
define ``ENTRIES``; :mod:`fusion_rl.graph.zoo` assembles them into one registry.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from fusion_rl.errors import ConfigError

#: The suites: ``tiny`` (tests, demos, training; milliseconds per model) and ``bench``
#: (deployment sizes: 224x224 images, 128-token sequences; for experiments only).
SUITES = ("tiny", "bench")

@dataclass(frozen=True)
class ZooEntry:
    """One model of the zoo.

    Attributes
    ----------
    name:
        Unique key, e.g. ``"resnet_tiny"``.
    family:
        Architecture family: ``"cnn" | "residual_cnn" | "mobile_cnn" | "grouped_cnn" |
        "convnext" | "transformer" | "decoder" | "vit" | "mixer" | "mlp" | "hf"``.
    description:
        One line for the README table.
    source:
        ``"torch"`` (a module defined in this package) or ``"transformers"`` (built from a
        ``transformers`` config, random weights).
    defaults:
        Size parameters accepted by :attr:`builder` and their default values.
    builder:
        ``builder(**sizes) -> (module, inputs)``. It draws weights and inputs from torch's global
        RNG; :func:`build_torch` seeds that RNG, so call that rather than the builder directly.
    input_names:
        ONNX input names, one per example input.
    suite:
        One of :data:`SUITES`. Bench entries are named ``bench_*`` and never built at their
        default sizes by the tests.
    fold_shapes:
        Import into TVM a copy of the export whose static shape subgraphs ONNX Runtime folded
        (:func:`fusion_rl.graph.importer.fold_static_shapes`); needed where an export computes
        padding from tensor shapes (TensorFlow-style "same" padding), which TVM's ONNX frontend
        rejects as dynamic. Verification still runs ONNX Runtime on the original export.
    """

    name: str
    family: str
    description: str
    source: str
    defaults: Mapping[str, Any]
    builder: Callable[..., tuple[nn.Module, tuple[torch.Tensor, ...]]]
    input_names: tuple[str, ...] = field(default=("input",))
    suite: str = "tiny"
    fold_shapes: bool = False


# --------------------------------------------------------------------------------------------
# Shared building blocks
# --------------------------------------------------------------------------------------------


def randomize_norm_stats(module: nn.Module) -> None:
    """Give BatchNorm layers non-trivial running statistics and affine parameters.

    Freshly constructed BN layers are the identity (mean 0, var 1, weight 1, bias 0), which would
    let a numerically wrong lowering of BN go unnoticed by the ORT comparison.
    """
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                if m.weight is not None:
                    m.weight.uniform_(0.8, 1.2)
                    m.bias.uniform_(-0.1, 0.1)


def conv_bn_act(
    cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: nn.Module | None = None
) -> nn.Sequential:
    """Conv (no bias) + BatchNorm + optional activation, padding keeps 'same' spatial size."""
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act is not None:
        layers.append(act)
    return nn.Sequential(*layers)


def causal_additive_mask(seq: int) -> torch.Tensor:
    """(1, 1, seq, seq) additive causal mask; -1e9 rather than -inf so no row can become NaN."""
    return torch.triu(torch.full((seq, seq), -1e9), diagonal=1)[None, None]


class SelfAttention(nn.Module):
    """Multi-head self-attention written out as matmul/softmax, optionally causal.

    Written by hand (rather than ``nn.MultiheadAttention``) so the exported graph is the plain
    MatMul/Softmax chain a fusion policy should see, and has no fused or SDPA-specific ops.
    """

    def __init__(self, hidden: int, heads: int, causal: bool = False, max_seq: int = 0) -> None:
        super().__init__()
        if hidden % heads != 0:
            raise ConfigError(f"hidden ({hidden}) must be divisible by heads ({heads})")
        self.heads = heads
        self.head_dim = hidden // heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.causal = causal
        if causal:
            self.register_buffer("mask", causal_additive_mask(max_seq)[0, 0], persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        qkv = self.qkv(x).reshape(b, s, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))
        if self.causal:
            scores = scores + self.mask[:s, :s]
        attn = torch.softmax(scores, dim=-1)
        out = torch.matmul(attn, v).transpose(1, 2).reshape(b, s, h)
        return self.proj(out)


class FeedForward(nn.Module):
    """Two-layer MLP with GELU, the transformer FFN."""

    def __init__(self, hidden: int, ff: int, approximate: str = "none") -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden, ff)
        self.act = nn.GELU(approximate=approximate)
        self.fc2 = nn.Linear(ff, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class PreNormBlock(nn.Module):
    """Pre-LayerNorm transformer block (GPT-2 / ViT style)."""

    def __init__(
        self,
        hidden: int,
        heads: int,
        ff: int,
        causal: bool = False,
        max_seq: int = 0,
        approximate: str = "none",
    ) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(hidden)
        self.attn = SelfAttention(hidden, heads, causal=causal, max_seq=max_seq)
        self.ln2 = nn.LayerNorm(hidden)
        self.ff = FeedForward(hidden, ff, approximate=approximate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.ff(self.ln2(x))


class PostNormBlock(nn.Module):
    """Post-LayerNorm transformer encoder block (original Transformer / BERT style)."""

    def __init__(self, hidden: int, heads: int, ff: int) -> None:
        super().__init__()
        self.attn = SelfAttention(hidden, heads)
        self.ln1 = nn.LayerNorm(hidden)
        self.ff = FeedForward(hidden, ff)
        self.ln2 = nn.LayerNorm(hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln1(x + self.attn(x))
        return self.ln2(x + self.ff(x))


# --------------------------------------------------------------------------------------------
# Inputs: builder(**sizes) -> (module, example inputs), drawing from torch's global RNG
# --------------------------------------------------------------------------------------------

Built = tuple[nn.Module, tuple[torch.Tensor, ...]]


def image_input(batch: int, image_size: int) -> torch.Tensor:
    """A random NCHW image batch with 3 channels."""
    return torch.randn(batch, 3, image_size, image_size)


def token_ids(batch: int, seq: int, vocab: int) -> torch.Tensor:
    """Random int64 token ids inside the vocabulary, shape (batch, seq)."""
    return torch.randint(0, vocab, (batch, seq), dtype=torch.int64)


class HFTensorOutput(nn.Module):
    """Wrap a ``transformers`` model so ``forward`` returns one plain tensor.

    The ONNX exporter cannot return ``ModelOutput`` dataclasses, and the cached-key outputs of
    decoders would add graph outputs the fusion study does not care about.

    ``attention_mask``, if given, is a prepared 4D additive mask passed to the model on every
    call. transformers 5 returns a 4D mask as-is; without one, its mask builder probes position
    ids for packed sequences with ``torch.diff``, which the ONNX exporter cannot export.
    """

    def __init__(
        self, model: nn.Module, output_key: str, attention_mask: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        self.model = model
        self.output_key = output_key
        self.attention_mask: torch.Tensor | None
        self.register_buffer("attention_mask", attention_mask, persistent=False)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        kwargs: dict[str, Any] = {"return_dict": True}
        if self.attention_mask is not None:
            kwargs["attention_mask"] = self.attention_mask
        out = self.model(*inputs, **kwargs)
        return out[self.output_key]


def make_entry(
    name: str,
    family: str,
    description: str,
    builder: Callable[..., Built],
    defaults: Mapping[str, Any],
    source: str = "torch",
    input_names: tuple[str, ...] = ("input",),
    suite: str = "tiny",
    fold_shapes: bool = False,
) -> ZooEntry:
    """A :class:`ZooEntry` with read-only defaults."""
    if suite not in SUITES:
        raise ConfigError(f"zoo entry {name!r}: suite must be one of {SUITES}, got {suite!r}")
    return ZooEntry(
        name=name,
        family=family,
        description=description,
        source=source,
        defaults=MappingProxyType(dict(defaults)),
        builder=builder,
        input_names=input_names,
        suite=suite,
        fold_shapes=fold_shapes,
    )

