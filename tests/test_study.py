"""The README's main job, at tiny size: every model trains, is logged, and lands in the table."""
from __future__ import annotations

import mlflow

from reproduce.runs import study


def test_study_trains_each_model_and_prints_the_table(cifar_tar, capsys):
    code = study.main(["--data", str(cifar_tar), "--models", "plain20", "resnet20", "--iterations", "4",
                       "optim.batch_size=16", "data.val_split=40", "run.progress=false", "eval.batch_size=64"])
    assert code == 0
    out = capsys.readouterr().out
    runs = mlflow.search_runs(experiment_names=["cifar10-quick"], output_format="list")
    assert sorted(r.data.tags["reproduce.model"] for r in runs) == ["plain20", "resnet20"]
    assert all(r.info.status == "FINISHED" for r in runs)
    table = out[out.index("model "):]
    for run in runs:
        row = next(line for line in table.splitlines() if line.startswith(run.data.tags["reproduce.model"] + " "))
        assert f"{run.data.metrics['test_top1_err']:.2f}" in row and run.info.run_id in row


def test_study_refuses_a_bad_override_before_training(capsys):
    assert study.main(["--models", "plain20", "optim.lr=-1"]) == 2
    assert "optim.lr = -1" in capsys.readouterr().err
