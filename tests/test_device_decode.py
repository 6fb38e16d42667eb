"""data.loader=device (issue 20 item 3): JPEGs decoded in batches on run.device, tested here on
the CPU, which runs the same code path (torchvision's decode_jpeg takes a list on both); the
CUDA run of the same checks is in tests/test_gpu.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from reproduce import train
from reproduce.config import load_config
from reproduce.data import build_data, eval_loader, train_loader
from reproduce.distributed import DistInfo
from tests.conftest import REPO

CONFIG = REPO / "configs" / "imagenet" / "resnet18.yaml"
CPU = DistInfo(0, 0, 1, torch.device("cpu"), "python", None)


def jpeg_tree(root: Path, per_class: int = 6) -> Path:
    """Two classes of JPEGs of different sizes and aspects, in train/ and val/."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for label, wnid in enumerate(("n01440764", "n02102040")):
            (root / split / wnid).mkdir(parents=True)
            for i in range(per_class):
                h, w = int(rng.integers(40, 72)), int(rng.integers(40, 72))
                base = np.linspace(0, 255, w)[None, :, None] * np.array([1.0, 0.5 + label * 0.4, 0.2])
                pixels = np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / wnid / f"{i}.JPEG", quality=90)
    return root


def _cfg(tree: Path, loader: str, *extra: str):
    return load_config(
        CONFIG,
        [
            f"data.path={tree}",
            f"data.loader={loader}",
            "data.crop=32",
            "data.scale=[36,44]",
            "optim.batch_size=4",
            "schedule.iterations=6",
            "schedule.milestones=[]",
            "run.device=cpu",
            *extra,
        ],
    )


def _stream(cfg, start: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    data = build_data(cfg)
    return [(x.clone(), y.clone()) for x, y in train_loader(data, cfg, CPU, start)]


@pytest.mark.parametrize("crop", ["scale", "random_resized"])
def test_batches_are_the_same_whatever_the_workers_and_on_resume(tmp_path, crop):
    tree = jpeg_tree(tmp_path / "tree")
    straight = _stream(_cfg(tree, "device", "data.workers=0", f"data.train_crop={crop}"))
    assert len(straight) == 6 and straight[0][0].shape == (4, 3, 32, 32) and straight[0][0].dtype == torch.float32
    workers = _stream(_cfg(tree, "device", "data.workers=2", f"data.train_crop={crop}"))
    resumed = _stream(_cfg(tree, "device", "data.workers=2", f"data.train_crop={crop}"), start=3)
    for (a, la), (b, lb) in zip(straight, workers):
        assert torch.equal(a, b) and torch.equal(la, lb)
    for (a, la), (b, lb) in zip(straight[3:], resumed):
        assert torch.equal(a, b) and torch.equal(la, lb)
    assert not torch.equal(straight[0][0], straight[1][0])  # the draws differ batch to batch
    # normalised like the torchvision loader's batches: about zero mean and unit spread
    both = torch.cat([x for x, _ in straight])
    reference = torch.cat(
        [x for x, _ in _stream(_cfg(tree, "torchvision", "data.workers=0", f"data.train_crop={crop}"))]
    )
    assert abs(both.mean() - reference.mean()) < 0.15 and abs(both.std() - reference.std()) < 0.15


@pytest.mark.parametrize("protocol", ["center224", "tencrop"])
def test_evaluation_views_match_the_torchvision_loader(tmp_path, protocol):
    tree = jpeg_tree(tmp_path / "tree")
    device = _cfg(tree, "device", f"eval.protocol={protocol}", "eval.batch_size=5")
    torchvision = _cfg(tree, "torchvision", f"eval.protocol={protocol}", "eval.batch_size=5", "data.workers=0")
    ours = list(eval_loader(build_data(device).test, device, CPU))
    theirs = list(eval_loader(build_data(torchvision).test, torchvision, CPU))
    assert [x.shape for x, _ in ours] == [x.shape for x, _ in theirs]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(ours, theirs))
    diff = torch.cat([(a - b).abs().flatten() for (a, _), (b, _) in zip(ours, theirs)])
    # the same libjpeg-turbo decode (PIL's and torchvision's builds may round an IDCT differently) and resize
    assert diff.mean() < 0.01 and diff.max() < 0.2, (diff.mean(), diff.max())


def test_a_file_that_is_not_a_jpeg_is_named(tmp_path, capsys):
    tree = jpeg_tree(tmp_path / "tree")
    bad = tree / "train" / "n01440764" / "3.JPEG"
    Image.open(bad).save(bad.with_suffix(".png"), format="PNG")
    bad.with_suffix(".png").rename(bad)  # a PNG named .JPEG
    argv = [
        "--config",
        str(CONFIG),
        f"data.path={tree}",
        "data.loader=device",
        "data.crop=32",
        "data.scale=[36,44]",
        "optim.batch_size=12",
        "schedule.iterations=2",
        "schedule.milestones=[]",
        "eval.every=2",
        "run.checkpoint_every=2",
        "run.device=cpu",
        "run.progress=false",
        "data.workers=0",
        "run.log_model=false",
    ]
    assert train.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        err[-1].startswith("error: cannot decode image ")
        and str(bad) in err[-1]
        and "data.loader=torchvision" in err[-1]
    )


def test_training_and_evaluation_run_through_it(tmp_path):
    tree = jpeg_tree(tmp_path / "tree")
    argv = [
        "--config",
        str(CONFIG),
        f"data.path={tree}",
        "data.loader=device",
        "data.crop=32",
        "data.scale=[36,44]",
        "optim.batch_size=4",
        "schedule.iterations=4",
        "schedule.milestones=[]",
        "eval.every=2",
        "eval.batch_size=4",
        "run.checkpoint_every=2",
        "run.device=cpu",
        "run.progress=false",
        "data.workers=2",
        "run.log_model=false",
        "eval.protocol=tencrop",
    ]
    assert train.main(argv) == 0
    import mlflow

    (run,) = mlflow.search_runs(experiment_names=["imagenet"], output_format="list")
    assert run.info.status == "FINISHED" and "decoded on the device" in run.data.tags["reproduce.data"]
    assert run.data.params["data.loader"] == "device" and 0 <= run.data.metrics["test_top1_err"] <= 100


def test_it_is_for_imagenet_folders_only(tmp_path):
    from reproduce.config import ConfigError

    with pytest.raises(ConfigError, match="data.loader=device decodes ImageNet-style JPEG folders"):
        load_config(REPO / "configs" / "cifar10" / "resnet20.yaml", ["data.loader=device"])
