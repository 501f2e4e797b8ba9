"""Transformer models of the tiny zoo: a post-norm encoder, a GPT-style decoder, a ViT.

Attention is written out as MatMul/Softmax (:class:`~fusion_rl.graph.zoo.blocks.SelfAttention`).
"""

from __future__ import annotations

import torch
from torch import nn

from fusion_rl.errors import ConfigError
from fusion_rl.graph.zoo.blocks import (
    Built, PostNormBlock, PreNormBlock, ZooEntry, image_input, make_entry, token_ids,
)


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


def _build_transformer_encoder(
    batch: int, seq: int, hidden: int, heads: int, ff: int, layers: int
) -> Built:
    return TransformerEncoder(hidden, heads, ff, layers), (torch.randn(batch, seq, hidden),)


def _build_gpt_tiny(
    batch: int, seq: int, vocab: int, hidden: int, heads: int, ff: int, layers: int
) -> Built:
    model = TinyGPT(vocab, seq, hidden, heads, ff, layers)
    return model, (token_ids(batch, seq, vocab),)


def _build_vit_tiny(
    batch: int, image_size: int, patch: int, hidden: int, heads: int, ff: int, layers: int,
    num_classes: int,
) -> Built:
    model = TinyViT(image_size, patch, hidden, heads, ff, layers, num_classes)
    return model, (image_input(batch, image_size),)




ENTRIES: tuple[ZooEntry, ...] = (
    make_entry(
        "transformer_encoder", "transformer",
        "post-norm encoder block: MHA + GELU FFN + LayerNorm (1x32x64, 4 heads)",
        _build_transformer_encoder,
        {"batch": 1, "seq": 32, "hidden": 64, "heads": 4, "ff": 128, "layers": 1},
    ),
    make_entry(
        "gpt_tiny", "decoder",
        "GPT-style decoder: embeddings, causal-attention pre-norm block, LM head (seq 32)",
        _build_gpt_tiny,
        {"batch": 1, "seq": 32, "vocab": 128, "hidden": 64, "heads": 4, "ff": 128, "layers": 1},
        input_names=("input_ids",),
    ),
    make_entry(
        "vit_tiny", "vit", "ViT: 8x8 patches, class token, pre-norm block (1x3x32x32)",
        _build_vit_tiny,
        {"batch": 1, "image_size": 32, "patch": 8, "hidden": 64, "heads": 4, "ff": 128,
         "layers": 1, "num_classes": 10},
    ),
)
