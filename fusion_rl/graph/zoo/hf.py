"""Models built from ``transformers`` configs with random weights (no download).

The builders take sizes, so one builder serves a tiny entry here and a deployment-size entry in
:mod:`fusion_rl.graph.zoo.bench`. Attention is ``eager`` everywhere, so exports
hold plain MatMul/Softmax chains and no SDPA-specific ops. Decoders get a prepared causal mask
(:class:`~fusion_rl.graph.zoo.blocks.HFTensorOutput` explains why).
"""

from __future__ import annotations

from fusion_rl.graph.zoo.blocks import (
    Built, HFTensorOutput, ZooEntry, causal_additive_mask, image_input, make_entry, token_ids,
)


def build_hf_resnet(
    batch: int, image_size: int, embedding_size: int, hidden_sizes: tuple[int, ...],
    depths: tuple[int, ...],
) -> Built:
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
    return model, (image_input(batch, image_size),)


def build_hf_bert(
    batch: int, seq: int, vocab: int, hidden: int, heads: int, ff: int, layers: int
) -> Built:
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
    return model, (token_ids(batch, seq, vocab),)


def build_hf_gpt2(
    batch: int, seq: int, vocab: int, hidden: int, heads: int, layers: int
) -> Built:
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
        transformers.GPT2Model(config), "last_hidden_state", causal_additive_mask(seq)
    )
    return model, (token_ids(batch, seq, vocab),)


def build_hf_vit(
    batch: int, image_size: int, patch: int, hidden: int, heads: int, ff: int, layers: int
) -> Built:
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
    return model, (image_input(batch, image_size),)


def build_hf_convnext(
    batch: int, image_size: int, hidden_sizes: tuple[int, ...], depths: tuple[int, ...]
) -> Built:
    import transformers

    config = transformers.ConvNextConfig(
        num_channels=3,
        hidden_sizes=list(hidden_sizes),
        depths=list(depths),
        num_stages=len(hidden_sizes),
        image_size=image_size,
    )
    model = HFTensorOutput(transformers.ConvNextModel(config), "pooler_output")
    return model, (image_input(batch, image_size),)



def build_hf_mobilenet_v2(batch: int, image_size: int, width_percent: int) -> Built:
    """MobileNetV2 as published: TensorFlow-style "same" padding (``tf_padding``), so its export
    computes pads from shapes and needs ``fold_shapes`` for TVM's importer."""
    import transformers

    config = transformers.MobileNetV2Config(
        num_channels=3, image_size=image_size, depth_multiplier=width_percent / 100.0,
        tf_padding=True,
    )
    model = HFTensorOutput(transformers.MobileNetV2Model(config), "pooler_output")
    return model, (image_input(batch, image_size),)


def build_hf_efficientnet(batch: int, image_size: int, width_percent: int, depth_percent: int) -> Built:
    """EfficientNet (B0 at ``width_percent = depth_percent = 100``): MBConv blocks, a pointwise
    expansion feeding a 3x3 or 5x5 depthwise conv, squeeze-excite and swish. Strided depthwise
    convs pad explicitly (``ZeroPad2d`` then "valid"), as in the TensorFlow original, so the
    export needs ``fold_shapes``."""
    import transformers
    from transformers.models.efficientnet.modeling_efficientnet import round_filters

    config = transformers.EfficientNetConfig(
        num_channels=3, image_size=image_size, width_coefficient=width_percent / 100.0,
        depth_coefficient=depth_percent / 100.0,
    )
    # The head conv is sized by round_filters(1280) but its batch norm by hidden_dim: they agree
    # only at the default width unless hidden_dim follows the width.
    config.hidden_dim = round_filters(config, 1280)
    model = HFTensorOutput(transformers.EfficientNetModel(config), "pooler_output")
    return model, (image_input(batch, image_size),)


def build_hf_regnet(
    batch: int, image_size: int, embedding_size: int, hidden_sizes: tuple[int, ...],
    depths: tuple[int, ...], groups_width: int, layer_type: str = "x",
) -> Built:
    """RegNetX: ResNeXt-style bottlenecks whose 3x3 convs are grouped (``groups_width``
    channels per group), no squeeze-excite; ``layer_type="y"`` gives RegNetY, the same with
    squeeze-excite in every block."""
    import transformers

    config = transformers.RegNetConfig(
        num_channels=3,
        embedding_size=embedding_size,
        hidden_sizes=list(hidden_sizes),
        depths=list(depths),
        groups_width=groups_width,
        layer_type=layer_type,
        hidden_act="relu",
    )
    model = HFTensorOutput(transformers.RegNetModel(config), "pooler_output")
    return model, (image_input(batch, image_size),)


def build_hf_llama(
    batch: int, seq: int, vocab: int, hidden: int, heads: int, kv_heads: int, ff: int,
    layers: int, model_type: str = "llama",
) -> Built:
    """Llama-style decoder: RMSNorm, rotary position embeddings, grouped-query attention
    (``kv_heads`` key/value heads), SiLU-gated MLP; causal mask prepared as for GPT-2.

    ``model_type`` picks another ``transformers`` decoder of the same shape by its config name
    (``"mistral"``, ``"qwen2"``: Qwen2 adds biases to the q/k/v projections), so the import
    corpus covers several implementations of these layers with one builder.
    """
    import transformers

    config = transformers.AutoConfig.for_model(
        model_type,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=ff,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max(seq, 64),
        use_cache=False,
        bos_token_id=0,
        eos_token_id=vocab - 1,
        attn_implementation="eager",
    )
    model = HFTensorOutput(
        transformers.AutoModel.from_config(config), "last_hidden_state", causal_additive_mask(seq)
    )
    return model, (token_ids(batch, seq, vocab),)


ENTRIES: tuple[ZooEntry, ...] = (
    make_entry(
        "hf_resnet", "hf", "transformers ResNetModel (basic blocks, widths 16/32), pooled output",
        build_hf_resnet,
        {"batch": 1, "image_size": 32, "embedding_size": 16, "hidden_sizes": (16, 32),
         "depths": (1, 1)},
        source="transformers",
    ),
    make_entry(
        "hf_bert", "hf", "transformers BertModel (2 layers, hidden 64), last hidden state",
        build_hf_bert,
        {"batch": 1, "seq": 32, "vocab": 128, "hidden": 64, "heads": 4, "ff": 128, "layers": 2},
        source="transformers",
        input_names=("input_ids",),
    ),
    make_entry(
        "hf_gpt2", "hf", "transformers GPT2Model (2 layers, hidden 64), last hidden state",
        build_hf_gpt2,
        {"batch": 1, "seq": 32, "vocab": 128, "hidden": 64, "heads": 4, "layers": 2},
        source="transformers",
        input_names=("input_ids",),
    ),
    make_entry(
        "hf_vit", "hf", "transformers ViTModel (8x8 patches, 2 layers, hidden 64)",
        build_hf_vit,
        {"batch": 1, "image_size": 32, "patch": 8, "hidden": 64, "heads": 4, "ff": 128,
         "layers": 2},
        source="transformers",
    ),
    make_entry(
        "hf_convnext", "hf", "transformers ConvNextModel (widths 16/32, depth 1/1), pooled",
        build_hf_convnext,
        {"batch": 1, "image_size": 32, "hidden_sizes": (16, 32), "depths": (1, 1)},
        source="transformers",
    ),
)
