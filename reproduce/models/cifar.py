"""CIFAR-10 networks of the paper's §4.2: 6n+2 layers with 16, 32, 64 filters.

The state_dict layout (`conv1, bn1, layerX.K.{conv1,bn1,conv2,bn2,shortcut.0,shortcut.1}, linear`)
is the one of the widely used public CIFAR ResNet checkpoints, so those load strictly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from reproduce.models.options import Shortcut, Variant


class ZeroPadShortcut(nn.Module):
    """Option A (§3.3): identity, subsampled by `stride` and zero-padded to `out_channels` where
    the shape changes; no parameters.

    Subsampling takes every `stride`-th pixel, the positions a 1x1 stride-2 projection would see.
    The new channels are split evenly on both sides of the channel dimension (planes//4 each side
    for 16->32 and 32->64), as the public CIFAR checkpoints were trained; the paper only says
    "extra zero entries padded", and where they go changes nothing but which channels of the next
    block's input carry the identity, so ImageNet nets use the same even split.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(f"option A can only add channels, not go from {in_channels} to {out_channels}")
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        extra = self.out_channels - self.in_channels
        if extra:
            x = F.pad(x, (0, 0, 0, 0, extra // 2, extra - extra // 2))
        return x

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


def projection(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    """Options B/C: a 1x1 convolution and BN (keys `0` and `1`, as in the public checkpoints)."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers, ReLU after the first and after the addition (§3.2, Fig. 2).

    A plain block (residual=False) is the same stack with no addition and no shortcut module,
    so plain and residual nets differ by nothing but the identity (§4.2 compares them so).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, residual: bool, shortcut: Shortcut):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.residual = residual
        changes = stride != 1 or in_channels != out_channels
        self.shortcut: nn.Module | None
        if not residual:
            self.shortcut = None
        elif shortcut == Shortcut.C or (shortcut == Shortcut.B and changes):
            self.shortcut = projection(in_channels, out_channels, stride)
        else:  # option A everywhere, and B where the shape is unchanged: parameter-free identity
            self.shortcut = ZeroPadShortcut(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.shortcut is not None:
            out = out + self.shortcut(x)
        return F.relu(out)


class CifarResNet(nn.Module):
    """§4.2: 3x3 conv (16) -> 3 stages of n blocks (16, 32, 64 filters; the first conv of stages
    2 and 3 has stride 2) -> global average pooling -> 10-way FC. 6n+2 weighted layers."""

    def __init__(
        self, depth: int, residual: bool = True, shortcut: Shortcut | str | None = Shortcut.A, num_classes: int = 10
    ):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110, 1202), got {depth}")
        if residual and shortcut is None:
            raise ValueError("a residual CIFAR network needs a shortcut option: A, B or C")
        shortcut = Shortcut(shortcut) if shortcut is not None else Shortcut.A  # unused by plain nets
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages, in_channels = [], 16
        for i, width in enumerate((16, 32, 64)):
            blocks = []
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1  # "subsampling ... by convolutions with a stride of 2"
                blocks.append(BasicBlock(in_channels, width, stride, residual, shortcut))
                in_channels = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(64, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # He initialisation [13] (§3.4, used again in §4.2) on every conv, in its fan_out form (the
        # paper allows fan_in or fan_out). The paper does not say how the FC layer is initialised; we
        # use the same He-normal (fan_out: std sqrt(2/10)) with zero bias. Public CIFAR models differ
        # here (fan_in He-normal, or PyTorch's default uniform). BN starts at the identity (weight 1, bias 0).
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def cifar_resnet(
    depth: int,
    residual: bool = True,
    shortcut: Shortcut | None = Shortcut.A,
    variant: Variant = Variant.V1,
    num_classes: int = 10,
) -> CifarResNet:
    """Registry builder, with the same signature as `imagenet_resnet`."""
    if Variant(variant) != Variant.V1:
        raise ValueError("CIFAR networks have no bottleneck blocks; the variant must be v1")
    return CifarResNet(depth, residual, shortcut, num_classes)
