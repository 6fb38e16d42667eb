"""Every shipped config validates; broken ones are refused in one line with exit status 2."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from reproduce import cli
from reproduce.config import ConfigError, load_config
from tests.conftest import REPO, run_cli

CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))
CIFAR = REPO / "configs" / "cifar10" / "resnet20.yaml"


def test_there_is_a_config_per_paper_experiment():
    names = {p.relative_to(REPO / "configs").as_posix() for p in CONFIGS}
    expected = {f"cifar10/{k}{d}.yaml" for k in ("plain", "resnet") for d in (20, 32, 44, 56, 110)} | {
        "cifar10/resnet1202.yaml"
    }
    expected |= {
        f"imagenet/{m}.yaml"
        for m in ("plain18", "plain34", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
    }
    assert expected <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.relative_to(REPO / "configs").as_posix())
def test_shipped_config_validates(path, tmp_path):
    overrides = [f"data.path={tmp_path}"] if "imagenet" in path.parts or "transfer" in path.parts else []
    cfg = load_config(path, overrides)
    if "transfer" in path.parts:  # fine-tuning recipes on an image folder, not paper experiments
        assert cfg.data.dataset == "folder" and cfg.model.name in path.stem
        return
    assert cfg.model.name == path.stem
    assert cfg.optim.momentum == 0.9 and cfg.optim.weight_decay == 1e-4 and cfg.optim.lr == 0.1
    if cfg.data.dataset == "cifar10":  # paper §4.2
        assert (cfg.optim.batch_size, cfg.schedule.iterations, cfg.schedule.milestones) == (128, 64000, (32000, 48000))
        assert cfg.data.val_split == 5000 and cfg.eval.protocol.value == "single"
        assert cfg.eval.target_top1_err == (20, 10)
        assert (cfg.schedule.warmup_lr, cfg.schedule.warmup_iterations) == (
            (0.01, 400) if cfg.model.name.endswith(("110", "1202")) else (None, 0)
        )
    else:  # paper §3.4
        assert (cfg.optim.batch_size, cfg.schedule.iterations, cfg.data.scale) == (256, 600000, (256, 480))
        assert cfg.eval.protocol.value == "tencrop"
        assert cfg.eval.target_top1_err == (24.1,)  # 75.9% top-1 accuracy


def test_imagenet_config_needs_a_data_path():
    with pytest.raises(ConfigError, match="data.path is required"):
        load_config(REPO / "configs" / "imagenet" / "resnet50.yaml")


def test_override_goes_through_the_same_checks():
    cfg = load_config(
        CIFAR, ["optim.lr=0.05", "schedule.milestones=[10,20]", "schedule.iterations=30", "model.shortcut=B"]
    )
    assert cfg.optim.lr == 0.05 and cfg.schedule.milestones == (10, 20) and cfg.model.shortcut.value == "B"


def test_batch_must_split_over_processes():
    assert load_config(CIFAR, world_size=8).optim.batch_size == 128
    with pytest.raises(
        ConfigError, match=r"optim.batch_size = 128: not divisible by the 3 processes; nearest valid is 129"
    ):
        load_config(CIFAR, world_size=3)


def test_recipe_hash_ignores_seed_and_housekeeping_only():
    base = load_config(CIFAR)
    assert load_config(CIFAR, ["seed=3", "run.log_every=7", "data.workers=1"]).recipe_hash() == base.recipe_hash()
    assert load_config(CIFAR, ["eval.target_top1_err=[30]"]).recipe_hash() == base.recipe_hash()
    assert load_config(CIFAR, ["optim.lr=0.2"]).recipe_hash() != base.recipe_hash()
    assert load_config(CIFAR, ["seed=3"]).run_dir() != base.run_dir()


# (override or file edit, fragment the one-line message must contain)
BROKEN = [
    (["optim.lr=-0.1"], "optim.lr = -0.1: Input should be greater than 0"),
    (["optim.lr=fast"], "optim.lr = 'fast'"),
    (["optim.momentum=1.5"], "optim.momentum = 1.5"),
    (["optim.weight_decay=-1"], "optim.weight_decay = -1"),
    (["optim.batch_size=0"], "optim.batch_size = 0"),
    (["optim.batch_size=12.5"], "optim.batch_size = 12.5"),
    (["optim.learning_rate=0.1"], "unknown key 'optim.learning_rate'"),
    (["optim.lrr=0.1"], "did you mean 'optim.lr'"),
    (["optimizer.lr=0.1"], "did you mean 'optim'"),
    (["model.name=resnte20"], "closest valid is 'resnet20'"),
    (["model.name=ResNet56"], "unknown model 'ResNet56'"),
    (["model.shortcut=D"], "model.shortcut = 'D'"),
    (["model.name=plain20", "model.shortcut=A"], "plain"),
    (["model.name=resnet50"], "model: resnet50 has bottleneck blocks"),
    (
        ["model.name=resnet50", "model.shortcut=B"],
        "config error: model resnet50 is a network for imagenet but data.dataset is cifar10; use imagenet",
    ),
    (["model.variant=v1.5"], "v1.5"),
    (["schedule.iterations=0"], "schedule.iterations = 0"),
    (["eval.target_top1_err=[20,20]"], "give distinct errors in % between 0 and 100, got [20.0, 20.0]"),
    (["eval.target_top1_err=[0]"], "eval.target_top1_err = [0]"),
    (["eval.target_top1_err=20"], "eval.target_top1_err = 20"),
    (["schedule.milestones=[48000,32000]"], "strictly increasing"),
    (["schedule.milestones=[32000,70000]"], "is not below schedule.iterations=64000"),
    (["schedule.gamma=2"], "schedule.gamma = 2"),
    (["schedule.warmup_iterations=100"], "warmup_lr is null"),
    (["eval.protocol=tencrop"], "does not apply to cifar10"),
    (["eval.protocol=centre224"], "closest valid is 'center224'"),
    (["eval.every=-5"], "eval.every = -5"),
    (["data.dataset=cifar100"], "data.dataset = 'cifar100'"),
    (["data.path=/no/such/place"], "no such file or folder"),
    (["data.workers=-1"], "data.workers = -1"),
    (["data.scale=[480,256]"], "need 0 < lo <= hi"),
    (["data.loader=dali"], "data.loader = 'dali'"),
    (["run.device=tpu"], "run.device = 'tpu'"),
    (["run.amp=maybe"], "run.amp = 'maybe'"),
    (["run.compile=true", "run.compile_mode=reduce_overhead"], "closest valid is 'reduce-overhead'"),
    (["run.compile_mode=reduce-overhead"], "has no effect while run.compile is false; set run.compile=true"),
    (["seed=-1"], "seed = -1"),
    (["experiment="], "experiment"),
    (["=0.1"], "is not key=value"),
]


@pytest.mark.parametrize("overrides,fragment", BROKEN, ids=[" ".join(o) for o, _ in BROKEN])
def test_broken_override_is_refused_in_one_line(overrides, fragment, capsys):
    assert cli.main(["check", str(CIFAR), *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def _edited(tmp_path: Path, edit) -> Path:
    raw = yaml.safe_load(CIFAR.read_text())
    edit(raw)
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


BROKEN_FILES = [
    (lambda r: r.pop("optim"), "optim is missing"),
    (lambda r: r["optim"].pop("lr"), "optim.lr is missing"),
    (lambda r: r.update(extra_section={"a": 1}), "unknown key 'extra_section'"),
    (lambda r: r["data"].update(augmentation=True), "did you mean 'data.augment'"),
    (lambda r: r.update(model="resnet20"), "model = 'resnet20'"),
]


@pytest.mark.parametrize("edit,fragment", BROKEN_FILES, ids=[f for _, f in BROKEN_FILES])
def test_broken_file_is_refused_in_one_line(edit, fragment, tmp_path, capsys):
    assert cli.main(["check", str(_edited(tmp_path, edit))]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1, err


def test_unreadable_files_are_refused(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    for name, fragment in (
        ("bad.yaml", "is not valid YAML"),
        ("list.yaml", "must hold a mapping"),
        ("none.yaml", "not found"),
    ):
        assert cli.main(["check", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err.strip()
        assert fragment in err and len(err.splitlines()) == 1, err


def test_train_refuses_bad_config_with_exit_2_and_no_traceback():
    """The real command in a fresh process: nothing starts, one line, status 2."""
    result = run_cli("train", "--config", str(CIFAR), "optim.lr=-1")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == "error: config error: optim.lr = -1: Input should be greater than 0"
    assert not Path("mlflow.db").exists() and not Path("runs").exists()


def test_check_reads_the_machines_cifar10_copy_where_a_run_would(cifar_tar, monkeypatch, capsys):
    """data.path null: a run reads $REPRODUCE_CIFAR10 where it is set, so `check` checks that data
    too (instead of saying it would be downloaded), and refuses what train would refuse."""
    monkeypatch.delenv("REPRODUCE_CIFAR10", raising=False)
    assert cli.main(["check", str(CIFAR)]) == 0
    assert "is downloaded when training starts" in capsys.readouterr().out
    monkeypatch.setenv("REPRODUCE_CIFAR10", str(cifar_tar))
    assert cli.main(["check", str(CIFAR), "data.val_split=40"]) == 0
    assert capsys.readouterr().out.strip() == f"ok    {CIFAR}"
    assert cli.main(["check", str(CIFAR)]) == 2  # the config's 5k validation split out of the tiny set's 240 images
    assert "leaves no training images" in capsys.readouterr().err
