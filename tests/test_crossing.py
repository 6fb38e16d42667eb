"""tools/crossing.py against a real MLflow store: where a deeper net's logged training error drops
below a shallower one's, and the run length from which the study's last-fifth means show it."""

from __future__ import annotations

import importlib.util

import mlflow
import pytest

from tests.conftest import REPO

spec = importlib.util.spec_from_file_location("crossing", REPO / "tools" / "crossing.py")
crossing = importlib.util.module_from_spec(spec)
spec.loader.exec_module(crossing)


def _log(model: str, seed: int, errors: dict[int, float], status: str = "FINISHED") -> None:
    with mlflow.start_run(tags={"reproduce.model": model, "reproduce.seed": str(seed)}) as run:
        for step, err in errors.items():
            mlflow.log_metric("train_top1_err", err, step=step)
    mlflow.MlflowClient().set_terminated(run.info.run_id, status)


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    mlflow.set_experiment("crossing")
    steps = range(100, 1001, 100)
    _log("resnet20", 0, {s: 50.0 for s in steps})
    _log("resnet20", 1, {s: 52.0 for s in steps})  # a second seed: the curve is the mean, 51
    _log("resnet56", 0, {s: 80.0 if s < 600 else 40.0 for s in steps})
    _log("resnet56", 1, {s: 10.0 for s in steps}, status="KILLED")  # unfinished runs are not read
    yield
    mlflow.set_tracking_uri(None)


def test_crossing_and_the_run_length_that_shows_it(store, capsys):
    assert crossing.main(["--smooth", "1"]) == 0
    out = capsys.readouterr().out
    # deep below shallow from 600 on; the last fifth of a 600-iteration run is (480, 600]: 500 and 600,
    # deep (80 + 40) / 2 = 60 > 51; of 700: 600 and 700, 40 < 51
    assert "curves cross (smoothed over 1 windows): iteration 600" in out
    assert "ahead from a run length of: 700" in out and "2 + 1 runs" in out


def test_smoothing_delays_the_crossing_and_no_crossing_is_said(store, capsys):
    table = crossing.curves("crossing", ["resnet20", "resnet56"])
    assert crossing.crossing(table, "resnet20", "resnet56", 3) == 800  # at 700: (80 + 40 + 40) / 3 > 51
    assert crossing.crossing(table, "resnet56", "resnet20", 1) is None  # the other way round: never ahead
    assert crossing.study_shows(table, "resnet56", "resnet20")[0] is None


def test_unfinished_runs_are_read_on_request(store, capsys):
    """The stopped ResNet-56 run (10% from the start) pulls the deep curve's mean down to (80 + 10) / 2 = 45."""
    table = crossing.curves("crossing", ["resnet20", "resnet56"], unfinished=True)
    assert table["resnet56"].iloc[0] == 45.0 and table["resnet56 runs"].iloc[0] == 2
    assert crossing.main(["--smooth", "1", "--unfinished"]) == 0
    assert "curves cross (smoothed over 1 windows): iteration 100" in capsys.readouterr().out


def test_a_missing_experiment_or_network_is_one_line(store):
    with pytest.raises(SystemExit, match="no MLflow experiment 'nope'"):
        crossing.main(["--experiment", "nope"])
    with pytest.raises(SystemExit, match="no finished resnet110 run"):
        crossing.main(["--deep", "resnet110"])


def test_each_seed_is_shown_on_its_own_beside_the_mean(store, capsys):
    """Seed 0: 50 against 80 then 40 (crosses at 600, shown from 700, margin 10 at 1000); seed 1 (its
    ResNet-56 run stopped, read with --unfinished): 52 against 10 everywhere (margin 42)."""
    seeds = crossing.per_seed("crossing", "resnet20", "resnet56", 1, unfinished=True)
    assert seeds.to_dict("index") == {
        "0": {"curves cross": 600, "study shows from": 700, "iterations": 1000, "last-fifth margin": 10.0},
        "1": {"curves cross": 100, "study shows from": 100, "iterations": 1000, "last-fifth margin": 42.0},
    }
    assert crossing.main(["--smooth", "1", "--unfinished"]) == 0
    assert "last-fifth margin over 2 seeds: 26.00 +- 22.63 points" in capsys.readouterr().out
    assert crossing.main(["--smooth", "1"]) == 0  # finished runs only: one pair, no per-seed lines
    assert "per seed" not in capsys.readouterr().out
