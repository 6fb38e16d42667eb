"""The training loop through its real entry points: one process, resume, failure states,
real DDP processes with gloo (one node and two "nodes"), and real CIFAR-10 images."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch

from reproduce import checkpoint, train
from reproduce.config import load_config
from reproduce.data import TrainBatches
from reproduce.models import build_model
from tests.conftest import REPO, shared_file, sigterm_during, tiny_overrides

CIFAR = REPO / "configs" / "cifar10" / "resnet20.yaml"


def _runs(experiment: str = "cifar10"):
    return mlflow.search_runs(experiment_names=[experiment], output_format="list")


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint.list_checkpoints(run_dir)[-1], weights_only=True)["model"]


def _metric_steps(run_id: str, key: str) -> list[int]:
    return [m.step for m in mlflow.MlflowClient().get_metric_history(run_id, key)]


def test_one_process_run_is_logged_and_checkpointed(cifar_tar):
    overrides = tiny_overrides(cifar_tar)
    assert train.main(["--config", str(CIFAR), *overrides]) == 0
    (run,) = _runs()
    assert run.info.status == "FINISHED"
    params, tags, metrics = run.data.params, run.data.tags, run.data.metrics
    assert (
        params["model.name"] == "resnet20"
        and params["optim.batch_size"] == "16"
        and params["schedule.iterations"] == "6"
    )
    for tag in (
        "git_commit",
        "git_dirty",
        "torch",
        "host",
        "world_size",
        "launcher",
        "data_fingerprint",
        "eval_protocol",
        "recipe",
    ):
        assert tags[f"reproduce.{tag}"], tag
    assert tags["reproduce.launcher"] == "python" and tags["reproduce.world_size"] == "1"
    assert tags["reproduce.eval_protocol"] == "single"
    for key in (
        "train_loss",
        "train_top1_err",
        "lr",
        "images_per_sec",
        "val_top1_err",
        "val_top5_err",
        "test_top1_err",
        "test_top5_err",
    ):
        assert key in metrics, key
    assert _metric_steps(run.info.run_id, "train_loss") == [1, 2, 3, 4, 5, 6]
    assert _metric_steps(run.info.run_id, "test_top1_err") == [3, 6]
    lrs = [m.value for m in mlflow.MlflowClient().get_metric_history(run.info.run_id, "lr")]
    assert lrs == pytest.approx([0.1, 0.1, 0.1, 0.01, 0.01, 0.01])
    cfg = load_config(CIFAR, overrides)
    saved = checkpoint.list_checkpoints(cfg.run_dir())
    assert [p.name for p in saved] == ["ckpt-00000003.pt", "ckpt-00000006.pt"]
    state = torch.load(saved[-1], weights_only=True)
    assert state["iteration"] == 6 and state["mlflow_run_id"] == run.info.run_id
    assert (cfg.run_dir() / "config.yaml").exists()
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"config.yaml", "final_metrics.json"} <= artifacts
    # Starting the finished job again changes nothing.
    assert train.main(["--config", str(CIFAR), *overrides]) == 0
    assert len(_runs()) == 1 and checkpoint.list_checkpoints(cfg.run_dir()) == saved


def test_resume_with_another_recipe_under_an_explicit_run_dir_is_refused(cifar_tar, tmp_path, monkeypatch, capsys):
    """A run directory given by hand is not named after the recipe: continuing its checkpoint with
    another lr, schedule or seed would mix two recipes in one MLflow run (whose params keep the
    first). Refused in one line naming the keys; where the data lies and run.* may change."""
    first = tiny_overrides(cifar_tar, iterations=4, **{"run.dir": tmp_path / "run", "run.checkpoint_every": 100})
    real_lr_at = sigterm_during(monkeypatch, 1)
    assert train.main(["--config", str(CIFAR), *first]) == 128 + signal.SIGTERM
    monkeypatch.setattr(train, "lr_at", real_lr_at)
    saved = checkpoint.list_checkpoints(tmp_path / "run")
    assert [p.name for p in saved] == ["ckpt-00000002.pt"]
    capsys.readouterr()
    changed = tiny_overrides(
        cifar_tar,
        iterations=8,
        **{
            "run.dir": tmp_path / "run",
            "run.checkpoint_every": 100,
            "optim.lr": 0.05,
            "seed": 3,
            "run.deterministic": "false",
        },
    )
    assert train.main(["--config", str(CIFAR), *changed, "experiment=other"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: checkpoint "), err
    for pair in (
        "experiment 'cifar10' -> 'other'",
        "seed 0 -> 3",
        "optim.lr 0.1 -> 0.05",
        "schedule.iterations 4 -> 8",
        "schedule.milestones [2] -> [4]",
        "run.deterministic True -> False",
    ):
        assert pair in err, (pair, err)
    (run,) = _runs()
    assert run.info.status == "KILLED" and checkpoint.list_checkpoints(tmp_path / "run") == saved
    # The same recipe from another copy of the data, with other run.* settings, resumes.
    copy = tmp_path / "copy.tar.gz"
    copy.write_bytes(cifar_tar.read_bytes())
    same = tiny_overrides(
        copy,
        iterations=4,
        **{
            "run.dir": tmp_path / "run",
            "run.checkpoint_every": 100,
            "run.log_every": 2,
            "data.workers": 1,
            "eval.batch_size": 32,
        },
    )
    assert train.main(["--config", str(CIFAR), *same]) == 0
    (run,) = _runs()
    assert run.info.status == "FINISHED"


def test_resume_after_sigterm_is_bitwise_identical(cifar_tar, tmp_path, monkeypatch):
    """8 iterations straight == 4, SIGTERM (run KILLED, checkpoint written), resume 4 more."""
    straight = tiny_overrides(
        cifar_tar, iterations=8, **{"run.dir": tmp_path / "straight", "run.checkpoint_every": 100}
    )
    assert train.main(["--config", str(CIFAR), *straight]) == 0

    resumed = tiny_overrides(cifar_tar, iterations=8, **{"run.dir": tmp_path / "resumed", "run.checkpoint_every": 100})
    real_lr_at = train.lr_at

    def lr_then_sigterm(iteration, *args):
        if iteration == 3:  # during the 4th iteration, as a scheduler's SIGTERM would arrive
            os.kill(os.getpid(), signal.SIGTERM)
        return real_lr_at(iteration, *args)

    monkeypatch.setattr(train, "lr_at", lr_then_sigterm)
    assert train.main(["--config", str(CIFAR), *resumed]) == 128 + signal.SIGTERM
    killed = [r for r in _runs() if r.info.status == "KILLED"]
    assert len(killed) == 1
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path / "resumed")] == ["ckpt-00000004.pt"]

    monkeypatch.setattr(train, "lr_at", real_lr_at)
    assert train.main(["--config", str(CIFAR), *resumed]) == 0
    runs = {r.info.run_id: r for r in _runs()}
    assert len(runs) == 2  # the resumed job went on in the KILLED run, now FINISHED
    assert runs[killed[0].info.run_id].info.status == "FINISHED"
    assert _metric_steps(killed[0].info.run_id, "train_loss") == list(range(1, 9))

    a, b = _final_weights(tmp_path / "straight"), _final_weights(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_run_that_raises_is_failed(cifar_tar, capsys):
    """An exploding lr gives a non-finite loss: the run stops with a message and is FAILED."""
    overrides = tiny_overrides(cifar_tar, iterations=20, **{"optim.lr": 1e12, "run.checkpoint_every": 100})
    assert train.main(["--config", str(CIFAR), *overrides]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(r"error: training loss is (nan|inf) at iteration \d+ \(lr 1e\+12\); stopping", err), err
    (run,) = _runs()
    assert run.info.status == "FAILED"


def test_ranks_split_each_global_batch_disjointly():
    ranks = [list(TrainBatches(100, 32, rank, 2, seed=1, start=0, stop=6)) for rank in (0, 1)]
    single = list(TrainBatches(100, 32, 0, 1, seed=1, start=0, stop=6))
    for it in range(6):
        r0, r1 = ({i for i, _ in ranks[r][it]} for r in (0, 1))
        assert len(r0) == len(r1) == 16 and not r0 & r1
        assert ranks[0][it] + ranks[1][it] == single[it]  # same global batch, same augmentation seeds
    epoch0 = [i for batch in single[:3] for i, _ in batch]
    assert len(set(epoch0)) == 96  # no image twice within an epoch
    resumed = list(TrainBatches(100, 32, 0, 1, seed=1, start=4, stop=6))
    assert resumed == single[4:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args: list[str], env_extra: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.slow
def test_torchrun_two_processes_one_run(cifar_tar, tmp_path):
    overrides = tiny_overrides(cifar_tar, iterations=6, **{"run.dir": tmp_path / "ddp"})
    proc = _torchrun(
        [
            "--standalone",
            "--nproc_per_node",
            "2",
            str(REPO / "reproduce" / "train.py"),
            "--config",
            str(CIFAR),
            *overrides,
        ]
    )
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    (run,) = _runs()  # rank 1 created no run of its own
    assert run.info.status == "FINISHED"
    assert run.data.tags["reproduce.world_size"] == "2" and run.data.tags["reproduce.launcher"] == "torchrun"
    assert run.data.params["optim.batch_size"] == "16"
    assert "test_top1_err" in run.data.metrics
    assert _metric_steps(run.info.run_id, "train_loss") == list(range(1, 7))
    assert checkpoint.list_checkpoints(tmp_path / "ddp")[-1].name == "ckpt-00000006.pt"


@pytest.mark.slow
def test_two_nodes_with_c10d_rendezvous(cifar_tar, tmp_path):
    port = _free_port()
    overrides = tiny_overrides(cifar_tar, iterations=4, **{"run.dir": tmp_path / "nodes"})
    nodes = [
        _torchrun(
            [
                "--nnodes",
                "2",
                "--nproc_per_node",
                "1",
                "--rdzv_backend",
                "c10d",
                "--rdzv_endpoint",
                f"127.0.0.1:{port}",
                "--rdzv_id",
                "twonodes",
                "--node_rank",
                str(rank),
                str(REPO / "reproduce" / "train.py"),
                "--config",
                str(CIFAR),
                *overrides,
            ]
        )
        for rank in (0, 1)
    ]
    outs = [n.communicate(timeout=300)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], outs
    (run,) = _runs()
    assert run.info.status == "FINISHED" and run.data.tags["reproduce.world_size"] == "2"


@pytest.mark.slow
def test_resnet20_learns_real_cifar10(tmp_path):
    """200 iterations (half an epoch) on the real CIFAR-10 images (lossy JPEG copies) are
    far better than chance (90% error) on 2,000 test images spread over the test split."""
    archive = shared_file("cifar10-jpeg.tar.gz")
    overrides = [
        f"data.path={archive}",
        "data.workers=0",
        "optim.batch_size=128",
        "schedule.iterations=200",
        "schedule.milestones=[]",
        "eval.every=1000",
        "eval.max_images=2000",
        "run.checkpoint_every=1000",
        "run.progress=false",
        "run.log_every=50",
        "run.device=cpu",
    ]
    threads = torch.get_num_threads()
    torch.set_num_threads(max(threads, os.cpu_count() or 1))  # one process alone: every core (conftest sets 1)
    try:
        assert train.main(["--config", str(CIFAR), *overrides]) == 0
    finally:
        torch.set_num_threads(threads)
    (run,) = _runs()
    assert run.data.metrics["test_top1_err"] < 75.0, run.data.metrics
    assert "lossy JPEG" in run.data.tags["reproduce.data"]


@pytest.mark.slow
def test_compiled_training_on_cpu_matches_eager(cifar_tar, tmp_path):
    """run.compile (mode reduce-overhead: CUDA graphs on a GPU, plain compilation on a CPU) with
    channels_last works on a CPU-only machine and trains the same weights as eager mode."""
    base = tiny_overrides(
        cifar_tar,
        iterations=2,
        **{"run.deterministic": "false", "eval.max_images": 16, "run.checkpoint_every": 100, "optim.lr": 0.01},
    )
    assert train.main(["--config", str(CIFAR), *base, f"run.dir={tmp_path / 'eager'}"]) == 0
    assert (
        train.main(
            [
                "--config",
                str(CIFAR),
                *base,
                f"run.dir={tmp_path / 'compiled'}",
                "run.compile=true",
                "run.compile_mode=reduce-overhead",
                "run.channels_last=true",
            ]
        )
        == 0
    )
    eager, compiled = _final_weights(tmp_path / "eager"), _final_weights(tmp_path / "compiled")
    torch.manual_seed(0)  # the weights both runs started from (train.py seeds with cfg.seed before building)
    start = build_model("resnet20").state_dict()
    assert eager.keys() == compiled.keys() == start.keys()
    for key in eager:  # the two runs moved every tensor the same way, up to float rounding of fused kernels
        if not eager[key].is_floating_point():
            assert torch.equal(eager[key], compiled[key]), key
            continue
        step_eager, step_compiled = eager[key] - start[key], compiled[key] - start[key]
        assert step_eager.norm() > 0, key
        assert (step_eager - step_compiled).norm() <= 0.01 * step_eager.norm(), key
    assert {r.data.params["run.compile_mode"] for r in _runs()} == {"default", "reduce-overhead"}


def test_auto_numerics_are_recorded_and_kept_on_resume(cifar_tar, tmp_path, monkeypatch):
    """run.amp=auto / run.channels_last=auto: decided once, tagged in MLflow, stored in the
    checkpoint and reused by the resumed segment (which does not measure again)."""
    overrides = tiny_overrides(
        cifar_tar,
        4,
        **{
            "run.amp": "auto",
            "run.channels_last": "auto",
            "run.dir": tmp_path / "run",
            "schedule.milestones": "[]",
            "run.checkpoint_every": 100,
        },
    )
    real_lr_at = sigterm_during(monkeypatch, 1)
    assert train.main(["--config", str(CIFAR), *overrides]) == 128 + signal.SIGTERM
    (run,) = _runs()
    tags = run.data.tags
    assert tags["reproduce.numerics"].startswith(("measured images/s", "by capability"))
    saved = torch.load(checkpoint.list_checkpoints(tmp_path / "run")[-1], weights_only=True)["numerics"]
    assert (
        str(saved["amp"]).lower() == tags["reproduce.amp"]
        and str(saved["channels_last"]).lower() == tags["reproduce.channels_last"]
    )

    def no_second_measurement(*args, **kwargs):
        raise AssertionError("a resumed run must reuse the stored numerics")

    monkeypatch.setattr(train, "lr_at", real_lr_at)
    monkeypatch.setattr(train, "resolve_numerics", no_second_measurement)
    assert train.main(["--config", str(CIFAR), *overrides]) == 0
    (run,) = _runs()
    assert run.info.status == "FINISHED" and run.data.tags["reproduce.resumes"] == "1"
    assert run.data.tags["reproduce.numerics"] == tags["reproduce.numerics"]
