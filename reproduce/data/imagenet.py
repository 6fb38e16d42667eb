"""ImageNet-style folders (train/<wnid>/*, val/<wnid>/*) through torchvision, with the
paper's augmentation (§3.4) and its two test protocols."""
from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from torchvision import datasets
from torchvision.transforms import v2

from reproduce.data.cifar import DataError

# AlexNet's PCA colour augmentation ("standard color augmentation in [21]"): eigen-decomposition
# of the ImageNet RGB covariance on [0, 1] pixels, as published with fb.resnet.torch.
PCA_EIGVAL = torch.tensor([0.2175, 0.0188, 0.0045])
PCA_EIGVEC = torch.tensor([[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]])
MEAN = (0.485, 0.456, 0.406)  # ImageNet channel statistics on [0, 1] pixels
STD = (0.229, 0.224, 0.225)
TEST_SHORT_SIDE = 256  # both protocols resize the shorter side to 256 (paper §3.4, Tables 2-3)


class Lighting(torch.nn.Module):
    """Add eigvec @ (alpha * eigval), alpha ~ N(0, std), to every pixel of a float image."""

    def __init__(self, std: float):
        super().__init__()
        self.std = std

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        if self.std == 0:
            return img
        alpha = torch.randn(3) * self.std
        return img + (PCA_EIGVEC @ (alpha * PCA_EIGVAL)).view(3, 1, 1)


def train_transform(scale: tuple[int, int], crop: int, lighting: float, augment: bool) -> v2.Compose:
    if not augment:
        return eval_transform(crop, "center224")
    return v2.Compose([
        v2.PILToTensor(),
        v2.RandomShortestSize(min_size=list(range(scale[0], scale[1] + 1)), antialias=True),  # scale augmentation
        v2.RandomCrop(crop),
        v2.RandomHorizontalFlip(),
        v2.ToDtype(torch.float32, scale=True),
        Lighting(lighting),
        v2.Normalize(MEAN, STD),
    ])


def eval_transform(crop: int, protocol: str) -> v2.Compose:
    short = round(crop * TEST_SHORT_SIDE / 224)
    head = [v2.PILToTensor(), v2.Resize(short, antialias=True)]
    tail = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)]
    if protocol == "tencrop":  # 4 corners + centre, and their flips -> (10, 3, crop, crop)
        return v2.Compose(head + tail + [partial(_ten_crop, size=crop)])
    return v2.Compose(head + [v2.CenterCrop(crop)] + tail)


def _ten_crop(img: torch.Tensor, size: int) -> torch.Tensor:
    return torch.stack(v2.functional.ten_crop(img, size))


def image_folder(root: Path, split: str, transform) -> datasets.ImageFolder:
    folder = Path(root) / split
    if not folder.is_dir():
        raise DataError(f"{folder} not found; data.path must hold train/ and val/ class folders")
    try:
        ds = datasets.ImageFolder(str(folder), transform=transform, loader=_load_rgb)
    except (FileNotFoundError, RuntimeError) as err:
        raise DataError(f"{folder}: {err}") from None
    return ds


def _load_rgb(path: str):
    from PIL import Image

    try:
        with open(path, "rb") as f, Image.open(f) as img:
            return img.convert("RGB")
    except Exception as err:  # PIL raises many types for a bad file
        raise DataError(f"cannot decode image {path}: {err}") from None
