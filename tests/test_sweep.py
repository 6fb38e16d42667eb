"""The sweep: the configs x seeds grid, in this process or as parallel child processes."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml

from reproduce.runs import sweep
from tests.conftest import REPO, tiny_overrides

CIFAR = REPO / "configs" / "cifar10"


def _trained(kind: str = "train") -> list:
    """The experiment's training runs (or its parent runs, kind="study"): the filter the README gives."""
    return mlflow.search_runs(
        experiment_names=["cifar10"], filter_string=f"tags.`reproduce.kind` = '{kind}'", output_format="list"
    )


def test_sweep_dry_run_prints_the_grid(capsys):
    assert sweep.main(["--configs", "a.yaml", "b.yaml", "--seeds", "0", "1", "optim.lr=0.05", "--dry-run"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "reproduce train --config a.yaml seed=0 optim.lr=0.05",
        "reproduce train --config b.yaml seed=0 optim.lr=0.05",
        "reproduce train --config a.yaml seed=1 optim.lr=0.05",
        "reproduce train --config b.yaml seed=1 optim.lr=0.05",
    ]


def test_sweep_goes_on_past_a_failed_run(monkeypatch, capsys):
    from reproduce import train

    calls = []

    def fake_run(cfg, stop):  # the sweep hands train its parsed config, once per run
        calls.append((cfg.model.name, cfg.seed))
        if (cfg.model.name, cfg.seed) == ("plain20", 0):
            raise RuntimeError("boom")
        return 3 if (cfg.model.name, cfg.seed) == ("resnet20", 1) else 0

    monkeypatch.setattr(train, "run", fake_run)
    configs = [str(CIFAR / f"{m}.yaml") for m in ("plain20", "resnet20")]
    assert sweep.main(["--configs", *configs, "--seeds", "0", "1"]) == 1
    assert calls == [("plain20", 0), ("resnet20", 0), ("plain20", 1), ("resnet20", 1)]
    err = capsys.readouterr().err
    assert "FAILED (RuntimeError: boom)" in err and "FAILED (3)" in err and err.count("FAILED") == 2
    assert sweep.main(["--configs", "nope.yaml", "--seeds", "0"]) == 2


def test_sweep_refuses_zero_parallel(capsys):
    with pytest.raises(SystemExit) as exit_:
        sweep.main(["--configs", str(CIFAR / "resnet20.yaml"), "--parallel", "0"])
    assert exit_.value.code == 2 and "--parallel must be at least 1, got 0" in capsys.readouterr().err


def _exploding_config(tmp_path: Path) -> Path:
    """resnet20's config with an lr that makes the loss non-finite at once: a run that fails."""
    raw = yaml.safe_load((CIFAR / "resnet20.yaml").read_text())
    raw["optim"]["lr"] = 1e12
    path = tmp_path / "exploding.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.slow
def test_parallel_sweep_runs_children_at_once(cifar_tar, tmp_path, capsys):
    """Three runs, two at a time, as child processes sharing one sqlite MLflow store: the first
    two overlap in time, each writes its own log, and the failing one is reported, not fatal."""
    configs = [str(CIFAR / "plain20.yaml"), str(CIFAR / "resnet20.yaml"), str(_exploding_config(tmp_path))]
    code = sweep.main(
        [
            "--configs",
            *configs,
            "--seeds",
            "0",
            "--parallel",
            "2",
            "--log-dir",
            str(tmp_path / "logs"),
            *tiny_overrides(cifar_tar, iterations=20, **{"run.log_every": 1}),
        ]
    )
    assert code == 1
    out, err = capsys.readouterr()
    assert "sweep: 2 of 3 runs succeeded" in out and err.count("FAILED") == 1 and "exploding.yaml" in err
    logs = sorted((tmp_path / "logs").iterdir())
    assert [p.name for p in logs] == ["001-plain20-seed0.log", "002-resnet20-seed0.log", "003-exploding-seed0.log"]
    assert "training loss is" in logs[2].read_text() and "final:" in logs[0].read_text()
    runs = {r.data.params["model.name"] + r.data.params["optim.lr"]: r for r in _trained()}
    assert {k: r.info.status for k, r in runs.items()} == {
        "plain200.1": "FINISHED",
        "resnet200.1": "FINISHED",
        "resnet201000000000000.0": "FAILED",
    }
    first, second = runs["plain200.1"].info, runs["resnet200.1"].info
    assert first.start_time < second.end_time and second.start_time < first.end_time  # they trained at once
    for run in (first, second):  # every logged step of each run is there, none twice, despite the shared store
        steps = [m.step for m in mlflow.MlflowClient().get_metric_history(run.run_id, "train_loss")]
        assert sorted(steps) == list(range(1, 21))
    # one parent run, the three nested under it; it holds the report of the two that finished
    (parent,) = _trained("study")
    assert parent.info.status == "FINISHED" and parent.info.run_name == "sweep-plain20-resnet20"
    assert {r.data.tags["mlflow.parentRunId"] for r in runs.values()} == {parent.info.run_id}
    for model, run in (("plain20", runs["plain200.1"]), ("resnet20", runs["resnet200.1"])):
        assert parent.data.metrics[f"{model}/n"] == 1
        assert parent.data.metrics[f"{model}/test_err_mean"] == run.data.metrics["errors/test_top1_err"]
    assert "margin/plain20-resnet20/train_err" in parent.data.metrics
    assert {a.path for a in mlflow.MlflowClient().list_artifacts(parent.info.run_id)} >= {"table.md", "summary.csv"}


@pytest.mark.slow
def test_stopped_parallel_sweep_resumes_into_the_same_runs(cifar_tar, tmp_path):
    """Fault: a parallel sweep is preempted or cancelled (scancel, Ctrl-C, a shutdown).
    Injected: SIGTERM to `reproduce sweep --parallel 2` of three runs while the first two train.
    Suite: the sweep asks both children to stop; each checkpoints, ends its MLflow run as KILLED, and the sweep exits 143
    without starting the third; the same command resumes both into their own runs and trains the third, all FINISHED.
    Lost: nothing: each run goes on from the checkpoint written at the stop."""
    overrides = tiny_overrides(cifar_tar, iterations=100, **{"run.checkpoint_every": 1000, "run.log_every": 10})
    command = [
        sys.executable,
        "-m",
        "reproduce.cli",
        "sweep",
        "--configs",
        str(CIFAR / "plain20.yaml"),
        str(CIFAR / "resnet20.yaml"),
        str(CIFAR / "plain32.yaml"),
        "--parallel",
        "2",
        *overrides,
    ]
    sweep_ = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    logs = [tmp_path / "sweep-logs" / name for name in ("001-plain20-seed0.log", "002-resnet20-seed0.log")]
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:  # both children have started training (their MLflow runs exist)
        if all(p.exists() and "MLflow run" in p.read_text() for p in logs):
            break
        assert sweep_.poll() is None, sweep_.communicate()
        time.sleep(0.2)
    else:
        pytest.fail("the children never started training")
    sweep_.send_signal(signal.SIGTERM)
    out, err = sweep_.communicate(timeout=120)  # a run still pending once stopping must not keep the sweep waiting
    assert sweep_.returncode == 128 + signal.SIGTERM, err
    assert "with 1 runs not started; start the same command to resume" in err
    stopped = {r.data.params["model.name"]: r for r in _trained()}
    assert {k: r.info.status for k, r in stopped.items()} == {"plain20": "KILLED", "resnet20": "KILLED"}
    ((parent, status),) = [(r.info.run_id, r.info.status) for r in _trained("study")]
    assert status == "KILLED"  # as its runs

    again = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    final = {r.data.params["model.name"]: r for r in _trained()}
    assert final.pop("plain32").info.status == "FINISHED"
    assert {k: (r.info.run_id, r.info.status) for k, r in final.items()} == {
        k: (r.info.run_id, "FINISHED") for k, r in stopped.items()
    }
    assert [(r.info.run_id, r.info.status) for r in _trained("study")] == [(parent, "FINISHED")]  # the same parent
    assert {r.data.tags["mlflow.parentRunId"] for r in _trained()} == {parent}
    for path in logs:  # each log holds both attempts: the second resumed from the stop's checkpoint
        assert "resuming at iteration" in path.read_text()
    assert sorted(p.name for p in (tmp_path / "sweep-logs").iterdir()) == [p.name for p in logs] + [
        "003-plain32-seed0.log"
    ]


def test_a_stop_during_a_runs_last_iteration_ends_the_sweep_after_that_run(cifar_tar, monkeypatch, capsys):
    """Fault: a sweep (one run at a time, in its own process) is asked to stop while a run is in its
    last iteration, too late for that run to stop.
    Injected: SIGTERM from the process itself during the last of 4 iterations of the first of two runs.
    Suite: the first run finishes (FINISHED), the sweep does not start the second and exits 143; the same
    command then skips the first (complete) and trains the second. Before, the request was lost and the sweep went on.
    Lost: nothing."""
    from reproduce import train
    from tests.conftest import sigterm_during

    overrides = tiny_overrides(cifar_tar, iterations=4)
    command = ["--configs", str(CIFAR / "plain20.yaml"), str(CIFAR / "resnet20.yaml"), *overrides]
    real_lr_at = sigterm_during(monkeypatch, 3)
    assert sweep.main(command) == 128 + signal.SIGTERM
    assert "sweep stopped on request before run 2/2" in capsys.readouterr().err
    runs = _trained()
    assert [(r.data.params["model.name"], r.info.status) for r in runs] == [("plain20", "FINISHED")]
    monkeypatch.setattr(train, "lr_at", real_lr_at)
    assert sweep.main(command) == 0
    runs = _trained()
    assert sorted((r.data.params["model.name"], r.info.status) for r in runs) == [
        ("plain20", "FINISHED"),
        ("resnet20", "FINISHED"),
    ]


def test_sweep_refuses_an_unreachable_server_before_any_run(monkeypatch, capsys):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    assert sweep.main(["--configs", str(CIFAR / "resnet20.yaml"), "--parallel", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith("error: MLflow tracking server http://127.0.0.1:") and "unreachable" in err and "\n" not in err
    )


@pytest.mark.slow
def test_children_stop_when_the_sweep_is_killed(cifar_tar, tmp_path):
    """Fault: the sweep process itself dies outright (OOM killer, kill -9), leaving its children.
    Injected: SIGKILL to `reproduce sweep --parallel 2` while its child run trains.
    Suite: the kernel sends the child SIGTERM (PR_SET_PDEATHSIG); it checkpoints and ends its MLflow run as KILLED instead of training on unwatched, holding its run directory's lock.
    Lost: nothing: the run resumes from that checkpoint when the sweep is started again."""
    overrides = tiny_overrides(cifar_tar, iterations=1000, **{"run.checkpoint_every": 5000, "run.log_every": 10})
    sweep_ = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "reproduce.cli",
            "sweep",
            "--configs",
            str(CIFAR / "resnet20.yaml"),
            "--parallel",
            "2",
            *overrides,
        ],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    log = tmp_path / "sweep-logs" / "001-resnet20-seed0.log"
    deadline = time.monotonic() + 240
    while not (log.exists() and "MLflow run" in log.read_text()):
        assert time.monotonic() < deadline and sweep_.poll() is None, "the child never started training"
        time.sleep(0.2)
    sweep_.kill()
    sweep_.wait()
    deadline = time.monotonic() + 120
    while _trained()[0].info.status == "RUNNING":
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.5)
    (run,) = _trained()
    assert run.info.status == "KILLED" and "stopped on request" in log.read_text()
    (run_dir,) = (tmp_path / "runs" / "cifar10").iterdir()
    assert [p.name for p in run_dir.glob("ckpt-*.pt")], "no checkpoint written on the way out"
