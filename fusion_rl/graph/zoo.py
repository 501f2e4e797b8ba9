"""A built-in zoo of small models with random, seeded weights, exported to ONNX and cached.

The zoo gives every layer above it (graph extraction, fusion plans, the RL environment, the
benchmarks) the same reproducible suite of models without any download. Each entry is a small
``torch.nn.Module`` (or a ``transformers`` model built from a config with random weights) plus
example inputs. Sizes are constructor parameters with small defaults, so that tests can compile
each model several times with TVM's unscheduled ("naive") loops: each has 10-100 ``call_tir``
ops after legalization, compiles in about a second and runs in a few milliseconds.

Every model here has been checked to import into TVM Relax through the ONNX frontend, to legalize
into ``call_tir`` bindings only, and to match ONNX Runtime numerically (see ``tests/test_zoo.py``).
That constraint shaped some choices: attention is written by hand (plain MatMul/Softmax, no
fused or SDPA ops), HF models use eager attention and, for GPT-2, a prepared causal mask, and
exports use static shapes only.

Example
-------
>>> from fusion_rl.graph.zoo import build_torch, export_onnx, list_models
>>> [e.name for e in list_models()][:3]  # doctest: +SKIP
['mlp_tiny', 'cnn_plain', 'se_cnn']
>>> path = export_onnx("resnet_tiny", cache_dir="/tmp/zoo")  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from torch import nn

from fusion_rl.errors import ConfigError, OutputError, UnknownModelError
from fusion_rl.io import output_dir, write_atomic

__all__ = [
    "ONNX_OPSET",
    "ZOO",
    "ZooEntry",
    "build_torch",
    "default_cache_dir",
    "example_inputs",
    "export_onnx",
    "get_entry",
    "list_models",
]

#: ONNX opset used for every export (17 has ``LayerNormalization``, which TVM imports as one op).
ONNX_OPSET = 17



@dataclass(frozen=True)
class ZooEntry:
    """One model of the zoo.

    Attributes
    ----------
    name:
        Unique key, e.g. ``"resnet_tiny"``.
    family:
        Architecture family: ``"cnn" | "residual_cnn" | "mobile_cnn" | "transformer" |
        "decoder" | "vit" | "mixer" | "mlp" | "hf"``.
    description:
        One line for the README table.
    source:
        ``"torch"`` (defined in this file) or ``"transformers"`` (built from a HF config).
    defaults:
        Size parameters accepted by :attr:`builder` and their default values.
    builder:
        ``builder(**sizes) -> (module, inputs)``. It draws weights and inputs from torch's global
        RNG; :func:`build_torch` seeds that RNG, so call that rather than the builder directly.
    input_names:
        ONNX input names, one per example input.
    """

    name: str
    family: str
    description: str
    source: str
    defaults: Mapping[str, Any]
    builder: Callable[..., tuple[nn.Module, tuple[torch.Tensor, ...]]]
    input_names: tuple[str, ...] = field(default=("input",))


# --------------------------------------------------------------------------------------------
# Shared building blocks
# --------------------------------------------------------------------------------------------


def _randomize_norm_stats(module: nn.Module) -> None:
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


def _conv_bn_act(
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


def _causal_additive_mask(seq: int) -> torch.Tensor:
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
            self.register_buffer("mask", _causal_additive_mask(max_seq)[0, 0], persistent=False)

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
# Torch-defined models
# --------------------------------------------------------------------------------------------


class TinyMLP(nn.Module):
    """Stack of Linear + ReLU layers followed by a classifier."""

    def __init__(self, in_features: int, hidden: int, layers: int, num_classes: int) -> None:
        super().__init__()
        dims = [in_features] + [hidden] * layers
        body: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            body += [nn.Linear(a, b), nn.ReLU()]
        self.body = nn.Sequential(*body)
        self.head = nn.Linear(dims[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class PlainCNN(nn.Module):
    """VGG-like stack of conv-BN-ReLU stages, global pooling and a linear head."""

    def __init__(self, channels: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for i, c in enumerate(channels):
            # Downsample from the second stage on, as VGG/ResNet do, to keep naive loops cheap.
            layers.append(_conv_bn_act(cin, c, 3, stride=1 if i == 0 else 2, act=nn.ReLU()))
            cin = c
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.features(x)), 1))


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs and an identity or 1x1-projection shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _conv_bn_act(cin, cout, 3, stride=stride, act=nn.ReLU())
        self.conv2 = _conv_bn_act(cout, cout, 3)
        self.shortcut: nn.Module = (
            _conv_bn_act(cin, cout, 1, stride=stride)
            if stride != 1 or cin != cout
            else nn.Identity()
        )
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


class ResNetTiny(nn.Module):
    """Small ResNet: a stem, one stage of basic blocks per width, pooling and a head."""

    def __init__(self, widths: tuple[int, ...], blocks_per_stage: int, num_classes: int) -> None:
        super().__init__()
        self.stem = _conv_bn_act(3, widths[0], 3, act=nn.ReLU())
        blocks: list[nn.Module] = []
        cin = widths[0]
        for i, w in enumerate(widths):
            for j in range(blocks_per_stage):
                blocks.append(BasicBlock(cin, w, stride=2 if (i > 0 and j == 0) else 1))
                cin = w
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 linear projection, optional residual."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        self.block = nn.Sequential(
            _conv_bn_act(cin, mid, 1, act=nn.ReLU6()),
            _conv_bn_act(mid, mid, 3, stride=stride, groups=mid, act=nn.ReLU6()),
            _conv_bn_act(mid, cout, 1),
        )
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.residual else y


class MobileNetTiny(nn.Module):
    """MobileNetV2-style network: strided stem, inverted residual blocks, 1x1 head conv."""

    def __init__(
        self, stem: int, stages: tuple[tuple[int, int], ...], expand: int, last: int,
        num_classes: int,
    ) -> None:
        super().__init__()
        self.stem = _conv_bn_act(3, stem, 3, stride=2, act=nn.ReLU6())
        blocks: list[nn.Module] = []
        cin = stem
        for cout, stride in stages:
            blocks.append(InvertedResidual(cin, cout, stride, expand))
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.last = _conv_bn_act(cin, last, 1, act=nn.ReLU6())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(last, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.last(self.blocks(self.stem(x)))
        return self.head(torch.flatten(self.pool(x), 1))


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation: global pool, bottleneck 1x1 convs, sigmoid channel gate."""

    def __init__(self, channels: int, reduction: int) -> None:
        super().__init__()
        mid = max(1, channels // reduction)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, mid, 1)
        self.fc2 = nn.Conv2d(mid, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.sigmoid(self.fc2(torch.relu(self.fc1(self.pool(x)))))
        return x * s


class SECNN(nn.Module):
    """Conv-BN-ReLU stages each followed by a squeeze-excite gate (SENet style)."""

    def __init__(self, channels: tuple[int, ...], reduction: int, num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for i, c in enumerate(channels):
            layers += [
                _conv_bn_act(cin, c, 3, stride=1 if i == 0 else 2, act=nn.ReLU()),
                SqueezeExcite(c, reduction),
            ]
            cin = c
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.features(x)), 1))


class ConvLNBlock(nn.Module):
    """ConvNeXt block: 7x7 depthwise conv, channels-last LayerNorm, GELU MLP, residual."""

    def __init__(self, dim: int, kernel: int, mlp_ratio: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel, padding=kernel // 2, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_ratio * dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(mlp_ratio * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)  # NCHW -> NHWC so LayerNorm/Linear see channels
        y = self.fc2(self.act(self.fc1(self.norm(y))))
        return x + y.permute(0, 3, 1, 2)


class ConvLNNet(nn.Module):
    """Patchify stem + ConvNeXt blocks + pooled LayerNorm head."""

    def __init__(
        self, dim: int, patch: int, depth: int, kernel: int, mlp_ratio: int, num_classes: int
    ) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, dim, patch, stride=patch)
        self.blocks = nn.Sequential(*[ConvLNBlock(dim, kernel, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.head(self.norm(x.mean(dim=(2, 3))))


class TransformerEncoder(nn.Module):
    """Post-norm encoder blocks on a float (batch, seq, hidden) input."""

    def __init__(self, hidden: int, heads: int, ff: int, layers: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(*[PostNormBlock(hidden, heads, ff) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class TinyGPT(nn.Module):
    """GPT-style decoder: token + learned position embeddings, causal pre-norm blocks, LM head."""

    def __init__(self, vocab: int, seq: int, hidden: int, heads: int, ff: int, layers: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, hidden)
        self.pos = nn.Parameter(torch.randn(1, seq, hidden) * 0.02)
        self.blocks = nn.Sequential(
            *[
                PreNormBlock(hidden, heads, ff, causal=True, max_seq=seq, approximate="tanh")
                for _ in range(layers)
            ]
        )
        self.norm = nn.LayerNorm(hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tok(ids) + self.pos[:, : ids.shape[1]]
        return self.lm_head(self.norm(self.blocks(x)))


class TinyViT(nn.Module):
    """ViT: patch-embedding conv, class token, position embeddings, pre-norm blocks, head."""

    def __init__(
        self, image_size: int, patch: int, hidden: int, heads: int, ff: int, layers: int,
        num_classes: int,
    ) -> None:
        super().__init__()
        if image_size % patch != 0:
            raise ConfigError(f"image_size ({image_size}) must be divisible by patch ({patch})")
        n = (image_size // patch) ** 2
        self.embed = nn.Conv2d(3, hidden, patch, stride=patch)
        self.cls = nn.Parameter(torch.randn(1, 1, hidden) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, n + 1, hidden) * 0.02)
        self.blocks = nn.Sequential(*[PreNormBlock(hidden, heads, ff) for _ in range(layers)])
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2)  # (B, patches, hidden)
        cls = self.cls.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


class MixerBlock(nn.Module):
    """MLP-Mixer block: token-mixing MLP across patches, then channel-mixing MLP."""

    def __init__(self, tokens: int, hidden: int, token_ff: int, channel_ff: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(hidden)
        self.token_mlp = FeedForward(tokens, token_ff)
        self.ln2 = nn.LayerNorm(hidden)
        self.channel_mlp = FeedForward(hidden, channel_ff)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.token_mlp(self.ln1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mlp(self.ln2(x))


class TinyMixer(nn.Module):
    """MLP-Mixer: patch embedding conv, mixer blocks, mean pooling over tokens, head."""

    def __init__(
        self, image_size: int, patch: int, hidden: int, token_ff: int, channel_ff: int,
        layers: int, num_classes: int,
    ) -> None:
        super().__init__()
        if image_size % patch != 0:
            raise ConfigError(f"image_size ({image_size}) must be divisible by patch ({patch})")
        tokens = (image_size // patch) ** 2
        self.embed = nn.Conv2d(3, hidden, patch, stride=patch)
        self.blocks = nn.Sequential(
            *[MixerBlock(tokens, hidden, token_ff, channel_ff) for _ in range(layers)]
        )
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = self.norm(self.blocks(x))
        return self.head(x.mean(dim=1))


# --------------------------------------------------------------------------------------------
# Builders: builder(**sizes) -> (module, example inputs), drawing from torch's global RNG
# --------------------------------------------------------------------------------------------

_Built = tuple[nn.Module, tuple[torch.Tensor, ...]]


def _image(batch: int, image_size: int) -> torch.Tensor:
    return torch.randn(batch, 3, image_size, image_size)


def _token_ids(batch: int, seq: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), dtype=torch.int64)


def _build_mlp(batch: int, in_features: int, hidden: int, layers: int, num_classes: int) -> _Built:
    return TinyMLP(in_features, hidden, layers, num_classes), (torch.randn(batch, in_features),)


def _build_cnn_plain(
    batch: int, image_size: int, channels: tuple[int, ...], num_classes: int
) -> _Built:
    return PlainCNN(tuple(channels), num_classes), (_image(batch, image_size),)


def _build_resnet_tiny(
    batch: int, image_size: int, widths: tuple[int, ...], blocks_per_stage: int, num_classes: int
) -> _Built:
    return ResNetTiny(tuple(widths), blocks_per_stage, num_classes), (_image(batch, image_size),)


def _build_mobilenet_tiny(
    batch: int, image_size: int, stem: int, stages: tuple[tuple[int, int], ...], expand: int,
    last: int, num_classes: int,
) -> _Built:
    stages_t = tuple((int(c), int(s)) for c, s in stages)
    model = MobileNetTiny(stem, stages_t, expand, last, num_classes)
    return model, (_image(batch, image_size),)


def _build_se_cnn(
    batch: int, image_size: int, channels: tuple[int, ...], reduction: int, num_classes: int
) -> _Built:
    return SECNN(tuple(channels), reduction, num_classes), (_image(batch, image_size),)


def _build_convnext_tiny(
    batch: int, image_size: int, dim: int, patch: int, depth: int, kernel: int, mlp_ratio: int,
    num_classes: int,
) -> _Built:
    model = ConvLNNet(dim, patch, depth, kernel, mlp_ratio, num_classes)
    return model, (_image(batch, image_size),)


def _build_transformer_encoder(
    batch: int, seq: int, hidden: int, heads: int, ff: int, layers: int
) -> _Built:
    return TransformerEncoder(hidden, heads, ff, layers), (torch.randn(batch, seq, hidden),)


def _build_gpt_tiny(
    batch: int, seq: int, vocab: int, hidden: int, heads: int, ff: int, layers: int
) -> _Built:
    model = TinyGPT(vocab, seq, hidden, heads, ff, layers)
    return model, (_token_ids(batch, seq, vocab),)


def _build_vit_tiny(
    batch: int, image_size: int, patch: int, hidden: int, heads: int, ff: int, layers: int,
    num_classes: int,
) -> _Built:
    model = TinyViT(image_size, patch, hidden, heads, ff, layers, num_classes)
    return model, (_image(batch, image_size),)


def _build_mixer_tiny(
    batch: int, image_size: int, patch: int, hidden: int, token_ff: int, channel_ff: int,
    layers: int, num_classes: int,
) -> _Built:
    model = TinyMixer(image_size, patch, hidden, token_ff, channel_ff, layers, num_classes)
    return model, (_image(batch, image_size),)


# --------------------------------------------------------------------------------------------
# transformers-built models
# --------------------------------------------------------------------------------------------


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


def _build_hf_resnet(
    batch: int, image_size: int, embedding_size: int, hidden_sizes: tuple[int, ...],
    depths: tuple[int, ...],
) -> _Built:
    import transformers

    config = transformers.ResNetConfig(
        num_channels=3,
        embedding_size=embedding_size,
        hidden_sizes=list(hidden_sizes),
        depths=list(depths),
        layer_type="basic",
        hidden_act="relu",
    )
    model = HFTensorOutput(transformers.ResNetModel(config), "pooler_output")
    return model, (_image(batch, image_size),)


def _build_hf_bert(
    batch: int, seq: int, vocab: int, hidden: int, heads: int, ff: int, layers: int
) -> _Built:
    import transformers

    config = transformers.BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=ff,
        max_position_embeddings=max(seq, 64),
        attn_implementation="eager",
    )
    bert = transformers.BertModel(config, add_pooling_layer=False)
    model = HFTensorOutput(bert, "last_hidden_state")
    return model, (_token_ids(batch, seq, vocab),)


def _build_hf_gpt2(
    batch: int, seq: int, vocab: int, hidden: int, heads: int, layers: int
) -> _Built:
    import transformers

    config = transformers.GPT2Config(
        vocab_size=vocab,
        n_positions=max(seq, 64),
        n_embd=hidden,
        n_layer=layers,
        n_head=heads,
        use_cache=False,
        # The defaults (50256) lie outside a tiny vocabulary and make transformers warn.
        bos_token_id=vocab - 1,
        eos_token_id=vocab - 1,
        attn_implementation="eager",
    )
    model = HFTensorOutput(
        transformers.GPT2Model(config), "last_hidden_state", _causal_additive_mask(seq)
    )
    return model, (_token_ids(batch, seq, vocab),)


def _build_hf_vit(
    batch: int, image_size: int, patch: int, hidden: int, heads: int, ff: int, layers: int
) -> _Built:
    import transformers

    config = transformers.ViTConfig(
        image_size=image_size,
        patch_size=patch,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=ff,
        attn_implementation="eager",
    )
    vit = transformers.ViTModel(config, add_pooling_layer=False)
    model = HFTensorOutput(vit, "last_hidden_state")
    return model, (_image(batch, image_size),)


def _build_hf_convnext(
    batch: int, image_size: int, hidden_sizes: tuple[int, ...], depths: tuple[int, ...]
) -> _Built:
    import transformers

    config = transformers.ConvNextConfig(
        num_channels=3,
        hidden_sizes=list(hidden_sizes),
        depths=list(depths),
        num_stages=len(hidden_sizes),
        image_size=image_size,
    )
    model = HFTensorOutput(transformers.ConvNextModel(config), "pooler_output")
    return model, (_image(batch, image_size),)


def _entry(
    name: str,
    family: str,
    description: str,
    builder: Callable[..., _Built],
    defaults: Mapping[str, Any],
    source: str = "torch",
    input_names: tuple[str, ...] = ("input",),
) -> ZooEntry:
    return ZooEntry(
        name=name,
        family=family,
        description=description,
        source=source,
        defaults=MappingProxyType(dict(defaults)),
        builder=builder,
        input_names=input_names,
    )


_ENTRIES: tuple[ZooEntry, ...] = (
    _entry(
        "mlp_tiny", "mlp", "3-layer MLP with ReLU on a 1x64 vector",
        _build_mlp,
        {"batch": 1, "in_features": 64, "hidden": 128, "layers": 3, "num_classes": 10},
    ),
    _entry(
        "cnn_plain", "cnn", "VGG-like conv-BN-ReLU x3, global pool, linear head (1x3x32x32)",
        _build_cnn_plain,
        {"batch": 1, "image_size": 32, "channels": (16, 32, 32), "num_classes": 10},
    ),
    _entry(
        "se_cnn", "cnn", "conv-BN-ReLU stages with squeeze-excite gates (1x3x32x32)",
        _build_se_cnn,
        {"batch": 1, "image_size": 32, "channels": (16, 32), "reduction": 4, "num_classes": 10},
    ),
    _entry(
        "convnext_tiny", "cnn",
        "patchify stem + ConvNeXt blocks (7x7 depthwise conv, LayerNorm, GELU MLP)",
        _build_convnext_tiny,
        {"batch": 1, "image_size": 32, "dim": 32, "patch": 4, "depth": 2, "kernel": 7,
         "mlp_ratio": 4, "num_classes": 10},
    ),
    _entry(
        "resnet_tiny", "residual_cnn", "ResNet with basic blocks, widths 16/32 (1x3x32x32)",
        _build_resnet_tiny,
        {"batch": 1, "image_size": 32, "widths": (16, 32), "blocks_per_stage": 1,
         "num_classes": 10},
    ),
    _entry(
        "mobilenet_tiny", "mobile_cnn",
        "MobileNetV2-style inverted residuals with depthwise convs and ReLU6 (1x3x32x32)",
        _build_mobilenet_tiny,
        {"batch": 1, "image_size": 32, "stem": 16, "stages": ((16, 1), (24, 2), (24, 1)),
         "expand": 4, "last": 64, "num_classes": 10},
    ),
    _entry(
        "transformer_encoder", "transformer",
        "post-norm encoder block: MHA + GELU FFN + LayerNorm (1x32x64, 4 heads)",
        _build_transformer_encoder,
        {"batch": 1, "seq": 32, "hidden": 64, "heads": 4, "ff": 128, "layers": 1},
    ),
    _entry(
        "gpt_tiny", "decoder",
        "GPT-style decoder: embeddings, causal-attention pre-norm block, LM head (seq 32)",
        _build_gpt_tiny,
        {"batch": 1, "seq": 32, "vocab": 128, "hidden": 64, "heads": 4, "ff": 128, "layers": 1},
        input_names=("input_ids",),
    ),
    _entry(
        "vit_tiny", "vit", "ViT: 8x8 patches, class token, pre-norm block (1x3x32x32)",
        _build_vit_tiny,
        {"batch": 1, "image_size": 32, "patch": 8, "hidden": 64, "heads": 4, "ff": 128,
         "layers": 1, "num_classes": 10},
    ),
    _entry(
        "mixer_tiny", "mixer", "MLP-Mixer: 4x4 patches, token- and channel-mixing MLPs",
        _build_mixer_tiny,
        {"batch": 1, "image_size": 32, "patch": 4, "hidden": 32, "token_ff": 64,
         "channel_ff": 64, "layers": 2, "num_classes": 10},
    ),
    _entry(
        "hf_resnet", "hf", "transformers ResNetModel (basic blocks, widths 16/32), pooled output",
        _build_hf_resnet,
        {"batch": 1, "image_size": 32, "embedding_size": 16, "hidden_sizes": (16, 32),
         "depths": (1, 1)},
        source="transformers",
    ),
    _entry(
        "hf_bert", "hf", "transformers BertModel (2 layers, hidden 64), last hidden state",
        _build_hf_bert,
        {"batch": 1, "seq": 32, "vocab": 128, "hidden": 64, "heads": 4, "ff": 128, "layers": 2},
        source="transformers",
        input_names=("input_ids",),
    ),
    _entry(
        "hf_gpt2", "hf", "transformers GPT2Model (2 layers, hidden 64), last hidden state",
        _build_hf_gpt2,
        {"batch": 1, "seq": 32, "vocab": 128, "hidden": 64, "heads": 4, "layers": 2},
        source="transformers",
        input_names=("input_ids",),
    ),
    _entry(
        "hf_vit", "hf", "transformers ViTModel (8x8 patches, 2 layers, hidden 64)",
        _build_hf_vit,
        {"batch": 1, "image_size": 32, "patch": 8, "hidden": 64, "heads": 4, "ff": 128,
         "layers": 2},
        source="transformers",
    ),
    _entry(
        "hf_convnext", "hf", "transformers ConvNextModel (widths 16/32, depth 1/1), pooled",
        _build_hf_convnext,
        {"batch": 1, "image_size": 32, "hidden_sizes": (16, 32), "depths": (1, 1)},
        source="transformers",
    ),
)

#: All zoo entries by name, in a stable order (torch models first, then transformers ones).
ZOO: dict[str, ZooEntry] = {e.name: e for e in _ENTRIES}


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def list_models() -> list[ZooEntry]:
    """Return every zoo entry, in registration order."""
    return list(ZOO.values())


def get_entry(name: str) -> ZooEntry:
    """Return the entry called ``name``.

    Raises
    ------
    UnknownModelError
        If ``name`` is not in the zoo; the message lists the valid names.
    """
    try:
        return ZOO[name]
    except KeyError:
        raise UnknownModelError(
            f"unknown zoo model {name!r}; valid names: {', '.join(sorted(ZOO))}"
        ) from None


def _resolve_sizes(entry: ZooEntry, sizes: Mapping[str, Any]) -> dict[str, Any]:
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
    merged = _resolve_sizes(entry, sizes)
    # fork_rng so seeding here does not disturb the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            module, inputs = entry.builder(**merged)
        except (ValueError, TypeError, RuntimeError) as exc:
            raise ConfigError(f"zoo model {name!r} cannot be built with sizes {merged}: {exc}") \
                from exc
        _randomize_norm_stats(module)
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
    """Digest of this file, so editing any builder invalidates old exports automatically.

    A hand-maintained format version is easy to forget to bump, and a stale cached graph would
    silently disagree with :func:`build_torch`.
    """
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


def _cache_key(entry: ZooEntry, sizes: Mapping[str, Any], seed: int) -> str:
    """Hash of everything that changes the exported bytes."""
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
    blob = json.dumps(payload, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def export_onnx(
    name: str, cache_dir: str | Path | None = None, seed: int = 0, **sizes: Any
) -> Path:
    """Export zoo model ``name`` to ONNX (static shapes, opset 17) and return the file path.

    The file is cached under ``cache_dir`` (default :func:`default_cache_dir`) by a key of
    (name, sizes, seed, torch version, opset, transformers version for HF models, and a digest
    of this module's source); a second call with the same key returns the cached
    path without exporting again. The file is written with :func:`fusion_rl.io.write_atomic`
    (temp file, rename), so an interrupted export never leaves a truncated model behind.
    """
    entry = get_entry(name)
    merged = _resolve_sizes(entry, sizes)
    directory = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = directory / f"{name}-s{seed}-{_cache_key(entry, merged, seed)}.onnx"
    if path.is_file():
        return path

    try:
        output_dir(directory, "model cache folder")
    except OutputError as exc:
        raise ConfigError(f"{exc}; point FUSION_RL_CACHE at a writable folder") from None
    module, inputs = build_torch(name, seed=seed, **merged)

    def export(tmp: Path) -> None:
        with warnings.catch_warnings(), torch.no_grad():
            # The legacy (TorchScript) exporter is deprecated but is faster and yields plain
            # static graphs, which is what the TVM importer handles best.
            warnings.simplefilter("ignore", category=DeprecationWarning)
            warnings.simplefilter("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            torch.onnx.export(
                module,
                inputs,
                str(tmp),
                dynamo=False,
                opset_version=ONNX_OPSET,
                input_names=list(entry.input_names),
                output_names=["output"],
                do_constant_folding=True,
            )

    # A temp file renamed into place (also on KeyboardInterrupt no temp file is left).
    write_atomic(path, export, what="model cache file")
    return path
