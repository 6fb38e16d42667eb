"""Bad input: mutated configs, damaged dataset archives and images.

Every test here injects one fault for real; its docstring's Fault / Injected / Suite / Lost lines
go into results/reliability.md (tools/reliability.py)."""

from __future__ import annotations

import gzip
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import typing
from pathlib import Path

import mlflow
import numpy as np
import psutil
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydantic import BaseModel

from reproduce import checkpoint, cli
from reproduce.config import Config
from reproduce.models import build_model
from tests.conftest import REPO, make_cifar_tree, tiny_overrides
from tests.faults import CIFAR, _env, _wait_for

# --- 6. bad input -------------------------------------------------------------------------
# Bad values are drawn for every field of the schema (read from the pydantic models, so a new
# field is covered the day it is added), for the relations between fields, and for the YAML
# itself. Each bad config must be refused by `check` and by `train` with exit status 2, one
# line naming the key or file, no traceback, and nothing created (no run directory, no MLflow).


def _fields(model=Config, prefix=()):
    """(dotted path, pydantic FieldInfo) for every leaf of the schema."""
    for name, field in model.model_fields.items():
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            yield from _fields(sub, prefix + (name,))
        else:
            yield prefix + (name,), field


def _bounds(field) -> dict:
    out = {}
    for item in field.metadata:
        for attr in ("gt", "ge", "lt", "le", "min_length"):
            if getattr(item, attr, None) is not None:
                out[attr] = getattr(item, attr)
    return out


FIELDS = dict(_fields())
NOT_A_NUMBER = st.sampled_from([True, False, "ten", [1, 2], {"a": 1}, float("inf"), float("-inf"), float("nan")])


def bad_values(path: tuple, field):
    """Values no valid config holds at `path`: wrong types, booleans for numbers, non-finite and
    out-of-range numbers, unknown choices."""
    annotation, bounds = field.annotation, _bounds(field)
    text = str(annotation)
    if annotation is bool or bool in typing.get_args(annotation):  # bool, or bool | "auto"
        return st.sampled_from([2, -1, "maybe", 0.5, [True], {"on": 1}])
    if annotation in (int, float) or text in (
        "int | None",
        "float | None",
        "typing.Optional[int]",
        "typing.Optional[float]",
    ):
        below = []
        if "gt" in bounds:
            below += [bounds["gt"], bounds["gt"] - 1]
        if "ge" in bounds:
            below += [bounds["ge"] - 1, bounds["ge"] - 0.5]
        if "lt" in bounds:
            below += [bounds["lt"], bounds["lt"] + 1]
        if "le" in bounds:
            below += [bounds["le"] + 1]
        if "int" in text:
            below += [1.5]
        return NOT_A_NUMBER | st.sampled_from(below or [[]])
    if path == ("data", "path"):
        return st.sampled_from(["/nonexistent/cifar", 5, [1]])
    if path == ("run", "dir"):
        return st.sampled_from([5, [1], str(REPO / "README.md")])  # a file, not a folder
    if path == ("run", "register_model"):  # a free name: empty, not a string, or with characters outside [A-Za-z0-9._-]
        return st.sampled_from(["", 7, [1], True, "my model/v1", "-x"])
    if path == ("experiment",):
        return st.sampled_from(["", 5, [1], {"a": 1}])
    if path == ("data", "scale"):
        return st.sampled_from([[480, 256], [True, 480], "256-480", [-1, 10], [0, 5], [256, 384, 480], [256.5, 480]])
    if path == ("schedule", "milestones"):
        return st.sampled_from([[3, 3], [True], [-1, 3], [4, 3], "3,4", [0], [2.5]])
    if path == ("eval", "target_top1_err"):  # errors in %: distinct, between 0 and 100
        return st.sampled_from([[20, 20], [0], [100], [-5, 10], [True], [float("nan")], "20", 7, {"a": 1}])
    # enums, literals and names: a close-but-wrong string, a number, a list
    return st.sampled_from(["no-such-choice", 7, [1], True])


CROSS_FIELD = [  # each valid on its own, impossible together
    {"schedule.milestones": [100, 10**9]},
    {"schedule.warmup_iterations": 5, "schedule.warmup_lr": None},
    {"run.compile_mode": "reduce-overhead", "run.compile": False},
    {"model.shortcut": "B", "model.name": "plain20"},
    {"data.dataset": "imagenet", "model.name": "resnet20"},
    {"data.loader": "gpu", "data.dataset": "imagenet"},
    {"eval.protocol": "tencrop"},
    {"optim.batch_size": 100_000},  # larger than the training split: a data reason, refused all the same
    {"data.val_split": 10**6},
]


def _base(cifar_tar: Path) -> dict:
    raw = yaml.safe_load(CIFAR.read_text())
    raw["data"].update(path=str(cifar_tar), val_split=40, workers=0)
    raw["optim"]["batch_size"] = 16
    raw["schedule"].update(iterations=6, milestones=[3])
    raw["run"].update(device="cpu", progress=False)
    return raw


@st.composite
def broken_configs(draw, cifar_tar: Path):
    """(YAML text, what was broken) for a small valid CIFAR config with one thing made invalid."""
    raw = _base(cifar_tar)
    kind = draw(st.sampled_from(["field", "field", "field", "cross", "unknown", "drop", "yaml"]))
    if kind == "field":
        path = draw(st.sampled_from(sorted(FIELDS)))
        _set(raw, path, draw(bad_values(path, FIELDS[path])))
        return yaml.safe_dump(raw), ".".join(path)
    if kind == "cross":
        change = draw(st.sampled_from(CROSS_FIELD))
        for key, value in change.items():
            _set(raw, tuple(key.split(".")), value)
        return yaml.safe_dump(raw), " ".join(change)
    if kind == "unknown":
        parent = draw(st.sampled_from([(), ("model",), ("data",), ("optim",), ("schedule",), ("eval",), ("run",)]))
        name = draw(st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12))
        node = _get(raw, parent)
        node[name + ("_x" if name in node else "")] = draw(st.integers() | st.text(max_size=5))
        return yaml.safe_dump(raw), "unknown key"
    if kind == "drop":
        required = [p for p, f in FIELDS.items() if f.is_required()] + [
            (s,) for s in Config.model_fields if s != "seed"
        ]
        path = draw(st.sampled_from(sorted(required)))
        _get(raw, path[:-1]).pop(path[-1])
        return yaml.safe_dump(raw), ".".join(path)
    text = yaml.safe_dump(raw)
    damage = draw(st.sampled_from(["duplicate", "binary", "list", "scalar", "tab", "unclosed", "empty"]))
    return {
        "duplicate": text + "experiment: again\n",
        "binary": b"\x89\xff\xfe\x00garbage".decode("latin-1") + text,
        "list": "- " + text.replace("\n", "\n  "),
        "scalar": "42\n",
        "tab": text.replace("  ", "\t", 1),
        "unclosed": text + "extra: [1, 2\n",
        "empty": "",
    }[damage], f"yaml {damage}"


def _named(what: str, path: Path) -> list[str]:
    """What the one line must name: the file for a YAML fault, else the key (its last part is
    enough where a section-level check words it in prose)."""
    if what.startswith("yaml"):
        return [str(path)]
    if what == "unknown key":
        return ["unknown key"]
    return [key.split(".")[-1] for key in what.split()]


def _get(tree, path):
    for part in path:
        tree = tree[part]
    return tree


def _set(tree, path, value):
    node = tree
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = value


def test_mutated_configs_are_refused_in_one_line(cifar_tar, tmp_path_factory, capsys):
    """Fault: a bad config: a wrong type, a boolean for a number, a non-finite or out-of-range value, an unknown choice, an impossible combination, a batch larger than the data, an unknown or missing key, a key given twice, a file that is binary, not a mapping, or not YAML.
    Injected: 300 configs drawn by hypothesis from the schema's own fields and bounds, one fault each.
    Suite: `reproduce check` and `reproduce train` both refuse each: exit status 2, one line naming the key or file, no traceback, no run directory and no MLflow store created.
    Lost: nothing; nothing starts."""

    @settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(broken_configs(cifar_tar))
    def refused(case):
        text, what = case
        folder = tmp_path_factory.mktemp("cfg")
        path = folder / "mutated.yaml"
        path.write_bytes(text.encode("latin-1") if what == "yaml binary" else text.encode())
        capsys.readouterr()
        assert cli.main(["check", str(path)]) == 2, (what, text)
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err and err.startswith("error "), (what, err)
        assert any(name in err for name in _named(what, path)), (what, err)
        os.chdir(folder)  # train must create nothing here: no runs/, no mlflow.db, no mlruns/
        code = cli.main(["train", "--config", str(path)])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, (what, err)
        assert sorted(p.name for p in folder.iterdir()) == ["mutated.yaml"], (what, list(folder.iterdir()))

    refused()


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
    assert code == 2 and "cannot decode image" in err and "train/cat/0003.png" in err and len(err.splitlines()) == 1, (
        err
    )


def test_prepare_refuses_an_out_that_is_a_file_and_a_negative_split(cifar_tree, tmp_path, capsys):
    """Fault: `reproduce prepare` given a file as --out, or a negative --val-split.
    Injected: --out naming an existing file; --val-split -100.
    Suite: one line each, exit status 2, before any .beton is written (before, a FileExistsError traceback, and a
    manifest recording val_split -100 with no validation file).
    Lost: nothing: the file given as --out is untouched."""
    from reproduce.data.ffcv import prepare

    taken = tmp_path / "notes.txt"
    taken.write_text("mine")
    assert prepare.main(["cifar10", "--source", str(cifar_tree), "--out", str(taken)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: --out {taken} is a file; give a folder for the .beton files (it is created if missing)"
    assert taken.read_text() == "mine"
    pytest.importorskip("ffcv", reason="the split is checked after FFCV is found")
    assert (
        prepare.main(["cifar10", "--source", str(cifar_tree), "--out", str(tmp_path / "out"), "--val-split", "-100"])
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert "validation split of -100 images" in err and "\n" not in err, err
    assert not list((tmp_path / "out").glob("*.beton"))


# --- a worker's error during the job (issue 30) -------------------------------------------
# One damaged image in a folder only shows when a DataLoader worker decodes it, mid-job. The job
# must end at once: one line, exit status 2, the MLflow run FAILED, no worker left behind (a
# worker ignores stop signals, so one left alive hung the exit until SIGKILL), and a stop signal
# must still end it.

FOLDER_CONFIG = REPO / "configs" / "transfer" / "imagenette32-resnet56.yaml"
AFTER_ERROR_S = 30  # the most a job may take to exit once it has printed its error (measured: 1-7 s on 2 busy cores)


def _broken_folder(root: Path, where: str) -> Path:
    """Issue 30's folder: 13 images, 3 classes of 3 train and 1 val images, and one truncated
    JPEG more in `where` (train/ or val/). Returns the truncated file."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 3), ("val", 1)):
        for c in range(3):
            (root / split / f"k{c}").mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = np.clip(np.array([80 * c, 200 - 60 * c, 120]) + rng.normal(0, 30, (40, 48, 3)), 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(root / split / f"k{c}" / f"{i}.jpg")
    bad = root / where / "k0" / "9.jpg"
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(bad)
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    return bad


def _train_args(tree: Path, workers: int, run_dir: Path) -> list[str]:
    """A 4-iteration fine-tuning run whose global batch is the whole training split (10 images):
    the first batch holds the damaged image, so the error comes before any iteration ends."""
    values = {
        "model.name": "resnet20",
        "data.path": tree,
        "data.workers": workers,
        "optim.batch_size": 10,
        "schedule.iterations": 4,
        "schedule.milestones": "[2]",
        "eval.every": 2,
        "eval.batch_size": 2,
        "run.checkpoint_every": 2,
        "run.log_every": 1,
        "run.progress": "false",
        "run.device": "cpu",
        "run.dir": run_dir,
        "run.log_model": "false",
    }
    return ["train", "--config", str(FOLDER_CONFIG), *(f"{k}={v}" for k, v in values.items())]


def _evaluate_args(tree: Path, workers: int, weights: Path) -> list[str]:
    torch.save(build_model("resnet20", num_classes=3).state_dict(), weights)
    return [
        "evaluate",
        "--weights",
        str(weights),
        "--model",
        "resnet20",
        "--data",
        str(tree),
        "data.dataset=folder",
        "data.crop=32",
        f"data.workers={workers}",
        "eval.batch_size=2",
        "run.device=cpu",
    ]


def _run_job(args: list[str], on_line=None, timeout: float = 240) -> tuple[int | None, list[str], float | None]:
    """`python -m reproduce.cli ARGS` as the leader of its own process group (as a batch job step
    is), its stderr read as it comes; `on_line(proc, line, seconds since the error line or None)`
    is called for each line and every 0.2 s (line None) while it runs. Returns the
    exit status (None: still running AFTER_ERROR_S after its error line, or at `timeout`; then
    the group is SIGKILLed), the stderr lines, and the seconds from the error line to the exit.
    Asserts that no process of the group (a loader worker) outlives the job."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "reproduce.cli", *args],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line.rstrip("\n")) for line in proc.stderr], daemon=True).start()
    seen, error_at, end = [], None, time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < min(end, (error_at or end) + AFTER_ERROR_S):
            try:
                line = lines.get(timeout=0.2)
                seen.append(line)
            except queue.Empty:
                line = None
            if line is not None and line.startswith("error:") and error_at is None:
                error_at = time.monotonic()
            if on_line is not None:
                on_line(proc, line, None if error_at is None else time.monotonic() - error_at)
        status = proc.poll()
        exited = time.monotonic()
        if status is not None:  # its workers ignore SIGTERM: one left behind would run on by itself
            _wait_for(lambda: not _group_alive(proc.pid), 10, "the job's worker processes to end")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    time.sleep(0.5)  # the reader thread's last lines
    while not lines.empty():
        seen.append(lines.get())
    return status, seen, (exited - error_at if error_at is not None and status is not None else None)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _assert_one_line_exit_2(status, lines: list[str], after: float | None, bad: Path) -> None:
    text = "\n".join(lines)
    assert status is not None, f"still running {AFTER_ERROR_S} s after its error (or never failed):\n{text[-3000:]}"
    errors = [line for line in lines if line.startswith("error:")]
    assert status == 2 and len(errors) == 1, (status, text[-3000:])
    assert errors[0].startswith(f"error: cannot decode image {bad}: ") and "truncated" in errors[0], errors[0]
    assert "Traceback" not in text and "DataLoader worker" not in text, text[-3000:]
    assert after is not None and after < AFTER_ERROR_S, after


def _runs(experiment: str | None = None) -> list:
    if experiment is None:
        return mlflow.search_runs(search_all_experiments=True, output_format="list")
    return mlflow.search_runs(experiment_names=[experiment], output_format="list")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_damaged_image_during_training_ends_the_job(workers, tmp_path):
    """Fault: an image that only a DataLoader worker finds damaged, mid-job (issue 30).
    Injected: one truncated JPEG among 13 in a data.dataset=folder tree; `reproduce train` with data.workers 0 and 2, its first batch holding that image.
    Suite: the job ends at once: exit status 2, one line naming the file (no worker traceback), the MLflow run FAILED, no worker left (before: with workers it printed the error and hung, SIGTERM ignored, until SIGKILL).
    Lost: nothing: the run never trained."""
    bad = _broken_folder(tmp_path / "tree", "train")
    status, lines, after = _run_job(_train_args(tmp_path / "tree", workers, tmp_path / "run"))
    _assert_one_line_exit_2(status, lines, after, bad)
    (run,) = _runs("transfer")
    assert run.info.status == "FAILED"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_damaged_image_during_evaluation_ends_the_job(workers, tmp_path):
    """Fault: an image of the test split that only a DataLoader worker finds damaged (issue 30).
    Injected: one truncated JPEG in val/ of a 13-image data.dataset=folder tree; `reproduce evaluate` with data.workers 0 and 2.
    Suite: the job ends at once: exit status 2, one line naming the file (no worker traceback), no MLflow run recorded as anything but FAILED (an evaluation logs its run only once it has a result).
    Lost: nothing."""
    bad = _broken_folder(tmp_path / "tree", "val")
    status, lines, after = _run_job(_evaluate_args(tmp_path / "tree", workers, tmp_path / "w.th"))
    _assert_one_line_exit_2(status, lines, after, bad)
    assert all(run.info.status == "FAILED" for run in _runs()), [run.info.status for run in _runs()]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigterm_while_a_worker_fails_ends_the_job(tmp_path):
    """Fault: a stop signal while a DataLoader worker fails on a damaged image (issue 30).
    Injected: `reproduce train`, data.workers=2, the first batch holding a truncated JPEG; SIGTERM to the whole process group (as scancel sends it) as training starts, while the workers start and fail, and again if the job still runs 10 s after printing its error.
    Suite: the job ends within 30 s of its error: exit status 2 (the error came before any iteration ended, so there was no checkpoint to stop at), one line, the MLflow run FAILED, no worker left (before: the job hung after its error and was still running 10 minutes after a SIGTERM).
    Lost: nothing: the run never trained."""
    bad = _broken_folder(tmp_path / "tree", "train")
    sent = []

    def stop(proc, line, since_error):
        if line is not None and "global batch" in line:  # logged just before the loop starts the workers
            os.killpg(proc.pid, signal.SIGTERM)
            sent.append("as training starts")
        elif since_error is not None and since_error > 10 and len(sent) == 1:  # exiting takes 1-7 s on 2 busy cores
            os.killpg(proc.pid, signal.SIGTERM)
            sent.append("after the error")

    status, lines, after = _run_job(_train_args(tmp_path / "tree", 2, tmp_path / "run"), on_line=stop)
    assert sent[:1] == ["as training starts"], (sent, lines[-20:])
    _assert_one_line_exit_2(status, lines, after, bad)
    (run,) = _runs("transfer")
    assert run.info.status == "FAILED"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_damaged_image_under_torchrun_ends_the_job(tmp_path):
    """Fault: an image that only a DataLoader worker of one rank finds damaged, under torchrun (issue 30).
    Injected: `python -m reproduce.torchrun --nproc_per_node 2 reproduce/train.py`, data.workers=2, a truncated JPEG in the first global batch (in one rank's share).
    Suite: the job ends at once: that rank exits 2 with one line naming the file, the other fails on the lost peer (exit 1), torchrun reports the failure, the MLflow run is FAILED, no rank or worker is left (before: both ranks hung after the error, and outlived torchrun).
    Lost: nothing: the run never trained."""
    bad = _broken_folder(tmp_path / "tree", "train")
    args = _train_args(tmp_path / "tree", 2, tmp_path / "run")[1:]  # without "train"
    train_py = str(REPO / "reproduce" / "train.py")
    proc = subprocess.Popen(
        [sys.executable, "-m", "reproduce.torchrun", "--standalone", "--nproc_per_node", "2", train_py, *args],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    err: list[str] = []
    threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True).start()
    seen: dict[int, psutil.Process] = {}  # the ranks and their workers: torchrun starts each rank in its own session
    try:
        end = time.monotonic() + 180
        while proc.poll() is None and time.monotonic() < end:
            try:
                seen.update((p.pid, p) for p in psutil.Process(proc.pid).children(recursive=True))
            except psutil.NoSuchProcess:
                pass
            time.sleep(0.2)
        status = proc.poll()
        if status is not None:
            _wait_for(lambda: not any(map(_alive, seen.values())), 10, "the ranks and their workers to end")
    finally:
        for p in [proc, *seen.values()]:
            try:
                p.kill()
            except (psutil.NoSuchProcess, ProcessLookupError):
                pass
        proc.wait(timeout=30)
    time.sleep(0.5)  # the reader thread's last lines
    text = "".join(err)
    assert status is not None, f"torchrun still running after 180 s:\n{text[-3000:]}"
    errors = [line for line in text.splitlines() if line.startswith("error: cannot decode image")]
    assert len(errors) == 1 and errors[0].startswith(f"error: cannot decode image {bad}: "), text[-3000:]
    assert "DataLoader worker" not in text and "exitcode  : 2" in text, text[-3000:]
    assert status == 1  # one rank refused (2), the other failed on the lost peer (1): torchrun's own status
    (run,) = _runs("transfer")
    assert run.info.status == "FAILED"
