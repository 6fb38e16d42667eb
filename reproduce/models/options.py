"""Architecture switches, as enums so a typo cannot pass silently."""

import enum


class Shortcut(str, enum.Enum):
    """Paper §3.3 / Table 3: how a shortcut handles a change of shape."""

    A = "A"  # identity; zero-padded channels and subsampling where the shape changes (no parameters)
    B = "B"  # 1x1 projection (+BN) only where the shape changes
    C = "C"  # 1x1 projection (+BN) on every shortcut


class Variant(str, enum.Enum):
    """Where a bottleneck block downsamples."""

    V1 = "v1"  # the paper's: stride 2 in the first 1x1 convolution
    V1_5 = "v1.5"  # torchvision's: stride 2 in the 3x3 convolution
