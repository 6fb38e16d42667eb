"""`reproduce evaluate` and the multiscale protocol (issue 16 items 2-3)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from reproduce import evaluate
from reproduce.data.imagenet import MEAN, MULTISCALE_SIDES, STD, MultiScale
from reproduce.models import build_model
from tests.conftest import REPO, SHARED_DATA, shared_file, tiny_overrides


def imagenette_val(root: Path, classes: int = 2, per_class: int = 2) -> Path:
    """The first `per_class` images of the first `classes` classes of the real Imagenette val split."""
    archive = shared_file("imagenette-224-val.tar.gz")
    taken: dict[str, int] = {}
    with tarfile.open(archive) as tf:
        for member in tf:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) != 3:
                continue
            if parts[1] not in taken and len(taken) == classes:
                break
            if taken.setdefault(parts[1], 0) < per_class:
                (root / parts[0] / parts[1]).mkdir(parents=True, exist_ok=True)
                (root / member.name).write_bytes(tf.extractfile(member).read())
                taken[parts[1]] += 1
    return root


def generated_val(root: Path, sizes=((224, 224), (300, 224), (224, 260))) -> Path:
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(sizes):
        folder = root / "val" / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def weights_file(path: Path, name: str = "resnet18", classes: int = 2) -> Path:
    torch.manual_seed(0)
    torch.save(build_model(name, "B", num_classes=classes).state_dict(), path)
    return path


def by_hand(model: torch.nn.Module, files: list[Path], labels: list[int]) -> float:
    """Top-1 error of the multiscale protocol computed directly: every shorter side, the image and
    its mirror, softmax scores averaged."""
    model.eval()
    wrong = 0
    with torch.no_grad():
        for file, label in zip(files, labels):
            x = v2.functional.pil_to_tensor(Image.open(file).convert("RGB"))
            scores = []
            for side in MULTISCALE_SIDES:
                y = v2.functional.normalize(
                    v2.functional.to_dtype(v2.functional.resize(x, side, antialias=True), torch.float32, scale=True),
                    MEAN,
                    STD,
                )
                scores += list(model(torch.stack([y, y.flip(-1)])).softmax(1))
            wrong += int(torch.stack(scores).mean(0).argmax()) != label
    return 100.0 * wrong / len(files)


def _evaluate(*argv: str) -> dict:
    out = Path("result.json")
    assert evaluate.main([*argv, "--out", str(out), "data.workers=0", "run.device=cpu"]) == 0
    return json.loads(out.read_text())


# ---------------------------------------------------------------------------- multiscale
def test_multiscale_transform_sizes():
    views = MultiScale([224, 256, 384, 480, 640])(Image.new("RGB", (300, 200)))
    assert [tuple(v.shape) for v in views] == [(2, 3, s, round(s * 1.5)) for s in (224, 256, 384, 480, 640)]
    assert torch.equal(views[0][1], views[0][0].flip(-1))


@pytest.mark.parametrize("eval_batch", ["256", "1"])
def test_multiscale_matches_by_hand_on_images_of_different_sizes(tmp_path, eval_batch):
    root = generated_val(tmp_path / "gen")
    path = weights_file(tmp_path / "w.pt")
    result = _evaluate(
        "--weights",
        str(path),
        "--model",
        "resnet18",
        "--protocol",
        "multiscale",
        "--data",
        str(root),
        f"eval.batch_size={eval_batch}",
    )
    files = sorted((root / "val").rglob("*.png"))
    model = build_model("resnet18", "B", num_classes=2)
    model.load_state_dict(torch.load(path, weights_only=True))
    assert result["images"] == 3 and result["protocol"] == "multiscale"
    assert result["test_top1_err"] == pytest.approx(by_hand(model, files, [int(f.parent.name[1]) for f in files]))


@pytest.mark.slow
def test_multiscale_on_real_imagenette_jpegs(tmp_path):
    root = imagenette_val(tmp_path / "nette", classes=2, per_class=2)
    path = weights_file(tmp_path / "w.pt")
    result = _evaluate("--weights", str(path), "--model", "resnet18", "--protocol", "multiscale", "--data", str(root))
    files = sorted((root / "val").rglob("*.JPEG"))
    classes = sorted({f.parent.name for f in files})
    model = build_model("resnet18", "B", num_classes=2)
    model.load_state_dict(torch.load(path, weights_only=True))
    assert result["images"] == 4
    assert result["test_top1_err"] == pytest.approx(
        by_hand(model, files, [classes.index(f.parent.name) for f in files])
    )


# ---------------------------------------------------------------------------- the command
def test_evaluation_is_one_mlflow_run_with_its_json(tmp_path):
    root = generated_val(tmp_path / "gen", sizes=((64, 64),) * 4)
    path = weights_file(tmp_path / "w.pt")
    result = _evaluate(
        "--weights", str(path), "--model", "resnet18", "--protocol", "tencrop", "--data", str(root), "data.crop=32"
    )
    run = mlflow.get_run(result["mlflow_run_id"])
    tags = run.data.tags
    assert tags["reproduce.kind"] == "evaluation" and tags["reproduce.eval_protocol"] == "tencrop"
    assert (
        tags["reproduce.weights_sha256"] == result["weights_sha256"]
        and tags["reproduce.weights_format"] == "state_dict"
    )
    assert tags["reproduce.architecture"] == "resnet18 (shortcut B, v1)" and tags["reproduce.data_fingerprint"]
    assert run.data.metrics["test_top1_err"] == result["test_top1_err"] and result["images_per_sec"] > 0
    assert "test_top5_err" not in result  # two classes: top-5 is not defined


def test_default_result_files_are_one_per_data_and_numerics(tmp_path):
    """The same weights on two datasets, and in bf16: three JSON files, none overwriting another."""
    path = weights_file(tmp_path / "w.pt")
    first, second = (generated_val(tmp_path / name, sizes=((64, 64),) * n) for name, n in (("a", 2), ("b", 3)))
    for data, numerics in ((first, "fp32"), (second, "fp32"), (first, "bf16")):
        argv = ["--weights", str(path), "--model", "resnet18", "--data", str(data), "--numerics", numerics]
        assert evaluate.main([*argv, "data.crop=32", "data.workers=0", "run.device=cpu"]) == 0
    files = sorted(p.name for p in Path("runs/evaluations").glob("*.json"))
    assert len(files) == 3 and sum(name.endswith("-bf16.json") for name in files) == 1, files


def test_a_model_that_does_not_fit_the_weights_is_refused(tmp_path, capsys):
    root = generated_val(tmp_path / "gen", sizes=((64, 64),) * 2)
    path = weights_file(tmp_path / "w.pt")
    assert evaluate.main(["--weights", str(path), "--model", "resnet34", "--data", str(root), "run.device=cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "depth 18" in err and "resnet34" in err
    assert (
        evaluate.main(["--weights", str(path), "--model", "resnet18", "--data", str(tmp_path), "run.device=cpu"]) == 2
    )
    assert "val" in capsys.readouterr().err


def test_what_could_not_be_recorded_is_refused_before_evaluating(tmp_path, capsys, monkeypatch):
    """An --out that is a folder, an unreachable tracking server and missing weights are each refused
    in one line with exit status 2 before anything is evaluated. Without --model the network comes
    from the tensors where they tell it, and a failure says what is wrong with the weights."""
    root = generated_val(tmp_path / "gen", sizes=((64, 64),) * 2)
    path = weights_file(tmp_path / "w.pt")  # resnet18 with projection shortcuts: the tensors say which net
    base = ["--data", str(root), "data.crop=32", "data.workers=0", "run.device=cpu"]
    assert evaluate.main(["--weights", str(path), *base, "--out", str(tmp_path)]) == 2
    assert f"--out {tmp_path} is a folder" in capsys.readouterr().err
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with monkeypatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
        assert evaluate.main(["--weights", str(path), *base]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and f"http://127.0.0.1:{port} is unreachable" in err
    assert evaluate.main(["--weights", str(tmp_path / "missing.pt"), *base]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "missing.pt not found" in err
    assert not Path("runs").exists() and not mlflow.search_runs(search_all_experiments=True, output_format="list")
    out = tmp_path / "result.json"
    assert evaluate.main(["--weights", str(path), *base, "--out", str(out)]) == 0
    assert json.loads(out.read_text())["architecture"]["name"] == "resnet18"


def test_a_store_failing_after_the_evaluation_keeps_the_result(tmp_path, capsys, monkeypatch):
    """The tracking store fails only when the result is logged (here: its folder is a file): the
    JSON result is written all the same and the exit status is 1, with the reason in one line."""
    root = generated_val(tmp_path / "gen", sizes=((64, 64),) * 2)
    path = weights_file(tmp_path / "w.pt")
    (tmp_path / "not-a-folder").write_text("")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'not-a-folder' / 'mlflow.db'}")
    out = tmp_path / "result.json"
    assert (
        evaluate.main(
            [
                "--weights",
                str(path),
                "--model",
                "resnet18",
                "--data",
                str(root),
                "data.crop=32",
                "data.workers=0",
                "run.device=cpu",
                "--out",
                str(out),
            ]
        )
        == 1
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: the result is in {out} but not in MLflow (")
    doc = json.loads(out.read_text())
    assert doc["mlflow_run_id"] is None and 0 <= doc["test_top1_err"] <= 100 and doc["images"] == 2


def test_weights_are_scored_with_the_normalisation_they_were_trained_with(cifar_tar, tmp_path):
    """A run trained with data.normalize=channel is evaluated with per-channel statistics although
    the CIFAR configs (and --model's defaults) say pixel_mean; data.normalize on the command line
    still overrides it, and that gives another error."""
    from reproduce import train

    overrides = tiny_overrides(cifar_tar, iterations=4, **{"run.dir": tmp_path / "run", "data.normalize": "channel"})
    assert train.main(["--config", str(REPO / "configs/cifar10/resnet20.yaml"), *overrides]) == 0
    base = [
        "--weights",
        str(tmp_path / "run"),
        "--data",
        str(cifar_tar),
        "data.workers=0",
        "data.val_split=40",
        "run.device=cpu",
    ]
    results = {}
    for name, extra in (
        ("model", ["--model", "resnet20"]),
        ("config", ["--config", str(REPO / "configs/cifar10/resnet20.yaml")]),
        ("given", ["--model", "resnet20", "data.normalize=pixel_mean"]),
    ):
        out = tmp_path / f"{name}.json"
        assert evaluate.main([*base, *extra, "--out", str(out)]) == 0
        doc = json.loads(out.read_text())
        results[name] = (mlflow.get_run(doc["mlflow_run_id"]).data.params["data.normalize"], doc["test_loss"])
    assert results["model"][0] == results["config"][0] == "channel" and results["given"][0] == "pixel_mean"
    assert results["model"][1] == pytest.approx(results["config"][1]) and results["given"][1] != pytest.approx(
        results["model"][1]
    )


def test_public_cifar_checkpoint_on_exact_test_pixels(tmp_path):
    subset = shared_file("cifar10-exact-subset.npz")
    files = sorted((SHARED_DATA / "pretrained").glob("cifar-resnet20-*.th")) or [
        shared_file("pretrained/cifar-resnet20-*.th")
    ]
    result = _evaluate("--weights", str(files[0]), "--model", "resnet20", "--data", str(subset), "eval.max_images=300")
    assert result["images"] == 300 and result["weights_format"] == "public-cifar"
    # best_prec1 is its accuracy on all 10,000 test images; 300 of them agree within sampling noise
    assert abs(result["test_top1_err"] - (100 - result["weights_extra"]["best_prec1"])) < 5
    # `reproduce report` lists it beside the paper's Table 6 number, not in the trained table
    from reproduce.report.runs import load_mlflow_runs, select_runs
    from reproduce.report.tables import build_table, evaluation_table, load_paper, markdown, provenance

    runs = load_mlflow_runs("cifar10", "cifar10")
    selection = select_runs(runs, "cifar10")
    assert not selection.main and [r["run_id"] for r in selection.evaluations] == [result["mlflow_run_id"]]
    row = evaluation_table(selection.evaluations, "cifar10", load_paper()).iloc[0]
    assert (row.model, row.shortcut, row.protocol, row.reference) == ("resnet20", "A", "single", 8.75)
    assert row.ours == pytest.approx(result["test_top1_err"]) and row.images == 300
    paper = load_paper()
    text = markdown(
        "cifar10",
        build_table([], "cifar10", paper),
        build_table([], "cifar10", paper),
        selection,
        provenance(runs, selection),
        [],
        "reproduce report --study cifar10",
        "test",
        paper,
    )
    assert f"| {files[0].name} (public-cifar) | ResNet-20 A | single | test_top1_err | 8.75 | Table 6 | " in text
    edited = paper.copy()  # `reproduce report --paper FILE`: its numbers, in this section too
    edited.loc[(edited.model == "resnet20") & (edited.metric == "top1_err"), "value"] = 9.99
    from reproduce.report.command import write_report

    write_report(runs, "cifar10", tmp_path, edited, "reproduce report --study cifar10 --paper edited.csv", "test")
    text = (tmp_path / "table.md").read_text()
    assert f"| {files[0].name} (public-cifar) | ResNet-20 A | single | test_top1_err | 9.99 | Table 6 | " in text


@pytest.mark.slow
def test_two_processes_count_the_same_as_one(tmp_path):
    subset = shared_file("cifar10-exact-subset.npz")
    files = sorted((SHARED_DATA / "pretrained").glob("cifar-resnet20-*.th")) or [
        shared_file("pretrained/cifar-resnet20-*.th")
    ]
    common = [
        "--weights",
        str(files[0]),
        "--model",
        "resnet20",
        "--data",
        str(subset),
        "eval.max_images=201",
        "eval.batch_size=32",
        "data.workers=0",
        "run.device=cpu",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    one = _evaluate(*common[:-2])
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "reproduce.evaluate",
            *common,
            "--out",
            str(tmp_path / "two.json"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr[-2000:]
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1
    for key in ("images", "test_top1_err", "test_top5_err"):
        assert two[key] == one[key], key
    assert two["test_loss"] == pytest.approx(one["test_loss"], rel=1e-6)


# ---------------------------------------------------------------------------- reading the weights (issues 29, 30)
def suite_run(run_dir: Path, data: Path, iterations=(5,)) -> list[Path]:
    """A run directory of the suite's checkpoints of resnet18 (2 classes), as training writes them."""
    from reproduce import checkpoint
    from reproduce.config import load_config

    cfg = load_config(REPO / "configs" / "imagenet" / "resnet18.yaml", [f"data.path={data}"])
    paths = []
    for iteration in iterations:
        torch.manual_seed(iteration)
        state = {
            "model": build_model("resnet18", num_classes=2).state_dict(),
            "iteration": iteration,
            "config": cfg.model_dump(mode="json"),
            "architecture": checkpoint.architecture(cfg.model),
            "mlflow_run_id": None,
        }
        paths.append(checkpoint.save(run_dir, iteration, state, keep=len(iterations)))
    return paths


def folder_state(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_checkpoint_is_read_hashed_and_loaded_once(tmp_path, monkeypatch):
    """`reproduce evaluate` of a run directory or a checkpoint, with or without --model, reads the
    checkpoint file once, hashes it once and loads it once (it was 5 hashes and 2 loads)."""
    import hashlib
    import io

    root = generated_val(tmp_path / "gen", sizes=((64, 64),) * 2)
    (path,) = suite_run(tmp_path / "run", root)
    blob = path.read_bytes()
    counts = {"read": 0, "sha256": 0, "torch.load": 0}
    read_bytes, sha256, load = Path.read_bytes, hashlib.sha256, torch.load

    def counting_read_bytes(self):
        counts["read"] += Path(self).absolute() == path.absolute()
        return read_bytes(self)

    def counting_sha256(data=b"", **kwargs):
        counts["sha256"] += len(data) == len(blob) and bytes(data) == blob
        return sha256(data, **kwargs)

    def counting_load(f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)):
            counts["torch.load"] += Path(f).absolute() == path.absolute()
        elif isinstance(f, io.BytesIO):
            counts["torch.load"] += f.getvalue() == blob
        return load(f, *args, **kwargs)

    monkeypatch.setattr(Path, "read_bytes", counting_read_bytes)
    monkeypatch.setattr(hashlib, "sha256", counting_sha256)
    monkeypatch.setattr(torch, "load", counting_load)
    base = ["--data", str(root), "data.crop=32", "data.workers=0", "run.device=cpu"]
    for weights, model in ((tmp_path / "run", []), (tmp_path / "run", ["--model", "resnet18"]), (path, [])):
        for key in counts:
            counts[key] = 0
        out = tmp_path / "result.json"
        assert evaluate.main(["--weights", str(weights), *model, *base, "--out", str(out)]) == 0
        assert counts == {"read": 1, "sha256": 1, "torch.load": 1}, (weights, model)
        doc = json.loads(read_bytes(out))
        assert doc["weights_sha256"] == sha256(blob).hexdigest() and doc["weights"] == str(path)


def test_evaluating_a_run_directory_never_changes_it(tmp_path, caplog):
    """A damaged newest checkpoint is named in a warning and the previous intact one is evaluated;
    nothing in the folder is renamed (it was set aside as *.corrupt). With none intact: refused."""
    root = generated_val(tmp_path / "gen", sizes=((64, 64),) * 2)
    older, newest = suite_run(tmp_path / "run", root, iterations=(5, 6))
    blob = bytearray(newest.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    newest.write_bytes(bytes(blob))
    before = folder_state(tmp_path / "run")
    base = ["--weights", str(tmp_path / "run"), "--data", str(root), "data.crop=32", "data.workers=0", "run.device=cpu"]
    out = tmp_path / "result.json"
    assert evaluate.main([*base, "--out", str(out)]) == 0
    assert json.loads(out.read_text())["weights"] == str(older)
    assert f"checkpoint {newest} is damaged" in caplog.text
    assert folder_state(tmp_path / "run") == before
    older.write_bytes(older.read_bytes()[:1000])  # truncated: nothing intact is left
    before = folder_state(tmp_path / "run")
    assert evaluate.main([*base, "--model", "resnet18", "--out", str(out)]) == 2
    assert evaluate.main([*base, "--out", str(out)]) == 2
    assert folder_state(tmp_path / "run") == before


def test_an_empty_weights_file_is_refused_in_one_line(tmp_path, capsys):
    root = generated_val(tmp_path / "gen", sizes=((64, 64),) * 2)
    (tmp_path / "empty.pt").write_bytes(b"")
    base = ["--weights", str(tmp_path / "empty.pt"), "--data", str(root), "data.crop=32", "run.device=cpu"]
    for model in ([], ["--model", "resnet18"]):  # read to name the network, or read to evaluate it
        assert evaluate.main([*base, *model]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and err == f"error: {tmp_path / 'empty.pt'} is empty (0 bytes); give a weights file"


def test_an_out_that_cannot_be_written_is_refused_before_anything_is_logged(tmp_path, capsys):
    """--out names that pass for writable but are not (a file name too long for the temporary file
    the atomic write makes, a folder that is a link to nothing) are refused in one line, exit
    status 2, before the evaluation and before any MLflow run (the run was logged, then a crash)."""
    root = generated_val(tmp_path / "gen", sizes=((64, 64),) * 2)
    path = weights_file(tmp_path / "w.pt")
    (tmp_path / "nowhere").symlink_to(tmp_path / "missing-folder")
    base = ["--weights", str(path), "--data", str(root), "data.crop=32", "data.workers=0", "run.device=cpu"]
    for out in (tmp_path / ("x" * 250 + ".json"), tmp_path / "nowhere" / "result.json"):
        assert evaluate.main([*base, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and err.startswith(f"error: --out {out} cannot be written (")
    assert not mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no probe left behind
    assert not (tmp_path / "missing-folder").exists()
