"""`reproduce park` / `unpark`: an unfinished run goes on in another tracking store and run directory
(a fresh machine) from the parked folder alone, bit for bit, into one MLflow record."""

from __future__ import annotations

import shutil
import signal

import mlflow
import torch

from reproduce import checkpoint, train
from reproduce.runs import park
from tests.conftest import REPO, sigterm_during, tiny_overrides

CONFIG = str(REPO / "configs" / "cifar10" / "resnet20.yaml")


def _train(args) -> int:
    return train.main(["--config", CONFIG, *args])


def _files(folder):
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.iterdir()}


def test_a_parked_run_resumes_in_a_fresh_store_bit_for_bit(cifar_tar, tmp_path, monkeypatch, capsys):
    straight = tiny_overrides(
        cifar_tar, iterations=8, **{"run.dir": tmp_path / "straight", "run.checkpoint_every": 100}
    )
    assert _train(straight) == 0

    first_store = f"sqlite:///{tmp_path / 'first.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", first_store)
    run_dir = tmp_path / "machine-a" / "run"
    args = tiny_overrides(cifar_tar, iterations=8, **{"run.dir": run_dir, "run.checkpoint_every": 100})
    real_lr_at = sigterm_during(monkeypatch, 3)
    assert _train(args) == 128 + signal.SIGTERM
    monkeypatch.setattr(train, "lr_at", real_lr_at)
    original = checkpoint.load(checkpoint.list_checkpoints(run_dir)[-1])["mlflow_run_id"]

    before = _files(run_dir)
    assert park.park_main([str(run_dir), "--to", str(tmp_path / "repo" / "pending")]) == 0
    assert _files(run_dir) == before  # a reader: the run directory is untouched
    parked = tmp_path / "repo" / "pending" / "run"
    assert sorted(p.name for p in parked.iterdir()) == ["ckpt-00000004.pt", "ckpt-00000004.pt.sha256", "run.json"]

    # The other machine: neither the run directory nor the first store exists there.
    shutil.rmtree(tmp_path / "machine-a")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'second.db'}")
    assert park.unpark_main([str(parked)]) == 0
    assert "resumes at iteration 4" in capsys.readouterr().out
    assert park.unpark_main([str(parked)]) == 0  # again: nothing new, the same imported run
    assert _train(args) == 0

    a, b = (
        torch.load(checkpoint.list_checkpoints(d)[-1], weights_only=True)["model"]
        for d in (tmp_path / "straight", run_dir)
    )
    assert all(torch.equal(a[k], b[k]) for k in a)
    runs = mlflow.search_runs(search_all_experiments=True)
    assert len(runs) == 1  # one record, not one per unpark
    run = runs.iloc[0]
    assert run["status"] == "FINISHED" and run["tags.reproduce.imported_from"] == original
    steps = [m.step for m in mlflow.MlflowClient().get_metric_history(run["run_id"], "train_loss")]
    assert steps == list(range(1, 9))  # the first machine's 4 steps, then the second's, none twice
    assert run["params.model.name"] == "resnet20" and run["tags.reproduce.model"] == "resnet20"


def test_damaged_or_foreign_parked_folders_are_refused_in_one_line(cifar_tar, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    sigterm_during(monkeypatch, 1)
    assert _train(tiny_overrides(cifar_tar, iterations=4, **{"run.dir": run_dir})) == 128 + signal.SIGTERM
    assert park.park_main([str(run_dir), "--to", str(tmp_path / "pending")]) == 0
    parked = tmp_path / "pending" / "run"
    capsys.readouterr()

    assert park.unpark_main([str(tmp_path)]) == 2  # not a parked folder
    assert "is not a parked run" in capsys.readouterr().err
    ckpt = next(parked.glob("ckpt-*.pt"))
    ckpt.write_bytes(ckpt.read_bytes()[:-10])
    assert park.unpark_main([str(parked)]) == 2
    err = capsys.readouterr().err
    assert "cannot be used" in err and "park the run again" in err and err.count("\n") == 1
    (parked / "run.json").write_text("{not json")
    assert park.unpark_main([str(parked)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert park.park_main([str(tmp_path / "absent"), "--to", str(tmp_path / "p")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_finished_run_is_not_parked_and_its_parked_folder_goes(cifar_tar, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    args = tiny_overrides(cifar_tar, iterations=4, **{"run.dir": run_dir, "run.checkpoint_every": 100})
    real_lr_at = sigterm_during(monkeypatch, 1)
    assert _train(args) == 128 + signal.SIGTERM
    monkeypatch.setattr(train, "lr_at", real_lr_at)
    assert park.park_main([str(run_dir), "--to", str(tmp_path / "pending")]) == 0
    assert (tmp_path / "pending" / "run" / "run.json").exists()
    assert _train(args) == 0
    assert park.park_main([str(run_dir), "--to", str(tmp_path / "pending")]) == 0
    assert "has finished" in capsys.readouterr().out
    assert not (tmp_path / "pending" / "run").exists()


def test_park_parks_every_run_it_can_and_names_the_ones_it_cannot(cifar_tar, tmp_path, monkeypatch, capsys):
    """`reproduce park runs/*`: a run just started (no checkpoint yet) is passed over with a note, a
    run whose checkpoints are all damaged is an error, and neither keeps the good run from being parked."""
    good = tmp_path / "runs" / "good"
    sigterm_during(monkeypatch, 1)
    assert _train(tiny_overrides(cifar_tar, iterations=4, **{"run.dir": good})) == 128 + signal.SIGTERM
    fresh = tmp_path / "runs" / "fresh"
    fresh.mkdir()
    (fresh / "config.yaml").write_text("seed: 0\n")
    damaged = tmp_path / "runs" / "damaged"
    damaged.mkdir()
    for path in good.glob("ckpt-*.pt"):
        (damaged / path.name).write_bytes(path.read_bytes()[:-10])
        (damaged / (path.name + ".sha256")).write_text((good / (path.name + ".sha256")).read_text())
    capsys.readouterr()
    pending = tmp_path / "pending"
    assert park.park_main([str(damaged), str(fresh), str(good), "--to", str(pending)]) == 2
    out, err = capsys.readouterr()
    assert "fresh has no checkpoint yet: nothing to park" in out
    assert "damaged holds no intact checkpoint" in err and err.count("\n") == 1
    assert (pending / "good" / "run.json").exists() and not (pending / "damaged").exists()
    assert park.park_main([str(fresh), str(good), "--to", str(pending)]) == 0
