"""The README's main job, at tiny size: every model trains for each seed, is logged, lands in the
table beside the paper's number, the findings are stated, and the report's table and Fig. 6 are written."""

from __future__ import annotations

import fcntl
import math

import mlflow
import pandas as pd
import pytest

from reproduce.config import load_config
from reproduce.report.summary import Finding, Network, frame, markdown
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


def test_runs_of_one_seed_pair_and_the_margin_is_held_against_the_spread_of_their_differences():
    """A seed fixes the batches and their order whatever the network, so the seed-to-seed swing that
    both networks share cancels in the per-seed differences: the crossing runs (results/plan/crossing.md)
    differ by 1.15 and 0.78 points at seeds 0 and 1, while each network's own range is about 1.6."""

    def finding(worse: list[float], better: list[float], seeds=("0", "1"), better_seeds=None):
        nets = [
            Network(m, m, train, [], [f"{m}{i}" for i, _ in enumerate(train)], list(ss))
            for m, train, ss in (("a", worse, seeds), ("b", better, better_seeds or seeds))
        ]
        return Finding(*nets, "x", "x")

    same_swing = finding([80.0, 84.0], [79.0, 83.0])  # each seed: a 1 point margin; unpaired it drowns in 4
    assert same_swing.paired() and same_swing.margin("train") == (1.0, 0.0) and same_swing.shown
    assert "SHOWN" in study.verdict(same_swing) and "its 2 per-seed differences, 0.0" in study.verdict(same_swing)
    crossing = finding([27.2448, 28.4297], [26.0911, 27.6510])  # ResNet-20, ResNet-56 at 3,000 iterations
    assert crossing.margin("train") == pytest.approx((0.9662, 0.375)) and crossing.shown
    assert not finding([27.2448, 28.4297], [26.0911, 27.6510], better_seeds=("2", "3")).shown  # 0.97 < 1.56
    disagree = finding([80.0, 84.0], [78.0, 85.0])  # +2 and -1
    assert disagree.margin("train") == pytest.approx((0.5, 3.0)) and not disagree.shown
    # seeds not in common (or only one): the networks' means and the larger of their ranges, as before
    apart = finding([80.0, 84.0], [79.0, 83.0], better_seeds=("2", "3"))
    assert (
        not apart.paired()
        and apart.margin("train") == (1.0, 4.0)
        and "seed-to-seed spread of 4.0" in study.verdict(apart)
    )
    three = finding([80.0, 84.0, 82.0], [79.0, 83.0], seeds=("0", "1", "2"), better_seeds=("0", "1"))
    assert three.paired() and three.pairs("train") == {"0": 1.0, "1": 1.0}  # seed 2 has no partner: left out
    lines = "\n".join(markdown([same_swing.worse, same_swing.better], [same_swing]))
    assert "| 1.00 | 0.00 (2 pairs) | yes |" in lines and "per-seed differences" in lines
    row = frame([same_swing.worse, same_swing.better], [same_swing]).iloc[-1]
    assert row.n == 2 and bool(row.paired) and row.train_err_spread == 0.0


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


# The budget sizing (issue 32 item 2): pure, against made-up costs; the real 10-minute study is run by hand.
def fake_costs(step_s: float, fixed_s: float = 10.0) -> dict:
    """Each candidate network's cost on a made-up machine: 56-layer nets take about 2.8x a 20-layer's step."""
    return {m: study.Cost(fixed_s, step_s * (2.8 if "56" in m else 1.0)) for m in study.THIRD_MODELS}


def test_a_fast_machine_gets_more_iterations_and_seeds_and_the_third_finding():
    slow = study.size_study(fake_costs(0.5), 600)
    medium = study.size_study(fake_costs(0.05), 600)  # 4 seeds of the three networks at 360 iterations
    assert medium.iterations > slow.iterations and len(medium.seeds) > len(slow.seeds)
    assert medium.models == study.CPU_MODELS and "the third finding" in medium.note
    fast = study.size_study(fake_costs(0.002), 600)
    assert fast.iterations > medium.iterations and len(fast.seeds) > len(slow.seeds)
    assert "resnet20" in fast.models and fast.iterations >= study.THIRD_ITERATIONS
    assert "ResNet-20 included" in fast.note
    for sized in (slow, medium, fast):  # the budget is filled, not exceeded
        assert sized.seconds <= 600 and sized.iterations % 10 == 0
    assert fast.seconds > 0.8 * 600


def test_a_slow_machine_gets_the_minimum_and_is_told_what_would_show_the_rest():
    sized = study.size_study(fake_costs(0.5), 600)  # 3 x 2 x (10 + 80 x ~1.5 s) fits; no more than that
    assert sized.models == study.CPU_MODELS and sized.seeds == [0, 1]
    assert study.MIN_ITERATIONS <= sized.iterations < 2 * study.MIN_ITERATIONS
    assert "only about the minimum" in sized.note
    assert (
        "the third finding (ResNet-56 ahead of ResNet-20) needs ResNet-20" in sized.note and "--minutes " in sized.note
    )
    # the budget it names would include ResNet-20 on that machine (minus the measuring it counts)
    minutes = int(sized.note.split("`--minutes ")[1].split("`")[0])
    assert "resnet20" in study.size_study(fake_costs(0.5), minutes * 60 - 60).models


def test_a_budget_too_small_for_the_minimum_is_refused_in_one_line():
    with pytest.raises(study.StudyRefused) as refused:
        study.size_study(fake_costs(0.5), 60)
    message = str(refused.value)
    assert "\n" not in message and "too small for the smallest study" in message and "--minutes" in message


def test_given_models_and_seeds_are_kept_and_only_the_rest_is_sized():
    costs = fake_costs(0.02)
    sized = study.size_study(costs, 600, models=["plain20", "resnet20"], seeds=[3])
    assert sized.models == ["plain20", "resnet20"] and sized.seeds == [3]
    assert sized.iterations > study.size_study(costs, 600, models=["plain20", "resnet20"]).iterations
    assert sized.iterations <= study.PAPER_ITERATIONS


def test_iterations_given_skip_the_measuring_and_minutes_need_the_cpu_budget(monkeypatch, capsys):
    args = study.parse_args(["--iterations", "30"])
    assert not args.sized and args.iterations == 30 and args.seeds == [0, 1] and args.models == study.CPU_MODELS
    args = study.parse_args(["--budget", "cpu"])
    assert args.sized and args.minutes == 10
    with pytest.raises(SystemExit) as code:
        study.parse_args(["--budget", "full", "--minutes", "5"])
    assert code.value.code == 2 and "--minutes" in capsys.readouterr().err


def test_measured_costs_time_one_network_per_depth_on_the_real_data(cifar_tar, monkeypatch):
    """measure_costs for real at tiny size: plain-20 and ResNet-20 cost the same (one depth, one
    measurement), ResNet-56 more per iteration; each run's fixed seconds include evaluations and start-up."""
    import reproduce.bench.plan as plan

    measured = []
    real = plan.measure
    monkeypatch.setattr(plan, "measure", lambda cfg, *rest: measured.append(cfg.model.name) or real(cfg, *rest))
    args = study.parse_args(
        ["--budget", "cpu", "--models", "plain20", "resnet20", "resnet56", "--data", str(cifar_tar)]
    )
    tiny = [
        "optim.batch_size=8",
        "eval.max_images=16",
        "eval.batch_size=16",
        "run.amp=false",
        "run.channels_last=false",
    ]
    costs = study.measure_costs(args, [*study.run_overrides(args), *tiny])
    assert measured == ["plain20", "resnet56"] and costs["plain20"] == costs["resnet20"]
    assert costs["resnet56"].step_s > costs["resnet20"].step_s > 0
    assert all(c.fixed_s > study.RUN_OVERHEAD_S for c in costs.values())


def test_the_study_refuses_a_budget_too_small_after_measuring_before_training(tmp_path, capsys, monkeypatch):
    measured = []
    monkeypatch.setattr(study, "measure_costs", lambda args, common: measured.append(common) or fake_costs(0.5))
    argv = ["--budget", "cpu", "--minutes", "1", "--out", str(tmp_path / "out"), "run.amp=false"]
    assert study.main([*argv, "run.channels_last=false"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(measured) == 1 and "\n" not in err and "too small for the smallest study" in err
    assert not mlflow.search_runs(search_all_experiments=True, output_format="list")  # nothing trained
