"""reproduce/weights.py: every weights format to (state_dict, architecture), refusals in one line,
and the architecture check of the suite's checkpoints on resume (issue 14 item 3, issue 16 item 1)."""

from __future__ import annotations

import pytest
import torch
import torchvision

from reproduce import checkpoint
from reproduce.config import load_config
from reproduce.models import Shortcut, Variant, build_model
from reproduce.weights import Arch, WeightsError, load_weights
from tests.conftest import REPO, SHARED_DATA, shared_file, tiny_overrides


def _save(state: dict, path) -> str:
    torch.save(state, path)
    return str(path)


def _same_outputs(a: torch.nn.Module, b: torch.nn.Module, size: int = 64) -> bool:
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    return torch.allclose(a.eval()(x), b.eval()(x), atol=1e-5)


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------- torchvision-style files
def test_torchvision_resnet18_is_recognised_as_shortcut_b(tmp_path):
    tv = torchvision.models.resnet18(weights=None)
    weights = load_weights(_save(tv.state_dict(), tmp_path / "r18.pt"))
    assert weights.arch == Arch("resnet18", Shortcut.B, Variant.V1) and weights.num_classes == 1000
    assert weights.format == "state_dict" and len(weights.sha256) == 64
    assert _same_outputs(weights.build(), tv)


def test_torchvision_resnet18_refuses_option_a_or_another_depth(tmp_path):
    path = _save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "r18.pt")
    with pytest.raises(WeightsError) as err:
        load_weights(path, "resnet18", "A")
    assert "resnet18 (shortcut B, v1)" in _one_line(err) and "resnet18 (shortcut A, v1)" in str(err.value)
    with pytest.raises(WeightsError) as err:
        load_weights(path, "resnet34")
    assert "depth 18" in _one_line(err) and "resnet34" in str(err.value)


def test_a_bottleneck_file_needs_its_variant_stated(tmp_path):
    tv = torchvision.models.resnet50(weights=None)
    path = _save(tv.state_dict(), tmp_path / "r50.pt")
    with pytest.raises(WeightsError) as err:
        load_weights(path)
    assert "v1 from v1.5" in _one_line(err) and "model.variant" in str(err.value)
    v15 = load_weights(path, variant="v1.5")
    assert v15.arch == Arch("resnet50", Shortcut.B, Variant.V1_5)
    assert _same_outputs(v15.build(), tv)
    # The same tensors in the paper's v1 net load, but compute something else: why it must be stated.
    v1 = load_weights(path, variant="v1")
    assert v1.arch.variant == Variant.V1 and not _same_outputs(v1.build(), tv)


def test_projection_layout_is_read_from_the_tensors(tmp_path):
    c = load_weights(_save(build_model("resnet34", "C").state_dict(), tmp_path / "c.pt"))
    assert c.arch == Arch("resnet34", Shortcut.C)
    path = _save(build_model("resnet18", "A").state_dict(), tmp_path / "a.pt")  # no projections: A or plain
    with pytest.raises(WeightsError) as err:
        load_weights(path)
    assert "resnet18 or plain18" in _one_line(err)
    assert load_weights(path, "resnet18").arch == Arch("resnet18", Shortcut.A)
    assert load_weights(path, "plain18").arch == Arch("plain18", None)


def test_first_mismatching_tensor_is_named(tmp_path):
    state = torchvision.models.resnet18(weights=None).state_dict()
    state["layer2.1.conv2.weight"] = torch.zeros(128, 128, 1, 1)
    with pytest.raises(WeightsError) as err:
        load_weights(_save(state, tmp_path / "bad.pt")).build()
    assert _one_line(err).endswith(
        "tensor 'layer2.1.conv2.weight' is [128, 128, 1, 1] in the file but the model wants [128, 128, 3, 3]"
    )


def test_not_a_state_dict_is_refused(tmp_path):
    with pytest.raises(WeightsError) as err:
        load_weights(_save({"epoch": 3}, tmp_path / "x.pt"))
    assert "no state_dict" in _one_line(err)
    with pytest.raises(WeightsError) as err:
        load_weights(tmp_path / "missing.pt")
    assert "not found" in _one_line(err)


# ---------------------------------------------------------------------------- torchvision's named weights
def test_named_torchvision_weights_come_from_the_hub_cache_only(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(WeightsError) as err:
        load_weights("torchvision:resnet50.IMAGENET1K_V1")
    message = _one_line(err)
    assert str(tmp_path / "hub" / "checkpoints" / "resnet50-0676ba61.pth") in message and "https://" in message
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    tv = torchvision.models.resnet50(weights=None)
    torch.save(tv.state_dict(), tmp_path / "hub" / "checkpoints" / "resnet50-0676ba61.pth")
    weights = load_weights("torchvision:resnet50.IMAGENET1K_V1")  # torchvision's layout: v1.5, no need to say it
    assert weights.arch == Arch("resnet50", Shortcut.B, Variant.V1_5) and weights.format == "torchvision-named"
    assert _same_outputs(weights.build(), tv)
    with pytest.raises(WeightsError) as err:
        load_weights("torchvision:resnet50.IMAGENET1K_V1", "resnet50", variant="v1")
    assert "resnet50 (shortcut B, v1.5)" in _one_line(err) and "resnet50 (shortcut B, v1) was asked" in str(err.value)
    with pytest.raises(WeightsError) as err:
        load_weights("torchvision:resnet50.IMAGENET1K_V7")
    assert "IMAGENET1K_V2" in _one_line(err)


# ---------------------------------------------------------------------------- the public CIFAR checkpoints
@pytest.mark.parametrize("depth", [20, 56])
def test_public_cifar_checkpoints(depth):
    files = sorted((SHARED_DATA / "pretrained").glob(f"cifar-resnet{depth}-*.th"))
    path = files[0] if files else shared_file(f"pretrained/cifar-resnet{depth}-*.th")
    weights = load_weights(path)
    assert weights.arch == Arch(f"resnet{depth}", Shortcut.A) and weights.format == "public-cifar"
    assert 90 < weights.extra["best_prec1"] < 95
    model = weights.build()
    raw = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    assert torch.equal(model.linear.weight, raw["module.linear.weight"])
    with pytest.raises(WeightsError) as err:
        load_weights(path, f"plain{depth}")
    assert "plain net" in _one_line(err)


# ---------------------------------------------------------------------------- the suite's checkpoints
def _suite_checkpoint(run_dir, name="resnet20", shortcut=None):
    cfg = load_config(
        REPO / "configs" / "cifar10" / "resnet20.yaml",
        [f"model.name={name}"] + ([f"model.shortcut={shortcut}"] if shortcut else []),
    )
    model = build_model(name, shortcut)
    state = {
        "model": model.state_dict(),
        "iteration": 5,
        "config": cfg.model_dump(mode="json"),
        "architecture": checkpoint.architecture(cfg.model),
        "mlflow_run_id": None,
    }
    return checkpoint.save(run_dir, 5, state, keep=2), model


def test_suite_checkpoint_from_run_dir_or_file(tmp_path):
    path, model = _suite_checkpoint(tmp_path / "run", "resnet32", "B")
    for source in (tmp_path / "run", path):
        weights = load_weights(source)
        assert weights.arch == Arch("resnet32", Shortcut.B) and weights.format == "checkpoint"
        assert _same_outputs(weights.build(), model, size=32)
    with pytest.raises(WeightsError) as err:
        load_weights(path, "resnet32", "A")
    assert "resnet32 (shortcut B, v1)" in _one_line(err) and "resnet32 (shortcut A, v1)" in str(err.value)


def test_damaged_suite_checkpoint_is_refused(tmp_path):
    path, _ = _suite_checkpoint(tmp_path / "run")
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(WeightsError) as err:
        load_weights(path)
    assert "does not match" in _one_line(err)
    with pytest.raises(WeightsError) as err:
        load_weights(tmp_path / "run")  # nothing intact is left
    assert "without an intact" in _one_line(err)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        path.name,
        path.name + ".sha256",
    ]  # nothing set aside


def test_the_stored_architecture_is_arch_as_a_dict():
    """checkpoint.architecture (what a checkpoint stores; an MLflow model's metadata has the same
    form) is Arch.of's as_dict, and Arch.from_dict reads it back, for every network and option."""
    from reproduce.config import ModelConfig
    from reproduce.models import MODELS

    for name, spec in MODELS.items():
        shortcuts = [None] + (
            [s for s in Shortcut if not (spec.bottleneck and s == Shortcut.A)] if spec.residual else []
        )
        for shortcut in shortcuts:
            for variant in [Variant.V1] + ([Variant.V1_5] if spec.bottleneck else []):
                stored = checkpoint.architecture(ModelConfig(name=name, shortcut=shortcut, variant=variant))
                resolved = shortcut or spec.default_shortcut
                assert stored == {
                    "name": name,
                    "shortcut": resolved.value if resolved else None,
                    "variant": variant.value,
                }
                assert Arch.from_dict(stored) == Arch.of(name, shortcut, variant)


def test_resume_refuses_a_checkpoint_of_another_architecture(cifar_tar, tmp_path, capsys):
    from reproduce import train

    config = str(REPO / "configs" / "cifar10" / "resnet20.yaml")
    overrides = tiny_overrides(cifar_tar, iterations=2, **{"run.dir": tmp_path / "run"})
    assert train.main(["--config", config, *overrides]) == 0
    state = torch.load(checkpoint.list_checkpoints(tmp_path / "run")[-1], weights_only=True)
    assert state["architecture"] == {"name": "resnet20", "shortcut": "A", "variant": "v1"}
    capsys.readouterr()
    assert train.main(["--config", config, *overrides, "schedule.iterations=4", "model.shortcut=B"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "resnet20 (shortcut A, v1)" in err and "resnet20 (shortcut B, v1)" in err
