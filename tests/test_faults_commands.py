"""Issue 30: a new user's bad input to the suite's commands. Each is refused in one line
(`error: ...`, exit status 2) naming the input and the fix, writes nothing, creates no tracking
store, and answers within seconds; never a traceback, a hang, or a blame on the wrong argument."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlflow.tracking._tracking_service import utils as tracking_utils

from reproduce import cli, doctor
from reproduce.report.tables import PaperRefused, load_paper
from reproduce.tracking.sender import UNSENT, MetricSender, UnsentRefused, read_unsent
from tests.conftest import REPO, run_cli

PAPER_HEAD = "table,model,shortcut,protocol,metric,value,note,source\n"


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip() and " INFO " not in line]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and "For further information" not in err, err
    return lines[0]


@pytest.fixture(autouse=True)
def own_tracking_uri(monkeypatch):
    """`reproduce sync` sets MLflow's tracking URI in the process: undone after each test."""
    monkeypatch.setattr(tracking_utils, "_tracking_uri", None)


def _export(path: Path) -> Path:
    """A `reproduce report --export` file with one finished run: enough to reach the table."""
    run = {
        "run_id": "r" * 32,
        "status": "FINISHED",
        "start_time": "2026-12-01 00:00:00 UTC",
        "end_time": "2026-12-01 01:00:00 UTC",
        "params": {"model.name": "resnet20", "schedule.iterations": "6", "seed": "0"},
        "tags": {"reproduce.recipe": "abc", "reproduce.seed": "0", "reproduce.study": "cifar10"},
        "metrics": {"test_top1_err": 50.0},
        "history": {},
    }
    doc = {"format": "reproduce-runs/1", "study": "cifar10", "experiment": "cifar10", "runs": [run]}
    path.write_text(json.dumps(doc))
    return path


# ---------------------------------------------------------------------------- report --paper
PAPERS = {
    "malformed": b'table,model\n"unterminated\n1,2,3\n',
    "missing": None,
    "a folder": "folder",
    "no value column": b"table,model,shortcut,protocol,metric\nTable 6,resnet20,A,single,top1_err\n",
    "value not a number": (PAPER_HEAD + "Table 6,resnet20,A,single,top1_err,lots,,\n").encode(),
    "not text": b"\xff\xfe\x00\x01" * 50,
    "empty": b"",
}


@pytest.mark.parametrize("kind", list(PAPERS))
def test_report_refuses_bad_reference_numbers_in_one_line(kind, tmp_path, capsys):
    """Fault: `reproduce report --paper` names a missing file, a folder, a malformed or non-numeric CSV, missing columns, non-UTF-8 or empty.
    Injected: each such file as --paper.
    Suite: one line naming the file and --paper, exit status 2, before anything is read or written.
    Lost: nothing: no export, table or figure is written."""
    paper = tmp_path / "paper.csv"
    if PAPERS[kind] == "folder":
        paper.mkdir()
    elif PAPERS[kind] is not None:
        paper.write_bytes(PAPERS[kind])
    out = tmp_path / "out"
    args = ["report", "--from-export", str(_export(tmp_path / "runs.json")), "--paper", str(paper)]
    assert cli.main([*args, "--out", str(out), "--export", str(tmp_path / "again.json")]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert str(paper) in line and "--paper" in line and "--out" not in line
    assert not out.exists() and not (tmp_path / "again.json").exists()  # nothing written


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.one_of(st.binary(max_size=200), st.text(alphabet=',"\n\r;ab1.x', max_size=200)))
def test_any_reference_file_is_read_or_refused(content, tmp_path):
    """Fault: arbitrary bytes as the paper's reference CSV.
    Injected: files drawn by hypothesis.
    Suite: read, or refused in one line with exit status 2; never a traceback.
    Lost: nothing."""
    path = tmp_path / "any.csv"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    try:
        paper = load_paper(path)
    except PaperRefused as err:
        assert "\n" not in str(err) and str(path) in str(err)
    else:
        assert {"table", "model", "shortcut", "protocol", "metric", "value"} <= set(paper.columns)


# ---------------------------------------------------------------------------- sync
def _store_with_a_run() -> str:
    mlflow.set_experiment("sync-test")
    with mlflow.start_run() as run:
        return run.info.run_id


DAMAGED = {
    "not JSON": b'{"run_id": "abc", "metr',
    "not text": b"\x80\x81\x82",
    "a list": b"[1, 2]",
    "no run_id": json.dumps({"tracking_uri": "x", "status": "FINISHED", "metrics": []}).encode(),
    "metrics not a list": json.dumps({"tracking_uri": "x", "run_id": "a", "status": "FINISHED", "metrics": 3}).encode(),
    "a bad metric": json.dumps(
        {"tracking_uri": "x", "run_id": "a", "status": "FINISHED", "metrics": [["lr", "high", 1, 2]]}
    ).encode(),
    "unknown status": json.dumps({"tracking_uri": "x", "run_id": "a", "status": "DONE", "metrics": []}).encode(),
}


@pytest.mark.parametrize("kind", list(DAMAGED))
def test_sync_refuses_a_damaged_unsent_file_in_one_line(kind, tmp_path, capsys):
    """Fault: a damaged unsent-metrics.json in a run directory.
    Injected: truncated, non-JSON or wrong-schema files.
    Suite: `reproduce sync` refuses in one line, exit status 2, and leaves the file as it was.
    Lost: nothing: the file is kept for a later sync."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / UNSENT).write_bytes(DAMAGED[kind])
    assert cli.main(["sync", str(tmp_path / "run")]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert str(tmp_path / "run" / UNSENT) in line and "damaged" in line
    assert (tmp_path / "run" / UNSENT).read_bytes() == DAMAGED[kind]  # kept as it was
    assert not (tmp_path / "mlflow.db").exists()  # no store made


def test_sync_refuses_metrics_of_a_run_the_store_lacks(tmp_path, capsys):
    """Fault: unsent metrics of an MLflow run the tracking store does not hold.
    Injected: a store without that run.
    Suite: one line naming the run and the store, exit status 2.
    Lost: nothing: the file is kept."""
    _store_with_a_run()  # a store, without the file's run
    (tmp_path / "run").mkdir()
    record = {"tracking_uri": "http://elsewhere:5000", "run_id": "f" * 32, "status": "FINISHED"}
    (tmp_path / "run" / UNSENT).write_text(json.dumps({**record, "metrics": [["lr", 0.1, 1, 1]]}))
    assert cli.main(["sync", str(tmp_path / "run")]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "does not hold MLflow run " + "f" * 32 in line and "MLFLOW_TRACKING_URI" in line
    assert (tmp_path / "run" / UNSENT).exists()


def test_sync_to_a_store_that_does_not_exist_creates_none(tmp_path, capsys, monkeypatch):
    """Fault: `reproduce sync` with no tracking store where it looks.
    Injected: MLFLOW_TRACKING_URI unset in an empty folder.
    Suite: one line saying there is no store, exit status 2.
    Lost: nothing; no empty store is created."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    (tmp_path / "run").mkdir()
    gone = tmp_path / "gone" / "mlflow.db"
    record = {"tracking_uri": f"sqlite:///{gone}", "run_id": "f" * 32, "status": "FINISHED", "metrics": []}
    (tmp_path / "run" / UNSENT).write_text(json.dumps(record))
    assert cli.main(["sync", str(tmp_path / "run")]) == 2
    assert "no tracking store" in _one_error_line(capsys.readouterr().err)
    assert not gone.parent.exists()


def test_a_job_killed_while_making_the_store_leaves_none_half_made(tmp_path):
    """Fault: a job killed in its first seconds, while MLflow makes a new local store's tables
    (CI found a store left half-made this way: every later open failed on `table ... already exists`).
    Injected: SIGKILL to a process in `prepare_store` once its tables are being made.
    Suite: no store at the path until it is whole; the next job makes it and clears what was left.
    Lost: nothing."""
    db = tmp_path / "store" / "mlflow.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{db}"}
    code = "from reproduce.tracking import prepare_store; prepare_store()"
    job = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=REPO)
    deadline = time.monotonic() + 120
    while not list(db.parent.glob(".mlflow.db.making-*")):
        assert job.poll() is None and time.monotonic() < deadline, "the store was not made beside its path"
        time.sleep(0.005)
    job.kill()
    job.wait()
    assert not db.exists()  # killed before the tables were whole: no store, rather than a broken one
    subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, check=True, timeout=120)
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    assert [e.name for e in client.search_experiments()] == ["Default"]
    assert not list(db.parent.glob(".mlflow.db.making-*"))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    doc=st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
        lambda inner: (
            st.lists(inner, max_size=4)
            | st.dictionaries(st.sampled_from(["tracking_uri", "run_id", "status", "metrics", "x"]), inner, max_size=5)
        ),
        max_leaves=12,
    )
)
def test_any_unsent_file_is_read_or_refused(doc, tmp_path):
    """Fault: arbitrary JSON as unsent-metrics.json.
    Injected: documents drawn by hypothesis.
    Suite: read, or refused in one line; never a traceback.
    Lost: nothing."""
    path = tmp_path / UNSENT
    path.write_text(json.dumps(doc))
    try:
        record = read_unsent(path)
    except UnsentRefused as err:
        assert "\n" not in str(err) and str(path) in str(err)
    else:
        assert all(len(row) == 4 for row in record["metrics"])


def test_a_job_ending_beside_a_damaged_unsent_file_keeps_both(tmp_path):
    """Fault: a job ends with unsent metrics beside a damaged earlier unsent-metrics.json.
    Injected: a damaged file in the run directory.
    Suite: the damaged file is moved aside with a timestamp and this job's metrics are written.
    Lost: nothing: both are kept."""
    from mlflow.entities import Metric

    sender = MetricSender.__new__(MetricSender)  # no thread: only write_unsent is exercised
    sender.run_id, sender.run_dir = "a" * 32, tmp_path
    sender._queue, sender._pending = __import__("queue").Queue(), [Metric("lr", 0.1, 1, 5)]
    (tmp_path / UNSENT).write_text("{damaged")
    sender.write_unsent("KILLED")
    assert read_unsent(tmp_path / UNSENT)["metrics"] == [["lr", 0.1, 1, 5]]
    (aside,) = tmp_path.glob(UNSENT + ".damaged-*")
    assert aside.read_text() == "{damaged"


# ---------------------------------------------------------------------------- readers create no store
READERS = {
    "runs": ["runs"],
    "runs --csv": ["runs", "--csv", "--experiment", "cifar10"],
    "report": ["report", "--study", "cifar10", "--no-mlflow"],
    "analyze": ["analyze", "responses", "--run", "0" * 32],
}


@pytest.mark.parametrize("uri", ["unset", "missing sqlite file", "missing file store"])
@pytest.mark.parametrize("command", list(READERS))
def test_a_reader_says_there_is_no_store_and_creates_none(command, uri, tmp_path, monkeypatch, capsys):
    """Fault: a reader (runs, report, analyze) pointed at no tracking store.
    Injected: MLFLOW_TRACKING_URI unset, or naming a sqlite or file store that does not exist.
    Suite: one line saying there is no store, exit status 2.
    Lost: nothing; no store is created."""
    before = set(tmp_path.iterdir())
    if uri == "unset":
        monkeypatch.delenv("MLFLOW_TRACKING_URI")  # MLflow's default: ./mlflow.db
    elif uri == "missing sqlite file":
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'elsewhere' / 'mlflow.db'}")
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file://{tmp_path / 'mlruns'}")
    assert cli.main(READERS[command]) == 2
    assert "no tracking store" in _one_error_line(capsys.readouterr().err)
    assert set(tmp_path.iterdir()) == before  # no mlflow.db, mlruns/ or results/


def test_doctor_proves_a_new_store_without_creating_it(tmp_path, monkeypatch):
    """Fault: `reproduce doctor` in a folder without a tracking store.
    Injected: MLFLOW_TRACKING_URI unset.
    Suite: the doctor proves a store could be made in a temporary folder and says so.
    Lost: nothing; the real store is not created."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    before = set(tmp_path.iterdir())
    check = doctor.check_tracking()
    assert check.status == "ok" and "does not exist yet" in check.detail and "will create it" in check.detail
    assert set(tmp_path.iterdir()) == before


# ---------------------------------------------------------------------------- bounded waits
def test_runs_against_a_closed_port_answers_within_seconds(tmp_path):
    """Fault: a tracking server that does not answer.
    Injected: MLFLOW_TRACKING_URI naming a closed local port.
    Suite: `reproduce runs` answers in one line within seconds, exit status 2.
    Lost: nothing."""
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    for args in (["runs"], ["report", "--study", "cifar10"]):
        proc = run_cli(*args, env={"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"}, timeout=90, cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        assert "unreachable" in _one_error_line(proc.stderr)
    assert time.monotonic() - start < 90
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("where", ["inside the folder", "given itself"])
def test_doctor_data_never_opens_a_named_pipe(where, tmp_path):
    """Fault: a named pipe where the doctor checks data.
    Injected: a FIFO inside --data, or given as --data.
    Suite: never opened: skipped inside a folder, reported as a failure when given.
    Lost: nothing; no hang."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.bin").write_bytes(b"x" * 1000)
    os.mkfifo(data / "pipe")
    target = data if where == "inside the folder" else data / "pipe"
    code = f"from pathlib import Path; from reproduce import doctor; print(doctor.check_data(Path({str(target)!r})))"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,  # opening the pipe for reading waits for a writer that never comes
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, proc.stderr
    if where == "inside the folder":
        assert "status='ok'" in proc.stdout and "(1 file," in proc.stdout
    else:
        assert "status='FAIL'" in proc.stdout and "not a regular file" in proc.stdout


# ---------------------------------------------------------------------------- argparse in one line
BAD_ARGS = {
    "runs": ["runs", "--bogus"],
    "report": ["report", "--study", "mnist"],
    "analyze": ["analyze", "responses", "--run", "x", "--split", "train"],
    "bench-loaders": ["bench-loaders", "--crop", "square"],
    "prepare": ["prepare", "mnist", "--out", "x"],
    "prepare missing --out": ["prepare", "cifar10"],
    "doctor": ["doctor", "--bogus"],
}


@pytest.mark.parametrize("command", list(BAD_ARGS))
def test_bad_arguments_are_one_line(command, capsys):
    """Fault: a bad command-line argument (an invalid choice, a missing value).
    Injected: such arguments to each command.
    Suite: one line naming the argument, exit status 2.
    Lost: nothing."""
    with pytest.raises(SystemExit) as stop:
        cli.main(BAD_ARGS[command])
    assert stop.value.code == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: reproduce {command.split()[0]}") and "--help" in line


# ---------------------------------------------------------------------------- bench-loaders --source
def _jpegs(root: Path, classes=("n01", "n02"), per_class: int = 2, side: int = 32) -> Path:
    from PIL import Image

    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (side, side), (i * 40, 0, 0)).save(root / name / f"{i}.JPEG")
    return root


def test_bench_loaders_refuses_the_folder_above_the_classes(tmp_path, capsys):
    """Fault: `bench-loaders --source` given the folder above the class folders.
    Injected: such a folder.
    Suite: one line naming the folder to give instead, exit status 2.
    Lost: nothing."""
    _jpegs(tmp_path / "imagenette" / "val")
    args = ["bench-loaders", "--default-malloc", "--source", str(tmp_path / "imagenette")]
    assert cli.main(args) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"--source {tmp_path / 'imagenette' / 'val'}" in line  # the fix: the folder that holds the classes


@pytest.mark.parametrize("kind", ["no class folders", "not an archive", "two splits in the archive"])
def test_bench_loaders_refuses_other_sources_in_one_line(kind, tmp_path, capsys):
    """Fault: a --source that is not an archive, or an archive of several top folders.
    Injected: such files.
    Suite: one line, exit status 2.
    Lost: nothing."""
    import tarfile

    source = tmp_path / "source"
    if kind == "no class folders":
        source.mkdir()
        (source / "a.JPEG").write_bytes(b"x")
    elif kind == "not an archive":
        source.write_text("not a tar file\n")
    else:
        _jpegs(tmp_path / "a" / "train")
        _jpegs(tmp_path / "a" / "val")
        source = tmp_path / "two.tar.gz"
        with tarfile.open(source, "w:gz") as tf:
            tf.add(tmp_path / "a" / "train", "train")
            tf.add(tmp_path / "a" / "val", "val")
    assert cli.main(["bench-loaders", "--default-malloc", "--source", str(source)]) == 2
    assert f"--source {source}" in _one_error_line(capsys.readouterr().err)


# ---------------------------------------------------------------------------- prepare
@pytest.mark.parametrize(
    "args",
    [
        ["cifar10", "--source", "/nonexistent/cifar"],
        ["cifar10", "--source", "{tmp}/empty"],
        ["cifar10", "--source", "{tmp}/notes.txt"],
        ["imagenet", "--source", "/nonexistent/imagenet"],
    ],
)
def test_prepare_looks_at_its_arguments_before_asking_for_ffcv(args, tmp_path, monkeypatch, capsys):
    """Fault: `reproduce prepare` with a wrong --source where FFCV is absent.
    Injected: a missing or unknown source, FFCV made unavailable.
    Suite: the source is named as the problem (not FFCV), one line, exit status 2.
    Lost: nothing is written."""
    from reproduce.data.base import DataError
    from reproduce.data.ffcv import prepare

    def no_ffcv(needed_by="data.loader=ffcv"):
        raise DataError(f"{needed_by} needs FFCV (No module named 'ffcv')")

    monkeypatch.setattr(prepare, "ffcv_library", no_ffcv)
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    args = [a.format(tmp=tmp_path) for a in args]
    assert cli.main(["prepare", *args, "--out", str(tmp_path / "out")]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "FFCV" not in line and args[2] in line


@pytest.fixture(scope="session")
def imagenet_noise(tmp_path_factory) -> Path:
    """ImageNet-style train/ and val/ of noise JPEGs: slow enough to decode that a stop lands mid-file."""
    import numpy as np
    from PIL import Image

    root, rng = tmp_path_factory.mktemp("imagenet-noise"), np.random.default_rng(0)
    for split, n in (("train", 120), ("val", 4)):
        for name in ("n01", "n02"):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 255, (400, 400, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.JPEG", quality=90)
    return root


def _start_prepare(source: Path, out: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "reproduce.cli", "prepare", "imagenet", "--source", str(source), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [*cmd, "--workers", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def _wait_for_temporary_file(proc: subprocess.Popen, out: Path) -> None:
    deadline = time.monotonic() + 120
    while not list(out.glob(".*.tmp")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert list(out.glob(".*.tmp")), "the temporary file never appeared"


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.0, 0.5])
def test_a_stopped_prepare_leaves_no_temporary_file(delay, imagenet_noise, tmp_path):
    """Fault: SIGTERM while `reproduce prepare imagenet --workers 2` writes train.beton.
    Injected: SIGTERM to the process `delay` s after its temporary .beton appears.
    Suite: exit status 143 with one line; its writer and decoding processes are killed and the
    temporary file removed.
    Lost: the preparation so far (run the command again)."""
    import psutil

    pytest.importorskip("ffcv")
    out = tmp_path / "out"
    proc = _start_prepare(imagenet_noise, out)
    try:
        _wait_for_temporary_file(proc, out)
        time.sleep(delay)
        children = psutil.Process(proc.pid).children(recursive=True)
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    assert not list(out.iterdir()), list(out.iterdir())
    assert err.strip().splitlines()[-1].startswith("stopped by SIGTERM") and "Traceback" not in err
    gone = psutil.wait_procs(children, timeout=5)[1]
    assert not [c for c in gone if c.status() != psutil.STATUS_ZOMBIE]


@pytest.mark.slow
def test_a_killed_prepares_temporary_file_is_removed_by_the_next(imagenet_noise, tmp_path):
    """Fault: `reproduce prepare` killed outright (SIGKILL, a lost machine) while writing.
    Injected: SIGKILL to the process once its temporary .beton appears.
    Suite: the temporary file stays (nothing can run on SIGKILL); the next prepare into the same
    folder removes it, says so, and writes complete files.
    Lost: the preparation so far."""
    pytest.importorskip("ffcv")
    out = tmp_path / "out"
    proc = _start_prepare(imagenet_noise, out)
    try:
        _wait_for_temporary_file(proc, out)
        left = list(out.glob(".*.tmp"))
    finally:
        proc.kill()
        proc.communicate(timeout=60)
    rerun = _start_prepare(imagenet_noise, out)
    _, err = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, err
    assert f"removed {left[0]}" in err
    assert not list(out.glob(".*.tmp")) and (out / "train.beton").exists()


# ---------------------------------------------------------------------------- analyze responses --data
@pytest.mark.slow
def test_analyze_with_data_that_does_not_exist_is_one_line(cifar_tar, capsys):
    """Fault: `reproduce analyze responses --data` naming nothing.
    Injected: a path that does not exist.
    Suite: one config-error line, exit status 2, without pydantic's footer.
    Lost: nothing."""
    from reproduce import train
    from tests.conftest import tiny_overrides

    assert (
        train.main(["--config", str(REPO / "configs" / "cifar10" / "resnet20.yaml"), *tiny_overrides(cifar_tar)]) == 0
    )
    (run,) = mlflow.search_runs(experiment_names=["cifar10"], output_format="list")
    capsys.readouterr()
    assert cli.main(["analyze", "responses", "--run", run.info.run_id, "--data", "/nonexistent"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "/nonexistent" in line and "data.path" in line


# ---------------------------------------------------------------------------- reproduce.torchrun
def test_torchrun_passes_on_a_refusal_as_exit_status_2(tmp_path):
    """Fault: a config key that does not exist, given to a 2-process job started by `python -m reproduce.torchrun`.
    Injected: `optim.lrr=0.1` on the command line of both ranks.
    Suite: each rank refuses in one line (exit 2); reproduce.torchrun exits 2 with one line naming the ranks,
    instead of torchrun's exit status 1 and its multi-line error report.
    Lost: nothing: nothing ran."""
    train_py = str(REPO / "reproduce" / "train.py")
    config = str(REPO / "configs" / "cifar10" / "resnet20.yaml")
    cmd = [sys.executable, "-m", "reproduce.torchrun", "--standalone", "--nproc_per_node", "2", train_py]
    proc = subprocess.run(
        [*cmd, "--config", config, "optim.lrr=0.1", f"run.dir={tmp_path / 'run'}"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}"},
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[-1] == "reproduce.torchrun: rank 0, 1 refused its input (exit status 2; the error line is above)"
    assert any("optim.lrr" in line for line in lines) and "ChildFailedError" not in proc.stderr
