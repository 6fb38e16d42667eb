"""The model registry against the paper: shapes, Table 6 parameter counts, Table 1
multiply-adds, shortcut options A/B/C, v1 vs v1.5, torchvision and public-checkpoint
compatibility, and the error messages for options that do not apply."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.models import resnet as tv

import reproduce.models as models
from reproduce.models import (
    MODELS,
    CifarResNet,
    Shortcut,
    Variant,
    ZeroPadShortcut,
    build_model,
    check_model_options,
    count_macs,
    count_parameters,
    format_model_table,
    model_names,
)
from tests.conftest import shared_file

PRETRAINED = Path(__file__).resolve().parents[2] / "shared" / "data" / "pretrained"


def build(name: str, *, meta: bool = False, **options) -> nn.Module:
    """A registry network; on the meta device when only shapes matter (counting is then cheap)."""
    with torch.device("meta" if meta else "cpu"):
        return build_model(name, **options)


def params(name: str, **options) -> int:
    return count_parameters(build(name, meta=True, **options))


def macs(name: str, size: int = 224, **options) -> int:
    return count_macs(build(name, meta=True, **options), size)


def block_channels(widths: tuple[int, ...], blocks: tuple[int, ...], stem: int) -> list[tuple[int, int]]:
    """(in, out) channels of every residual block, read off the paper's architecture tables."""
    pairs, prev = [], stem
    for width, count in zip(widths, blocks):
        for _ in range(count):
            pairs.append((prev, width))
            prev = width
    return pairs


def projection_params(pairs: list[tuple[int, int]]) -> int:
    """A 1x1 conv (no bias) + BN (weight, bias) per (in, out) pair."""
    return sum(i * o + 2 * o for i, o in pairs)


# --- every registered network runs forward and backward --------------------------------------


def _registry_params():
    for name in MODELS:
        marks = [pytest.mark.slow] if name == "resnet1202" else []  # ~3600 modules: seconds on 2 cores
        yield pytest.param(name, marks=marks, id=name)


@pytest.mark.parametrize("name", _registry_params())
def test_forward_backward(name):
    spec = MODELS[name]
    torch.manual_seed(0)
    model = build_model(name).train()
    size = 32 if spec.family == "cifar" else 64  # ImageNet nets are fully convolutional: 64x64 is enough
    out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, spec.num_classes)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without a gradient: {missing[:5]}"


def test_registry_entries():
    assert model_names() == list(MODELS)
    assert {n for n, s in MODELS.items() if s.family == "cifar"} == {
        *(f"resnet{d}" for d in (20, 32, 44, 56, 110, 1202)),
        *(f"plain{d}" for d in (20, 32, 44, 56, 110)),
    }
    assert {n for n, s in MODELS.items() if s.family == "imagenet"} == {
        "resnet18",
        "resnet34",
        "resnet50",
        "resnet101",
        "resnet152",
        "plain18",
        "plain34",
    }
    for name, spec in MODELS.items():
        assert (spec.input_size, spec.num_classes) == ((32, 10) if spec.family == "cifar" else (224, 1000))
        assert name.startswith("resnet") == spec.residual
        expected = None if not spec.residual else Shortcut.B if spec.depth in (50, 101, 152) else Shortcut.A
        assert spec.default_shortcut == expected, name


def test_num_classes_override():
    assert build_model("resnet20", num_classes=100)(torch.randn(1, 3, 32, 32)).shape == (1, 100)
    assert build("resnet18", meta=True, num_classes=10).fc.out_features == 10


# --- the paper's numbers ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, millions, digits",
    [
        ("resnet20", 0.27, 2),
        ("resnet32", 0.46, 2),
        ("resnet44", 0.66, 2),
        ("resnet56", 0.85, 2),
        ("resnet110", 1.7, 1),
        ("resnet1202", 19.4, 1),
    ],
)
def test_cifar_params_match_table6(name, millions, digits):
    assert round(params(name) / 1e6, digits) == millions


@pytest.mark.parametrize(
    "name, paper",
    [("resnet18", 1.8e9), ("resnet34", 3.6e9), ("resnet50", 3.8e9), ("resnet101", 7.6e9), ("resnet152", 11.3e9)],
)
def test_imagenet_macs_match_table1(name, paper):
    assert abs(macs(name) - paper) / paper < 0.03


@pytest.mark.parametrize("depth", [18, 34])
def test_plain_and_option_a_have_equal_cost(depth):
    # Option A is parameter-free, so plain and residual nets compare at equal cost (§4.1).
    assert params(f"plain{depth}") == params(f"resnet{depth}", shortcut="A")
    assert macs(f"plain{depth}") == macs(f"resnet{depth}", shortcut="A")


# --- shortcut options A / B / C (§3.3, Table 3) ------------------------------------------------


@pytest.mark.parametrize("depth", [20, 56])
def test_cifar_shortcut_options(depth):
    pairs = block_channels((16, 32, 64), ((depth - 2) // 6,) * 3, stem=16)
    plain, a = params(f"plain{depth}"), params(f"resnet{depth}", shortcut="A")
    assert a == plain
    assert params(f"resnet{depth}", shortcut="B") - a == projection_params([(i, o) for i, o in pairs if i != o])
    assert params(f"resnet{depth}", shortcut="C") - a == projection_params(pairs)


def test_cifar_option_b_extra_is_the_two_projections():
    assert params("resnet20", shortcut="B") - params("resnet20", shortcut="A") == 16 * 32 + 32 * 64 + 2 * (32 + 64)


def test_imagenet_shortcut_options():
    pairs = block_channels((64, 128, 256, 512), (3, 4, 6, 3), stem=64)  # resnet34, Table 1
    a = params("resnet34", shortcut="A")
    assert a == params("plain34")
    assert params("resnet34", shortcut="B") - a == projection_params([(i, o) for i, o in pairs if i != o])
    assert params("resnet34", shortcut="C") - a == projection_params(pairs)
    # resnet50: C adds a projection to every block that B leaves as identity (in == out).
    identity = [(c, c) for c, n in zip((256, 512, 1024, 2048), (3, 4, 6, 3)) for _ in range(n - 1)]
    assert params("resnet50", shortcut="C") - params("resnet50", shortcut="B") == projection_params(identity)


def test_zero_pad_shortcut_subsamples_and_pads_both_sides():
    x = torch.randn(2, 16, 8, 8)
    y = ZeroPadShortcut(16, 32, stride=2)(x)
    assert y.shape == (2, 32, 4, 4)
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2])  # planes//4 = 8 zero channels on each side
    assert not y[:, :8].any() and not y[:, 24:].any()
    assert ZeroPadShortcut(16, 16)(x) is x
    assert not list(ZeroPadShortcut(16, 32, 2).parameters())


def test_plain_nets_have_no_shortcut_modules_and_residual_nets_add():
    for name in ("plain20", "plain18"):
        model = build(name, meta=True)
        assert not any(isinstance(m, ZeroPadShortcut) for m in model.modules())
        assert not any("shortcut" in k or "downsample" in k for k in model.state_dict())
    # Same weights, with and without the identity: only the addition differs.
    torch.manual_seed(0)
    plain, res = build_model("plain20").eval(), build_model("resnet20").eval()
    res.load_state_dict(plain.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    assert not torch.allclose(plain(x), res(x))


def test_default_shortcuts_are_the_papers():
    assert isinstance(build("resnet18", meta=True).layer2[0].downsample, ZeroPadShortcut)
    assert isinstance(build("resnet50", meta=True).layer2[0].downsample[0], nn.Conv2d)
    assert isinstance(build("resnet20", meta=True).layer2[0].shortcut, ZeroPadShortcut)


def test_option_c_convs_are_he_initialised():
    torch.manual_seed(0)
    conv = build_model("resnet34", "C").layer3[1].downsample[0]  # added by us (torchvision has none there)
    expected_std = (2 / conv.out_channels) ** 0.5  # He init, fan_out of a 1x1 conv = out channels
    assert abs(conv.weight.std().item() / expected_std - 1) < 0.05


def test_cifar_layout_and_init():
    torch.manual_seed(0)
    model = build_model("resnet20", "B")
    keys = set(model.state_dict())
    assert {
        "conv1.weight",
        "bn1.running_mean",
        "layer3.2.bn2.weight",
        "linear.weight",
        "linear.bias",
        "layer2.0.shortcut.0.weight",
        "layer2.0.shortcut.1.running_var",
    } <= keys
    assert not any(k.startswith("layer1.") and "shortcut" in k for k in keys)  # B: projections only where shapes change
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d))
    assert not model.linear.bias.any()
    w = model.layer3[0].conv2.weight
    assert abs(w.std().item() / (2 / (64 * 9)) ** 0.5 - 1) < 0.05  # He normal, fan_out


# --- torchvision compatibility and bottleneck variants ------------------------------------------


@pytest.mark.parametrize(
    "name, variant, reference", [("resnet18", Variant.V1, tv.resnet18), ("resnet50", Variant.V1_5, tv.resnet50)]
)
def test_torchvision_weights_load_and_outputs_match(name, variant, reference):
    torch.manual_seed(0)
    ref = reference(weights=None).eval()
    ours = build_model(name, Shortcut.B, variant).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(ours(x), ref(x))  # same modules, same kernels: bit-identical


def test_v1_and_v1_5_differ_only_in_strides():
    v1, v15 = build("resnet50", meta=True), build("resnet50", meta=True, variant="v1.5")
    assert count_parameters(v1) == count_parameters(v15)
    assert list(v1.state_dict()) == list(v15.state_dict())
    assert (v1.layer2[0].conv1.stride, v1.layer2[0].conv2.stride) == ((2, 2), (1, 1))  # the paper's
    assert (v15.layer2[0].conv1.stride, v15.layer2[0].conv2.stride) == ((1, 1), (2, 2))  # torchvision's
    assert v1.layer1[0].conv1.stride == v1.layer1[0].conv2.stride == (1, 1)  # conv2_x does not downsample
    assert count_macs(v1, 224) < count_macs(v15, 224)


# --- public CIFAR checkpoints (../shared/data/pretrained) --------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("depth", [20, 32, 44, 56])
def test_public_cifar_checkpoint_loads_strictly_and_scores_as_published(depth):
    """The public weights fit our network key for key and shape for shape, and the network they
    make classifies real CIFAR-10 test images (the exact pixels of the first 1,017) about as well
    as the accuracy the checkpoint records for the whole test set: our layout (option A shortcuts,
    strides, the 3 stages) is theirs, not merely the same tensor names."""
    files = sorted(PRETRAINED.glob(f"cifar-resnet{depth}-*.th"))
    if not files:
        pytest.skip(f"no cifar-resnet{depth}-*.th in {PRETRAINED} (public checkpoints are optional)")
    subset = shared_file("cifar10-exact-subset.npz")
    # Tensors and a float only: the safe loader suffices. Saved from a GPU, hence map_location.
    checkpoint = torch.load(files[0], map_location="cpu", weights_only=True)
    state = {k.removeprefix("module."): v for k, v in checkpoint["state_dict"].items()}
    model = build_model(f"resnet{depth}").eval()
    model.load_state_dict(state, strict=True)
    arrays = np.load(subset)
    images = torch.from_numpy(arrays["test_batch_data_prefix"]).permute(0, 3, 1, 2).float().div(255)
    labels = torch.from_numpy(arrays["test_batch_labels"][: len(images)].astype(np.int64))
    # These checkpoints were trained on inputs normalised with ImageNet's channel mean and std.
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    with torch.no_grad():
        accuracy = 100.0 * (model((images - mean) / std).argmax(1) == labels).float().mean().item()
    assert abs(accuracy - float(checkpoint["best_prec1"])) < 3.0, (accuracy, checkpoint["best_prec1"])


# --- bad options ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("resnt20", {}, "unknown model 'resnt20'; did you mean 'resnet20'?"),
        ("resnet50", {"shortcut": "A"}, "bottleneck"),
        ("resnet152", {"shortcut": Shortcut.A}, "use B or C"),
        ("plain20", {"shortcut": "A"}, "plain network"),
        ("plain34", {"shortcut": "B"}, "plain network"),
        ("resnet18", {"variant": "v1.5"}, "v1.5"),
        ("resnet56", {"variant": Variant.V1_5}, "v1.5"),
        ("resnet20", {"shortcut": "D"}, "A, B, C"),
    ],
)
def test_bad_options_are_refused(name, options, message):
    with pytest.raises(ValueError, match=message.replace("?", r"\?")):
        check_model_options(name, **options)
    with pytest.raises(ValueError, match=message.replace("?", r"\?")):
        build_model(name, **options)


def test_good_options_pass_and_cifar_depth_is_checked():
    assert check_model_options("resnet50", "C", "v1.5").depth == 50
    assert check_model_options("plain20", None).residual is False
    with pytest.raises(ValueError, match="6n\\+2"):
        CifarResNet(21)


# --- the table printed by `reproduce models` -----------------------------------------------------


def test_model_table_small(monkeypatch):
    monkeypatch.setattr(models, "MODELS", {k: MODELS[k] for k in ("resnet20", "plain20", "resnet18")})
    rows = models.model_table()
    assert [r["name"] for r in rows] == ["resnet20", "plain20", "resnet18"]
    assert rows[0]["params"] == params("resnet20") and rows[2]["macs"] == macs("resnet18")
    text = models.format_model_table()
    assert "resnet18" in text and "plain20" in text and len(text.splitlines()) == 6


@pytest.mark.slow
def test_model_table_full():
    text = format_model_table()
    assert all(name in text for name in MODELS)
