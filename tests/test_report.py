"""The report against real MLflow stores (the per-test sqlite file, and a real `mlflow server`),
its export round trip, its figures' data, and the sweep that feeds it."""

from __future__ import annotations

import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.entities import Metric, Param, RunTag

from reproduce import report
from reproduce.report.figures import depth_curves
from reproduce.report.runs import load_mlflow_runs, select_runs
from reproduce.report.tables import load_paper, paper_reference
from reproduce.runs import sweep
from tests.conftest import REPO, tiny_overrides

FULL = 64000
DATA = "CIFAR-10 45000 train / 5000 val / 10000 test from test fixture"
# (model, recipe, seed, status, final test error %, iterations)
RUNS = [
    ("plain20", "p20", 0, "FINISHED", 15.0, FULL),
    ("resnet20", "r20", 0, "FINISHED", 10.0, FULL),
    ("resnet20", "r20", 1, "FINISHED", 12.0, FULL),
    ("resnet20", "r20", 2, "FAILED", 50.0, FULL),
    ("resnet20", "r20short", 0, "FINISHED", 30.0, 500),  # a shortened schedule next to the full one
    ("resnet56", "r56", 0, "FINISHED", 9.0, FULL),
    ("resnet56", "r56", 1, "FINISHED", 8.0, FULL),
    ("resnet110", "r110", 0, "FINISHED", 6.5, FULL),
    ("resnet110", "r110", 1, "FINISHED", 6.7, FULL),
    ("resnet110", "r110", 2, "FINISHED", 6.6, FULL),
]


def _curve(final: float, seed: int, iterations: int, every: int) -> list[tuple[int, float]]:
    """A decreasing error curve that ends at `final` on step = iterations."""
    steps = list(range(every, iterations + 1, every))
    return [(s, final + (40.0 + seed) * (1 - s / iterations)) for s in steps]


def log_runs(client: mlflow.MlflowClient | None = None, runs: list = RUNS, **extra_tags: str) -> dict:
    """`runs` (default RUNS) through the MLflow client as train.py would log them; returns the histories."""
    client = client or mlflow.MlflowClient()
    exp_id = client.create_experiment("cifar10")
    histories = {}
    for model, recipe, seed, status, final, iterations in runs:
        shortcut = "None" if model.startswith("plain") else "A"
        tags = {
            "reproduce.model": model,
            "reproduce.study": "cifar10",
            "reproduce.recipe": recipe,
            "reproduce.seed": str(seed),
            "reproduce.git_commit": "abc123",
            "reproduce.git_dirty": "false",
            "reproduce.torch": "2.14.1",
            "reproduce.cuda": "None",
            "reproduce.host": "testhost",
            "reproduce.gpu": "none",
            "reproduce.world_size": "1",
            "reproduce.launcher": "python",
            "reproduce.slurm_job_id": "",
            "reproduce.data_fingerprint": "f00d",
            "reproduce.data": DATA,
            "reproduce.eval_protocol": "single",
            "reproduce.run_dir": f"/runs/{model}-s{seed}-{recipe}",
            **{f"reproduce.{k}": v for k, v in extra_tags.items()},
        }
        params = {
            "model.name": model,
            "model.shortcut": shortcut,
            "model.variant": "v1",
            "seed": seed,
            "data.dataset": "cifar10",
            "eval.protocol": "single",
            "schedule.iterations": iterations,
        }
        run = client.create_run(exp_id, tags=tags, run_name=f"{model}-s{seed}")
        done = iterations if status == "FINISHED" else iterations // 2
        train = [(s, v) for s, v in _curve(final + 5, seed, iterations, iterations // 10) if s <= done]
        test = [(s, v) for s, v in _curve(final, seed, iterations, iterations // 5) if s <= done]
        now = int(time.time() * 1000)
        metrics = [Metric("train_top1_err", v, now, s) for s, v in train]
        metrics += [Metric(k, v, now, s) for k in ("test_top1_err", "val_top1_err") for s, v in test]
        client.log_batch(
            run.info.run_id,
            metrics=metrics,
            params=[Param(k, str(v)) for k, v in params.items()],
            tags=[RunTag("mlflow.user", "test")],
        )
        client.set_terminated(run.info.run_id, status)
        histories[(model, recipe, seed)] = {"train": train, "test": test, "run_id": run.info.run_id}
    return histories


@pytest.fixture(scope="module")
def seeded_store(tmp_path_factory) -> tuple[Path, dict]:
    """The RUNS logged once into an sqlite store (creating a store takes seconds)."""
    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    return path, log_runs(mlflow.MlflowClient(tracking_uri=f"sqlite:///{path}"))


@pytest.fixture
def store(seeded_store, tmp_path) -> dict:
    """A copy of the seeded store where this test's MLFLOW_TRACKING_URI (conftest) points."""
    path, histories = seeded_store
    shutil.copy(path, tmp_path / "mlflow.db")
    return histories


def _row(table: pd.DataFrame, model: str) -> pd.Series:
    (index,) = table.index[table.model == model]
    return table.loc[index]


def check_table(out: Path) -> pd.DataFrame:
    table = pd.read_csv(out / "table.csv", keep_default_na=False)
    assert list(table.model) == ["plain20", "resnet20", "resnet56", "resnet110"]
    r20, r56, r110, p20 = (_row(table, m) for m in ("resnet20", "resnet56", "resnet110", "plain20"))
    # ResNet-20: seeds 0 and 1 only; the FAILED seed 2 and the 500-iteration recipe stay out.
    assert r20.n == 2 and float(r20["mean"]) == pytest.approx(11.0) and float(r20["std"]) == pytest.approx(math.sqrt(2))
    assert float(r20.best) == 10.0 and r20.seeds == "0 1" and r20.iterations == FULL
    assert float(r20.reference) == 8.75 and float(r20["diff"]) == pytest.approx(2.25)
    assert r20.within == "yes (ours ±2 std)"  # 2.25 <= 2 * 1.414
    assert float(r56["mean"]) == pytest.approx(8.5) and float(r56["std"]) == pytest.approx(math.sqrt(0.5))
    assert r56.within == "no (ours ±2 std)"  # 1.53 > 2 * 0.707
    # ResNet-110: compared with the paper's mean and std over 5 runs, 6.61 ± 0.16 (best 6.43).
    assert float(r110["mean"]) == pytest.approx(6.6) and r110.n == 3
    assert float(r110.reference) == 6.61 and float(r110.reference_std) == 0.16 and float(r110.reference_best) == 6.43
    assert r110.within == "yes (paper ±2 std)" and r110.reference_source == "Table 6"
    assert p20.n == 1 and p20.reference == "" and p20["std"] == ""  # Table 6 has no plain nets
    assert set(table.protocol) == {"single"} and set(table.data) == {DATA}
    md = (out / "table.md").read_text()
    assert "1 FAILED" in md and "1 other recipe" in md and "r20short" in md
    assert "| ResNet-110 A | single | test_top1_err | 6.61 ± 0.16 (best 6.43) | Table 6 | 6.60 ± 0.10 | 3 |" in md
    prov = pd.read_csv(out / "provenance.csv", keep_default_na=False)
    assert len(prov) == len(RUNS) and set(prov.git_commit) == {"abc123"} and set(prov.host) == {"testhost"}
    assert (prov.used == "table").sum() == 8 and "FAILED" in set(prov.used)
    return table


def test_report_from_local_store(tmp_path, store):
    out = tmp_path / "out"
    assert report.main(["--study", "cifar10", "--out", str(out)]) == 0
    check_table(out)
    assert (out / "fig6.png").stat().st_size > 10_000 and not (out / "fig7.png").exists()
    md = (out / "table.md").read_text()
    assert "reproduce report --study cifar10 --out" in md and "sqlite:///" in md and "## Provenance" in md


def test_figure_lines_are_the_runs_metrics(store):
    histories = store
    runs = load_mlflow_runs("cifar10", "cifar10")
    fig = depth_curves(select_runs(runs, "cifar10").main, "cifar10")
    plain, resnets = fig.axes
    lines = {line.get_gid(): line for ax in fig.axes for line in ax.get_lines()}
    assert {line.get_gid() for line in plain.get_lines()} == {"plain-20|train", "plain-20|test_top1_err"}
    # One line per depth = the mean over the seeds of the tabulated recipe.
    for name, model, recipe, seeds in [
        ("plain-20", "plain20", "p20", [0]),
        ("ResNet-20 A", "resnet20", "r20", [0, 1]),
        ("ResNet-110 A", "resnet110", "r110", [0, 1, 2]),
    ]:
        for kind, gid in (("train", f"{name}|train"), ("test", f"{name}|test_top1_err")):
            series = [histories[(model, recipe, s)][kind] for s in seeds]
            x, y = lines[gid].get_data()
            assert list(x) == [s / 1e4 for s, _ in series[0]]  # the paper's axis: iterations in units of 1e4
            assert list(y) == pytest.approx([sum(v[i][1] for v in series) / len(series) for i in range(len(x))])
    assert lines["ResNet-20 A|test_top1_err"].get_color() == lines["plain-20|test_top1_err"].get_color()
    assert lines["ResNet-20 A|train"].get_linestyle() == "--" and lines["ResNet-20 A|test_top1_err"].get_linewidth() > 2


def test_report_from_export_matches_mlflow(tmp_path, monkeypatch, store):
    export = tmp_path / "runs.json"
    assert report.main(["--study", "cifar10", "--out", str(tmp_path / "a"), "--export", str(export)]) == 0
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'empty.db'}")  # the export needs no store
    assert report.main(["--from-export", str(export), "--out", str(tmp_path / "b")]) == 0
    assert (tmp_path / "a" / "table.csv").read_text() == (tmp_path / "b" / "table.csv").read_text()
    assert (tmp_path / "a" / "provenance.csv").read_text() == (tmp_path / "b" / "provenance.csv").read_text()
    check_table(tmp_path / "b")
    assert "the export" in (tmp_path / "b" / "table.md").read_text()


def test_imagenet_rows_use_the_protocols_reference():
    paper = load_paper()
    ref = paper_reference(paper, ("resnet34", "B", "v1", "tencrop"), "test_top5_err")
    assert ref["reference"] == 7.46 and ref["reference_source"] == "Table 3"
    ref = paper_reference(paper, ("plain34", "", "v1", "tencrop"), "test_top1_err")
    assert ref["reference"] == 28.54 and ref["reference_source"] == "Table 2, Table 3"
    ref = paper_reference(paper, ("resnet34", "", "v1", "tencrop"), "test_top1_err")
    assert ref["reference"] == 25.03  # no shortcut given: the paper's default row (A) comes first
    assert paper_reference(paper, ("resnet50", "B", "v1.5", "center224"), "test_top1_err")["reference"] == 23.87
    assert math.isnan(paper_reference(paper, ("resnet20", "A", "v1", "tencrop"), "test_top1_err")["reference"])


def test_report_without_runs_fails_clearly(tmp_path, capsys, store):
    assert report.main(["--study", "imagenet", "--out", str(tmp_path / "o")]) == 1
    assert "no imagenet runs" in capsys.readouterr().err
    assert report.main([]) == 2


def test_report_refuses_an_unreachable_server_and_an_unwritable_out_in_one_line(tmp_path, capsys, monkeypatch, store):
    (tmp_path / "a-file").write_text("")
    for out in (tmp_path / "a-file", tmp_path / "a-file" / "below"):  # --out a file, or under one
        assert report.main(["--study", "cifar10", "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and err.startswith(f"error: cannot write the report to {out} (") and "--out" in err
    assert (
        report.main(["--study", "cifar10", "--out", str(tmp_path / "o"), "--export", str(tmp_path / "a-file" / "x")])
        == 2
    )
    assert "cannot write the export" in capsys.readouterr().err
    uri = f"http://127.0.0.1:{_free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert report.main(["--study", "cifar10", "--out", str(tmp_path / "o")]) == 2  # at once: no retries for minutes
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"error: MLflow tracking server {uri} is unreachable")
    assert not (tmp_path / "o").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path, monkeypatch):
    port = _free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
            "--default-artifact-root",
            str(tmp_path / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                    if answer.read().decode().strip() == "OK":
                        break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "mlflow server did not come up"
            time.sleep(0.5)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
        try:  # the server started in its own session: its group holds only its processes (workers too)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


@pytest.mark.slow
def test_report_from_mlflow_server(tmp_path, mlflow_server):
    log_runs()
    assert mlflow.get_tracking_uri() == mlflow_server
    out = tmp_path / "out"
    assert report.main(["--study", "cifar10", "--out", str(out)]) == 0
    check_table(out)
    assert mlflow_server in (out / "table.md").read_text()


@pytest.mark.slow
def test_sweep_then_report_end_to_end(tmp_path, cifar_tar):
    config = str(REPO / "configs" / "cifar10" / "resnet20.yaml")
    assert sweep.main(["--configs", config, "--seeds", "0", "1", *tiny_overrides(cifar_tar, iterations=4)]) == 0
    out = tmp_path / "out"
    assert report.main(["--study", "cifar10", "--out", str(out)]) == 0
    table = pd.read_csv(out / "table.csv", keep_default_na=False)
    assert list(table.model) == ["resnet20"] and list(table.n) == [2] and list(table.iterations) == [4]
    runs = {
        r.data.tags["reproduce.seed"] + r.data.params["model.name"]: r
        for r in mlflow.search_runs(
            experiment_names=["cifar10"], output_format="list", filter_string="tags.`reproduce.study` = 'cifar10'"
        )
    }  # not the report's own run
    finals = {key: run.data.metrics["test_top1_err"] for key, run in runs.items()}
    assert float(_row(table, "resnet20")["mean"]) == pytest.approx((finals["0resnet20"] + finals["1resnet20"]) / 2)
    assert _row(table, "resnet20").data == next(iter(runs.values())).data.tags["reproduce.data"]


def test_fig6_draws_resnet110_against_1202_and_marks_single_points():
    from reproduce.report.runs import Group

    def run(model, seed, train, test):
        return {
            "run_id": f"{model}-{seed}",
            "tags": {"reproduce.model": model, "reproduce.seed": str(seed)},
            "params": {},
            "metrics": {},
            "history": {"train_top1_err": train, "test_top1_err": test},
        }

    groups = [
        Group(
            ("resnet110", "A", "v1", "single"),
            "r110",
            [run("resnet110", 0, [[1000, 30.0], [64000, 5.0]], [[64000, 6.5]])],
        ),
        Group(("resnet1202", "A", "v1", "single"), "r1202", [run("resnet1202", 0, [[64000, 4.0]], [[64000, 7.9]])]),
        Group(
            ("plain20", "", "v1", "single"),
            "p20",
            [run("plain20", 0, [[32000, 9.0], [64000, 8.0]], [[32000, 12.0], [64000, 10.0]])],
        ),
    ]
    fig = depth_curves(groups, "cifar10")
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["plain networks", "ResNets", "ResNet-110 and ResNet-1202"]
    third = {line.get_gid(): line for line in fig.axes[2].get_lines()}
    assert set(third) == {
        "ResNet-110 A|train",
        "ResNet-110 A|test_top1_err",
        "ResNet-1202 A|train",
        "ResNet-1202 A|test_top1_err",
    }
    assert "ResNet-1202 A|train" not in {line.get_gid() for line in fig.axes[1].get_lines()}
    assert third["ResNet-1202 A|test_top1_err"].get_marker() == "o" and third["ResNet-110 A|train"].get_marker() in (
        None,
        "None",
        "",
    )
    assert list(third["ResNet-110 A|train"].get_xdata()) == [0.1, 6.4] and fig.axes[0].get_xlabel() == "iter. (1e4)"


def test_with_export_adds_runs_from_another_store_and_a_carried_run_replaces_its_original(tmp_path, monkeypatch, store):
    export = tmp_path / "runs.json"
    assert (
        report.main(["--study", "cifar10", "--out", str(tmp_path / "a"), "--export", str(export), "--no-mlflow"]) == 0
    )
    exported = report.runs.read_export(export)["runs"]
    # Another machine: a fresh store holding one run carried there from the first (reproduce unpark).
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'second.db'}")
    carried = next(r for r in exported if r["tags"]["reproduce.model"] == "resnet20" and r["status"] == "FAILED")
    log_runs(runs=[("resnet20", "r20", 2, "FINISHED", 11.0, FULL)], imported_from=carried["run_id"])
    merged = tmp_path / "merged.json"
    assert (
        report.main(
            [
                "--study",
                "cifar10",
                "--out",
                str(tmp_path / "b"),
                "--with-export",
                str(export),
                "--export",
                str(merged),
                "--no-mlflow",
            ]
        )
        == 0
    )
    runs = report.runs.read_export(merged)["runs"]
    assert len(runs) == len(exported)  # the carried run replaced its original, nothing else was lost or doubled
    assert carried["run_id"] not in {r["run_id"] for r in runs}
    table = pd.read_csv(tmp_path / "b" / "table.csv")
    row = table[(table["model"] == "resnet20") & (table["metric"] == "test_top1_err")].iloc[0]
    assert row["n"] == 3 and row["mean"] == pytest.approx(11.0)


def test_a_run_in_two_sources_keeps_its_finished_record():
    """The same run in a store and an export: the finished record wins whichever source holds it (a
    store left behind by an earlier session can be older than the export); else the first source's."""
    from reproduce.report.runs import merge_runs

    def record(run_id, status, err=None):
        return {"run_id": run_id, "status": status, "tags": {}, "metrics": {"test_top1_err": err} if err else {}}

    store = [record("a", "KILLED"), record("b", "FINISHED", 12.0), record("c", "RUNNING")]
    export = [record("a", "FINISHED", 11.0), record("b", "FINISHED", 13.0), record("c", "KILLED")]
    merged = {r["run_id"]: r for r in merge_runs(store, export)}
    assert merged["a"]["status"] == "FINISHED" and merged["a"]["metrics"]["test_top1_err"] == 11.0
    assert merged["b"]["metrics"]["test_top1_err"] == 12.0  # both finished: the first source's
    assert merged["c"]["status"] == "RUNNING"
    assert len(merge_runs(store, export)) == 3


@pytest.mark.parametrize(
    "text",
    ["[1, 2]", '{"format": "reproduce-runs/1"}', '{"format": "x", "runs": []}', '{"format": "reproduce-runs/1", "stu'],
)
def test_a_file_that_is_not_an_export_is_refused_in_one_line(text, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(text)
    assert report.main(["--from-export", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(bad) in err and "--export FILE" in err
    assert not (tmp_path / "o").exists()
