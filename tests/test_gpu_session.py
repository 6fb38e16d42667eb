"""tools/gpu_session.py on this CPU: the real script with a tiny budget stops cleanly and a rerun
of the same command finishes into the same folder, ready for `reproduce report`; its pieces
(stopping a step at the budget, the switches the doctor allows, the plan's arithmetic) alone."""

from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import sys
import time

import mlflow
import pytest
import torch

from tests.conftest import REPO

SCRIPT = REPO / "tools" / "gpu_session.py"
TINY = [
    "data.val_split=40",
    "data.workers=0",
    "optim.batch_size=16",
    "schedule.iterations=30",
    "schedule.milestones=[15]",
    "eval.every=15",
    "eval.batch_size=64",
    "run.checkpoint_every=15",
    "run.log_every=5",
    "run.device=cpu",
]


def _module():
    spec = importlib.util.spec_from_file_location("gpu_session", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_session_stops_at_its_budget_and_the_same_command_finishes(cifar_tar, tmp_path):
    out = tmp_path / "session"
    command = [
        sys.executable,
        str(SCRIPT),
        "--out",
        str(out),
        "--data",
        str(cifar_tar),
        "--configs",
        "resnet20",
        "plain20",
        "--parallel",
        "2",
        *TINY,
    ]
    start = time.monotonic()
    first = subprocess.run(
        [*command, "--budget-min", "0.5"], capture_output=True, text=True, timeout=600, cwd=tmp_path, check=False
    )
    print(f"first attempt (budget 0.5 min): {time.monotonic() - start:.0f} s")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "== tests: skipped: no CUDA device" in first.stdout and "== bench: skipped: no CUDA device" in first.stdout
    state = json.loads((out / "session.json").read_text())
    assert state["steps"]["doctor"]["status"] == "done" and (out / "doctor.json").exists()
    assert state["steps"]["table6"]["status"] in ("not started", "stopped at the budget", "done")

    second = subprocess.run(
        [*command, "--budget-min", "5"], capture_output=True, text=True, timeout=600, cwd=tmp_path, check=False
    )
    assert second.returncode == 0, second.stdout + second.stderr
    assert "== doctor: done in an earlier attempt" in second.stdout and "session: complete" in second.stdout
    state = json.loads((out / "session.json").read_text())
    assert [state["steps"][s]["status"] for s in ("doctor", "tests", "bench", "table6", "report")] == [
        "done",
        "skipped",
        "skipped",
        "done",
        "done",
    ]
    commits = [a["commit"] for a in state["attempts"]]  # HEAD may move between attempts in a shared checkout
    assert len(commits) == 2 and all(
        subprocess.run(["git", "cat-file", "-e", c], cwd=REPO, check=False).returncode == 0 for c in commits
    )
    assert all(str(SCRIPT) in a["command"] and a["summary"] for a in state["attempts"])
    assert (
        state["machine"]["versions"]["torch"] == torch.__version__
        and state["machine"]["devices"][-1]["device"] == "cpu"
    )
    runs = {r["model"]: r for r in state["mlflow_runs"]}
    assert {m: r["status"] for m, r in runs.items()} == {"resnet20": "FINISHED", "plain20": "FINISHED"}
    stored = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    for r in runs.values():
        assert stored.get_run(r["run_id"]).data.tags["reproduce.git_commit"] in commits
    assert min(p.name for p in (out / "runs" / "cifar10").iterdir()).startswith("plain20-s0-")
    assert (out / "report" / "table.md").exists() and (out / "report" / "runs.json").exists()
    assert state["report_command"].startswith(
        f"MLFLOW_TRACKING_URI=sqlite:///{out / 'mlflow.db'} reproduce report --study cifar10"
    )


def test_a_step_past_its_time_gets_sigterm_and_a_captured_output_is_whole(tmp_path):
    session = _module()
    trap = (
        "import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: sys.exit(143)); "
        "print('started', flush=True); time.sleep(60)"
    )
    start = time.monotonic()
    # Limits of a few seconds: a signal that arrives before the child's interpreter has started kills it
    # without a trace (on a loaded 2-core machine Python's start-up alone has taken over a second).
    code, how = session.run_step([sys.executable, "-c", trap], tmp_path, {}, tmp_path / "a.log", None, limit_s=5.0)
    assert (code, how) == (128 + signal.SIGTERM, "stopped at the time limit") and time.monotonic() - start < 30
    assert "started" in (tmp_path / "a.log").read_text()
    # The session's own SIGINT handler (main) is reset to the default across exec, so its steps end on
    # SIGINT with KeyboardInterrupt; here pytest stands in for the session, and a pytest started in the
    # background by a shell without job control ignores SIGINT, as its children then would: the
    # handler is set as main sets it.
    previous = signal.signal(signal.SIGINT, lambda signum, frame: None)
    try:
        code, how = session.run_step(
            [sys.executable, "-c", "import time; time.sleep(60)"],
            tmp_path,
            {},
            tmp_path / "i.log",
            None,
            5.0,
            signal.SIGINT,
        )
    finally:
        signal.signal(signal.SIGINT, previous)
    assert how == "stopped at the time limit" and "KeyboardInterrupt" in (tmp_path / "i.log").read_text()  # tidy end
    code, how = session.run_step(
        [sys.executable, "-c", "print('{}')"], tmp_path, {}, tmp_path / "b.log", tmp_path / "b.json", 30.0
    )
    assert (code, how) == (0, "") and (tmp_path / "b.json").read_text() == "{}\n"
    code, how = session.run_step(
        [sys.executable, "-c", trap], tmp_path, {}, tmp_path / "c.log", tmp_path / "c.json", 1.0
    )
    assert how and not (tmp_path / "c.json").exists() and not list(tmp_path.glob(".c.json*"))  # no torn output left


def test_the_recipe_keeps_only_what_the_doctor_proved():
    session = _module()

    def doctor(**status):
        checks = {"bf16_step": "ok", "channels_last_step": "ok", "compile_step": "ok", **status}
        rows = [{"name": k, "status": v, "detail": f"{k} said {v}"} for k, v in checks.items()]
        return {"checks": rows + [{"name": "fast_bf16", "status": "info", "detail": status.get("fast", "yes: sm 9.0")}]}

    switches, notes = session.recipe(doctor())
    assert switches == [f"{k}={v}" for k, v in session.RECIPE.items()] and notes == []
    switches, notes = session.recipe(doctor(compile_step="unknown", fast="no: emulated"))
    assert "run.compile=false" in switches and not any(s.startswith("run.compile_mode") for s in switches)
    assert "run.amp=false" in switches and "data.loader=gpu" in switches and len(notes) == 2
    switches, _ = session.recipe(doctor(channels_last_step="FAIL"))
    assert "run.channels_last=false" in switches and "run.amp=true" in switches


def test_plan_counts_multiply_adds_of_the_configured_schedule():
    from reproduce.models import build_model, count_macs

    with torch.device("meta"):
        macs = count_macs(build_model("resnet56"), 32)
    table = _module().plan(["resnet56"], 790.0, [0.25], 4.0)
    cells = [c.strip() for c in table.splitlines()[2].strip("|").split("|")]
    flops = macs * 6 * 64000 * 128
    assert cells[:5] == [
        "resnet56",
        f"{macs / 1e6:.1f} M",
        "64000 x 128",
        f"{flops / 1e15:.2f}",
        f"{flops / 197.5e12:.0f}",
    ]
    ops = int(cells[5])
    assert (
        110 < ops < 2000 and cells[6] == f"{ops * 4e-6 * 64000:.0f}"
    )  # at least its 110 convolutions' forward + backward


def test_missing_data_is_refused_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        _module().main(["--out", str(tmp_path / "o"), "--data", str(tmp_path / "nope")])
    assert exit_.value.code == 2 and "does not exist; copy CIFAR-10 along" in capsys.readouterr().err
