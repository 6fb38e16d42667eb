"""The README's main job, at tiny size: every model trains for each seed, is logged, lands in the
table beside the paper's number, the findings are stated, and the report's table and Fig. 6 are written."""

from __future__ import annotations

import fcntl
import math

import mlflow
import pandas as pd
import pytest

from reproduce.config import load_config
from reproduce.report.summary import Finding, Network
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
    assert not [r for r in runs if r.data.tags.get("reproduce.kind") == "report"]  # no report run beside them
    (parent,) = [r for r in runs if r.data.tags.get("reproduce.kind") == "study"]  # the table and Fig. 6, in MLflow
    assert {a.path for a in mlflow.MlflowClient().list_artifacts(parent.info.run_id)} >= {
        "table.md",
        "fig6.png",
        "summary.csv",
        "study.md",
    }
    assert parent.info.status == "FINISHED" and parent.info.run_name == "study-plain20-resnet20"
    runs = [r for r in runs if r is not parent]
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {parent.info.run_id}  # nested under it
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
    means = {}
    for model in ("plain20", "resnet20"):
        row = next(line for line in table.splitlines() if line.startswith(model + " "))
        mine = [r for r in runs if r.data.tags["reproduce.model"] == model]
        tests = [r.data.metrics["test_top1_err"] for r in mine]
        trains = [
            sum(v) / len(v)
            for v in (
                [m.value for m in client.get_metric_history(r.info.run_id, "train_top1_err") if m.step > 8]
                for r in mine
            )
        ]
        for kind, values in (("test", tests), ("train", trains)):  # mean and sample std over the 2 seeds
            mean, std = sum(values) / 2, abs(values[0] - values[1]) / math.sqrt(2)
            assert f"{mean:.2f} ± {std:.2f}" in row, (kind, row)
            # the parent run holds the same numbers as metrics, rounded for display
            assert parent.data.metrics[f"{model}/{kind}_err_mean"] == round(mean, 4)
            assert parent.data.metrics[f"{model}/{kind}_err_std"] == pytest.approx(round(std, 4), abs=1e-4)
            means[model, kind] = mean
        assert parent.data.metrics[f"{model}/n"] == 2
        assert all(r.info.run_id in row for r in mine)
    margin = means["plain20", "train"] - means["resnet20", "train"]
    assert parent.data.metrics["margin/plain20-resnet20/train_err"] == pytest.approx(round(margin, 4), abs=1e-4)
    assert f"margin of {margin:.1f} points" in out
    note = parent.data.tags["mlflow.note.content"]
    assert "| network | n | train err % (mean ± std) | test err % (mean ± std) |" in note
    assert f"| ResNet-20 A | 2 | {means['resnet20', 'train']:.2f} ± " in note and "| ResNet-20 A | single |" in note
    summary = pd.read_csv(tmp_path / "out" / "summary.csv")  # `reproduce report`'s numbers: the same, unrounded
    row = summary[summary.name == "resnet20"].iloc[0]
    assert row.train_err_mean == pytest.approx(means["resnet20", "train"], abs=1e-9) and row.n == 2
    assert "8.75" in next(line for line in table.splitlines() if line.startswith("resnet20 "))  # the paper's Table 6
    assert "residual learning at 20 layers: " in out and ("SHOWN" in out or "NOT shown" in out)
    assert "deeper ResNets are better" in out and "not shown by this budget" in out
    for name in ("table.md", "fig6.png", "study.md"):
        assert (tmp_path / "out" / name).stat().st_size > 0, name
    assert f"the table: {tmp_path / 'out' / 'table.md'}; Fig. 6: {tmp_path / 'out' / 'fig6.png'}" in out


def test_verdict_needs_a_margin_larger_than_the_spread():
    def finding(worse: list[float], better: list[float]):
        nets = [
            Network(m, m, train, [], [str(i) for i, _ in enumerate(train)])
            for m, train in (("a", worse), ("b", better))
        ]
        return Finding(*nets, "x", "x")

    assert "SHOWN" in study.verdict(finding([80.0, 84.0], [60.0, 62.0]))
    assert "NOT shown" in study.verdict(finding([80.0, 84.0], [79.0, 83.0]))  # margin 1 < spread 4
    assert finding([80.0, 84.0], [79.0, 83.0]).margin("train") == (1.0, 4.0)
    assert "one seed" in study.verdict(finding([80.0], [60.0]))
    assert "not measured" in study.verdict(finding([math.nan], [60.0]))


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


def test_more_seeds_extend_the_same_parent_run(cifar_tar, tmp_path):
    """A study run again with more seeds trains only the new one and reuses its parent run, whose
    summary then counts both seeds; a study of another recipe gets a parent of its own."""
    tiny = ["--data", str(cifar_tar), "--models", "resnet20", "--out", str(tmp_path / "out")]
    tiny += [
        "optim.batch_size=16",
        "run.progress=false",
        "eval.batch_size=64",
        "run.amp=false",
        "run.channels_last=false",
    ]
    assert study.main([*tiny, "--iterations", "10", "--seeds", "0"]) == 0
    assert study.main([*tiny, "--iterations", "10", "--seeds", "0", "1"]) == 0
    runs = mlflow.search_runs(experiment_names=["cifar10-quick"], output_format="list")
    (parent,) = [r for r in runs if r.data.tags["reproduce.kind"] == "study"]
    trained = [r for r in runs if r.data.tags["reproduce.kind"] == "train"]
    assert sorted(r.data.tags["reproduce.seed"] for r in trained) == ["0", "1"]  # seed 0 was not trained again
    assert {r.data.tags["mlflow.parentRunId"] for r in trained} == {parent.info.run_id}
    assert parent.data.metrics["resnet20/n"] == 2 and "resnet20/test_err_std" in parent.data.metrics
    assert study.main([*tiny, "--iterations", "12", "--seeds", "0"]) == 0  # another recipe: another study
    parents = mlflow.search_runs(
        experiment_names=["cifar10-quick"], filter_string="tags.`reproduce.kind` = 'study'", output_format="list"
    )
    assert len(parents) == 2 and len({p.data.tags["reproduce.study_key"] for p in parents}) == 2
