"""Deployable networks (reproduce/weights/export.py, `reproduce evaluate --numerics/--save`): the
exported and the int8 network agree with the eager one on real CIFAR-10 test images (the exact
pixels of ../shared/data), an exported file is scored by `reproduce evaluate` as it is, and a damaged
one is refused in one line.

Tolerances, on the public ResNet-20's logits (their spread over the test images is about 5):
  exported fp32 program: max |difference| <= 1e-4 (the same fp32 operators, reordered at most);
  int8 (PT2E, x86 backend, 256 calibration images): the same prediction on >= 95% of the images and
  mean |difference| <= 0.3 (int8 activations move logits by a few tenths).
"""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from reproduce import evaluate
from reproduce.weights import load_weights
from reproduce.weights.export import (
    export_program,
    in_numerics,
    load_program,
    quantize_int8,
    read_program,
    save_program,
)
from tests.conftest import run_cli, shared_file

TORCHAO = "torchao is not installed (pip install -e '.[deploy]')"


@pytest.fixture(scope="module")
def real():
    """(public ResNet-20 in eval mode, 256 real test images, its config, weights path, data path)."""
    weights_path = next(iter(sorted(shared_file("pretrained").glob("cifar-resnet20-*.th"))), None)
    if weights_path is None:
        pytest.skip("../shared/data/pretrained/cifar-resnet20-*.th is absent (real data lives in ../shared/data)")
    data = shared_file("cifar10-exact-subset.npz")
    weights = load_weights(weights_path, "resnet20")
    spec = argparse.Namespace(model="resnet20", config=None, protocol=None, data=str(data), overrides=[])
    cfg = evaluate.with_weights(evaluate.eval_config(spec), weights)
    split = evaluate.test_split(cfg)[0]
    images = torch.stack([split[i][0] for i in range(256)])
    return weights.build().eval(), images, cfg, weights_path, data


def logits(model, images):
    with torch.no_grad():
        return model(images).float()


def test_exported_program_matches_eager_after_a_file_round_trip(real, tmp_path):
    model, images, *_ = real
    meta = {"architecture": {"name": "resnet20", "shortcut": "A", "variant": "v1"}, "num_classes": 10}
    path = save_program(export_program(model, images[:2]), tmp_path / "r20.pt2", meta)
    loaded, stored = load_program(path)
    assert stored == meta
    assert (logits(loaded, images) - logits(model, images)).abs().max() <= 1e-4
    assert read_program(path).resolve().arch.name == "resnet20"


def test_int8_agrees_with_eager_and_survives_export(real, tmp_path):
    pytest.importorskip("torchao.quantization.pt2e", reason=TORCHAO)
    model, images, cfg, *_ = real
    batches = evaluate.calibration(cfg, 256)
    int8 = quantize_int8(model, batches, batches[0])
    eager, quantized = logits(model, images), logits(int8, images)
    agree = (eager.argmax(1) == quantized.argmax(1)).float().mean().item()
    assert agree >= 0.95, f"int8 predicts as fp32 on {agree:.1%} of the images"
    assert (eager - quantized).abs().mean() <= 0.3
    assert not torch.equal(eager, quantized)  # it is quantized: int8 rounding moves the logits
    path = save_program(export_program(int8, images[:2]), tmp_path / "int8.pt2", {"numerics": "int8"})
    assert torch.allclose(logits(load_program(path)[0], images), quantized, atol=1e-5)


@pytest.mark.parametrize("name", ["plain18", "resnet18", "resnet50"])  # basic and bottleneck blocks, plain and residual
def test_imagenet_networks_quantize_to_int8(name):
    """torchvision's blocks call one ReLU module several times, which X86InductorQuantizer refuses;
    relu_per_call's copy computes exactly what the network does, and it quantizes. Trained-like
    statistics (BN running stats from a few batches) so that the logits are not all alike."""
    pytest.importorskip("torchao.quantization.pt2e", reason=TORCHAO)
    from reproduce.models import build_model
    from reproduce.weights.export import relu_per_call

    torch.manual_seed(0)
    model = build_model(name, num_classes=10)
    images = torch.randn(16, 3, 64, 64)
    with torch.no_grad():
        model.train()(images)  # running BN statistics of this input
    model.eval()
    assert torch.equal(logits(relu_per_call(model), images), logits(model, images))
    int8 = quantize_int8(model, [images[:8], images[8:]], images[:2])
    eager, quantized = logits(model, images), logits(int8, images)
    assert not torch.equal(eager, quantized)
    assert torch.nn.functional.cosine_similarity(eager.flatten(), quantized.flatten(), dim=0) >= 0.98


def test_bf16_agrees_with_eager(real):
    model, images, *_ = real
    bf16 = in_numerics(load_weights(real[3], "resnet20").build(), "bf16", [], images[:2])
    agree = (logits(bf16, images).argmax(1) == logits(model, images).argmax(1)).float().mean().item()
    assert agree >= 0.95


@pytest.mark.slow
def test_evaluate_scores_the_exported_file_as_the_network(real, tmp_path):
    *_, weights_path, data = real
    common = ("--data", str(data), "eval.max_images=300")
    eager = run_cli(
        "evaluate", "--weights", str(weights_path), "--model", "resnet20", "--save", "r20.pt2",
        "--out", "eager.json", *common, cwd=tmp_path,
    )  # fmt: skip
    assert eager.returncode == 0, eager.stderr[-2000:]
    exported = run_cli("evaluate", "--weights", "r20.pt2", "--out", "exported.json", *common, cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr[-2000:]
    first, second = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("eager", "exported"))
    assert second["weights_format"] == "exported" and second["model"] == "resnet20"
    assert abs(first["test_top1_err"] - second["test_top1_err"]) < 1e-9
    p, n = first["test_top1_err"], first["images"]
    assert n == 300 and first["test_top1_err_std"] == pytest.approx((p * (100 - p) / n) ** 0.5)


@pytest.mark.parametrize("damage", ["truncated", "not-a-zip", "empty-archive"])
def test_a_damaged_export_file_is_refused_in_one_line(real, tmp_path, damage):
    model, images, *_ = real
    good = save_program(export_program(model, images[:2]), tmp_path / "good.pt2", {}).read_bytes()
    bad = tmp_path / "bad.pt2"
    if damage == "truncated":
        bad.write_bytes(good[: len(good) // 2])
    elif damage == "not-a-zip":
        bad.write_bytes(b"not a program\n" * 100)
    else:
        import zipfile

        zipfile.ZipFile(bad, "w").close()
    result = run_cli("evaluate", "--weights", str(bad), "--data", str(real[4]), cwd=tmp_path)
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    assert "bad.pt2" in lines[0] and "Traceback" not in result.stderr


def test_evaluate_refuses_bad_deployment_arguments(tmp_path):
    result = run_cli("evaluate", "--weights", "w.th", "--model", "resnet20", "--save", "x.onnx", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and ".pt2" in result.stderr
    result = run_cli("evaluate", "--weights", "w.th", "--numerics", "fp16", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
