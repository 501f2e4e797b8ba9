"""All-MLP models of the tiny zoo: a plain MLP and an MLP-Mixer."""

from __future__ import annotations

import torch
from torch import nn

from fusion_rl.errors import ConfigError
from fusion_rl.graph.zoo.blocks import Built, FeedForward, ZooEntry, image_input, make_entry


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


def _build_mlp(batch: int, in_features: int, hidden: int, layers: int, num_classes: int) -> Built:
    return TinyMLP(in_features, hidden, layers, num_classes), (torch.randn(batch, in_features),)


def _build_mixer_tiny(
    batch: int, image_size: int, patch: int, hidden: int, token_ff: int, channel_ff: int,
    layers: int, num_classes: int,
) -> Built:
    model = TinyMixer(image_size, patch, hidden, token_ff, channel_ff, layers, num_classes)
    return model, (image_input(batch, image_size),)




ENTRIES: tuple[ZooEntry, ...] = (
    make_entry(
        "mlp_tiny", "mlp", "3-layer MLP with ReLU on a 1x64 vector",
        _build_mlp,
        {"batch": 1, "in_features": 64, "hidden": 128, "layers": 3, "num_classes": 10},
    ),
    make_entry(
        "mixer_tiny", "mixer", "MLP-Mixer: 4x4 patches, token- and channel-mixing MLPs",
        _build_mixer_tiny,
        {"batch": 1, "image_size": 32, "patch": 4, "hidden": 32, "token_ff": 64,
         "channel_ff": 64, "layers": 2, "num_classes": 10},
    ),
)
