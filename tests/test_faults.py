"""Fault injection: each test injects one fault for real and checks that nothing is lost
beyond the work since the last checkpoint, no result is silently wrong, and no job hangs.

Each test's docstring has four lines that `python -m reproduce.reliability` copies into
results/reliability.md: Fault / Injected / Suite / Lost.
"""
from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import psutil
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reproduce import checkpoint, cli, train
from reproduce.config import ConfigError, load_config
from tests.conftest import REPO, make_cifar_tree, tiny_overrides

CIFAR = REPO / "configs" / "cifar10" / "resnet20.yaml"
TRAIN = str(REPO / "reproduce" / "train.py")


def _env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}


def _weights(run_dir: Path) -> dict:
    return torch.load(checkpoint.list_checkpoints(run_dir)[-1], weights_only=True)["model"]


def _same_weights(a: Path, b: Path) -> bool:
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _wait_for(predicate, timeout: float, what: str, poll: float = 0.2):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _steps(run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in mlflow.MlflowClient().get_metric_history(run_id, key))


def _torchrun(overrides: list[str], *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             *extra, TRAIN, "--config", str(CIFAR), *overrides],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _worker(parent: subprocess.Popen, rank: int) -> psutil.Process | None:
    """The training process of `rank` among torchrun's children (read from its environment)."""
    for child in psutil.Process(parent.pid).children(recursive=True):
        try:
            env = child.environ()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if env.get("RANK") == str(rank) and "LOCAL_RANK" in env:
            return child
    return None


# --- 1. a rank killed ---------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigkill_of_a_rank_restarts_from_the_last_checkpoint(cifar_tar, tmp_path):
    """Fault: a training process dies (SIGKILL, OOM killer, node failure).
    Injected: SIGKILL to rank 1 of a 2-process torchrun job (--max-restarts 2) after its first checkpoint.
    Suite: torchrun restarts both ranks; they resume from the newest checkpoint into the same MLflow run.
    Lost: the iterations since the last checkpoint, recomputed identically; final weights equal an uninterrupted run's."""
    iterations = 40
    straight = tiny_overrides(cifar_tar, iterations, **{"run.dir": tmp_path / "straight", "run.checkpoint_every": 10,
                                                        "eval.every": 20})
    proc = _torchrun(straight)
    assert proc.wait(300) == 0, proc.stdout.read()

    faulty = tiny_overrides(cifar_tar, iterations, **{"run.dir": tmp_path / "faulty", "run.checkpoint_every": 10,
                                                      "eval.every": 20})
    proc = _torchrun(faulty, "--max-restarts", "2")
    _wait_for(lambda: checkpoint.list_checkpoints(tmp_path / "faulty"), 240, "the first checkpoint")
    victim = _wait_for(lambda: _worker(proc, 1), 30, "rank 1")
    victim.kill()
    out, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, out
    runs = mlflow.search_runs(experiment_names=["cifar10"], output_format="list")
    faulty_runs = [r for r in runs if r.data.tags["reproduce.run_dir"] == str((tmp_path / "faulty").resolve())]
    assert len(faulty_runs) == 1 and faulty_runs[0].info.status == "FINISHED"
    assert faulty_runs[0].data.tags.get("reproduce.resumes") == "1"  # it really restarted
    assert _steps(faulty_runs[0].info.run_id, "train_loss") == list(range(1, iterations + 1))  # no step twice
    assert _same_weights(tmp_path / "straight", tmp_path / "faulty")


# --- 2. a rank that stalls ----------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_stalled_rank_fails_the_job_naming_it(cifar_tar, tmp_path):
    """Fault: a process hangs (stuck I/O, a frozen GPU, a debugger attached).
    Injected: SIGSTOP to rank 1 of a 2-process torchrun job after its first checkpoint; run.collective_timeout_s=20.
    Suite: rank 0 gives up after the timeout with one line naming rank 1 (pid, host, last iteration); the run is FAILED.
    Lost: nothing before the last checkpoint, which stays intact; the job ends instead of hanging."""
    overrides = tiny_overrides(cifar_tar, 2000, **{"run.dir": tmp_path / "stall", "run.checkpoint_every": 10,
                                                   "eval.every": 5000, "run.collective_timeout_s": 20})
    proc = _torchrun(overrides)
    victim = None
    try:
        _wait_for(lambda: checkpoint.list_checkpoints(tmp_path / "stall"), 240, "the first checkpoint")
        victim = _wait_for(lambda: _worker(proc, 1), 30, "rank 1")
        victim.suspend()
        stalled_at = time.monotonic()
        out, _ = proc.communicate(timeout=240)
    finally:
        if victim is not None and victim.is_running():
            victim.kill()
        proc.kill()
    assert proc.returncode != 0
    assert time.monotonic() - stalled_at < 200  # the timeout (20 s) plus torchrun's shutdown grace, not forever
    line = next((l for l in out.splitlines() if "stopped answering" in l), None)
    assert line, out
    assert f"rank 1 (pid {victim.pid} on" in line, line
    (run,) = mlflow.search_runs(experiment_names=["cifar10"], output_format="list")
    assert run.info.status == "FAILED"
    for path in checkpoint.list_checkpoints(tmp_path / "stall"):
        assert checkpoint.verify(path) is None


# --- 3. damaged checkpoints ---------------------------------------------------------------
def _resumable_run(cifar_tar, run_dir: Path, monkeypatch, stop_at: int, iterations: int = 8) -> list[str]:
    """Run `iterations` tiny steps with checkpoints every 2, stopped by SIGTERM at `stop_at`."""
    overrides = tiny_overrides(cifar_tar, iterations, **{"run.dir": run_dir, "run.checkpoint_every": 2, "eval.every": 100,
                                                         "run.keep_checkpoints": 3})
    real_lr_at = train.lr_at

    def lr_then_sigterm(iteration, *args):
        if iteration == stop_at - 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_lr_at(iteration, *args)

    monkeypatch.setattr(train, "lr_at", lr_then_sigterm)
    assert train.main(["--config", str(CIFAR), *overrides]) == 128 + signal.SIGTERM
    monkeypatch.setattr(train, "lr_at", real_lr_at)
    return overrides


@pytest.mark.parametrize("damage", ["truncate", "bitflip"])
def test_damaged_latest_checkpoint_is_set_aside_and_the_previous_used(damage, cifar_tar, tmp_path, monkeypatch, caplog):
    """Fault: the newest checkpoint is damaged on disk (full disk, a node dying mid-copy, bit rot).
    Injected: the newest checkpoint truncated to half, or one byte flipped, before resuming.
    Suite: the sha256 check fails; the file is renamed *.corrupt (kept), a warning names it, the previous checkpoint is used.
    Lost: the iterations since the previous checkpoint, recomputed; final weights equal an uninterrupted run's."""
    straight = tiny_overrides(cifar_tar, 8, **{"run.dir": tmp_path / "straight", "run.checkpoint_every": 100, "eval.every": 100})
    assert train.main(["--config", str(CIFAR), *straight]) == 0
    overrides = _resumable_run(cifar_tar, tmp_path / "run", monkeypatch, stop_at=5)
    saved = checkpoint.list_checkpoints(tmp_path / "run")
    assert [p.name for p in saved] == ["ckpt-00000002.pt", "ckpt-00000004.pt", "ckpt-00000005.pt"]
    blob = bytearray(saved[-1].read_bytes())
    if damage == "truncate":
        blob = blob[: len(blob) // 2]
    else:
        blob[len(blob) // 2] ^= 0x01
    saved[-1].write_bytes(bytes(blob))

    assert train.main(["--config", str(CIFAR), *overrides]) == 0
    assert (tmp_path / "run" / "ckpt-00000005.pt.corrupt").exists()
    assert "ckpt-00000005.pt is damaged" in caplog.text and "set aside" in caplog.text
    assert _same_weights(tmp_path / "straight", tmp_path / "run")


def test_interrupted_checkpoint_write_never_replaces_a_good_one(tmp_path, monkeypatch):
    """Fault: the job dies while writing a checkpoint.
    Injected: the write of checkpoint 2 fails half-way (an exception from inside the write).
    Suite: the temporary file is removed; checkpoint 1 and its digest are untouched and still verify.
    Lost: nothing that was saved before."""
    checkpoint.save(tmp_path, 1, {"iteration": 1, "w": torch.ones(1000)}, keep=2)
    good = (tmp_path / "ckpt-00000001.pt").read_bytes()
    real_replace = os.replace

    def fail_on_checkpoint(src, dst):
        if str(dst).endswith("ckpt-00000002.pt"):
            raise OSError("disk full (injected)")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", fail_on_checkpoint)
    with pytest.raises(OSError, match="injected"):
        checkpoint.save(tmp_path, 2, {"iteration": 2, "w": torch.zeros(1000)}, keep=2)
    monkeypatch.setattr(os, "replace", real_replace)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["ckpt-00000001.pt"]
    assert (tmp_path / "ckpt-00000001.pt").read_bytes() == good
    assert checkpoint.find_latest(tmp_path) == tmp_path / "ckpt-00000001.pt"
    assert not list(tmp_path.glob("*.tmp"))


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_checkpoint_cannot_run_code(cifar_tar, tmp_path, capsys):
    """Fault: a checkpoint file from elsewhere carries a pickled payload.
    Injected: a ckpt-*.pt (with a matching digest) whose pickle calls os.system when unpickled.
    Suite: torch.load(weights_only=True) refuses it; the job stops before training with one line and status 2.
    Lost: nothing; the code is never run."""
    run_dir = tmp_path / "run"
    checkpoint.save(run_dir, 3, {"iteration": 3, "evil": _Payload()}, keep=2)
    overrides = tiny_overrides(cifar_tar, 6, **{"run.dir": run_dir})
    assert train.main(["--config", str(CIFAR), *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: checkpoint {run_dir}/ckpt-00000003.pt cannot be loaded safely"), err
    assert not Path("pwned").exists()


# --- 4. the tracking server ---------------------------------------------------------------
def _start_server(store: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{store}",
                             "--default-artifact-root", str(store.parent / "artifacts"), "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"],
                            env=_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    import urllib.request

    def healthy():
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                return r.read().strip() == b"OK"
        except OSError:
            return proc.poll() is not None and pytest.fail("mlflow server exited")
    _wait_for(healthy, 90, "the MLflow server", poll=0.5)
    return proc


def _stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("returns", ["during the run", "never"])
def test_tracking_server_dies_mid_run(returns, cifar_tar, tmp_path):
    """Fault: the MLflow server goes away mid-run (restart, network partition).
    Injected: SIGTERM to a real `mlflow server` after the first checkpoint; restarted 5 s later, or never.
    Suite: training goes on; metrics queue and are sent when the server is back; if it never is, they and the final status go to <run dir>/unsent-metrics.json and `reproduce sync` delivers them.
    Lost: nothing: every step's metrics reach the run, which ends FINISHED."""
    port, store = _free_port(), tmp_path / "server.db"
    uri = f"http://127.0.0.1:{port}"
    server = _start_server(store, port)
    iterations = 60
    overrides = tiny_overrides(cifar_tar, iterations, **{"run.dir": tmp_path / "run", "run.checkpoint_every": 5,
                                                         "eval.every": 100, "run.tracking_flush_s": 60 if returns != "never" else 5})
    job = subprocess.Popen([sys.executable, TRAIN, "--config", str(CIFAR), *overrides], env=_env(MLFLOW_TRACKING_URI=uri),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(lambda: checkpoint.list_checkpoints(tmp_path / "run"), 240, "the first checkpoint")
        _stop_server(server)
        if returns == "never":
            out, _ = job.communicate(timeout=300)
            assert job.returncode == 0, out
            assert "send them with `reproduce sync" in out
            server = _start_server(store, port)
            result = subprocess.run([sys.executable, "-m", "reproduce.cli", "sync", str(tmp_path / "run")],
                                    env=_env(MLFLOW_TRACKING_URI=uri), capture_output=True, text=True, timeout=120)
            assert result.returncode == 0, result.stderr
            assert not (tmp_path / "run" / "unsent-metrics.json").exists()
        else:
            time.sleep(5)
            server = _start_server(store, port)
            out, _ = job.communicate(timeout=300)
            assert job.returncode == 0, out
        os.environ["MLFLOW_TRACKING_URI"] = uri  # read at each call; the autouse fixture restores it
        (run,) = mlflow.search_runs(experiment_names=["cifar10"], output_format="list")
        assert run.info.status == "FINISHED"
        assert _steps(run.info.run_id, "train_loss") == list(range(1, iterations + 1))
        assert _steps(run.info.run_id, "test_top1_err") == [iterations]
    finally:
        job.kill()
        _stop_server(server)


def test_unreachable_tracking_server_is_refused_before_training(cifar_tar, tmp_path):
    """Fault: MLFLOW_TRACKING_URI points at a server that is not there.
    Injected: a URI on a closed local port.
    Suite: one line naming the URI and the fixes, exit status 2, before any training or checkpoint.
    Lost: nothing."""
    uri = f"http://127.0.0.1:{_free_port()}"
    overrides = tiny_overrides(cifar_tar, 4, **{"run.dir": tmp_path / "run"})
    result = subprocess.run([sys.executable, TRAIN, "--config", str(CIFAR), *overrides], env=_env(MLFLOW_TRACKING_URI=uri),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().startswith(f"error: MLflow tracking server {uri} is unreachable"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not checkpoint.list_checkpoints(tmp_path / "run")


# --- 5. a non-finite loss -----------------------------------------------------------------
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(cifar_tar, tmp_path, capsys):
    """Fault: training diverges (a bad learning rate, a bad batch).
    Injected: the learning rate multiplied by 1e30 from iteration 5 on (the first 4 iterations are sane).
    Suite: the run stops at the next check with one line (iteration, lr), is FAILED, and writes no checkpoint of broken weights.
    Lost: nothing before the divergence: the checkpoints of iterations 2 and 4 are intact and finite."""
    overrides = tiny_overrides(cifar_tar, 30, **{"run.dir": tmp_path / "run", "run.checkpoint_every": 2, "eval.every": 100,
                                                 "schedule.milestones": "[]", "optim.lr": 1e-3, "run.keep_checkpoints": 5})
    real_lr_at = train.lr_at
    try:
        train.lr_at = lambda it, base, schedule: real_lr_at(it, base, schedule) * (1e30 if it >= 4 else 1)
        assert train.main(["--config", str(CIFAR), *overrides]) == 1
    finally:
        train.lr_at = real_lr_at
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and ("non-finite" in err or "loss is" in err), err
    assert "iteration" in err and "(lr 1e+27)" in err, err
    (run,) = mlflow.search_runs(experiment_names=["cifar10"], output_format="list")
    assert run.info.status == "FAILED"
    saved = checkpoint.list_checkpoints(tmp_path / "run")
    assert saved and saved[0].name == "ckpt-00000002.pt"
    for path in saved:
        assert checkpoint.verify(path) is None
        assert all(torch.isfinite(t).all() for t in torch.load(path, weights_only=True)["model"].values())


# --- 6. bad input -------------------------------------------------------------------------
VALID = [yaml.safe_load(p.read_text()) for p in sorted((REPO / "configs").rglob("*.yaml"))]


def _leaves(tree: dict, prefix=()):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, prefix + (key,))
        else:
            yield prefix + (key,)


@st.composite
def broken_configs(draw):
    """A shipped config with one mutation that makes it invalid."""
    raw = json.loads(json.dumps(draw(st.sampled_from(VALID))))
    if raw["data"]["dataset"] == "imagenet":
        raw["data"]["path"] = str(REPO)  # valid, so the mutation is what fails
    paths = list(_leaves(raw))
    kind = draw(st.sampled_from(["drop", "unknown", "type", "range"]))
    if kind == "drop":
        required = [("experiment",), ("model", "name"), ("data", "dataset"), ("optim", "batch_size"), ("optim", "lr"),
                    ("schedule", "iterations"), ("eval", "every"), ("eval", "protocol"), ("run", "checkpoint_every"),
                    ("model",), ("data",), ("optim",), ("schedule",), ("eval",), ("run",)]
        path = draw(st.sampled_from(required))
    elif kind == "unknown":
        parent = draw(st.sampled_from([(), ("model",), ("data",), ("optim",), ("schedule",), ("eval",), ("run",)]))
        name = draw(st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12))
        node = raw
        for part in parent:
            node = node[part]
        if name in node:
            name += "_x"
        node[name] = draw(st.integers() | st.text(max_size=5))
        return raw
    else:
        numeric = [p for p in paths if isinstance(_get(raw, p), (int, float)) and not isinstance(_get(raw, p), bool)
                   and p[-1] not in ("gamma",) or p == ("schedule", "gamma")]
        if kind == "type":
            path = draw(st.sampled_from(numeric + [("model", "name"), ("run", "amp"), ("eval", "protocol")]))
            _set(raw, path, draw(st.sampled_from([[1, 2], {"a": 1}, "not-a-number-x"])))
            return raw
        path = draw(st.sampled_from([p for p in numeric if p not in (("data", "val_split"), ("run", "tracking_flush_s"))
                                     and p[-1] != "seed"] + [("seed",)]))
        _set(raw, path, draw(st.sampled_from([-1, -0.5, -1000])))
        return raw
    _drop(raw, path)
    return raw


def _get(tree, path):
    for part in path:
        tree = tree[part]
    return tree


def _set(tree, path, value):
    _get(tree, path[:-1])[path[-1]] = value


def _drop(tree, path):
    _get(tree, path[:-1]).pop(path[-1])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(broken_configs())
def test_mutated_configs_are_refused_in_one_line(tmp_path_factory, raw):
    """Fault: a config with a dropped key, an unknown key, a wrong type or an out-of-range number.
    Injected: 150 configs generated by hypothesis from the shipped ones, one mutation each.
    Suite: each is refused before anything runs: one line naming the key, exit status 2, no traceback.
    Lost: nothing; nothing starts."""
    path = tmp_path_factory.mktemp("cfg") / "mutated.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith("config error: ") and "\n" not in message and "Traceback" not in message


@pytest.mark.parametrize("damage", ["missing", "empty", "truncated", "not an archive"])
def test_bad_dataset_archive_is_refused_before_training(damage, cifar_tar, tmp_path, capsys):
    """Fault: the dataset archive is missing, empty, truncated or not an archive.
    Injected: data.path pointing at such a file.
    Suite: one line naming the file, exit status 2, before any MLflow run or checkpoint.
    Lost: nothing."""
    bad = tmp_path / "cifar.tar.gz"
    if damage == "empty":
        bad.write_bytes(b"")
    elif damage == "truncated":
        bad.write_bytes(cifar_tar.read_bytes()[: cifar_tar.stat().st_size // 2])
    elif damage == "not an archive":
        bad.write_bytes(gzip.compress(b"hello"))
    overrides = tiny_overrides(bad, 4, **{"run.dir": tmp_path / "run"})
    code = cli.main(["train", "--config", str(CIFAR), *overrides])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert str(bad) in err
    assert not Path("mlflow.db").exists() and not checkpoint.list_checkpoints(tmp_path / "run")


def test_undecodable_image_is_named(tmp_path, capsys):
    """Fault: one image in the dataset cannot be decoded.
    Injected: train/cat/0003.png overwritten with garbage in an image-folder tree.
    Suite: one line naming that file, exit status 2, before training.
    Lost: nothing."""
    tree = make_cifar_tree(tmp_path / "tree", train_per_class=4, test_per_class=1)
    (tree / "train" / "cat" / "0003.png").write_bytes(b"\x89PNG garbage")
    code = cli.main(["train", "--config", str(CIFAR), *tiny_overrides(tree, 4, **{"run.dir": tmp_path / "run"})])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "cannot decode image" in err and "train/cat/0003.png" in err and len(err.splitlines()) == 1, err


# --- 7. two jobs, one run directory -------------------------------------------------------
def test_second_job_on_the_same_run_directory_is_refused(cifar_tar, tmp_path):
    """Fault: the same job submitted twice (a double sbatch, a requeue racing the original).
    Injected: a second training started on the run directory of a running one.
    Suite: the second is refused in one line naming the holder (pid, host), exit status 2; the first goes on.
    Lost: nothing; the two never write the same checkpoints."""
    overrides = tiny_overrides(cifar_tar, 3000, **{"run.dir": tmp_path / "run", "eval.every": 5000,
                                                   "run.checkpoint_every": 5000})
    first = subprocess.Popen([sys.executable, TRAIN, "--config", str(CIFAR), *overrides], env=_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: (tmp_path / "run" / ".lock").exists() and (tmp_path / "run" / ".lock").read_text(), 120, "the lock")
        second = subprocess.run([sys.executable, TRAIN, "--config", str(CIFAR), *overrides], env=_env(),
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2
        assert second.stderr.strip() == (f"error: run directory {tmp_path / 'run'} is in use by pid {first.pid} on "
                                         f"{os.uname().nodename}; wait for it, stop it, or set run.dir (or seed) to start "
                                         "a separate run")
        assert first.poll() is None
    finally:
        first.kill()
        first.wait()


# --- 8. secrets ---------------------------------------------------------------------------
def test_secrets_in_the_environment_never_reach_mlflow(cifar_tar, tmp_path, monkeypatch):
    """Fault: credentials in the environment of the job (tokens, keys, passwords).
    Injected: MY_API_TOKEN, AWS_SECRET_ACCESS_KEY, DB_PASSWORD and HF_TOKEN set to marker values.
    Suite: no param, tag, metric name, artifact or run-directory file contains them (the suite logs the config, never the environment).
    Lost: nothing."""
    secrets = {"MY_API_TOKEN": "tok-8f3a1c", "AWS_SECRET_ACCESS_KEY": "aws-5e7d2b", "DB_PASSWORD": "pw-91c4e0",
               "HF_TOKEN": "hf-0b6f3d"}
    for key, value in secrets.items():
        monkeypatch.setenv(key, value)
    overrides = tiny_overrides(cifar_tar, 4, **{"run.dir": tmp_path / "run"})
    assert train.main(["--config", str(CIFAR), *overrides]) == 0
    (run,) = mlflow.search_runs(experiment_names=["cifar10"], output_format="list")
    texts = [json.dumps(run.data.params), json.dumps(run.data.tags), json.dumps(list(run.data.metrics))]
    artifacts = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, dst_path=str(tmp_path / "artifacts")))
    texts += [p.read_bytes().decode(errors="replace") for p in artifacts.rglob("*") if p.is_file()]
    texts += [p.read_bytes().decode(errors="replace") for p in (tmp_path / "run").rglob("*") if p.is_file()]
    for value in secrets.values():
        assert not any(value in text for text in texts), value
