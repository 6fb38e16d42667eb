"""The layout of reproduce.data: every module imports on its own (no import cycle), importing
changes nothing (no FFCV, torch's thread count untouched) except where FFCV is the point,
and the backend table covers every data.loader."""

from __future__ import annotations

import subprocess
import sys
import typing

import pytest

from reproduce.config import DataConfig
from reproduce.data import BACKENDS
from reproduce.data.base import DataError
from reproduce.data.order import batches_per_epoch
from tests.conftest import REPO

QUIET = [
    "reproduce.data",
    "reproduce.data.base",
    "reproduce.data.order",
    "reproduce.data.augment",
    "reproduce.data.cifar",
    "reproduce.data.imagenet",
    "reproduce.data.torchvision_loader",
    "reproduce.data.synthetic",
    "reproduce.data.gpu",
    "reproduce.data.ffcv",
    "reproduce.data.ffcv.loaders",
    "reproduce.data.ffcv.manifest",
    "reproduce.data.ffcv.prepare",
]
FFCV = ["reproduce.data.ffcv.pipeline", "reproduce.data.ffcv.decode"]  # importing them imports FFCV

SCRIPT = """
import importlib, importlib.util, sys, torch
torch.set_num_threads(3)
def fresh(name):
    for m in [m for m in sys.modules if m == "reproduce" or m.startswith("reproduce.")]:
        del sys.modules[m]
    return importlib.import_module(name)
for name in sys.argv[1].split(","):
    fresh(name)
    assert torch.get_num_threads() == 3 and "ffcv" not in sys.modules, (name, torch.get_num_threads())
if importlib.util.find_spec("ffcv") is None:  # not installed: only the part above applies
    sys.exit(0)
loaders = fresh("reproduce.data").ffcv_module()
assert loaders.__name__ == "reproduce.data.ffcv.loaders" and torch.get_num_threads() == 3, torch.get_num_threads()
for name in sys.argv[2].split(","):
    fresh(name)
print("ok")
"""


def test_every_module_imports_alone_without_side_effects():
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, ",".join(QUIET), ",".join(FFCV)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr


def test_backend_table_covers_every_loader():
    loaders = typing.get_args(DataConfig.model_fields["loader"].annotation)
    assert set(BACKENDS) == {*loaders, "synthetic"}


def test_fewer_than_one_batch_is_refused():
    assert batches_per_epoch(100, 32) == 3
    with pytest.raises(
        DataError, match=r"the training split has 10 images, fewer than one global batch of 32; lower optim.batch_size"
    ):
        batches_per_epoch(10, 32)


def test_imagenet_folders_copied_elsewhere_are_the_same_data(tmp_path):
    """The data fingerprint of an ImageNet-style folder (which a resume checks against its run's)
    depends on the images' paths inside it and their labels, not on where the folder lies: SLURM
    jobs often copy the data to each node's local disk, under a new path each time."""
    import shutil

    from PIL import Image

    from reproduce.config import load_config
    from reproduce.data.imagenet import build_data

    root = tmp_path / "a"
    for split in ("train", "val"):
        for label, wnid in enumerate(("n01440764", "n02102040")):
            (root / split / wnid).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (40, 36), (100 * label, 50, i)).save(root / split / wnid / f"{i}.JPEG")
    shutil.copytree(root, tmp_path / "elsewhere" / "b")
    renamed = shutil.copytree(root, tmp_path / "c")
    (renamed / "val" / "n01440764" / "1.JPEG").rename(renamed / "val" / "n01440764" / "2.JPEG")

    def fingerprint(path):
        cfg = load_config(REPO / "configs" / "imagenet" / "resnet18.yaml", [f"data.path={path}", "data.workers=0"])
        return build_data(cfg).fingerprint

    assert fingerprint(root) == fingerprint(tmp_path / "elsewhere" / "b") != fingerprint(renamed)
