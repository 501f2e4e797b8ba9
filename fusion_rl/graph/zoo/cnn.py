"""Convolutional models of the tiny zoo: plain, squeeze-excite, ConvNeXt-style, residual, mobile."""

from __future__ import annotations

import torch
from torch import nn

from fusion_rl.graph.zoo.blocks import Built, ZooEntry, conv_bn_act, image_input, make_entry


class PlainCNN(nn.Module):
    """VGG-like stack of conv-BN-ReLU stages, global pooling and a linear head."""

    def __init__(self, channels: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for i, c in enumerate(channels):
            # Downsample from the second stage on, as VGG/ResNet do, to keep naive loops cheap.
            layers.append(conv_bn_act(cin, c, 3, stride=1 if i == 0 else 2, act=nn.ReLU()))
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
        self.conv1 = conv_bn_act(cin, cout, 3, stride=stride, act=nn.ReLU())
        self.conv2 = conv_bn_act(cout, cout, 3)
        self.shortcut: nn.Module = (
            conv_bn_act(cin, cout, 1, stride=stride)
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
        self.stem = conv_bn_act(3, widths[0], 3, act=nn.ReLU())
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
            conv_bn_act(cin, mid, 1, act=nn.ReLU6()),
            conv_bn_act(mid, mid, 3, stride=stride, groups=mid, act=nn.ReLU6()),
            conv_bn_act(mid, cout, 1),
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
        self.stem = conv_bn_act(3, stem, 3, stride=2, act=nn.ReLU6())
        blocks: list[nn.Module] = []
        cin = stem
        for cout, stride in stages:
            blocks.append(InvertedResidual(cin, cout, stride, expand))
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.last = conv_bn_act(cin, last, 1, act=nn.ReLU6())
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
                conv_bn_act(cin, c, 3, stride=1 if i == 0 else 2, act=nn.ReLU()),
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


def _build_cnn_plain(
    batch: int, image_size: int, channels: tuple[int, ...], num_classes: int
) -> Built:
    return PlainCNN(tuple(channels), num_classes), (image_input(batch, image_size),)


def _build_resnet_tiny(
    batch: int, image_size: int, widths: tuple[int, ...], blocks_per_stage: int, num_classes: int
) -> Built:
    return ResNetTiny(tuple(widths), blocks_per_stage, num_classes), (image_input(batch, image_size),)


def _build_mobilenet_tiny(
    batch: int, image_size: int, stem: int, stages: tuple[tuple[int, int], ...], expand: int,
    last: int, num_classes: int,
) -> Built:
    stages_t = tuple((int(c), int(s)) for c, s in stages)
    model = MobileNetTiny(stem, stages_t, expand, last, num_classes)
    return model, (image_input(batch, image_size),)


def _build_se_cnn(
    batch: int, image_size: int, channels: tuple[int, ...], reduction: int, num_classes: int
) -> Built:
    return SECNN(tuple(channels), reduction, num_classes), (image_input(batch, image_size),)


def _build_convnext_tiny(
    batch: int, image_size: int, dim: int, patch: int, depth: int, kernel: int, mlp_ratio: int,
    num_classes: int,
) -> Built:
    model = ConvLNNet(dim, patch, depth, kernel, mlp_ratio, num_classes)
    return model, (image_input(batch, image_size),)




ENTRIES: tuple[ZooEntry, ...] = (
    make_entry(
        "cnn_plain", "cnn", "VGG-like conv-BN-ReLU x3, global pool, linear head (1x3x32x32)",
        _build_cnn_plain,
        {"batch": 1, "image_size": 32, "channels": (16, 32, 32), "num_classes": 10},
    ),
    make_entry(
        "se_cnn", "cnn", "conv-BN-ReLU stages with squeeze-excite gates (1x3x32x32)",
        _build_se_cnn,
        {"batch": 1, "image_size": 32, "channels": (16, 32), "reduction": 4, "num_classes": 10},
    ),
    make_entry(
        "convnext_tiny", "cnn",
        "patchify stem + ConvNeXt blocks (7x7 depthwise conv, LayerNorm, GELU MLP)",
        _build_convnext_tiny,
        {"batch": 1, "image_size": 32, "dim": 32, "patch": 4, "depth": 2, "kernel": 7,
         "mlp_ratio": 4, "num_classes": 10},
    ),
    make_entry(
        "resnet_tiny", "residual_cnn", "ResNet with basic blocks, widths 16/32 (1x3x32x32)",
        _build_resnet_tiny,
        {"batch": 1, "image_size": 32, "widths": (16, 32), "blocks_per_stage": 1,
         "num_classes": 10},
    ),
    make_entry(
        "mobilenet_tiny", "mobile_cnn",
        "MobileNetV2-style inverted residuals with depthwise convs and ReLU6 (1x3x32x32)",
        _build_mobilenet_tiny,
        {"batch": 1, "image_size": 32, "stem": 16, "stages": ((16, 1), (24, 2), (24, 1)),
         "expand": 4, "last": 64, "num_classes": 10},
    ),
)
