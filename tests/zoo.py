"""Small user architectures for tests: what `teacher.arch=tests.zoo:NAME` imports.

Plain `nn.Module` classes (and one factory function) of standard layers, the kind of model a
user brings: residual adds, batch norm, depthwise convolutions, attention. Every argument is a
keyword with a default and every model ends in `n_classes` logits. They hold no randomness of
their own: seed torch before building one to get the same weights twice.

Inputs: `ResNet2d` and `MobileNetBlockNet` take `[N, C, H, W]`, `ResNet1d` takes `[N, C, L]`,
`TransformerClassifier` takes `[N, T, n_features]` (`data.shape: [T, n_features]`), and so does
`HeadsAttentionNet`, whose hand-written attention reshapes into heads with sizes fixed at build
time: no narrowing engine can follow it (reconstruct.mode=width cannot handle it, low_rank can).
"""

from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus a shortcut, then ReLU. The shortcut is the identity, or a
    1x1 conv + BN where the block changes the stride or the channels."""

    def __init__(self, cin: int, cout: int, stride: int = 1, dims: int = 2) -> None:
        super().__init__()
        conv, bn = (nn.Conv1d, nn.BatchNorm1d) if dims == 1 else (nn.Conv2d, nn.BatchNorm2d)
        self.conv1 = conv(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = bn(cout)
        self.relu = nn.ReLU()
        self.conv2 = conv(cout, cout, 3, padding=1, bias=False)
        self.bn2 = bn(cout)
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(conv(cin, cout, 1, stride=stride, bias=False), bn(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.downsample(x))


class _ResNet(nn.Module):
    def __init__(self, in_channels: int, channels: int, n_classes: int, dims: int) -> None:
        super().__init__()
        conv, bn = (nn.Conv1d, nn.BatchNorm1d) if dims == 1 else (nn.Conv2d, nn.BatchNorm2d)
        pool = nn.AdaptiveAvgPool1d if dims == 1 else nn.AdaptiveAvgPool2d
        self.stem = nn.Sequential(
            conv(in_channels, channels, 3, padding=1, bias=False), bn(channels), nn.ReLU()
        )
        self.layer1 = BasicBlock(channels, channels, stride=1, dims=dims)
        self.layer2 = BasicBlock(channels, 2 * channels, stride=2, dims=dims)
        self.pool = pool(1)
        self.fc = nn.Linear(2 * channels, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class ResNet2d(_ResNet):
    """Stem, two basic blocks (the second: stride 2, doubled channels), global pool, linear."""

    def __init__(self, in_channels: int = 1, channels: int = 8, n_classes: int = 10) -> None:
        super().__init__(in_channels, channels, n_classes, dims=2)


class ResNet1d(_ResNet):
    """`ResNet2d` in one dimension: input `[N, C, L]`."""

    def __init__(self, in_channels: int = 1, channels: int = 8, n_classes: int = 10) -> None:
        super().__init__(in_channels, channels, n_classes, dims=1)


def make_resnet1d(channels: int = 8, n_classes: int = 10) -> nn.Module:
    """A factory function (the other form `teacher.arch` accepts): a one-channel `ResNet1d`."""
    return ResNet1d(in_channels=1, channels=channels, n_classes=n_classes)


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expand + BN + ReLU6, depthwise 3x3 + BN + ReLU6, 1x1 project +
    BN, added to the input."""

    def __init__(self, channels: int, expand: int = 4) -> None:
        super().__init__()
        hidden = channels * expand
        self.expand = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()
        )
        self.depthwise = nn.Sequential(
            nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
        )
        self.project = nn.Sequential(
            nn.Conv2d(hidden, channels, 1, bias=False), nn.BatchNorm2d(channels)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.project(self.depthwise(self.expand(x)))


class MobileNetBlockNet(nn.Module):
    """Stem conv + BN + ReLU6, one inverted-residual block, global pool, linear."""

    def __init__(
        self, in_channels: int = 1, channels: int = 8, n_classes: int = 10, expand: int = 4
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU6(),
        )
        self.block = InvertedResidual(channels, expand)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


class TransformerClassifier(nn.Module):
    """Linear token embedding + learned positions, a post-norm encoder (no dropout), the mean
    over tokens, a linear head. Input `[N, seq_len, n_features]`."""

    def __init__(
        self,
        n_features: int = 8,
        seq_len: int = 8,
        d_model: int = 32,
        n_heads: int = 4,
        dim_feedforward: int = 64,
        n_layers: int = 2,
        n_classes: int = 10,
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(n_features, d_model)
        self.pos = nn.Parameter(torch.zeros(1, seq_len, d_model))
        nn.init.normal_(self.pos, std=0.02)
        layer = nn.TransformerEncoderLayer(
            d_model, n_heads, dim_feedforward, dropout=0.0, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x) + self.pos).mean(1))


class InceptionNet(nn.Module):
    """Two conv branches (1x1 and 3x3) concatenated on the channel axis, read by a 1x1 conv:
    one reader of two groups, at offsets."""

    def __init__(self, in_channels: int = 1, channels: int = 8, n_classes: int = 10) -> None:
        super().__init__()
        self.branch1 = nn.Sequential(nn.Conv2d(in_channels, channels, 1), nn.ReLU())
        self.branch3 = nn.Sequential(nn.Conv2d(in_channels, channels, 3, padding=1), nn.ReLU())
        self.mix = nn.Sequential(nn.Conv2d(2 * channels, channels, 1), nn.ReLU())
        self.fc = nn.Linear(channels, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mix(torch.cat([self.branch1(x), self.branch3(x)], dim=1))
        return self.fc(x.mean((2, 3)))


class TokenClassifier(nn.Module):
    """Token ids (given as floats, as distill feeds every row) -> `nn.Embedding`, mean over the
    sequence, an MLP head."""

    def __init__(
        self, vocab: int = 16, dim: int = 16, hidden: int = 32, n_classes: int = 10
    ) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim)
        self.hidden = nn.Linear(dim, hidden)
        self.out = nn.Linear(hidden, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.embedding(x.long()).mean(1)
        return self.out(torch.relu(self.hidden(e)))


class HeadsAttention(nn.Module):
    """Self-attention written by hand, as users write it: one fused q/k/v Linear whose output
    the forward `.view`s into (3, heads, head size) fixed when the module was built (kept in one
    tuple, named like nothing an engine knows), then an output projection."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.split = (3, heads, dim // heads)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, _ = x.shape
        q, k, v = self.qkv(x).view(n, t, *self.split).permute(2, 0, 3, 1, 4)
        weights = (q @ k.transpose(-2, -1) / self.split[2] ** 0.5).softmax(-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(n, t, -1))


class HeadsAttentionNet(nn.Module):
    """Linear token embedding, one residual `HeadsAttention` block, the mean over tokens, a
    linear head. Input `[N, T, n_features]`."""

    def __init__(
        self, n_features: int = 8, dim: int = 32, heads: int = 4, n_classes: int = 10
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(n_features, dim)
        self.attn = HeadsAttention(dim, heads)
        self.head = nn.Linear(dim, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        return self.head((x + self.attn(x)).mean(1))


__all__ = [
    "BasicBlock",
    "HeadsAttention",
    "HeadsAttentionNet",
    "InceptionNet",
    "InvertedResidual",
    "MobileNetBlockNet",
    "ResNet1d",
    "ResNet2d",
    "TokenClassifier",
    "TransformerClassifier",
    "make_resnet1d",
]
