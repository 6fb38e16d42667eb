"""The README's main job, at tiny size: every model trains for each seed, is logged, lands in the
table beside the paper's number, the findings are stated, and the report's table and Fig. 6 are written."""

from __future__ import annotations

import fcntl
import math

import mlflow
import pandas as pd

from reproduce.config import load_config
from reproduce.runs import study


def test_study_trains_each_model_and_seed_and_states_the_findings(cifar_tar, tmp_path, capsys, monkeypatch):
    from reproduce import config
    from reproduce.report import runs as report_runs

    reads, parses = [], []
    real_load, real_read = report_runs.load_mlflow_runs, config.load_config
    monkeypatch.setattr(report_runs, "load_mlflow_runs", lambda *a: reads.append(a) or real_load(*a))
    monkeypatch.setattr(config, "load_config", lambda *a, **k: parses.append(a[0]) or real_read(*a, **k))
    code = study.main(
        [
            "--data",
            str(cifar_tar),
            "--models",
            "plain20",
            "resnet20",
            "--seeds",
            "0",
            "1",
            "--iterations",
            "10",
            "--out",
            str(tmp_path / "out"),
            "optim.batch_size=16",
            "run.progress=false",
            "eval.batch_size=64",
        ]
    )
    assert code == 0
    assert len(reads) == 1  # MLflow is read once, for the findings and the report
    # each config file is read once, and one of them once more to decide the numerics: never per seed or run
    files = [str(study.CONFIGS / f"{m}.yaml") for m in ("plain20", "resnet20")]
    assert len(parses) == 3 and set(map(str, parses)) == set(files)
    out = capsys.readouterr().out
    runs = mlflow.search_runs(experiment_names=["cifar10-quick"], output_format="list")
    (report,) = [r for r in runs if r.data.tags.get("reproduce.kind") == "report"]  # the table and Fig. 6, in MLflow
    assert {a.path for a in mlflow.MlflowClient().list_artifacts(report.info.run_id)} >= {"table.md", "fig6.png"}
    runs = [r for r in runs if r is not report]
    assert sorted((r.data.tags["reproduce.model"], r.data.tags["reproduce.seed"]) for r in runs) == [
        ("plain20", "0"),
        ("plain20", "1"),
        ("resnet20", "0"),
        ("resnet20", "1"),
    ]
    assert all(r.info.status == "FINISHED" for r in runs)
    # the start of the paper's schedule at its starting rate for deep nets: lr 0.01 throughout
    assert {(r.data.params["schedule.milestones"], r.data.params["optim.lr"]) for r in runs} == {("[]", "0.01")}
    # no validation split: the study reads training and test error only, so none is held out or evaluated
    assert {r.data.params["data.val_split"] for r in runs} == {"0"}
    assert not any(key.startswith("val_") for r in runs for key in r.data.metrics)
    table = out[out.index("model ") :]
    client = mlflow.MlflowClient()
    for model in ("plain20", "resnet20"):
        row = next(line for line in table.splitlines() if line.startswith(model + " "))
        mine = [r for r in runs if r.data.tags["reproduce.model"] == model]
        tests = [r.data.metrics["test_top1_err"] for r in mine]
        assert f"{sum(tests) / 2:.2f} ± {(max(tests) - min(tests)) / 2:.2f}" in row, row
        trains = [
            sum(v) / len(v)
            for v in (
                [m.value for m in client.get_metric_history(r.info.run_id, "train_top1_err") if m.step > 8]
                for r in mine
            )
        ]
        assert f"{sum(trains) / 2:.2f}" in row, row
        assert all(r.info.run_id in row for r in mine)
    assert "8.75" in next(line for line in table.splitlines() if line.startswith("resnet20 "))  # the paper's Table 6
    assert "residual learning at 20 layers: " in out and ("SHOWN" in out or "NOT shown" in out)
    assert "deeper ResNets are better" in out and "not shown by this budget" in out
    for name in ("table.md", "fig6.png", "study.md"):
        assert (tmp_path / "out" / name).stat().st_size > 0, name
    assert f"the table: {tmp_path / 'out' / 'table.md'}; Fig. 6: {tmp_path / 'out' / 'fig6.png'}" in out


def test_verdict_needs_a_margin_larger_than_the_spread():
    worse = {"model": "plain56", "train": [80.0, 84.0]}
    assert "SHOWN" in study.verdict(worse, {"model": "plain20", "train": [60.0, 62.0]}, "x")
    assert "NOT shown" in study.verdict(worse, {"model": "plain20", "train": [79.0, 83.0]}, "x")  # margin 1 < spread 4
    assert "one seed" in study.verdict({"model": "a", "train": [80.0]}, {"model": "b", "train": [60.0]}, "x")
    assert "not measured" in study.verdict({"model": "a", "train": [math.nan]}, {"model": "b", "train": [60.0]}, "x")


def test_study_refuses_a_bad_override_before_training(capsys):
    assert study.main(["--models", "plain20", "optim.lr=-1"]) == 2
    assert "optim.lr = -1" in capsys.readouterr().err


def test_study_refuses_an_unknown_model_and_an_unwritable_out_before_training(tmp_path, capsys):
    assert study.main(["--models", "plain20", "resnet57"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--models resnet57: not a CIFAR-10 network; did you mean 'resnet56'?" in err
    assert study.main(["--models", "resnet50"]) == 2  # an ImageNet net
    assert "--models resnet50: not a CIFAR-10 network" in capsys.readouterr().err
    (tmp_path / "a-file").write_text("")
    assert study.main(["--models", "plain20", "--out", str(tmp_path / "a-file")]) == 2
    assert "is a file" in capsys.readouterr().err
    assert not mlflow.search_runs(search_all_experiments=True, output_format="list")  # nothing trained


def test_a_failed_run_leaves_the_table_of_the_others_and_only_this_studys_recipe(cifar_tar, tmp_path, capsys):
    """plain20's run directory is held by another job, so its run fails; the study still compares
    and reports the run that finished, says the finding that needed plain20 is not measured, and
    exits 1. Its table holds this study's recipe only, not an earlier study's longer run of the
    same net in the same experiment."""
    tiny = [
        "--data",
        str(cifar_tar),
        "--seeds",
        "0",
        "--out",
        str(tmp_path / "out"),
        "optim.batch_size=16",
        "run.progress=false",
        "eval.batch_size=64",
        "run.amp=false",
        "run.channels_last=false",
    ]
    assert study.main([*tiny, "--models", "resnet20", "--iterations", "12"]) == 0
    argv = [*tiny, "--models", "resnet20", "plain20", "--iterations", "10"]
    run_dir = load_config(study.CONFIGS / "plain20.yaml", study.run_overrides(study.parse_args(argv))).run_dir()
    run_dir.mkdir(parents=True)
    capsys.readouterr()
    with open(run_dir / ".lock", "a+") as held:  # another job's lock on plain20's run directory
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert study.main(argv) == 1
    out = capsys.readouterr().out
    assert "residual learning at 20 layers: not measured (a run did not finish)" in out
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| ResNet-20 A |" in table and "| plain-20 |" not in table
    runs = pd.read_csv(tmp_path / "out" / "provenance.csv")
    assert list(runs.model) == ["resnet20"] and list(runs.iterations) == [10]  # not the earlier 12-iteration run


def test_the_studys_paper_column_is_the_reports_reference():
    """ResNet-110's Table 6 entry is 6.43 (best of 5) with 6.61 ± 0.16 (mean of 5): the study, which
    prints a mean over seeds, shows the paper's mean, as the report does; nets without a number get none."""
    args = study.parse_args(["--budget", "full", "--models", "resnet110", "resnet20", "plain20"])
    configs = {m: load_config(study.CONFIGS / f"{m}.yaml", study.run_overrides(args)) for m in args.models}
    rows = {r["model"]: r for r in study.compare(args, configs, []).rows}  # no runs yet: the paper's numbers only
    assert (
        rows["resnet110"]["paper"] == 6.61
        and rows["resnet20"]["paper"] == 8.75
        and math.isnan(rows["plain20"]["paper"])
    )
    assert all(r["n"] == 0 for r in rows.values())
