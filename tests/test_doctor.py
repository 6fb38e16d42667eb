"""`reproduce doctor` on this CPU: each check does the thing it reports, a failure a job cannot
do without makes exit status 1 with one line naming it and the fix."""

from __future__ import annotations

import json
import socket
import time

import pytest
import torch

from reproduce import cli, doctor
from reproduce.bench.allreduce import child, reply_of
from tests.conftest import run_cli

ORDER = [
    "fp32_step",
    "bf16_step",
    "channels_last_step",
    "compile_step",
    "fast_bf16",
    "matmul",
    "nccl",
    "ffcv",
    "tracking",
    "data",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_doctor_on_this_cpu_is_ready_and_fits_one_screen(tmp_path):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "a.bin").write_bytes(b"x" * (1 << 20))
    (data / "sub" / "b.bin").write_bytes(b"y" * 1000)
    start = time.monotonic()
    proc = run_cli("doctor", "--json", "--data", str(data), timeout=300, env={"CUDA_VISIBLE_DEVICES": ""})
    print(f"reproduce doctor took {time.monotonic() - start:.0f} s here")  # measured, not asserted
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    checks = {c["name"]: c for c in report["checks"]}
    assert list(checks) == ORDER
    assert [n for n, c in checks.items() if c["needed"]] == ["fp32_step", "tracking", "data"]
    for name in ("fp32_step", "bf16_step", "channels_last_step", "tracking", "data"):
        assert checks[name]["status"] == "ok", checks[name]
    assert checks["compile_step"]["status"] in ("ok", "unknown"), checks[
        "compile_step"
    ]  # a cold compile may take longer
    assert checks["nccl"]["status"] == "skip" and "0 visible" in checks["nccl"]["detail"]
    assert "2 files" in checks["data"]["detail"] and "MB/s" in checks["data"]["detail"]
    assert not (tmp_path / "mlflow.db").exists() and "will create it" in checks["tracking"]["detail"]  # issue 30
    assert checks["ffcv"]["status"] == "ok" if _has_ffcv() else "apt-get install" in checks["ffcv"]["fix"]
    assert report["versions"]["torch"] == torch.__version__ and report["devices"][-1]["device"] == "cpu"
    assert report["verdict"].startswith("ready") and report["ready"]
    screen = doctor.render(report).splitlines()
    assert len(screen) <= 30 and screen[-1] == report["verdict"]
    assert sum(line.split()[0] in ("ok", "FAIL", "skip", "unknown", "info") for line in screen) == len(ORDER)


def _has_ffcv() -> bool:
    try:
        import ffcv  # noqa: F401
    except ImportError:
        return False
    return True


def test_unreachable_server_makes_one_line_naming_the_fix(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_free_port()}")
    tracking = doctor._run("tracking", doctor.check_tracking)
    assert tracking.status == "FAIL" and "unreachable" in tracking.detail
    rows = [
        doctor.Check("fp32_step", "ok", "fine", needed=True),
        doctor.Check("ffcv", "FAIL", "missing", "install it"),
        tracking,
    ]
    tracking.needed = True
    line = doctor.verdict(rows)
    assert (
        line.startswith("NOT READY: tracking: TrackingUnreachable: MLflow tracking server")
        and "fix: start the server" in line
    )
    assert "\n" not in line
    rows[2] = doctor.Check("tracking", "ok", "fine", needed=True)
    assert doctor.verdict(rows) == "ready: everything a training job needs works (not available or not proven: ffcv)"


def test_local_store_is_proven_creatable_then_opened(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}")
    assert doctor.check_tracking().detail.endswith("a training job will create it")
    assert not (tmp_path / "store").exists()  # issue 30: doctor never creates the store
    from reproduce.tracking import prepare_store

    prepare_store()
    assert doctor.check_tracking().detail.endswith("opened")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////proc/no-such-folder/mlflow.db")
    broken = doctor._run("tracking", doctor.check_tracking)
    assert broken.status == "FAIL" and "writable sqlite" in broken.fix


def test_data_read_speed_and_its_failures(tmp_path):
    assert doctor.check_data(None).status == "skip"
    missing = doctor.check_data(tmp_path / "nope")
    assert missing.status == "FAIL" and "does not exist" in missing.detail and missing.fix
    (tmp_path / "empty").mkdir()
    assert "holds no files" in doctor.check_data(tmp_path / "empty").detail
    for i in range(3):
        (tmp_path / "set" / str(i)).mkdir(parents=True)
        (tmp_path / "set" / str(i) / "f.bin").write_bytes(bytes(5000))
    ok = doctor.check_data(tmp_path / "set")
    assert ok.status == "ok" and "(3 files, 0.0 MB" in ok.detail
    assert "(1 file," in doctor.check_data(tmp_path / "set" / "0" / "f.bin").detail


def test_a_check_that_raises_is_a_failure_with_its_fix():
    row = doctor._run("data", lambda: 1 / 0)
    assert (row.name, row.status, row.detail, row.fix) == (
        "data",
        "FAIL",
        "ZeroDivisionError: division by zero",
        doctor.FIXES["data"],
    )


@pytest.mark.parametrize("amp, channels_last", [(False, False), (True, False), (False, True)])
def test_tiny_training_steps_prove_each_mode(amp, channels_last):
    row = doctor.check_step(torch.device("cpu"), amp, channels_last)
    assert row.status == "ok" and "resnet20" in row.detail


def test_compile_probe_that_runs_past_its_time_is_unknown_and_stopped():
    probe = doctor.CompileProbe(torch.device("cpu"))
    row = probe.result(timeout=0.5)
    assert row.status == "unknown" and "--compile-timeout" in row.fix
    assert probe.proc.poll() is not None  # killed, not left compiling


@pytest.mark.slow
def test_allreduce_bandwidth_between_two_processes():
    """The NCCL check's code path, with gloo on the CPU: two fresh processes, a right sum, a rate."""
    rate = doctor.allreduce_bandwidth("gloo", 2, 1 << 20)
    print(f"gloo all-reduce of 1 MiB between 2 processes: {rate:.2f} GB/s")
    assert rate > 0


def test_doctor_is_a_command(capsys):
    assert cli.main(["--help"]) == 0
    assert "reproduce doctor [--json] [--data PATH]" in capsys.readouterr().out
    assert cli.COMMANDS["doctor"] == "reproduce.doctor:main"


def test_a_child_check_that_raises_reports_its_error():
    proc = child("reproduce.doctor", "compile_probe", "cpu", "no-such-mode")
    out, err = proc.communicate(timeout=120)
    reply = reply_of(proc, out, err)
    assert "no-such-mode" in reply["error"], (reply, err[-500:])
