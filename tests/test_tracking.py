"""What a run looks like in MLflow (issue 17): params that describe it, MLflow's own fields, the
trained network as an MLflow model, the report stored in the tracking store, `reproduce runs`."""

from __future__ import annotations

import inspect
import io
import subprocess
import sys
import types

import mlflow
import pandas as pd
import pytest
import torch

from reproduce import checkpoint, evaluate, train
from reproduce.config import load_config
from reproduce.distributed import DistInfo
from reproduce.models import build_model
from reproduce.provenance import GitState
from reproduce.report import command as report
from reproduce.report.listing import training_runs
from reproduce.report.runs import load_mlflow_runs
from reproduce.tracking import NullTracker, Tracker, run_params, tracker_for
from tests.conftest import REPO, tiny_overrides

CIFAR = REPO / "configs" / "cifar10" / "resnet20.yaml"
PLAIN = REPO / "configs" / "cifar10" / "plain20.yaml"
IMAGENET = REPO / "configs" / "imagenet" / "resnet50.yaml"


def _runs(experiment: str = "cifar10"):
    return mlflow.search_runs(experiment_names=[experiment], output_format="list")


def test_params_describe_the_run_and_nothing_else():
    plain = run_params(load_config(PLAIN, ["data.loader=gpu"]))
    assert plain["model.shortcut"] == "none" and plain["model.family"] == "plain"
    assert plain["model.depth"] == 20 and plain["model.block"] == "basic"
    for key in (
        "data.crop",
        "data.lighting",
        "data.scale",
        "data.train_crop",
        "data.workers",  # not CIFAR / not this loader
        "run.progress",
        "run.tracking_flush_s",
        "run.collective_timeout_s",
        "run.dir",  # plumbing
        "optim.pretrained_lr_scale",
        "schedule.warmup_lr",
    ):  # unused here
        assert key not in plain, key
    assert None not in plain.values() and "None" not in map(str, plain.values())
    assert plain["optim.lr"] == 0.1 and plain["schedule.iterations"] == 64000 and plain["data.val_split"] == 5000

    big = run_params(load_config(IMAGENET, ["data.synthetic=true"]))
    assert big["model.shortcut"] == "B" and big["model.family"] == "resnet" and big["model.block"] == "bottleneck"
    assert big["model.depth"] == 50 and big["data.crop"] == 224 and big["data.train_crop"] == "scale"
    r20 = run_params(load_config(CIFAR, ["model.shortcut=null"]))  # the paper's default, spelled out
    assert r20["model.shortcut"] == "A" and r20["data.workers"] == 4


def test_system_metrics_default_to_gpu_jobs(monkeypatch):
    cpu = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), launcher="python", slurm_job_id=None)
    cuda = DistInfo(
        rank=0, local_rank=0, world_size=1, device=torch.device("cuda"), launcher="python", slurm_job_id=None
    )
    cfg = load_config(CIFAR)
    monkeypatch.delenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING")
    assert not Tracker(cpu, "r")._system_metrics(cfg) and Tracker(cuda, "r")._system_metrics(cfg)
    assert Tracker(cpu, "r")._system_metrics(load_config(CIFAR, ["run.system_metrics=true"]))
    assert not Tracker(cuda, "r")._system_metrics(load_config(CIFAR, ["run.system_metrics=false"]))
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")  # the user's environment rules `auto`
    assert not Tracker(cuda, "r")._system_metrics(cfg)


def test_ranks_other_than_0_get_a_tracker_that_does_nothing(tmp_path):
    def info(rank):
        return DistInfo(
            rank=rank, local_rank=rank, world_size=2, device=torch.device("cpu"), launcher="torchrun", slurm_job_id=None
        )

    assert type(tracker_for(info(0), tmp_path / "run")) is Tracker
    other = tracker_for(info(1), tmp_path / "run", 1.0)
    assert type(other) is NullTracker
    numerics = types.SimpleNamespace(amp=False, channels_last=False, how="given")
    assert other.start(load_config(CIFAR), "fingerprint", "data", None, GitState("abc", False)) is None
    other.log_numerics(numerics)
    other.log_metrics({"train_loss": 1.0}, step=1)
    other.log_final({"test_top1_err": 50.0})
    other.log_model(build_model("resnet20"), load_config(CIFAR, ["run.log_model=true"]), 10)
    other.end("FINISHED")
    assert other.run_id is None and not (tmp_path / "run").exists() and not (tmp_path / "mlflow.db").exists()
    assert mlflow.active_run() is None


def test_the_null_tracker_has_every_method_of_the_tracker():
    """A method added to Tracker and forgotten in NullTracker would fail on the other ranks."""
    public = {name for name in vars(Tracker) if not name.startswith("_")}
    assert public == {name for name in vars(NullTracker) if not name.startswith("_")} - {"run_id"}
    for name in public:
        assert inspect.signature(getattr(NullTracker, name)) == inspect.signature(getattr(Tracker, name)), name


def test_a_tracker_logs_nothing_before_start_or_after_end(tmp_path):
    rank0 = DistInfo(
        rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), launcher="python", slurm_job_id=None
    )
    tracker = Tracker(rank0, tmp_path / "run")
    tracker.log_metrics({"train_loss": 1.0}, step=1)
    tracker.log_final({"test_top1_err": 50.0})
    tracker.end("FAILED")
    assert tracker.run_id is None and not (tmp_path / "run").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.fixture
def logged_run(cifar_tar):
    """A finished tiny run with its network logged and registered."""
    overrides = tiny_overrides(cifar_tar, **{"run.log_model": "true", "run.register_model": "tiny-resnet20"})
    assert train.main(["--config", str(CIFAR), *overrides]) == 0
    (run,) = _runs()
    return run, load_config(CIFAR, overrides)


def test_mlflow_fields_are_filled(logged_run, cifar_tar):
    run, cfg = logged_run
    tags = run.data.tags
    assert tags["mlflow.source.git.commit"] == tags["reproduce.git_commit"] and len(tags["reproduce.git_commit"]) >= 7
    note = tags["mlflow.note.content"]
    for text in (
        "**resnet20** (ResNet of 20 layers, basic blocks, shortcut option A), seed 0",
        "global batch 16",
        "lr divided by 10 at 3",
        "6 iterations",
        tags["reproduce.data_fingerprint"],
        "`train_top1_err`: %",
        "`test_top1_err / test_top5_err`",
        "images_per_sec",
        "final protocol: single",
    ):
        assert text in note, text
    inputs = {i.tags[0].value: i for i in run.inputs.dataset_inputs}  # by context (mlflow.data.context)
    assert set(inputs) == {"training", "test"}
    dataset = inputs["training"].dataset
    assert dataset.name == "cifar10" and dataset.digest == tags["reproduce.data_fingerprint"]
    assert str(cifar_tar) in dataset.source and str(cifar_tar) in inputs["test"].dataset.source
    assert inputs["test"].dataset.name == "cifar10-test"
    assert {t.key: t.value for t in inputs["test"].tags}["reproduce.images"] == "60"  # the tiny tree's test split
    # the errors again, rounded, under errors/ (the UI's first section); full precision under the plain names
    for key in ("train_top1_err", "val_top1_err", "test_top1_err"):
        assert run.data.metrics[f"errors/{key}"] == round(run.data.metrics[key], 4), key
    assert "errors/train_loss" not in run.data.metrics and "errors/lr" not in run.data.metrics
    experiment = mlflow.get_experiment_by_name("cifar10")
    assert "Model training" in experiment.tags["mlflow.note.content"]
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # MLflow's own field for the kind
    assert not [k for k in run.data.metrics if k.startswith("system/")]  # a CPU job: off by default


def test_the_logged_network_is_the_trained_one(logged_run, cifar_tar, tmp_path, capsys):
    run, cfg = logged_run
    net = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/{run.info.run_name}")  # named after its run
    trained = build_model("resnet20")
    trained.load_state_dict(torch.load(checkpoint.list_checkpoints(cfg.run_dir())[-1], weights_only=True)["model"])
    images = torch.randn(5, 3, 32, 32)  # another batch size than the logged example's
    with torch.no_grad():
        assert torch.allclose(net(images), trained.eval()(images), atol=1e-5)
    info = mlflow.models.get_model_info(f"runs:/{run.info.run_id}/resnet20-s0")
    assert info.metadata["reproduce.architecture"] == {"name": "resnet20", "shortcut": "A", "variant": "v1"}
    assert [list(t.shape) for t in info.signature.inputs.inputs][0] == [-1, 3, 32, 32]
    registered = mlflow.pytorch.load_model("models:/tiny-resnet20/1")
    with torch.no_grad():
        assert torch.equal(registered(images), net(images))

    # `reproduce evaluate` takes the run (or the registered model) as weights: the same test error
    # as the run's own final evaluation, on the same images.
    data = ["--data", str(cifar_tar), "data.val_split=40", "eval.batch_size=64", "run.device=cpu"]
    outs = {}
    for name, weights in (
        ("run", f"runs:/{run.info.run_id}"),
        ("registry", "models:/tiny-resnet20/1"),
        ("dir", str(cfg.run_dir())),
    ):
        outs[name] = tmp_path / f"{name}.json"
        assert evaluate.main(["--weights", weights, "--model", "resnet20", "--out", str(outs[name]), *data]) == 0
    results = {name: pd.read_json(path, typ="series") for name, path in outs.items()}
    assert results["run"]["weights_format"] == "mlflow-model"
    for name in ("run", "registry"):
        assert results[name]["test_top1_err"] == pytest.approx(run.data.metrics["test_top1_err"], abs=1e-6)
        assert results[name]["test_top1_err"] == pytest.approx(results["dir"]["test_top1_err"], abs=1e-6)
    assert evaluate.main(["--weights", f"runs:/{run.info.run_id}", "--out", str(tmp_path / "bare.json"), *data]) == 0
    assert pd.read_json(tmp_path / "bare.json", typ="series")["model"] == "resnet20"  # the model's metadata says it
    assert evaluate.main(["--weights", f"runs:/{run.info.run_id}", "--model", "plain20", *data]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "resnet20 (shortcut A, v1)" in err and "plain20" in err
    assert evaluate.main(["--weights", "runs:/0123456789abcdef", "--model", "resnet20", *data]) == 2
    assert "cannot load an MLflow PyTorch model" in capsys.readouterr().err


@pytest.mark.slow  # two tiny trainings and three reports
def test_the_report_is_stored_in_the_tracking_store(cifar_tar, tmp_path):
    for config in (CIFAR, PLAIN):
        assert train.main(["--config", str(config), *tiny_overrides(cifar_tar)]) == 0
    out = tmp_path / "report"
    for _ in range(2):  # a second report replaces the first one's files, in the same run
        assert report.main(["--study", "cifar10", "--out", str(out)]) == 0
    runs = mlflow.search_runs(
        experiment_names=["cifar10"], filter_string="tags.`reproduce.kind` = 'report'", output_format="list"
    )
    assert len(runs) == 1 and runs[0].info.run_name == "report-cifar10" and runs[0].info.status == "FINISHED"
    artifacts = {a.path: a for a in mlflow.MlflowClient().list_artifacts(runs[0].info.run_id)}
    assert {"table.md", "table.csv", "provenance.csv", "fig6.png"} <= set(artifacts)
    stored = mlflow.artifacts.download_artifacts(run_id=runs[0].info.run_id, artifact_path="table.md")
    assert open(stored).read() == (out / "table.md").read_text()
    assert "| ResNet-20 A | single | test_top1_err | 8.75 |" in runs[0].data.tags["mlflow.note.content"]
    assert len(load_mlflow_runs("cifar10", "cifar10")) == 2  # the report run is not read as a training run
    # Every run says what it is: one filter shows exactly the training runs (issue 31).
    trained = mlflow.search_runs(
        experiment_names=["cifar10"], filter_string="tags.`reproduce.kind` = 'train'", output_format="list"
    )
    assert sorted(r.data.params["model.name"] for r in trained) == ["plain20", "resnet20"]
    assert len(mlflow.search_runs(experiment_names=["cifar10"], output_format="list")) == 3
    assert len(training_runs(["cifar10"])) == 2  # `reproduce runs` lists them, not the report
    assert report.main(["--study", "cifar10", "--out", str(tmp_path / "again"), "--no-mlflow"]) == 0


@pytest.mark.slow  # three tiny trainings
def test_runs_lists_the_comparison(cifar_tar):
    for config, seed in ((CIFAR, 0), (CIFAR, 1), (PLAIN, 0)):
        assert train.main(["--config", str(config), f"seed={seed}", *tiny_overrides(cifar_tar)]) == 0
    evaluate_run = mlflow.start_run(
        experiment_id=mlflow.get_experiment_by_name("cifar10").experiment_id,
        tags={"reproduce.kind": "evaluation", "reproduce.recipe": "x"},
    )
    mlflow.end_run()
    rows = training_runs()
    assert list(rows.model) == ["plain20", "resnet20", "resnet20"] and list(rows.seed) == [0, 0, 1]
    assert list(rows.depth) == [20, 20, 20] and list(rows.family) == ["plain", "resnet", "resnet"]
    assert set(rows.status) == {"FINISHED"} and set(rows.iterations) == {"6/6"}
    assert evaluate_run.info.run_id not in set(rows.run_id)
    finals = {
        r.info.run_id: r.data.metrics["test_top1_err"] for r in _runs() if r.info.run_id != evaluate_run.info.run_id
    }
    assert all(v == pytest.approx(round(finals[i], 2)) for i, v in zip(rows.run_id, rows.test_top1_err))

    cli = [sys.executable, "-m", "reproduce.cli", "runs"]
    text = subprocess.run(cli, capture_output=True, text=True, check=True).stdout
    assert "plain20 plain" in " ".join(text.split()) and "3 runs at sqlite:///" in text
    csv = subprocess.run(cli + ["--csv"], capture_output=True, text=True, check=True).stdout
    parsed = pd.read_csv(io.StringIO(csv))
    assert list(parsed.columns[:6]) == ["experiment", "model", "family", "depth", "seed", "status"]
    assert parsed.depth.dtype.kind == "i" and parsed.test_top1_err.dtype.kind == "f"
    missing = subprocess.run(cli + ["--experiment", "nope"], capture_output=True, text=True)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "no MLflow experiment nope" in missing.stderr


def test_runs_shows_a_stopped_run_at_its_checkpoint(cifar_tar, tmp_path, monkeypatch):
    """A run stopped by SIGTERM mid-run is listed at the iteration its checkpoint holds (where a
    resume starts), not at its latest logged step, and at the whole schedule once resumed."""
    import signal

    from tests.conftest import sigterm_during

    overrides = tiny_overrides(
        cifar_tar, iterations=8, **{"run.log_every": 3, "run.checkpoint_every": 100, "run.dir": tmp_path / "runs"}
    )
    real_lr_at = sigterm_during(monkeypatch, 4)
    assert train.main(["--config", str(CIFAR), *overrides]) == 128 + signal.SIGTERM
    (stopped,) = training_runs().itertuples()
    (run_dir,) = [p.parent for p in (tmp_path / "runs").rglob("config.yaml")]
    kept = int(checkpoint.find_latest(run_dir).stem.split("-")[1])
    assert stopped.status == "KILLED" and kept == 5 and stopped.iterations == "5/8"  # the last logged step is 3
    monkeypatch.setattr(train, "lr_at", real_lr_at)
    assert train.main(["--config", str(CIFAR), *overrides]) == 0
    (finished,) = training_runs().itertuples()
    assert finished.status == "FINISHED" and finished.iterations == "8/8" and finished.run_id == stopped.run_id


def test_the_logged_model_takes_raw_pixels_by_its_metadata_and_gives_the_runs_test_error(cifar_tar):
    """The logged network, found by its run and loaded by its URI alone (models:/<model id>), with
    what its metadata says to subtract and divide by, scores the raw test images (uint8 as stored)
    as the run's own final evaluation did; its final errors are linked to it and to the test split.
    Trained long enough at a gentle rate to tell the colours of the tiny set apart."""
    from reproduce.data.cifar import load_cifar10

    learn = {"optim.lr": "0.02", "schedule.milestones": "[]", "data.val_split": "0", "run.log_model": "true"}
    assert train.main(["--config", str(CIFAR), *tiny_overrides(cifar_tar, iterations=30, **learn)]) == 0
    (run,) = _runs()
    (logged,) = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
    assert logged.name == run.info.run_name == "resnet20-s0" and logged.source_run_id == run.info.run_id
    linked = {m.key: m for m in logged.metrics}
    assert linked["errors/test_top1_err"].value == run.data.metrics["errors/test_top1_err"]
    assert linked["errors/test_top1_err"].dataset_name == "cifar10-test"
    assert linked["errors/train_top1_err"].dataset_name == "cifar10"
    uri = f"models:/{logged.model_id}"
    net, meta = mlflow.pytorch.load_model(uri), mlflow.models.get_model_info(uri).metadata
    raw = load_cifar10(cifar_tar)  # the test images as stored: (N, 32, 32, 3) uint8
    pixels = torch.from_numpy(raw.test_x).permute(0, 3, 1, 2).float() / 255
    mean, std = torch.tensor(meta["reproduce.input_mean"]), torch.tensor(meta["reproduce.input_std"])
    assert mean.shape == (3, 32, 32) and std.shape == (3, 1, 1)  # data.normalize=pixel_mean: the mean image
    with torch.no_grad():
        predicted = net((pixels - mean) / std).argmax(1)
        unnormalised = net(pixels).argmax(1)
    error = 100 * (predicted != torch.from_numpy(raw.test_y)).double().mean().item()
    assert error == pytest.approx(run.data.metrics["test_top1_err"], abs=1e-9)
    assert error < 90 and not torch.equal(predicted, unnormalised)  # it learnt, and the statistics matter
