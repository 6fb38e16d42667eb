"""Fig. 7 layer responses: measured on a real tiny training run's checkpoint, checked against an
independent computation (hooks on the convs, BN applied by hand), logged, and drawn by the report."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
import torch
from torch import nn

from reproduce import checkpoint, report, train
from reproduce.config import Config
from reproduce.data import build_data
from reproduce.models import build_model
from reproduce.report import responses
from reproduce.report.figures import response_figure
from reproduce.report.runs import load_mlflow_runs, select_runs
from tests.conftest import REPO, tiny_overrides


def independent_stds(model: nn.Module, images: torch.Tensor) -> list[float]:
    """Each 3x3 conv paired with the next BatchNorm2d in registration order (true for plain
    nets); the conv output captured by name and normalised here with the BN's running stats."""
    modules = list(model.named_modules())
    pairs = [
        (name, next(m for _, m in modules[i + 1 :] if isinstance(m, nn.BatchNorm2d)))
        for i, (name, conv) in enumerate(modules)
        if isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3)
    ]
    captured, by_name = {}, dict(modules)
    handles = [
        by_name[name].register_forward_hook(lambda mod, inp, out, name=name: captured.__setitem__(name, out))
        for name, _ in pairs
    ]
    model.eval()
    with torch.no_grad():
        model(images)
    for handle in handles:
        handle.remove()
    stds = []
    for name, bn in pairs:
        p = {k: v.detach().double() for k, v in bn.state_dict().items()}  # running_mean/var, weight, bias
        shape = (1, -1, 1, 1)
        x = captured[name].double()
        y = (x - p["running_mean"].view(shape)) / (p["running_var"].view(shape) + bn.eps).sqrt()
        y = y * p["weight"].view(shape) + p["bias"].view(shape)
        per_channel = y.transpose(0, 1).reshape(y.shape[1], -1).std(dim=1, correction=0)
        stds.append(float(per_channel.mean()))
    return stds


def test_plain_net_responses_match_an_independent_computation(tmp_path, cifar_tar):
    assert train.main(["--config", str(REPO / "configs" / "cifar10" / "plain20.yaml"), *tiny_overrides(cifar_tar)]) == 0
    (run,) = mlflow.search_runs(experiment_names=["cifar10"], output_format="list")
    run_id = run.info.run_id
    assert responses.main(["responses", "--run", run_id, "--batch-size", "25"]) == 0  # several batches: sums merge

    client = mlflow.MlflowClient()
    logged = sorted(client.get_metric_history(run_id, "response_std"), key=lambda m: m.step)
    assert [m.step for m in logged] == list(range(1, 20))  # plain-20: 19 3x3 convs (the 20th layer is the fc)

    state = torch.load(checkpoint.list_checkpoints(Path(run.data.tags["reproduce.run_dir"]))[-1], weights_only=True)
    assert state["iteration"] == 6
    cfg = Config.model_validate(state["config"])
    data = build_data(cfg)
    images = torch.stack([data.test[i][0] for i in range(len(data.test))])  # all 60 test images of the tiny set
    model = build_model(cfg.model.name, cfg.model.shortcut, cfg.model.variant, num_classes=data.num_classes)
    model.load_state_dict(state["model"])
    expected = independent_stds(model, images)
    assert [m.value for m in logged] == pytest.approx(expected, rel=1e-5)
    assert len(set(expected)) > 1  # not a degenerate case

    doc = json.loads(mlflow.artifacts.load_text(f"runs:/{run_id}/layer_responses.json"))
    assert doc["images"] == 60 and doc["split"] == "test" and len(doc["layers"]) == 19
    assert doc["std"] == pytest.approx(expected, rel=1e-5) and doc["std_sorted"] == sorted(doc["std"], reverse=True)

    out = tmp_path / "report"
    assert report.main(["--study", "cifar10", "--out", str(out)]) == 0
    assert (out / "fig7.png").stat().st_size > 10_000 and "fig7.png" in (out / "table.md").read_text()
    fig = response_figure(select_runs(load_mlflow_runs("cifar10", "cifar10"), "cifar10").main)
    lines = {line.get_gid(): line for ax in fig.axes for line in ax.get_lines()}
    assert list(lines["plain-20|original"].get_ydata()) == [m.value for m in logged]
    assert list(lines["plain-20|sorted"].get_ydata()) == sorted((m.value for m in logged), reverse=True)


def test_only_bns_after_3x3_convs_count():
    """ImageNet ResNet-18 with projection shortcuts: the 7x7 stem and the 1x1 projections'
    BNs are not layers; the 16 3x3 convs are."""
    torch.manual_seed(0)
    model = build_model("resnet18", "B")
    stds = responses.layer_response_stds(model, [torch.randn(2, 3, 64, 64)])
    assert len(stds) == 16 and all(v > 0 for v in stds.values())


def test_unknown_run_is_a_clear_error(capsys):
    assert responses.main(["responses", "--run", "0" * 32]) == 2
    assert "error" in capsys.readouterr().err


def test_a_damaged_checkpoint_is_not_analysed(cifar_tar, capsys):
    """The newest checkpoint fails its sha256: the previous one is measured and the damaged one left
    as it is (an analysis reads the run directory, never changes it); with none intact left, a one-line error."""
    assert (
        train.main(["--config", str(REPO / "configs" / "cifar10" / "resnet20.yaml"), *tiny_overrides(cifar_tar)]) == 0
    )
    (run,) = mlflow.search_runs(experiment_names=["cifar10"], output_format="list")
    run_dir = Path(run.data.tags["reproduce.run_dir"])
    first, newest = checkpoint.list_checkpoints(run_dir)
    blob = bytearray(newest.read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # one flipped byte: torch.load might still read it
    newest.write_bytes(bytes(blob))
    capsys.readouterr()
    assert responses.main(["responses", "--run", run.info.run_id, "--images", "20"]) == 0
    captured = capsys.readouterr()
    assert f"({first.name}, 20 test images)" in captured.out
    assert "warning: the newest checkpoint is at iteration 3 of 6" in captured.err
    assert not newest.with_name(newest.name + ".corrupt").exists()
    assert checkpoint.list_checkpoints(run_dir) == [first, newest] and newest.read_bytes() == bytes(blob)

    first.with_name(first.name + ".sha256").unlink()
    assert responses.main(["responses", "--run", run.info.run_id]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"error: run {run.info.run_id} has no checkpoint (reproduce.run_dir = {str(run_dir)!r})"
