"""The bench suite: real architectures at the sizes people deploy, for experiments only.

Batch 1, 224x224 images, 128-token sequences, random weights from ``transformers`` configs (no
download). Widths are the published ones; transformer depth is cut to 2 layers (a deployed
BERT-base has 12) because every plan of every model is compiled and timed on 2 shared cores,
and the layers repeat: 2 layers show every kernel of 12 and the seams between layers.
Vocabularies are the published ones too; they only size the embedding gather (no LM head).

Tests never build these at their default sizes (each is tens of MB of weights and seconds to
export); they build tiny instances with size overrides, e.g.
``build_torch("bench_bert", hidden=64, heads=4, ff=128, seq=16, vocab=64)``.

FLOPs (:func:`fusion_rl.graph.zoo.flops`, 2 x multiply-accumulates of convolutions and matrix
products) are listed by ``fusion-rl zoo``.
"""

from __future__ import annotations

from fusion_rl.graph.zoo.blocks import ZooEntry, make_entry
from fusion_rl.graph.zoo.hf import (
    build_hf_bert, build_hf_convnext, build_hf_efficientnet, build_hf_gpt2, build_hf_llama,
    build_hf_mobilenet_v2, build_hf_regnet, build_hf_resnet, build_hf_vit,
)

_TEXT = {"source": "transformers", "suite": "bench", "input_names": ("input_ids",)}
_IMAGE = {"source": "transformers", "suite": "bench"}

ENTRIES: tuple[ZooEntry, ...] = (
    make_entry(
        "bench_resnet18", "residual_cnn",
        "ResNet-18: basic blocks 2/2/2/2, widths 64-512, 224x224, pooled (transformers ResNet)",
        build_hf_resnet,
        {"batch": 1, "image_size": 224, "embedding_size": 64, "hidden_sizes": (64, 128, 256, 512),
         "depths": (2, 2, 2, 2)},
        **_IMAGE,
    ),
    make_entry(
        "bench_mobilenet_v2", "mobile_cnn",
        "MobileNetV2 1.0: inverted residuals, depthwise 3x3, ReLU6, TF 'same' padding, 224x224",
        build_hf_mobilenet_v2,
        {"batch": 1, "image_size": 224, "width_percent": 100},
        fold_shapes=True,
        **_IMAGE,
    ),
    make_entry(
        "bench_efficientnet_b0", "efficientnet",
        "EfficientNet-B0: MBConv blocks, 3x3 and 5x5 depthwise, squeeze-excite, swish, 224x224",
        build_hf_efficientnet,
        {"batch": 1, "image_size": 224, "width_percent": 100, "depth_percent": 100},
        fold_shapes=True,
        **_IMAGE,
    ),
    make_entry(
        "bench_regnetx", "grouped_cnn",
        "RegNetX-200MF: grouped 3x3 convs (8 channels per group), depths 1/1/4/7, 224x224",
        build_hf_regnet,
        {"batch": 1, "image_size": 224, "embedding_size": 32, "hidden_sizes": (24, 56, 152, 368),
         "depths": (1, 1, 4, 7), "groups_width": 8},
        **_IMAGE,
    ),
    make_entry(
        "bench_convnext", "convnext",
        "ConvNeXt-Atto: 7x7 depthwise, LayerNorm, GELU MLP, widths 40-320, depths 2/2/6/2, 224x224",
        build_hf_convnext,
        {"batch": 1, "image_size": 224, "hidden_sizes": (40, 80, 160, 320), "depths": (2, 2, 6, 2)},
        **_IMAGE,
    ),
    make_entry(
        "bench_bert", "transformer",
        "BERT-base encoder width (768, 12 heads, FFN 3072), 2 layers, 128 tokens",
        build_hf_bert,
        {"batch": 1, "seq": 128, "vocab": 30522, "hidden": 768, "heads": 12, "ff": 3072,
         "layers": 2},
        **_TEXT,
    ),
    make_entry(
        "bench_gpt2", "decoder",
        "GPT-2 small width (768, 12 heads), causal attention, 2 layers, 128 tokens",
        build_hf_gpt2,
        {"batch": 1, "seq": 128, "vocab": 50257, "hidden": 768, "heads": 12, "layers": 2},
        **_TEXT,
    ),
    make_entry(
        "bench_llama", "decoder",
        "Llama-style decoder: RMSNorm, RoPE, GQA 12/4 heads, SwiGLU 2048, width 768, 2 layers, "
        "128 tokens",
        build_hf_llama,
        {"batch": 1, "seq": 128, "vocab": 32000, "hidden": 768, "heads": 12, "kv_heads": 4,
         "ff": 2048, "layers": 2},
        **_TEXT,
    ),
    make_entry(
        "bench_vit", "vit",
        "ViT-B/16 width (768, 12 heads, MLP 3072), 2 layers, 224x224 (197 tokens)",
        build_hf_vit,
        {"batch": 1, "image_size": 224, "patch": 16, "hidden": 768, "heads": 12, "ff": 3072,
         "layers": 2},
        **_IMAGE,
    ),
)
