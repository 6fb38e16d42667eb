"""FFCV: `reproduce prepare` and data.loader=ffcv. Round trips of real and generated images,
repeatable files, the paper's augmentation with the same semantics as the other two CIFAR
loaders, evaluation batches equal to theirs, shards of two gloo processes, ImageNet-style
protocols from real JPEGs, and clear errors (not hangs) for damaged or mismatched files.

FFCV's thread can hang on an error instead of raising: every test that runs it has a timeout."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip(
    "ffcv",
    reason="FFCV is not installed (apt-get install libturbojpeg0-dev libopencv-dev pkg-config; "
    "pip install -e '.[ffcv]')",
)

from ffcv.fields.basics import IntDecoder  # noqa: E402
from ffcv.fields.rgb_image import SimpleRGBImageDecoder  # noqa: E402
from ffcv.loader import Loader, OrderOption  # noqa: E402
from ffcv.pipeline.operation import Operation  # noqa: E402
from ffcv.transforms import ToTensor  # noqa: E402

from reproduce import train  # noqa: E402
from reproduce.config import load_config  # noqa: E402
from reproduce.data import DataError, build_data, cifar_split, eval_loader, train_loader  # noqa: E402
from reproduce.data.cifar import load_cifar10  # noqa: E402
from reproduce.data.ffcv import prepare  # noqa: E402
from reproduce.data.ffcv.pipeline import _Epoch, iterate  # noqa: E402
from tests.conftest import CLASSES, REPO, shared_file, stop_and_resume_matches_straight, tiny_overrides  # noqa: E402
from tests.test_gpu_loader import (
    check_uniform_crops_and_flips,
    dist,
    make_marker_tree,
    marker,
    marker_config,
    read_offsets,
)  # noqa: E402

# numba's finalizers raise a harmless KeyError when FFCV's compiled functions are collected.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
CIFAR = REPO / "configs" / "cifar10" / "resnet20.yaml"
IMAGENET = REPO / "configs" / "imagenet" / "resnet18.yaml"


@pytest.fixture(scope="module")
def cache_env(tmp_path_factory):
    """The decoded-CIFAR cache of conftest's `isolated`, for module-scoped fixtures."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(
            "REPRODUCE_CACHE",
            os.environ.get("REPRODUCE_TEST_CACHE", str(tmp_path_factory.getbasetemp() / "reproduce-cache")),
        )
        yield


@pytest.fixture(scope="module")
def prepared(cifar_tree, tmp_path_factory, cache_env) -> Path:
    """The generated tiny CIFAR-10 tree, prepared with the tiny runs' 40-image validation split."""
    out = tmp_path_factory.mktemp("prepared") / "cifar"
    assert prepare.main(["cifar10", "--source", str(cifar_tree), "--out", str(out), "--val-split", "40"]) == 0
    return out


def ffcv_config(data: Path, prepared_dir: Path, **extra):
    return load_config(CIFAR, tiny_overrides(data, **{"data.loader": "ffcv", "data.path": prepared_dir, **extra}))


def read_sequential(beton: Path) -> tuple[np.ndarray, np.ndarray]:
    """All images (N, 32, 32, 3) and labels of a CIFAR .beton, in file order, by plain FFCV."""
    loader = Loader(
        str(beton),
        batch_size=64,
        num_workers=1,
        order=OrderOption.SEQUENTIAL,
        drop_last=False,
        seed=0,
        pipelines={"image": [SimpleRGBImageDecoder(), ToTensor()], "label": [IntDecoder(), ToTensor()]},
    )
    batches = [(x.clone(), y.clone()) for x, y in iterate(loader, np.arange(loader.reader.num_samples), beton.name)]
    return torch.cat([x for x, _ in batches]).numpy(), torch.cat([y for _, y in batches]).view(-1).numpy()


def check_round_trip(source: Path, out: Path, val_split: int) -> None:
    arrays = load_cifar10(source)
    train_idx, val_idx = cifar_split(len(arrays.train_x), val_split)
    expected = {
        "train": (arrays.train_x[train_idx], arrays.train_y[train_idx]),
        "val": (arrays.train_x[val_idx], arrays.train_y[val_idx]),
        "test": (arrays.test_x, arrays.test_y),
    }
    for split, (images, labels) in expected.items():
        got_images, got_labels = read_sequential(out / f"{split}.beton")
        assert got_images.dtype == np.uint8 and np.array_equal(got_images, images), split
        assert np.array_equal(got_labels, labels), split
        manifest = json.loads((out / f"{split}.manifest.json").read_text())
        assert manifest["images"] == len(labels) and manifest["val_split"] == val_split
        assert manifest["counts"] == {c: int((labels == i).sum()) for i, c in enumerate(CLASSES)}
        assert manifest["ffcv"] == "1.0.2" and manifest["writer"]["write_mode"] == "raw"
        assert manifest["bytes"] == (out / f"{split}.beton").stat().st_size


@pytest.mark.timeout(300)
def test_round_trip_of_generated_images(prepared, cifar_tree):
    check_round_trip(cifar_tree, prepared, 40)


@pytest.mark.timeout(300)
def test_round_trip_of_real_cifar10_images(tmp_path):
    """A subset of the real CIFAR-10 JPEGs (12 train, 4 test per class) comes back exactly as
    load_cifar10 decodes them."""
    archive = shared_file("cifar10-jpeg.tar.gz")
    tree, wanted = tmp_path / "real", {"train": 12, "test": 4}
    with tarfile.open(archive) as tf:
        for member in tf:
            parts = Path(member.name).parts
            if (
                member.isfile()
                and len(parts) >= 3
                and parts[-3] in wanted
                and int(Path(parts[-1]).stem) < wanted[parts[-3]]
            ):
                target = tree / Path(*parts[-3:])
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tf.extractfile(member).read())
    assert prepare.main(["cifar10", "--source", str(tree), "--out", str(tmp_path / "out"), "--val-split", "20"]) == 0
    check_round_trip(tree, tmp_path / "out", 20)
    assert json.loads((tmp_path / "out" / "train.manifest.json").read_text())["lossy"] is True


@pytest.mark.timeout(300)
def test_preparing_twice_gives_identical_files(cifar_tar, tmp_path):
    for out in ("a", "b"):
        assert (
            prepare.main(["cifar10", "--source", str(cifar_tar), "--out", str(tmp_path / out), "--val-split", "40"])
            == 0
        )
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert (
        names
        == sorted(p.name for p in (tmp_path / "b").iterdir())
        == ["test.beton", "test.manifest.json", "train.beton", "train.manifest.json", "val.beton", "val.manifest.json"]
    )
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


@pytest.mark.timeout(300)
def test_three_cifar_loaders_augment_alike(tmp_path, cache_env):
    """Offsets uniform over 0..8 and flips ~50% (as test_gpu_loader checks for torchvision and
    gpu), and FFCV's training batches equal the gpu loader's bit for bit."""
    tree = make_marker_tree(tmp_path / "marker")
    assert prepare.main(["cifar10", "--source", str(tree), "--out", str(tmp_path / "out"), "--val-split", "0"]) == 0
    cfg = marker_config(tree, "ffcv", **{"data.path": tmp_path / "out"})
    batches = list(train_loader(build_data(cfg), cfg, dist(), 0))
    check_uniform_crops_and_flips([f for images, _ in batches for f in read_offsets(images, marker(tree))])
    gpu_cfg = marker_config(tree, "gpu")
    for (a, ya), (b, yb) in zip(batches, train_loader(build_data(gpu_cfg), gpu_cfg, dist(), 0), strict=True):
        assert torch.equal(a, b) and torch.equal(ya, yb)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("normalize", ["pixel_mean", "channel"])
def test_three_cifar_loaders_give_identical_evaluation_batches(prepared, cifar_tree, normalize):
    configs = [
        load_config(
            CIFAR,
            tiny_overrides(
                cifar_tree,
                **{"data.loader": loader, "data.normalize": normalize, "eval.batch_size": 16, "data.path": path},
            ),
        )
        for loader, path in (("torchvision", cifar_tree), ("gpu", cifar_tree), ("ffcv", prepared))
    ]
    datas = [build_data(cfg) for cfg in configs]
    assert len({d.fingerprint for d in datas}) == 1  # the manifest carries the source's digest
    for split in ("val", "test"):
        runs = [list(eval_loader(getattr(d, split), cfg, dist())) for d, cfg in zip(datas, configs)]
        assert len(runs[0]) > 1 and len({len(r) for r in runs}) == 1
        for (x0, y0), (x1, y1), (x2, y2) in zip(*runs):
            assert x2.dtype == torch.float32 and x2.shape == x0.shape
            assert torch.equal(x0, x1) and torch.equal(x0, x2) and torch.equal(y0, y1) and torch.equal(y0, y2)


@pytest.mark.timeout(300)
def test_order_shards_and_resume(prepared, cifar_tree):
    """TrainBatches' order across epochs; two ranks split each global batch; resume mid-epoch."""
    cfg = ffcv_config(
        cifar_tree, prepared, **{"optim.batch_size": 64, "schedule.iterations": 8, "schedule.milestones": "[4]"}
    )
    data = build_data(cfg)
    gpu_cfg = load_config(
        CIFAR,
        tiny_overrides(
            cifar_tree,
            **{"data.loader": "gpu", "optim.batch_size": 64, "schedule.iterations": 8, "schedule.milestones": "[4]"},
        ),
    )
    single = list(train_loader(data, cfg, dist(), 0))  # 3 iterations per epoch: 8 cross two epoch ends
    gpu = list(train_loader(build_data(gpu_cfg), gpu_cfg, dist(), 0))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(single, gpu, strict=True))
    ranks = [list(train_loader(data, cfg, dist(rank, 2), 0)) for rank in (0, 1)]
    for it in range(8):
        assert torch.equal(torch.cat([ranks[0][it][0], ranks[1][it][0]]), single[it][0])
    resumed = list(train_loader(data, cfg, dist(), 4))
    assert len(resumed) == 4 and all(torch.equal(a[0], b[0]) for a, b in zip(single[4:], resumed))


@pytest.mark.timeout(120)
def test_no_reader_thread_outlives_its_pass(prepared, cifar_tree):
    """A pass of train_batches stops without taking FFCV's end-of-epoch marker, and a training
    loop may stop a pass early: either way FFCV's reader thread, which holds the batch buffers
    (about 150 MB for an ImageNet batch of 256), must end with its pass instead of waiting forever."""
    cfg = ffcv_config(
        cifar_tree, prepared, **{"optim.batch_size": 64, "schedule.iterations": 8, "schedule.milestones": "[4]"}
    )
    data = build_data(cfg)
    for _ in train_loader(data, cfg, dist(), 0):  # three passes: epochs of 3 iterations
        pass
    stopped = train_loader(data, cfg, dist(), 0)
    next(stopped)
    stopped.close()
    for _ in eval_loader(data.test, cfg, dist()):
        pass
    assert not [t for t in threading.enumerate() if isinstance(t, _Epoch) and t.is_alive()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RANK_SCRIPT = """
import sys, torch
from reproduce import distributed
from reproduce.config import load_config
from reproduce.data import build_data, eval_loader, train_loader
cfg = load_config(sys.argv[1], sys.argv[3:], world_size=2)
info = distributed.setup("cpu")
data = build_data(cfg)
out = {"train": [(x.clone(), y.clone()) for x, y in train_loader(data, cfg, info, 0)],
       "test": [(x.clone(), y.clone()) for x, y in eval_loader(data.test, cfg, info)]}
torch.save(out, sys.argv[2])
distributed.teardown(info)
"""


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_gloo_processes_read_disjoint_halves(prepared, cifar_tree, tmp_path):
    """Two processes (gloo): each rank's images are its own, together they are the epoch."""
    overrides = tiny_overrides(
        cifar_tree,
        **{
            "data.loader": "ffcv",
            "data.path": prepared,
            "data.augment": "false",
            "optim.batch_size": 20,
            "schedule.iterations": 10,
            "schedule.milestones": "[5]",
        },
    )
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RANK_SCRIPT, str(CIFAR), str(tmp_path / f"rank{rank}.pt"), *overrides],
            env={
                **os.environ,
                "PYTHONPATH": str(REPO),
                "OMP_NUM_THREADS": "1",
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": "2",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outs = [p.communicate(timeout=500)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    got = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    cfg = load_config(CIFAR, overrides)
    single = list(train_loader(build_data(cfg), cfg, dist(), 0))

    def keys(batches):
        return [x.numpy().tobytes() for images, _ in batches for x in images]

    halves = [keys(g["train"]) for g in got]
    assert len(halves[0]) == len(halves[1]) == 100 and not set(halves[0]) & set(halves[1])
    assert set(halves[0]) | set(halves[1]) == set(keys(single))  # 10 batches of 20 = the whole epoch
    for it in range(10):
        assert torch.equal(torch.cat([got[0]["train"][it][0], got[1]["train"][it][0]]), single[it][0])
    tests = [keys(g["test"]) for g in got]
    assert len(tests[0]) + len(tests[1]) == 60 and not set(tests[0]) & set(tests[1])


def _damage(prepared: Path, tmp_path: Path, how: str) -> Path:
    broken = tmp_path / "broken"
    shutil.copytree(prepared, broken)
    beton = broken / "train.beton"
    if how == "truncated":
        with open(beton, "r+b") as f:
            f.truncate(beton.stat().st_size // 2)
    elif how == "header":
        with open(beton, "r+b") as f:
            f.write(bytes(64))  # the header zeroed, the size unchanged
    elif how == "missing":
        beton.unlink()
    elif how == "no manifest":
        (broken / "train.manifest.json").unlink()
    return broken


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "how, message",
    [
        ("truncated", r"train.beton has \d+ bytes but was written with \d+ \(truncated or overwritten\?\)"),
        (
            "header",
            r"train.beton( is not a readable FFCV file: .+|: (its fields are|it holds \d+ images|its allocation table|"
            r"some images have no data|its image metadata)[^;]*; prepare it again)$",
        ),
        ("missing", r"train.beton not found; write it with: reproduce prepare cifar10"),
        ("no manifest", r"train.manifest.json not found"),
    ],
)
def test_damaged_files_are_refused_in_one_line(prepared, cifar_tree, tmp_path, capsys, how, message):
    """Fault: a .beton that is truncated, has a damaged header, is missing, or has lost its manifest.
    Injected: the prepared train.beton cut in half, its first 64 bytes zeroed, or the file or its manifest deleted.
    Suite: one line naming the file and how to prepare it again, exit status 2, before training (no hang inside FFCV).
    Lost: nothing."""
    broken = _damage(prepared, tmp_path, how)
    with pytest.raises(DataError, match=message):
        build_data(ffcv_config(cifar_tree, broken))
    assert (
        train.main(
            ["--config", str(CIFAR), *tiny_overrides(cifar_tree, **{"data.loader": "ffcv", "data.path": broken})]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0]


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            {"data.val_split": 30},
            r"prepared with a validation split of 40 images but the config asks for data.val_split=30",
        ),
    ],
)
def test_files_prepared_otherwise_are_refused(prepared, cifar_tree, overrides, message):
    """Fault: a .beton written with other settings than the config expects.
    Injected: files prepared with a 40-image validation split, config asking for data.val_split=30.
    Suite: refused before training, naming both settings and the prepare flag that fixes it.
    Lost: nothing."""
    with pytest.raises(DataError, match=message):
        build_data(ffcv_config(cifar_tree, prepared, **overrides))


@pytest.mark.timeout(120)
def test_cifar_files_are_refused_for_imagenet(prepared):
    """Fault: .beton files of another dataset than the config's.
    Injected: CIFAR-10 files given to the ImageNet ResNet-18 config (data.loader=ffcv).
    Suite: refused before training: "holds cifar10 but data.dataset is imagenet".
    Lost: nothing."""
    cfg = load_config(IMAGENET, [f"data.path={prepared}", "data.loader=ffcv"])
    with pytest.raises(DataError, match="holds cifar10 but data.dataset is imagenet"):
        build_data(cfg)


class _Boom(Operation):
    """A pipeline step that fails in FFCV's thread."""

    def generate_code(self):
        def boom(images, dst):
            raise ValueError("boom")

        return boom

    def declare_state_and_memory(self, previous_state):
        return previous_state, None


@pytest.mark.timeout(120)
def test_error_in_ffcv_thread_is_raised_not_hung(prepared):
    """Fault: an exception inside FFCV's reader thread (FFCV's own iterator then waits forever).
    Injected: a pipeline step that raises ValueError in FFCV's thread.
    Suite: the training side gets DataError naming the file and the error, within the test's timeout.
    Lost: nothing beyond the work since the last checkpoint (the run fails and keeps it)."""
    loader = Loader(
        str(prepared / "train.beton"),
        batch_size=16,
        num_workers=1,
        order=OrderOption.SEQUENTIAL,
        seed=0,
        pipelines={"image": [SimpleRGBImageDecoder(), ToTensor(), _Boom()], "label": [IntDecoder(), ToTensor()]},
    )
    with pytest.raises(DataError, match="FFCV failed reading train.beton: ValueError: boom"):
        list(iterate(loader, np.arange(64), "train.beton"))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_training_and_resume_through_ffcv(prepared, cifar_tree, tmp_path, monkeypatch):
    """train.main end to end on the prepared files; a run stopped mid-epoch and resumed ends
    with the same weights as one that ran straight."""
    stop_and_resume_matches_straight(
        cifar_tree, tmp_path, monkeypatch, **{"data.loader": "ffcv", "data.path": prepared, "optim.batch_size": 64}
    )


@pytest.fixture(scope="module")
def imagenette(tmp_path_factory) -> Path:
    """train/ (12 per class) and val/ (4 per class) of real Imagenette JPEGs, plus non-square
    copies (two per class in train/, one in val/) so that crops of both orientations are exercised."""
    archive = shared_file("imagenette-224-val.tar.gz")
    from PIL import Image

    root, taken = tmp_path_factory.mktemp("imagenette") / "tree", {}
    with tarfile.open(archive) as tf:
        for member in tf:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) < 3:
                continue
            wnid = parts[-2]
            k = taken[wnid] = taken.get(wnid, 0) + 1
            if k > 16:
                continue
            split = "train" if k <= 12 else "val"
            target = root / split / wnid / parts[-1]
            target.parent.mkdir(parents=True, exist_ok=True)
            blob = tf.extractfile(member).read()
            target.write_bytes(blob)
            if k in (1, 2, 13):  # 224 wide x 300 high, or 300 x 224
                with Image.open(io.BytesIO(blob)) as img:
                    img.convert("RGB").resize((224, 300) if k != 2 else (300, 224)).save(
                        target.with_name(f"wide-{k}.jpg")
                    )
    return root


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_imagenet_protocols_from_real_jpegs(imagenette, tmp_path):
    """Prepared twice (byte-identical, half JPEG, half raw); training batches of both crop
    modes, center-224 and 10-crop evaluation have the expected shapes, dtypes and labels, and
    look like the torchvision path's images."""
    for out in ("a", "b"):
        assert (
            prepare.main(["imagenet", "--source", str(imagenette), "--out", str(tmp_path / out), "--workers", "2"]) == 0
        )
    for name in ("train.beton", "train.manifest.json", "val.beton", "val.manifest.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    manifest = json.loads((tmp_path / "a" / "train.manifest.json").read_text())
    assert manifest["images"] == 140 and 0 < manifest["writer"]["stored_jpeg"] < 140

    base = [
        "data.workers=2",
        "optim.batch_size=32",
        "schedule.iterations=5",
        "schedule.milestones=[]",
        "eval.batch_size=16",
    ]
    reference_cfg = load_config(IMAGENET, base + [f"data.path={imagenette}"])
    reference = build_data(reference_cfg)
    train_labels = torch.tensor([label for _, label in reference.train.base.samples])
    for crop in ("scale", "random_resized"):
        cfg = load_config(
            IMAGENET, base + [f"data.path={tmp_path / 'a'}", "data.loader=ffcv", f"data.train_crop={crop}"]
        )
        data = build_data(cfg)
        assert len(data.train) == 140 and data.num_classes == 10
        batches = list(train_loader(data, cfg, dist(), 0))
        assert len(batches) == 5
        from reproduce.data.order import TrainBatches

        for (images, labels), indices in zip(batches, TrainBatches(140, 32, 0, 1, cfg.seed, 0, 5)):
            assert images.shape == (32, 3, 224, 224) and images.dtype == torch.float32 and torch.isfinite(images).all()
            assert labels.dtype == torch.int64 and torch.equal(labels, train_labels[[i for i, _ in indices]])
        again = list(train_loader(data, cfg, dist(), 3))  # crops come from a hash: resume repeats them
        assert all(torch.equal(a[0], b[0]) for a, b in zip(batches[3:], again))
    for protocol, shape in (("center224", (3, 224, 224)), ("tencrop", (10, 3, 224, 224))):
        ref_cfg = load_config(IMAGENET, base + [f"data.path={imagenette}", f"eval.protocol={protocol}"])
        cfg = load_config(
            IMAGENET, base + [f"data.path={tmp_path / 'a'}", "data.loader=ffcv", f"eval.protocol={protocol}"]
        )
        ours = list(eval_loader(build_data(cfg).test, cfg, dist()))
        theirs = list(eval_loader(build_data(ref_cfg).test, ref_cfg, dist()))
        assert [len(y) for _, y in ours] == [len(y) for _, y in theirs] == [16, 16, 16, 2]
        for (x, y), (x_ref, y_ref) in zip(ours, theirs):
            assert x.shape[1:] == shape and x.dtype == torch.float32 and torch.equal(y, y_ref)
            # Same views up to interpolation (one-step crop-resize vs resize-then-crop) and JPEG at quality 90.
            view_error = (x - x_ref).abs().flatten(2 if protocol == "tencrop" else 1).mean(-1)
            assert view_error.max() < 0.1, view_error


@pytest.mark.timeout(300)
def test_imagenet_decoder_flips_half_and_crops_within_the_image(tmp_path):
    """Images that brighten from left to right: an unflipped crop still does, a flipped one
    darkens; about half are flipped, in both crop modes, and the scale crops vary in size."""
    from PIL import Image

    ramp = np.broadcast_to(np.linspace(0, 255, 300).astype(np.uint8)[None, :, None], (200, 300, 3))
    for split, count in (("train", 48), ("val", 2)):
        for cls in ("a", "b"):
            (tmp_path / "tree" / split / cls).mkdir(parents=True)
            for i in range(count):
                Image.fromarray(np.ascontiguousarray(ramp)).save(tmp_path / "tree" / split / cls / f"{i}.png")
    assert (
        prepare.main(
            [
                "imagenet",
                "--source",
                str(tmp_path / "tree"),
                "--out",
                str(tmp_path / "out"),
                "--workers",
                "1",
                "--compress-probability",
                "0",
            ]
        )
        == 0
    )
    for crop in ("scale", "random_resized"):
        cfg = load_config(
            IMAGENET,
            [
                "data.workers=1",
                "optim.batch_size=32",
                "schedule.iterations=12",
                "schedule.milestones=[]",
                f"data.path={tmp_path / 'out'}",
                "data.loader=ffcv",
                "data.lighting=0",
                f"data.train_crop={crop}",
            ],
        )
        images = torch.cat([x for x, _ in train_loader(build_data(cfg), cfg, dist(), 0)])[
            :, 0
        ]  # red channel, (384, H, W)
        slope = images[:, :, -8:].mean((1, 2)) - images[:, :, :8].mean((1, 2))
        assert (slope.abs() > 0.1).all()  # every crop shows the ramp, one way or the other
        flipped = (slope < 0).float().mean()
        assert abs(flipped - 0.5) < 5 * 0.5 / np.sqrt(len(slope)), flipped
        if crop == "scale":  # the window spans 224/480 .. 224/256 of the shorter side: the ramp's visible range varies
            assert slope.abs().max() - slope.abs().min() > 0.5


@pytest.mark.timeout(120)
def test_writer_process_failure_is_an_error_not_a_hang(cifar_tree, tmp_path, monkeypatch, capsys, cache_env):
    """Fault: FFCV's writer process dies while preparing (FFCV's writer then waits forever).
    Injected: the image source raising ValueError inside the writer's process.
    Suite: `reproduce prepare` exits 2 with "FFCV's writer process died while writing ..."; no .beton or temporary file left.
    Lost: nothing."""

    def broken(self, index):
        raise ValueError("cannot read this image")

    monkeypatch.setattr(prepare._Arrays, "__getitem__", broken)
    # SIGINT ignored, as in a job started in the background (`cmd &`, nohup): the watch must not rely on it.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        assert (
            prepare.main(["cifar10", "--source", str(cifar_tree), "--out", str(tmp_path / "out"), "--val-split", "40"])
            == 2
        )
    finally:
        signal.signal(signal.SIGINT, previous)
    err = capsys.readouterr().err.splitlines()
    assert any(line.startswith("error: FFCV's writer process died while writing") for line in err), err
    assert not list((tmp_path / "out").glob("*.beton")) and not list((tmp_path / "out").glob(".*tmp"))


@pytest.mark.timeout(120)
def test_undecodable_source_image_is_refused(tmp_path, capsys):
    """Fault: a source image that cannot be decoded while preparing .beton files.
    Injected: train/a/broken.jpg holding bytes that are not a JPEG.
    Suite: `reproduce prepare` exits 2 naming the file; no train.beton is left behind.
    Lost: nothing (no half-written file replaces a good one)."""
    from PIL import Image

    for split in ("train", "val"):
        (tmp_path / "tree" / split / "a").mkdir(parents=True)
        Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "tree" / split / "a" / "good.png")
    (tmp_path / "tree" / "train" / "a" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    assert (
        prepare.main(["imagenet", "--source", str(tmp_path / "tree"), "--out", str(tmp_path / "out"), "--workers", "2"])
        == 2
    )
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("error: 1 images of train could not be decoded, e.g. ") and "broken.jpg" in err[-1]
    assert not (tmp_path / "out" / "train.beton").exists()


@pytest.mark.parametrize("shape", [(5, 24, 40, 3), (3, 10, 16, 16, 3)])
def test_finishing_step_on_the_cpu_is_the_formula(shape):
    """The CPU finishing step (numba, in parallel) gives ((uint8 / 255 + lighting shift) - MEAN) / STD
    per image, channels-last NCHW (10-crop: each image's views share its shift), as torch computes it."""
    from reproduce.data.ffcv.loaders import _normalized
    from reproduce.data.imagenet import MEAN, STD

    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
    shift = torch.randn(shape[0], 3, generator=generator) * 0.1
    got = _normalized(images, shift, torch.device("cpu"))
    expected = (images.float() / 255 + shift.view(-1, *[1] * (len(shape) - 2), 3) - torch.tensor(MEAN)) / torch.tensor(
        STD
    )
    expected = expected.permute(0, 3, 1, 2) if len(shape) == 4 else expected.permute(0, 1, 4, 2, 3)
    assert got.shape == expected.shape and got.dtype == torch.float32
    assert torch.allclose(got, expected, atol=2e-6), (got - expected).abs().max()
    assert got.stride()[-3] == 1  # channels-last, as FFCV's batches
