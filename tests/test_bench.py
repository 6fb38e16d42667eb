"""`reproduce bench` and `reproduce bench-matrix` run their loops and report what they measured
(the numbers themselves are for a quiet machine, not for a test)."""

from __future__ import annotations

import re

import mlflow
import pandas as pd
import pytest

from reproduce.bench import matrix, overhead
from reproduce.models import build_model, count_macs


@pytest.mark.slow
def test_bench_compares_train_py_with_a_bare_loop(capsys):
    code = overhead.main(
        [
            "--iterations",
            "8",
            "--warmup",
            "4",
            "--rounds",
            "1",
            "data.synthetic=true",
            "data.workers=0",
            "optim.batch_size=8",
            "run.device=cpu",
            "run.progress=false",
            "eval.max_images=64",
        ]
    )
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


def test_bench_matrix_writes_every_cell_with_its_provenance(cifar_tar, tmp_path):
    """Two cells (channels_last off / on) on synthetic and real input: the table, its arithmetic,
    its verdicts and the MLflow run that holds the same numbers."""
    out = tmp_path / "bench"
    code = matrix.main(
        [
            "--models",
            "resnet20",
            "--precision",
            "fp32",
            "--channels-last",
            "off",
            "on",
            "--compile",
            "off",
            "--cifar-data",
            str(cifar_tar),
            "--iterations",
            "4",
            "--warmup",
            "1",
            "--batch",
            "8",
            "--workers",
            "1",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    table = pd.read_csv(out / "matrix.csv")
    assert list(table.channels_last) == ["off", "on"] and set(table.model) == {"resnet20"} and set(table.batch) == {8}
    assert (table[["synthetic", "real", "loader"]] > 0).all().all()
    assert list(table.bound) == [
        "compute-bound" if r >= 0.9 * s else "input-bound" for r, s in zip(table.real, table.synthetic)
    ]
    flops = 6 * count_macs(build_model("resnet20"), 32)
    for row in table.itertuples():
        assert row.tflops == pytest.approx(flops * max(row.synthetic, row.real) / 1e12, rel=1e-2, abs=1e-3)
    text = (out / "matrix.md").read_text()
    (run_id,) = re.search(r"mlflow_run: `(\w+)`", text).groups()
    assert (
        "- command: `reproduce bench-matrix --models resnet20" in text and "- commit: `" in text and "- date: " in text
    )
    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED"
    for row in table.itertuples():
        name = f"resnet20.fp32.cl-{row.channels_last}.compile-off"
        assert run.data.metrics[f"{name}.synthetic"] == pytest.approx(row.synthetic, abs=0.06)
        assert run.data.metrics[f"{name}.real"] == pytest.approx(row.real, abs=0.06)


def test_bench_matrix_refuses_bad_input_in_one_line(tmp_path, capsys):
    assert matrix.main(["--models", "resnet21", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == "error: unknown model resnet21; `reproduce models` lists them"
    assert (
        matrix.main(["--models", "resnet20", "--cifar-data", str(tmp_path / "nope.tar.gz"), "--out", str(tmp_path)])
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: config error: data.path") and "no such file" in err and "\n" not in err
    (tmp_path / "empty.tar.gz").write_bytes(b"")
    assert (
        matrix.main(["--models", "resnet20", "--cifar-data", str(tmp_path / "empty.tar.gz"), "--out", str(tmp_path)])
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "empty.tar.gz" in err and "\n" not in err, err
    assert not list(tmp_path.glob("matrix.*"))  # refused before any cell


@pytest.mark.slow
def test_bench_loaders_on_imagenet_sized_images(tmp_path, capsys):
    """The ImageNet-sized set is made from the real Imagenette archives (seeded: the same images
    and sizes each time), both loaders stream it with the paper's scale augmentation, and each is
    held against its library's measured decode limit."""
    pytest.importorskip("ffcv", reason="FFCV is not installed (pip install -e '.[ffcv]')")
    from PIL import Image

    from reproduce.bench import loaders
    from tests.conftest import shared_file

    shared_file("imagenette-224-train-1of2.tar.gz")
    first = loaders.make_imagenet_sized(tmp_path / "a", 30)
    again = loaders.make_imagenet_sized(tmp_path / "b", 30)
    files = sorted(p.relative_to(first) for p in first.glob("train/*/*"))
    assert len(files) == 30 and files == sorted(p.relative_to(again) for p in again.glob("train/*/*"))
    sizes = [Image.open(first / f).size for f in files]
    assert sizes == [Image.open(again / f).size for f in files]
    assert all(w == h and 333 <= w <= 500 for w, h in sizes) and len(set(sizes)) > 10
    assert len({f.parts[1] for f in files}) == 10  # picked over every class of both archives

    code = loaders.main(
        [
            "--set",
            "imagenet-sized",
            "--images",
            "64",
            "--batch",
            "16",
            "--epochs",
            "2",
            "--rounds",
            "1",
            "--crop",
            "scale",
            "--size",
            "224",
            "--variants",
            "ffcv-jpg,ffcv-raw",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "set imagenet-sized: 64 JPEGs" in out and "scale crop to 224" in out
    limits = re.search(r"decode limit per core: PIL ([\d,]+) images/s, FFCV imdecode \(libjpeg-turbo\) ([\d,]+)", out)
    assert limits and all(float(v.replace(",", "")) > 0 for v in limits.groups()), out
    rows = {
        m[1]: m
        for m in re.finditer(
            r"^(torchvision|ffcv-jpg|ffcv-raw)\s+([\d,]+)\s+([\d,]+)\s+.*?([\d.]+)x\s+(\S+)", out, re.M
        )
    }
    assert set(rows) == {"torchvision", "ffcv-jpg", "ffcv-raw"}, out
    raw_line = next(line for line in out.splitlines() if line.startswith("ffcv-raw "))
    assert rows["torchvision"][4] == "1.00" and raw_line.endswith("(of FFCV's)")  # raw: a share of the JPEG limit
    assert float(rows["ffcv-raw"][2].replace(",", "")) > float(
        rows["ffcv-jpg"][2].replace(",", "")
    )  # raw takes more disk
