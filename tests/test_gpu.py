"""CUDA: the suite's training paths on a GPU, a few real iterations each (marked `gpu`; skipped
where no CUDA device is visible).

  python -m pytest tests/test_gpu.py -m gpu -q -rs      (tools/gpu_session.py runs them first)

Each trains through reproduce.train.main, torchrun or `reproduce sweep` as a user would, with
run.device=cuda, and checks the MLflow run: FINISHED, on the GPU, with a final test error. What
is covered: a CIFAR and an ImageNet network in fp32, bf16 and bf16 + channels_last;
torch.compile in default and reduce-overhead (CUDA graphs) modes against eager; torchrun at
world size 1 and over all local GPUs (NCCL); the gpu and FFCV loaders feeding the device; 10-crop
evaluation; stop and resume (bitwise with run.deterministic=true; the fast session recipe
resumes into the same run); `reproduce sweep --parallel 2` sharing one device.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys

import mlflow
import pytest
import torch

from reproduce import checkpoint, train
from reproduce.config import load_config
from reproduce.data import build_data, train_loader
from reproduce.distributed import DistInfo
from tests.conftest import REPO, sigterm_during, stop_and_resume_matches_straight, tiny_overrides

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="no CUDA device visible (torch.cuda.is_available() is False): these run on a GPU machine, e.g. by tools/gpu_session.py",
    ),
]

CIFAR = REPO / "configs" / "cifar10"
IMAGENET = REPO / "configs" / "imagenet"
# What tools/gpu_session.py trains Table 6 with (README "Tables and figures from your runs").
SESSION_RECIPE = {
    "data.loader": "gpu",
    "run.amp": "true",
    "run.channels_last": "true",
    "run.compile": "true",
    "run.compile_mode": "reduce-overhead",
}


@pytest.fixture(autouse=True)
def fresh_torch_state():
    """train.py sets process-wide switches (deterministic algorithms, cuDNN autotuning) and
    torch.compile keeps graphs: each test starts from the state it found."""
    deterministic, benchmark = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    yield
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.benchmark = benchmark
    torch._dynamo.reset()
    torch.cuda.empty_cache()


def cuda_overrides(data, iterations: int = 4, **extra) -> list[str]:
    """tiny_overrides on the GPU, without deterministic kernels (the suite's default)."""
    return tiny_overrides(data, iterations, **{"run.device": "cuda", "run.deterministic": "false", **extra})


def imagenet_overrides(iterations: int = 4, **extra) -> list[str]:
    """A few iterations of an ImageNet network on synthetic 224x224 input, 16 images an iteration."""
    values = {
        "data.synthetic": "true",
        "data.workers": 0,
        "optim.batch_size": 16,
        "schedule.iterations": iterations,
        "schedule.milestones": f"[{iterations // 2}]",
        "eval.every": iterations // 2,
        "eval.batch_size": 8,
        "eval.max_images": 16,
        "eval.protocol": "center224",
        "run.checkpoint_every": iterations // 2,
        "run.log_every": 1,
        "run.progress": "false",
        "run.device": "cuda",
        "run.amp": "false",
        "run.channels_last": "false",
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def _runs():
    return mlflow.search_runs(search_all_experiments=True, output_format="list")


def _finished_on_gpu(world_size: int = 1):
    (run,) = _runs()
    tags, metrics = run.data.tags, run.data.metrics
    assert run.info.status == "FINISHED"
    assert tags["reproduce.gpu"] == torch.cuda.get_device_name(0) and tags["reproduce.world_size"] == str(world_size)
    assert math.isfinite(metrics["test_top1_err"]) and math.isfinite(metrics["train_loss"])
    return run


def _env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), **extra}


@pytest.mark.parametrize(
    "amp, channels_last", [(False, False), (True, False), (True, True)], ids=["fp32", "bf16", "bf16-channels_last"]
)
@pytest.mark.parametrize("network", ["cifar10/resnet20", "imagenet/resnet50"])
def test_training_steps_on_cuda(network, amp, channels_last, cifar_tar):
    switches = [f"run.amp={str(amp).lower()}", f"run.channels_last={str(channels_last).lower()}"]
    overrides = cuda_overrides(cifar_tar) if network.startswith("cifar10") else imagenet_overrides()
    assert train.main(["--config", str(REPO / "configs" / f"{network}.yaml"), *overrides, *switches]) == 0
    tags = _finished_on_gpu().data.tags
    assert (tags["reproduce.amp"], tags["reproduce.channels_last"]) == (str(amp).lower(), str(channels_last).lower())


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_training_matches_eager(mode, cifar_tar, tmp_path):
    """4 iterations compiled (reduce-overhead: CUDA graphs, recorded and replayed) move every
    weight as eager mode does, up to the rounding of fused kernels and TF32."""
    base = cuda_overrides(
        cifar_tar, **{"optim.lr": 0.01, "eval.every": 100, "eval.max_images": 16, "run.checkpoint_every": 100}
    )
    config = str(CIFAR / "resnet20.yaml")
    assert train.main(["--config", config, *base, f"run.dir={tmp_path / 'eager'}"]) == 0
    assert (
        train.main(
            [
                "--config",
                config,
                *base,
                f"run.dir={tmp_path / 'compiled'}",
                "run.compile=true",
                f"run.compile_mode={mode}",
            ]
        )
        == 0
    )
    eager, compiled = (
        torch.load(checkpoint.list_checkpoints(tmp_path / d)[-1], weights_only=True, map_location="cpu")["model"]
        for d in ("eager", "compiled")
    )
    torch.manual_seed(0)  # the weights both runs started from (train.py seeds with cfg.seed before building)
    from reproduce.models import build_model

    start = build_model("resnet20").state_dict()
    for key in eager:
        if not eager[key].is_floating_point():
            assert torch.equal(eager[key], compiled[key]), key
            continue
        step_eager, step_compiled = eager[key] - start[key], compiled[key] - start[key]
        assert step_eager.norm() > 0, key
        assert (step_eager - step_compiled).norm() <= 0.05 * step_eager.norm(), key
    assert {r.data.params["run.compile_mode"] for r in _runs()} == {"default", mode}


def test_the_gpu_session_recipe_trains(cifar_tar):
    """What tools/gpu_session.py runs Table 6 with: the gpu loader, bf16, channels_last, CUDA graphs."""
    overrides = cuda_overrides(cifar_tar, iterations=8, **SESSION_RECIPE)
    assert train.main(["--config", str(CIFAR / "resnet56.yaml"), *overrides]) == 0
    _finished_on_gpu()


@pytest.mark.parametrize("processes", ["one", "every-gpu"])
def test_torchrun_on_cuda(processes, cifar_tar, tmp_path):
    """torchrun with one process (the suite forms no process group for a world of one: this is
    the launcher path on CUDA) and with one process per local GPU (DDP over NCCL)."""
    n = 1 if processes == "one" else torch.cuda.device_count()
    if processes == "every-gpu" and n < 2:
        pytest.skip(
            f"{n} GPU visible: DDP over NCCL needs two or more (one process per GPU; NCCL refuses two ranks on one GPU)"
        )
    overrides = cuda_overrides(
        cifar_tar,
        iterations=6,
        **{"run.dir": tmp_path / "ddp", "optim.batch_size": 8 * n, "run.collective_timeout_s": 120},
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(n),
            str(REPO / "reproduce" / "train.py"),
            "--config",
            str(CIFAR / "resnet20.yaml"),
            *overrides,
        ],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = _finished_on_gpu(world_size=n)
    assert run.data.tags["reproduce.launcher"] == "torchrun"
    assert checkpoint.list_checkpoints(tmp_path / "ddp")[-1].name == "ckpt-00000006.pt"


def test_gpu_loader_feeds_the_device(cifar_tar):
    overrides = cuda_overrides(cifar_tar, **{"data.loader": "gpu"})
    cfg = load_config(CIFAR / "resnet20.yaml", overrides)
    info = DistInfo(0, 0, 1, torch.device("cuda", 0), "python", None)
    images, labels = next(iter(train_loader(build_data(cfg), cfg, info, 0)))
    assert images.device.type == labels.device.type == "cuda"
    assert images.shape == (16, 3, 32, 32) and images.dtype == torch.float32 and labels.dtype == torch.int64
    assert train.main(["--config", str(CIFAR / "resnet20.yaml"), *overrides]) == 0
    _finished_on_gpu()


def test_device_decode_loader_on_cuda_matches_its_cpu_path(tmp_path):
    """data.loader=device: nvJPEG decodes the batch on the GPU; the same draws on the CPU path give
    nearly the same pixels (two JPEG decoders and resize kernels), and a run trains on it."""
    from tests.test_device_decode import CONFIG, jpeg_tree

    tree = jpeg_tree(tmp_path / "tree")
    overrides = [
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
        "run.progress=false",
        "data.workers=2",
        "run.log_model=false",
    ]
    batches = {}
    for device in ("cpu", "cuda"):
        cfg = load_config(CONFIG, [*overrides, f"run.device={device}"])
        info = DistInfo(0, 0, 1, torch.device(device, 0) if device == "cuda" else torch.device("cpu"), "python", None)
        batches[device] = [(x.cpu(), y.cpu()) for x, y in train_loader(build_data(cfg), cfg, info, 0)]
    assert len(batches["cuda"]) == 4
    for (a, la), (b, lb) in zip(batches["cpu"], batches["cuda"]):
        assert torch.equal(la, lb) and a.shape == b.shape and (a - b).abs().mean() < 0.05
    assert train.main(["--config", str(CONFIG), *overrides, "run.device=cuda"]) == 0
    _finished_on_gpu()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # numba's finalizers at exit
def test_ffcv_loader_feeds_the_device(cifar_tree, tmp_path):
    pytest.importorskip("ffcv", reason="FFCV is not installed (pip install -e '.[ffcv]' after its apt packages)")
    from reproduce.data.ffcv import prepare

    out = tmp_path / "beton"
    assert prepare.main(["cifar10", "--source", str(cifar_tree), "--out", str(out), "--val-split", "40"]) == 0
    overrides = cuda_overrides(cifar_tree, **{"data.loader": "ffcv", "data.path": out, "data.workers": 2})
    cfg = load_config(CIFAR / "resnet20.yaml", overrides)
    info = DistInfo(0, 0, 1, torch.device("cuda", 0), "python", None)
    batches = train_loader(build_data(cfg), cfg, info, 0)
    images, labels = next(batches)
    assert images.device.type == labels.device.type == "cuda" and images.shape == (16, 3, 32, 32)
    batches.close()  # ends FFCV's reader thread before the run starts its own
    assert train.main(["--config", str(CIFAR / "resnet20.yaml"), *overrides]) == 0
    _finished_on_gpu()


def test_tencrop_evaluation_on_cuda():
    overrides = imagenet_overrides(
        **{
            "eval.protocol": "tencrop",
            "eval.max_images": 8,
            "eval.batch_size": 4,
            "run.amp": "true",
            "run.channels_last": "true",
        }
    )
    assert train.main(["--config", str(IMAGENET / "resnet18.yaml"), *overrides]) == 0
    run = _finished_on_gpu()
    assert run.data.tags["reproduce.eval_protocol"] == "tencrop" and math.isfinite(run.data.metrics["test_top5_err"])


@pytest.mark.parametrize("loader", ["torchvision", "gpu"])
def test_stop_and_resume_on_cuda_is_bitwise_identical(loader, cifar_tar, tmp_path, monkeypatch):
    """With run.deterministic=true (tiny_overrides' setting: deterministic kernels, no cuDNN
    autotuning) a run stopped by SIGTERM and resumed ends with the straight run's weights, bit
    for bit, on the GPU too. Without it the two segments may pick different cuDNN algorithms."""
    stop_and_resume_matches_straight(cifar_tar, tmp_path, monkeypatch, **{"run.device": "cuda", "data.loader": loader})


def test_stop_and_resume_of_the_session_recipe_continues_the_same_run(cifar_tar, tmp_path, monkeypatch):
    """The fast recipe (bf16, CUDA graphs, autotuned cuDNN) is not bitwise repeatable, so here
    only the resume is checked: SIGTERM -> checkpoint and exit 143; the rerun goes on in the same
    MLflow run, logs each iteration once, and finishes."""
    config = str(CIFAR / "resnet20.yaml")
    overrides = cuda_overrides(
        cifar_tar, iterations=8, **{**SESSION_RECIPE, "run.dir": tmp_path / "run", "run.checkpoint_every": 100}
    )
    real_lr_at = sigterm_during(monkeypatch, 3)
    assert train.main(["--config", config, *overrides]) == 128 + signal.SIGTERM
    (stopped,) = _runs()
    assert stopped.info.status == "KILLED"
    monkeypatch.setattr(train, "lr_at", real_lr_at)
    torch._dynamo.reset()  # a new job compiles afresh
    assert train.main(["--config", config, *overrides]) == 0
    run = _finished_on_gpu()
    assert run.info.run_id == stopped.info.run_id and run.data.tags["reproduce.resumes"] == "1"
    steps = [m.step for m in mlflow.MlflowClient().get_metric_history(run.info.run_id, "train_loss")]
    assert sorted(steps) == list(range(1, 9))


def test_parallel_sweep_shares_one_gpu(cifar_tar, tmp_path):
    """`reproduce sweep --parallel 2` with one GPU visible: both runs train on it at once."""
    first_gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    overrides = cuda_overrides(cifar_tar, iterations=40, **{"run.log_every": 10})
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "reproduce.cli",
            "sweep",
            "--configs",
            str(CIFAR / "plain20.yaml"),
            str(CIFAR / "resnet20.yaml"),
            "--seeds",
            "0",
            "--parallel",
            "2",
            "--log-dir",
            str(tmp_path / "logs"),
            *overrides,
        ],
        cwd=tmp_path,
        env=_env(CUDA_VISIBLE_DEVICES=first_gpu),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = {r.data.params["model.name"]: r for r in _runs()}
    assert {k: r.info.status for k, r in runs.items()} == {"plain20": "FINISHED", "resnet20": "FINISHED"}
    assert {r.data.tags["reproduce.gpu"] for r in runs.values()} == {
        torch.cuda.get_device_name(0)
    }  # this process's first GPU
    a, b = runs["plain20"].info, runs["resnet20"].info
    assert a.start_time < b.end_time and b.start_time < a.end_time  # they trained at once
