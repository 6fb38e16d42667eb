"""The device-resident CIFAR-10 loader (data.loader=gpu), run on the CPU: the torchvision
path's augmentation semantics and evaluation batches, TrainBatches' order and sharding,
exact resume, and a real training run through train.main."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from reproduce import train
from reproduce.config import load_config
from reproduce.data import build_data, eval_loader, train_loader
from reproduce.data.augment import PAD, pad_crop_flip
from reproduce.data.order import TrainBatches
from reproduce.distributed import DistInfo
from tests.conftest import CLASSES, REPO, stop_and_resume_matches_straight, tiny_overrides

CIFAR = REPO / "configs" / "cifar10" / "resnet20.yaml"


def dist(rank: int = 0, world: int = 1) -> DistInfo:
    return DistInfo(rank, rank, world, torch.device("cpu"), "python", None)


def make_marker_tree(root: Path, per_class: int = 16) -> Path:
    """Every training image is the same random 'marker', so a crop's offset and flip can be
    read back from the augmented image; the test images are ordinary noise."""
    rng = np.random.default_rng(7)
    marker = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    for split, count in (("train", per_class), ("test", 2)):
        for cls in CLASSES:
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = marker if split == "train" else rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:04d}.png")
    return root


def read_offsets(batch: torch.Tensor, marker: torch.Tensor) -> list[tuple[int, int, bool]]:
    """(row offset, column offset, flipped) of every image of `batch`: the one of the 9 x 9 x 2
    candidate crops of the padded normalised marker that it equals exactly."""
    n = (2 * PAD + 1) ** 2
    rows, cols = torch.meshgrid(torch.arange(2 * PAD + 1), torch.arange(2 * PAD + 1), indexing="ij")
    offsets = torch.stack([rows.flatten(), cols.flatten()], 1).repeat(2, 1)
    flips = torch.arange(2 * n) >= n
    candidates = pad_crop_flip(marker.expand(2 * n, -1, -1, -1), offsets, flips)
    found = []
    for image in batch:
        distance = (candidates - image).abs().flatten(1).amax(1)
        best = int(distance.argmin())
        assert distance[best] == 0, "an augmented image is no exact crop of the padded marker"
        found.append((int(offsets[best, 0]), int(offsets[best, 1]), bool(flips[best])))
    return found


def check_uniform_crops_and_flips(found: list[tuple[int, int, bool]]) -> None:
    n = len(found)
    for axis in (0, 1):
        counts = np.bincount([f[axis] for f in found], minlength=2 * PAD + 1)
        assert len(counts) == 2 * PAD + 1, counts  # never beyond 0..8
        expected = n / (2 * PAD + 1)  # each count is binomial: 5 standard deviations of slack
        assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected)), counts
    assert len({(r, c) for r, c, _ in found}) == (2 * PAD + 1) ** 2  # every (row, column) pair occurs
    share = np.mean([f[2] for f in found])
    assert abs(share - 0.5) < 5 * 0.5 / np.sqrt(n), share


@pytest.fixture(scope="module")
def marker_tree(tmp_path_factory) -> Path:
    return make_marker_tree(tmp_path_factory.mktemp("marker") / "tree")


def marker_config(tree: Path, loader: str, **extra):
    overrides = tiny_overrides(
        tree,
        **{
            "data.val_split": 0,
            "data.normalize": "channel",
            "optim.batch_size": 32,
            "schedule.iterations": 40,
            "schedule.milestones": "[]",
            "data.loader": loader,
            **extra,
        },
    )
    return load_config(CIFAR, overrides)


def marker(tree: Path) -> torch.Tensor:
    """The normalised marker, (1, 3, 32, 32): a training batch without augmentation."""
    cfg = marker_config(tree, "gpu", **{"data.augment": "false"})
    return next(iter(train_loader(build_data(cfg), cfg, dist(), 0)))[0][:1]


@pytest.mark.parametrize("loader", ["torchvision", "gpu"])
def test_crops_and_flips_are_uniform(loader, marker_tree):
    """1280 augmented views of the marker: offsets uniform over 0..8 on both axes, flips ~50%."""
    cfg = marker_config(marker_tree, loader)
    found = [
        f
        for images, _ in train_loader(build_data(cfg), cfg, dist(), 0)
        for f in read_offsets(images, marker(marker_tree))
    ]
    assert len(found) == 40 * 32
    check_uniform_crops_and_flips(found)


@pytest.mark.parametrize("normalize", ["pixel_mean", "channel"])
def test_evaluation_batches_equal_the_torchvision_path(cifar_tree, normalize):
    configs = [
        load_config(
            CIFAR,
            tiny_overrides(cifar_tree, **{"data.loader": loader, "data.normalize": normalize, "eval.batch_size": 16}),
        )
        for loader in ("torchvision", "gpu")
    ]
    reference, resident = (build_data(cfg) for cfg in configs)
    assert reference.fingerprint == resident.fingerprint
    for split in ("val", "test"):
        a = list(eval_loader(getattr(reference, split), configs[0], dist()))
        b = list(eval_loader(getattr(resident, split), configs[1], dist()))
        assert len(a) == len(b) > 1
        for (xa, ya), (xb, yb) in zip(a, b):
            assert xb.dtype == torch.float32 and xb.shape == xa.shape
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_order_and_shards_are_trainbatches(cifar_tree):
    """Same permutation and labels as TrainBatches; two ranks split each global batch."""
    cfg = load_config(
        CIFAR,
        tiny_overrides(
            cifar_tree,
            **{"data.loader": "gpu", "optim.batch_size": 32, "schedule.iterations": 14, "schedule.milestones": "[7]"},
        ),
    )
    data = build_data(cfg)
    single = list(train_loader(data, cfg, dist(), 0))
    assert len(single) == 14 and single[0][0].shape == (32, 3, 32, 32) and single[0][0].dtype == torch.float32
    expected = [
        data.train.labels[[i for i, _ in batch]] for batch in TrainBatches(len(data.train), 32, 0, 1, cfg.seed, 0, 14)
    ]
    assert all(torch.equal(labels, want) for (_, labels), want in zip(single, expected))
    ranks = [list(train_loader(data, cfg, dist(rank, 2), 0)) for rank in (0, 1)]
    for it in range(14):
        assert torch.equal(torch.cat([ranks[0][it][0], ranks[1][it][0]]), single[it][0])
        assert torch.equal(torch.cat([ranks[0][it][1], ranks[1][it][1]]), single[it][1])
    resumed = list(train_loader(data, cfg, dist(), 9))  # mid-epoch (6 iterations per epoch)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(single[9:], resumed)) and len(resumed) == 5
    shares = [torch.cat([y for _, y in eval_loader(data.test, cfg, dist(rank, 2))]) for rank in (0, 1)]
    assert len(shares[0]) + len(shares[1]) == len(data.test)


def test_train_runs_end_to_end(cifar_tar):
    import mlflow

    overrides = tiny_overrides(cifar_tar, **{"data.loader": "gpu"})
    assert train.main(["--config", str(CIFAR), *overrides]) == 0
    (run,) = mlflow.search_runs(experiment_names=["cifar10"], output_format="list")
    assert run.info.status == "FINISHED" and "test_top1_err" in run.data.metrics
    assert "resident on the device" in run.data.tags["reproduce.data"]


@pytest.mark.slow
def test_resume_after_sigterm_is_bitwise_identical(cifar_tar, tmp_path, monkeypatch):
    """As test_train's, with data.loader=gpu and epochs of 3 iterations, stopped mid-epoch."""
    stop_and_resume_matches_straight(cifar_tar, tmp_path, monkeypatch, **{"data.loader": "gpu", "optim.batch_size": 64})


def test_gpu_loader_is_refused_for_imagenet():
    from reproduce.config import ConfigError

    with pytest.raises(ConfigError, match="data.loader=gpu holds CIFAR-10"):
        load_config(REPO / "configs" / "imagenet" / "resnet18.yaml", ["data.path=.", "data.loader=gpu"])
