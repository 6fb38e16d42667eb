"""`reproduce bench` runs both loops and reports what it measured (the numbers themselves are
for a quiet machine, not for a test)."""
from __future__ import annotations

import re

import mlflow
import pytest

from reproduce import bench


@pytest.mark.slow
def test_bench_compares_train_py_with_a_bare_loop(capsys):
    code = bench.main(["--iterations", "8", "--warmup", "4", "--rounds", "1", "data.synthetic=true", "data.workers=0",
                       "optim.batch_size=8", "run.device=cpu", "run.progress=false"])
    out = capsys.readouterr().out
    assert code == 0, out
    bare = re.search(r"bare loop\s+median\s+([\d.]+) images/s\s+\(runs: ([\d.]+), ([\d.]+)\)", out)
    full = re.search(r"train.py\s+median\s+([\d.]+) images/s\s+\(runs: ([\d.]+)\)", out)
    ratio = re.search(r"ratio\s+([\d.]+)", out)
    assert bare and full and ratio, out
    assert float(bare[1]) > 0 and float(full[1]) > 0
    assert abs(float(ratio[1]) - float(full[1]) / float(bare[1])) < 2e-3
    (run_id,) = re.search(r"MLflow runs of train.py .*: (\w+)$", out, re.M).groups()
    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["schedule.iterations"] == "8"
