"""Transfer (issue 16 item 5): model.init, optim.pretrained_lr_scale and data.dataset=folder."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from reproduce import checkpoint, train
from reproduce.config import ConfigError, load_config
from reproduce.models import build_model
from tests.conftest import REPO

CONFIG = str(REPO / "configs" / "transfer" / "imagenette32-resnet56.yaml")


def folder_tree(root, classes: int = 3, train_per_class: int = 8, val_per_class: int = 2):
    rng = np.random.default_rng(0)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            (root / split / f"k{c}").mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = np.clip(np.array([80 * c, 200 - 60 * c, 120]) + rng.normal(0, 30, (40, 48, 3)), 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(root / split / f"k{c}" / f"{i}.jpg")
    return root


def overrides(tmp_path, init, **extra) -> list[str]:
    values = {
        "model.name": "resnet20",
        "model.init": init,
        "data.path": folder_tree(tmp_path / "tree"),
        "data.workers": 0,
        "optim.batch_size": 8,
        "schedule.iterations": 2,
        "schedule.milestones": "[1]",
        "eval.every": 2,
        "eval.batch_size": 16,
        "run.checkpoint_every": 2,
        "run.log_every": 1,
        "run.deterministic": "true",
        "run.progress": "false",
        "run.device": "cpu",
        "run.dir": tmp_path / "run",
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def cifar_weights(path):
    torch.manual_seed(123)
    model = build_model("resnet20")
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}, "best_prec1": 91.0}, path)
    return model.state_dict()


def final_state(tmp_path) -> dict:
    return torch.load(checkpoint.list_checkpoints(tmp_path / "run")[-1], weights_only=True)["model"]


def test_frozen_transfer_keeps_the_given_weights_and_replaces_the_classifier(tmp_path, caplog):
    given = cifar_weights(tmp_path / "w.th")
    with caplog.at_level(logging.INFO, logger="reproduce.weights"):
        assert (
            train.main(
                ["--config", CONFIG, *overrides(tmp_path, tmp_path / "w.th", **{"optim.pretrained_lr_scale": 0})]
            )
            == 0
        )
    assert "classifier replaced (10 -> 3 classes)" in caplog.text
    state = final_state(tmp_path)
    assert state["linear.weight"].shape == (3, 64)
    for key in (
        "conv1.weight",
        "layer2.0.conv1.weight",
        "layer3.2.bn2.weight",
        "layer3.2.bn2.bias",
        "bn1.running_mean",
        "layer3.2.bn2.running_var",
    ):
        assert torch.equal(state[key], given[key]), key  # frozen: exactly the file's, batch-norm statistics too
    fresh = build_model("resnet20", num_classes=3)  # the run's new classifier was trained, not left as drawn
    assert not torch.equal(state["linear.bias"], fresh.linear.bias)


def test_fine_tuning_starts_from_the_given_weights(tmp_path):
    given = cifar_weights(tmp_path / "w.th")
    assert train.main(["--config", CONFIG, *overrides(tmp_path, tmp_path / "w.th", **{"optim.lr": 0.01})]) == 0
    state = final_state(tmp_path)
    key = "layer1.0.conv1.weight"
    moved = (state[key] - given[key]).norm()
    assert 0 < moved < 0.2 * given[key].norm()  # trained, but near the file's weights, not a fresh draw
    torch.manual_seed(0)
    assert (state[key] - build_model("resnet20").state_dict()[key]).norm() > given[key].norm()


def test_a_classifier_of_as_many_classes_is_kept_unless_told_otherwise(tmp_path, caplog, capsys):
    """Weights with a 3-class classifier, 3-class data: by default the file's classifier is taken
    (so freezing what the file gave leaves nothing to train: refused in one line);
    model.init_classifier=false starts a new one (trained, logged), the frozen layers exactly the file's."""
    torch.manual_seed(7)
    given = build_model("resnet20", num_classes=3).state_dict()
    torch.save(given, tmp_path / "w3.pt")
    frozen = {"optim.pretrained_lr_scale": 0}
    assert (
        train.main(["--config", CONFIG, *overrides(tmp_path / "all", tmp_path / "w3.pt", **frozen)]) == 2
    )  # nothing to train
    assert "freezes every layer" in capsys.readouterr().err
    assert (
        train.main(
            [
                "--config",
                CONFIG,
                *overrides(tmp_path / "keep", tmp_path / "w3.pt", **{"optim.pretrained_lr_scale": 0.1}),
            ]
        )
        == 0
    )
    kept, start = final_state(tmp_path / "keep"), build_model("resnet20", num_classes=3)  # start: a new draw
    # trained from the file's classifier: nearer to it than to a new one
    assert (kept["linear.weight"] - given["linear.weight"]).norm() < (
        kept["linear.weight"] - start.linear.weight
    ).norm()
    with caplog.at_level(logging.INFO, logger="reproduce.weights"):
        assert (
            train.main(
                [
                    "--config",
                    CONFIG,
                    *overrides(tmp_path / "new", tmp_path / "w3.pt", **frozen, **{"model.init_classifier": "false"}),
                ]
            )
            == 0
        )
    assert "classifier replaced (model.init_classifier=false)" in caplog.text
    fresh = final_state(tmp_path / "new")
    assert not torch.equal(fresh["linear.weight"], given["linear.weight"])
    assert torch.equal(fresh["layer3.2.conv2.weight"], given["layer3.2.conv2.weight"])
    with pytest.raises(ConfigError, match="model.init_classifier=false needs model.init"):
        load_config(
            CONFIG, [f"data.path={tmp_path / 'keep' / 'tree'}", "model.init=null", "model.init_classifier=false"]
        )


def test_init_of_another_architecture_is_refused_in_one_line(tmp_path, capsys):
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "r18.pt")
    argv = [
        "--config",
        CONFIG,
        *overrides(
            tmp_path,
            tmp_path / "r18.pt",
            **{"model.name": "resnet18", "data.crop": 32, "eval.protocol": "center224", "data.scale": "[36,40]"},
        ),
    ]
    assert train.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "resnet18 (shortcut B, v1)" in err and "resnet18 (shortcut A, v1)" in err
    assert "model.shortcut" in err
    assert train.main(argv + ["model.shortcut=B"]) == 0  # stated: torchvision's ResNet-18 weights, ImageNet-style input


def test_folder_dataset_config_is_checked():
    with pytest.raises(ConfigError, match="data.normalize=imagenet"):
        load_config(CONFIG, ["data.path=.", "data.normalize=pixel_mean"])
    with pytest.raises(ConfigError, match="pretrained_lr_scale"):
        load_config(CONFIG, ["data.path=.", "optim.pretrained_lr_scale=-1"])


def test_a_cifar_network_on_an_image_folder_gets_its_own_input_size():
    """Not the ImageNet default crop of 224 (49x the compute) unless data.crop says so."""
    folder = ["data.dataset=folder", "data.normalize=imagenet", "data.path=."]
    assert load_config(REPO / "configs" / "cifar10" / "resnet56.yaml", folder).data.crop == 32
    assert load_config(REPO / "configs" / "cifar10" / "resnet56.yaml", [*folder, "data.crop=64"]).data.crop == 64
    assert load_config(REPO / "configs" / "imagenet" / "resnet50.yaml", folder).data.crop == 224


def test_a_network_trained_on_an_image_folder_is_evaluated_as_its_run_tested_it(tmp_path, capsys):
    """A run fine-tuned on an image folder logs its test error (on val/) every eval.every iterations;
    `reproduce evaluate` of it scores val/ with the run's own test transform: the same error as the
    run's final test error. Without data.dataset=folder
    the folder is refused in one line that says to add it."""
    import json

    import mlflow

    from reproduce import evaluate

    cifar_weights(tmp_path / "w.th")
    assert (
        train.main(
            [
                "--config",
                CONFIG,
                *overrides(tmp_path, tmp_path / "w.th", **{"schedule.iterations": 4, "schedule.milestones": "[2]"}),
            ]
        )
        == 0
    )
    (run,) = mlflow.search_runs(experiment_names=["transfer"], output_format="list")
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "test_top1_err")
    assert [m.step for m in history] == [2, 4]  # every eval.every iterations (its val/ is the test split), then the end
    base = ["--weights", str(tmp_path / "run"), "--data", str(tmp_path / "tree"), "data.workers=0", "run.device=cpu"]
    capsys.readouterr()
    assert evaluate.main(base) == 2  # the name comes from the run, the data is taken for CIFAR-10
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "add data.dataset=folder" in err
    out = tmp_path / "eval.json"
    assert evaluate.main([*base, "data.dataset=folder", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["images"] == 6 and doc["test_top1_err"] == pytest.approx(run.data.metrics["test_top1_err"])
    assert doc["test_loss"] == pytest.approx(run.data.metrics["test_loss"], rel=1e-5)
