"""ImageNet-style folders (train/<wnid>/*, val/<wnid>/*) through torchvision, with the
paper's augmentation (§3.4) and its two test protocols: the torchvision loader's ImageNet,
and the constants the ffcv loader's ImageNet shares with it."""

from __future__ import annotations

import hashlib
from functools import partial
from pathlib import Path

import torch
from torchvision import datasets
from torchvision.transforms import v2

from reproduce.config import Config
from reproduce.data.base import Data, DataError, Split

# AlexNet's PCA colour augmentation ("standard color augmentation in [21]"): eigen-decomposition
# of the ImageNet RGB covariance on [0, 1] pixels, as published with fb.resnet.torch.
PCA_EIGVAL = torch.tensor([0.2175, 0.0188, 0.0045])
PCA_EIGVEC = torch.tensor([[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]])
MEAN = (0.485, 0.456, 0.406)  # ImageNet channel statistics on [0, 1] pixels
STD = (0.229, 0.224, 0.225)
# center224 and tencrop resize the shorter side to 256 first. The paper says only "the standard 10-crop
# testing [21]" (§3.4); 256 is that standard's side (AlexNet [21], fb.resnet.torch), not a number the paper gives.
TEST_SHORT_SIDE = 256
# multiscale (§3.4, Table 4): the whole image with its shorter side at each of these (at crop 224), and
# its mirror image, as VGG [41] averages over flips too (the paper does not say it does); the net runs
# fully convolutionally on each.
MULTISCALE_SIDES = (224, 256, 384, 480, 640)


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


def build_data(cfg: Config) -> Data:
    """The splits of data.path through torchvision (data.loader=torchvision)."""
    d = cfg.data
    train = image_folder(d.path, "train", None)
    val = image_folder(d.path, "val", None)
    if train.classes != val.classes:
        raise DataError(f"{d.path}: train/ and val/ have different class folders")
    # Of the paths inside data.path and the labels: the same images copied elsewhere (a node's
    # local disk, a new mount) are the same data, so a resumed run accepts them.
    listing = "\n".join(f"{Path(p).relative_to(d.path)}:{label}" for p, label in train.samples + val.samples).encode()
    return Data(
        train=Split(train, train_transform(d.scale, d.crop, d.lighting, d.augment, d.train_crop), seeded=True),
        val=Split(val, eval_transform(d.crop, "center224")),
        test=Split(val, eval_transform(d.crop, cfg.eval.protocol.value)),
        num_classes=len(train.classes),
        fingerprint=hashlib.sha256(listing).hexdigest()[:16],
        description=f"ImageNet-style folders at {d.path}: {len(train)} train / {len(val)} val images, "
        f"{len(train.classes)} classes; test = val with protocol {cfg.eval.protocol.value}",
    )


def train_transform(
    scale: tuple[int, int], crop: int, lighting: float, augment: bool, train_crop: str = "scale"
) -> v2.Compose:
    """The paper's scale augmentation (shorter side resized to s ~ U{scale}, then a random
    crop x crop window) or, with train_crop=random_resized, torchvision's RandomResizedCrop;
    then a flip, the PCA lighting and the normalisation."""
    if not augment:
        return eval_transform(crop, "center224")
    if train_crop == "random_resized":
        window = [v2.RandomResizedCrop(crop, antialias=True)]
    else:
        window = [
            v2.RandomShortestSize(min_size=list(range(scale[0], scale[1] + 1)), antialias=True),
            v2.RandomCrop(crop),
        ]
    return v2.Compose(
        [
            v2.PILToTensor(),
            *window,
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            Lighting(lighting),
            v2.Normalize(MEAN, STD),
        ]
    )


def eval_transform(crop: int, protocol: str) -> v2.Compose:
    short = round(crop * TEST_SHORT_SIDE / 224)
    head = [v2.PILToTensor(), v2.Resize(short, antialias=True)]
    tail = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)]
    if protocol == "multiscale":
        return MultiScale([round(crop * side / 224) for side in MULTISCALE_SIDES])
    if protocol == "tencrop":  # 4 corners + centre, and their flips -> (10, 3, crop, crop)
        return v2.Compose(head + tail + [partial(_ten_crop, size=crop)])
    return v2.Compose(head + [v2.CenterCrop(crop)] + tail)


class MultiScale:
    """PIL image -> a tuple with one (2, 3, H, W) tensor per shorter side: the whole image resized,
    normalised, and its horizontal flip. Sizes differ by scale (and by image where aspect ratios
    differ), so the loader collates them per scale and engine.evaluate averages the softmax scores."""

    def __init__(self, sides: list[int]):
        self.sides = sides

    def __call__(self, img) -> tuple[torch.Tensor, ...]:
        x = v2.functional.pil_to_tensor(img)
        out = []
        for side in self.sides:
            y = v2.functional.to_dtype(v2.functional.resize(x, side, antialias=True), torch.float32, scale=True)
            y = v2.functional.normalize(y, MEAN, STD)
            out.append(torch.stack([y, y.flip(-1)]))
        return tuple(out)

    def pixels(self, crop: int) -> float:
        """Pixels one image costs at all scales and flips, in units of one crop x crop view (square image)."""
        return 2 * sum(side * side for side in self.sides) / (crop * crop)


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
