"""Time to accuracy (eval.target_top1_err): a real run logs the first iteration and wall time at
which its validation error reached each target, keeps them across a stop and resume (never logged
twice, never lost), reads them back from MLflow when it resumes from a checkpoint older than the
record, and `reproduce runs` shows them."""

from __future__ import annotations

import signal

import mlflow
import pytest
import torch

from reproduce import checkpoint, train
from reproduce.config import load_config
from reproduce.engine import TimeToTarget
from reproduce.report.listing import training_runs
from tests.conftest import REPO, sigterm_during, tiny_overrides

CIFAR = REPO / "configs" / "cifar10" / "resnet20.yaml"
# 99.9%: reached by the first evaluation unless every validation image is wrong; 0.01%: only by a
# perfect one. Which is reached is read from the logged errors, not assumed.
TARGETS = "[99.9,0.01]"


def _history(run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in mlflow.MlflowClient().get_metric_history(run_id, key))


def _first_reached(run_id: str, target: float) -> int | None:
    return next((step for step, err in _history(run_id, "val_top1_err") if err <= target), None)


def _only_run():
    (run,) = mlflow.search_runs(experiment_names=["cifar10"], output_format="list")
    return run


def test_a_run_logs_the_first_iteration_and_wall_time_of_each_target(cifar_tar):
    overrides = tiny_overrides(cifar_tar, iterations=6, **{"eval.every": 2, "eval.target_top1_err": TARGETS})
    assert train.main(["--config", str(CIFAR), *overrides]) == 0
    run = _only_run()
    reached = 0
    for target in (99.9, 0.01):
        first = _first_reached(run.info.run_id, target)
        key = f"time_to_val_top1_err_{target:g}"
        if first is None:
            assert f"{key}_iteration" not in run.data.metrics and f"{key}_s" not in run.data.metrics
            continue
        reached += 1
        assert _history(run.info.run_id, f"{key}_iteration") == [(first, first)]
        ((step, wall),) = _history(run.info.run_id, f"{key}_s")
        assert step == first and 0 < wall <= (run.info.end_time - run.info.start_time) / 1000
    assert reached >= 1
    state = torch.load(checkpoint.list_checkpoints(load_config(CIFAR, overrides).run_dir())[-1], weights_only=True)
    kept = state["time_to_target"]
    assert kept["elapsed_s"] > 0 and {float(t) for t in kept["reached"]} == {
        t for t in (99.9, 0.01) if _first_reached(run.info.run_id, t) is not None
    }
    # `reproduce runs` shows each target with the iteration and minutes it took, or '-'.
    (row,) = training_runs(["cifar10"]).itertuples()
    for target in (99.9, 0.01):
        first = _first_reached(run.info.run_id, target)
        if first is None:
            assert f"{target:g}%@-" in row.to_target
        else:
            wall = run.data.metrics[f"time_to_val_top1_err_{target:g}_s"]
            assert f"{target:g}%@{first} ({wall / 60:.1f} min)" in row.to_target, row.to_target


def test_a_target_reached_before_a_stop_is_kept_and_not_logged_again(cifar_tar, tmp_path, monkeypatch):
    """Reached at the evaluation of iteration 2, stopped during iteration 4 (checkpoint at 4), resumed
    to 8: the resumed run's evaluations (4, 6, 8) are also below the target, and must not log it again;
    a straight run logs the same iteration; the clock goes on from the checkpoint's time."""
    extra = {"eval.every": 2, "run.checkpoint_every": 100, "eval.target_top1_err": "[99.9]"}
    straight = tiny_overrides(cifar_tar, iterations=8, **extra, **{"run.dir": tmp_path / "straight"})
    assert train.main(["--config", str(CIFAR), *straight]) == 0
    (straight_run,) = mlflow.search_runs(experiment_names=["cifar10"], output_format="list")
    first = _first_reached(straight_run.info.run_id, 99.9)
    assert first == 2, "the first evaluation should be below 99.9% error"

    resumed = tiny_overrides(cifar_tar, iterations=8, **extra, **{"run.dir": tmp_path / "resumed"})
    real_lr_at = sigterm_during(monkeypatch, 3)
    assert train.main(["--config", str(CIFAR), *resumed]) == 128 + signal.SIGTERM
    (stopped_ckpt,) = checkpoint.list_checkpoints(tmp_path / "resumed")
    at_stop = torch.load(stopped_ckpt, weights_only=True)["time_to_target"]
    assert at_stop["reached"]["99.9"][0] == 2
    monkeypatch.setattr(train, "lr_at", real_lr_at)
    assert train.main(["--config", str(CIFAR), *resumed]) == 0
    runs = mlflow.search_runs(experiment_names=["cifar10"], output_format="list")
    (run,) = [r for r in runs if r.info.run_id != straight_run.info.run_id]
    assert [s for s, _ in _history(run.info.run_id, "val_top1_err")] == [2, 4, 6, 8]
    assert _history(run.info.run_id, "time_to_val_top1_err_99.9_iteration") == [(2, 2.0)]
    assert len(_history(run.info.run_id, "time_to_val_top1_err_99.9_s")) == 1
    final = torch.load(checkpoint.list_checkpoints(tmp_path / "resumed")[-1], weights_only=True)["time_to_target"]
    assert final["reached"] == at_stop["reached"] and final["elapsed_s"] > at_stop["elapsed_s"]


def test_a_resume_from_an_older_checkpoint_reads_the_reached_targets_back(cifar_tar, tmp_path, monkeypatch):
    """A checkpoint written before time to target existed (no record, no such metrics in the run):
    the resumed run takes the iteration from the errors its MLflow run logged, and logs it once; the
    wall time is not known, so none is logged."""
    extra = {"eval.every": 2, "run.checkpoint_every": 100, "run.dir": tmp_path / "run"}
    first = tiny_overrides(cifar_tar, iterations=8, **extra, **{"eval.target_top1_err": "[]"})
    real_lr_at = sigterm_during(monkeypatch, 3)
    assert train.main(["--config", str(CIFAR), *first]) == 128 + signal.SIGTERM
    monkeypatch.setattr(train, "lr_at", real_lr_at)
    (path,) = checkpoint.list_checkpoints(tmp_path / "run")
    state = torch.load(path, weights_only=True)
    del state["time_to_target"]  # as an older commit wrote it
    checkpoint.save(tmp_path / "run", state["iteration"], state, keep=2)
    later = tiny_overrides(cifar_tar, iterations=8, **extra, **{"eval.target_top1_err": "[99.9]"})
    assert train.main(["--config", str(CIFAR), *later]) == 0
    run = _only_run()
    assert run.info.status == "FINISHED"
    reached = _first_reached(run.info.run_id, 99.9)
    assert reached is not None and reached <= 4
    assert _history(run.info.run_id, "time_to_val_top1_err_99.9_iteration") == [(reached, float(reached))]
    assert "time_to_val_top1_err_99.9_s" not in run.data.metrics


def test_time_to_target_watches_the_validation_error_else_the_test_error():
    clock = TimeToTarget([20, 10])
    assert clock.update({"val_top1_err": 30.0, "test_top1_err": 5.0}, 100) == {}
    reached = clock.update({"val_top1_err": 15.0, "test_top1_err": 5.0}, 200)
    assert set(reached) == {"time_to_val_top1_err_20_iteration", "time_to_val_top1_err_20_s"}
    assert reached["time_to_val_top1_err_20_iteration"] == 200
    assert clock.update({"val_top1_err": 12.0}, 300) == {}  # reached once
    again = TimeToTarget.from_state([20, 10], clock.state())
    assert again.update({"val_top1_err": 19.0}, 400) == {}
    assert again.update({"val_top1_err": 9.0}, 500)["time_to_val_top1_err_10_iteration"] == 500
    no_val = TimeToTarget([20])
    assert no_val.update({"test_top1_err": 19.5}, 7) == pytest.approx(
        {"time_to_test_top1_err_20_iteration": 7, "time_to_test_top1_err_20_s": no_val.reached[20.0][1]}
    )
