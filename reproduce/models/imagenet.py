"""ImageNet networks of the paper's §3.3 / Table 1, built on torchvision's ResNet.

We only adjust torchvision's modules in place (shortcut modules, conv strides, block
classes), so the state_dict keys stay torchvision's: a torchvision checkpoint loads into
our v1.5 / option-B networks, and ours into torchvision.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import resnet as tv

from reproduce.models.cifar import ZeroPadShortcut
from reproduce.models.options import Shortcut, Variant

# Table 1: block type and number of blocks in conv2_x .. conv5_x.
LAYERS: dict[int, tuple[type[tv.BasicBlock] | type[tv.Bottleneck], list[int]]] = {
    18: (tv.BasicBlock, [2, 2, 2, 2]),
    34: (tv.BasicBlock, [3, 4, 6, 3]),
    50: (tv.Bottleneck, [3, 4, 6, 3]),
    101: (tv.Bottleneck, [3, 4, 23, 3]),
    152: (tv.Bottleneck, [3, 8, 36, 3]),
}


class PlainBasicBlock(tv.BasicBlock):
    """torchvision's basic block without the addition: the paper's plain network (Fig. 3 middle)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))))


class PlainBottleneck(tv.Bottleneck):
    """torchvision's bottleneck without the addition (not in the paper's tables; for completeness)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)))


def _identity_projection(channels: int) -> nn.Sequential:
    """Option C on a block whose shape does not change: 1x1 conv (stride 1) + BN, He-initialised
    like every other conv (torchvision's init has already run when we add it)."""
    conv = nn.Conv2d(channels, channels, 1, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return nn.Sequential(conv, nn.BatchNorm2d(channels))


def imagenet_resnet(
    depth: int,
    residual: bool = True,
    shortcut: Shortcut | str | None = Shortcut.B,
    variant: Variant | str = Variant.V1,
    num_classes: int = 1000,
) -> tv.ResNet:
    """A Table 1 network. torchvision's own layout is option B / variant v1.5; we adapt it."""
    if depth not in LAYERS:
        raise ValueError(f"ImageNet ResNet depth must be one of {sorted(LAYERS)}, got {depth}")
    block, layers = LAYERS[depth]
    bottleneck = block is tv.Bottleneck
    variant = Variant(variant)
    if variant == Variant.V1_5 and not bottleneck:
        raise ValueError(f"variant v1.5 only concerns bottleneck blocks; {depth}-layer nets use basic blocks")
    if residual:
        if shortcut is None:
            raise ValueError("a residual ImageNet network needs a shortcut option: A, B or C")
        shortcut = Shortcut(shortcut)
    else:
        block = PlainBottleneck if bottleneck else PlainBasicBlock

    # torchvision's init: He normal (fan_out) for convs, BN weight 1 / bias 0, and
    # zero_init_residual=False, since the paper does not zero-init the last BN of a block.
    model = tv.ResNet(block, layers, num_classes=num_classes)
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        for blk in stage:
            if not residual:
                blk.downsample = None  # no shortcut, so no projection either
            elif shortcut == Shortcut.A and blk.downsample is not None:
                # Option A (§3.3): parameter-free identity with zero padding; 2x subsampling where
                # the feature map halves ("performed with a stride of 2").
                conv = blk.downsample[0]
                blk.downsample = ZeroPadShortcut(conv.in_channels, conv.out_channels, conv.stride[0])
            elif shortcut == Shortcut.C and blk.downsample is None:
                blk.downsample = _identity_projection(blk.conv1.in_channels)  # in == out here
            if bottleneck and variant == Variant.V1 and blk.conv2.stride != (1, 1):
                # The paper's bottleneck (v1) downsamples in its first 1x1 conv; torchvision (v1.5)
                # moved the stride to the 3x3 conv. Only the stride moves: same parameters and keys.
                blk.conv1.stride, blk.conv2.stride = blk.conv2.stride, (1, 1)
    return model
