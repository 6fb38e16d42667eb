"""`reproduce bench-inference` (reproduce/bench/inference.py) at tiny size: every cell measured and
written (CSV, markdown with the machine and versions, an MLflow run tagged reproduce.kind=bench), and
bad arguments refused in one line. Speed itself is never asserted."""

from __future__ import annotations

import csv

import mlflow
import pytest

from reproduce.bench.inference import COLUMNS, row
from reproduce.cli import main


def cli(argv: list[str]) -> int:
    """The command's exit status as a user sees it (argparse's refusals exit by SystemExit)."""
    try:
        return main(argv)
    except SystemExit as stop:
        return stop.code


def test_a_row_reads_the_forwards_seconds():
    r = row("resnet20", "fp32", "eager", 4, [0.1, 0.2, 0.3, 0.4, 1.0])
    assert r["images_per_sec"] == pytest.approx(4 * 5 / 2.0)
    assert r["latency_ms_median"] == pytest.approx(300) and r["latency_ms_p95"] == pytest.approx(1000)
    assert r["timed"] == 5


def test_bench_inference_writes_its_table_and_mlflow_run(tmp_path, capsys):
    args = ["--batch", "1", "2", "--iterations", "2", "--warmup", "1", "--numerics", "fp32", "bf16"]
    status = cli(["bench-inference", *args, "--export", "eager", "exported", "--out", str(tmp_path / "out")])
    assert status == 0, capsys.readouterr().err[-2000:]
    with open(tmp_path / "out" / "resnet20-cpu.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(COLUMNS)
    cells = {(r["numerics"], r["export"], r["batch"]) for r in rows}
    assert cells == {(n, e, b) for n in ("fp32", "bf16") for e in ("eager", "exported") for b in ("1", "2")}
    assert all(float(r["images_per_sec"]) > 0 and r["timed"] == "2" for r in rows)
    assert all(float(r["latency_ms_p95"]) >= float(r["latency_ms_median"]) > 0 for r in rows)
    text = (tmp_path / "out" / "resnet20-cpu.md").read_text()
    assert "Machine:" in text and "torch 2." in text and text.count("| resnet20 |") == 8
    (run,) = mlflow.search_runs(experiment_names=["bench"], output_format="list")
    assert run.data.tags["reproduce.kind"] == "bench"
    assert run.data.metrics["bf16.exported.b2.images_per_sec"] == pytest.approx(
        float(
            next(r for r in rows if r["numerics"] == "bf16" and r["export"] == "exported" and r["batch"] == "2")[
                "images_per_sec"
            ]
        )
    )


def test_a_failure_keeps_the_cells_measured_before_it(tmp_path, monkeypatch, capsys):
    """bf16 fails after fp32's cells: the table on disk holds fp32's, marked partial; a finished run's is not."""
    import reproduce.bench.inference as inference

    real = inference.in_numerics

    def bf16_fails(model, numerics, *rest):
        if numerics == "bf16":
            raise RuntimeError("bf16 broke")
        return real(model, numerics, *rest)

    monkeypatch.setattr(inference, "in_numerics", bf16_fails)
    args = ["--batch", "1", "--iterations", "1", "--warmup", "1", "--export", "eager", "--no-mlflow"]
    with pytest.raises(RuntimeError, match="bf16 broke"):
        main(["bench-inference", *args, "--numerics", "fp32", "bf16", "--out", str(tmp_path / "out")])
    text = (tmp_path / "out" / "resnet20-cpu.md").read_text()
    assert "**Partial**" in text and text.count("| fp32 |") == 1 and "| bf16 |" not in text
    monkeypatch.setattr(inference, "in_numerics", real)
    assert main(["bench-inference", *args, "--numerics", "fp32", "--out", str(tmp_path / "out")]) == 0
    assert "Partial" not in (tmp_path / "out" / "resnet20-cpu.md").read_text()


@pytest.mark.slow
def test_bench_inference_int8_on_real_calibration_images(tmp_path, capsys):
    pytest.importorskip("torchao.quantization.pt2e", reason="torchao is not installed (pip install -e '.[deploy]')")
    from tests.conftest import shared_file

    data = shared_file("cifar10-jpeg.tar.gz")
    args = ["--numerics", "int8", "--export", "eager", "exported", "--batch", "1", "--iterations", "2"]
    status = cli(["bench-inference", *args, "--data", str(data), "--calibrate", "64", "--out", "o", "--no-mlflow"])
    assert status == 0, capsys.readouterr().err[-2000:]
    text = (tmp_path / "o" / "resnet20-cpu.md").read_text()
    assert "64 training images of" in text and text.count("| int8 |") == 2


@pytest.mark.parametrize(
    "bad",
    [
        ["--batch", "0"],
        ["--batch", "x"],
        ["--numerics", "fp16"],
        ["--export", "onnx"],
        ["--iterations", "-1"],
        ["--model", "resnet21"],
        ["--model", "resnet20", "--weights", "w.th"],
        ["--weights", "model.pt2"],
        ["--weights", "missing.th"],
    ],
)
def test_bad_arguments_are_refused_in_one_line(bad, tmp_path, capsys):
    assert cli(["bench-inference", *bad, "--no-mlflow", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1, err
    assert not list(tmp_path.iterdir())  # nothing measured, nothing written
