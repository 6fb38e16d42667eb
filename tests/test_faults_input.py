"""Bad input: mutated configs, damaged dataset archives and images.

Every test here injects one fault for real; its docstring's Fault / Injected / Suite / Lost lines
go into results/reliability.md (tools/reliability.py)."""

from __future__ import annotations

import gzip
import os
import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from reproduce import checkpoint, cli
from reproduce.config import Config
from tests.conftest import REPO, make_cifar_tree, tiny_overrides
from tests.faults import CIFAR

# --- 6. bad input -------------------------------------------------------------------------
# Bad values are drawn for every field of the schema (read from the pydantic models, so a new
# field is covered the day it is added), for the relations between fields, and for the YAML
# itself. Each bad config must be refused by `check` and by `train` with exit status 2, one
# line naming the key or file, no traceback, and nothing created (no run directory, no MLflow).


def _fields(model=Config, prefix=()):
    """(dotted path, pydantic FieldInfo) for every leaf of the schema."""
    for name, field in model.model_fields.items():
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            yield from _fields(sub, prefix + (name,))
        else:
            yield prefix + (name,), field


def _bounds(field) -> dict:
    out = {}
    for item in field.metadata:
        for attr in ("gt", "ge", "lt", "le", "min_length"):
            if getattr(item, attr, None) is not None:
                out[attr] = getattr(item, attr)
    return out


FIELDS = dict(_fields())
NOT_A_NUMBER = st.sampled_from([True, False, "ten", [1, 2], {"a": 1}, float("inf"), float("-inf"), float("nan")])


def bad_values(path: tuple, field):
    """Values no valid config holds at `path`: wrong types, booleans for numbers, non-finite and
    out-of-range numbers, unknown choices."""
    annotation, bounds = field.annotation, _bounds(field)
    text = str(annotation)
    if annotation is bool or bool in typing.get_args(annotation):  # bool, or bool | "auto"
        return st.sampled_from([2, -1, "maybe", 0.5, [True], {"on": 1}])
    if annotation in (int, float) or text in (
        "int | None",
        "float | None",
        "typing.Optional[int]",
        "typing.Optional[float]",
    ):
        below = []
        if "gt" in bounds:
            below += [bounds["gt"], bounds["gt"] - 1]
        if "ge" in bounds:
            below += [bounds["ge"] - 1, bounds["ge"] - 0.5]
        if "lt" in bounds:
            below += [bounds["lt"], bounds["lt"] + 1]
        if "le" in bounds:
            below += [bounds["le"] + 1]
        if "int" in text:
            below += [1.5]
        return NOT_A_NUMBER | st.sampled_from(below or [[]])
    if path == ("data", "path"):
        return st.sampled_from(["/nonexistent/cifar", 5, [1]])
    if path == ("run", "dir"):
        return st.sampled_from([5, [1], str(REPO / "README.md")])  # a file, not a folder
    if path == ("run", "register_model"):  # a free name: empty, not a string, or with characters outside [A-Za-z0-9._-]
        return st.sampled_from(["", 7, [1], True, "my model/v1", "-x"])
    if path == ("experiment",):
        return st.sampled_from(["", 5, [1], {"a": 1}])
    if path == ("data", "scale"):
        return st.sampled_from([[480, 256], [True, 480], "256-480", [-1, 10], [0, 5], [256, 384, 480], [256.5, 480]])
    if path == ("schedule", "milestones"):
        return st.sampled_from([[3, 3], [True], [-1, 3], [4, 3], "3,4", [0], [2.5]])
    # enums, literals and names: a close-but-wrong string, a number, a list
    return st.sampled_from(["no-such-choice", 7, [1], True])


CROSS_FIELD = [  # each valid on its own, impossible together
    {"schedule.milestones": [100, 10**9]},
    {"schedule.warmup_iterations": 5, "schedule.warmup_lr": None},
    {"run.compile_mode": "reduce-overhead", "run.compile": False},
    {"model.shortcut": "B", "model.name": "plain20"},
    {"data.dataset": "imagenet", "model.name": "resnet20"},
    {"data.loader": "gpu", "data.dataset": "imagenet"},
    {"eval.protocol": "tencrop"},
    {"optim.batch_size": 100_000},  # larger than the training split: a data reason, refused all the same
    {"data.val_split": 10**6},
]


def _base(cifar_tar: Path) -> dict:
    raw = yaml.safe_load(CIFAR.read_text())
    raw["data"].update(path=str(cifar_tar), val_split=40, workers=0)
    raw["optim"]["batch_size"] = 16
    raw["schedule"].update(iterations=6, milestones=[3])
    raw["run"].update(device="cpu", progress=False)
    return raw


@st.composite
def broken_configs(draw, cifar_tar: Path):
    """(YAML text, what was broken) for a small valid CIFAR config with one thing made invalid."""
    raw = _base(cifar_tar)
    kind = draw(st.sampled_from(["field", "field", "field", "cross", "unknown", "drop", "yaml"]))
    if kind == "field":
        path = draw(st.sampled_from(sorted(FIELDS)))
        _set(raw, path, draw(bad_values(path, FIELDS[path])))
        return yaml.safe_dump(raw), ".".join(path)
    if kind == "cross":
        change = draw(st.sampled_from(CROSS_FIELD))
        for key, value in change.items():
            _set(raw, tuple(key.split(".")), value)
        return yaml.safe_dump(raw), " ".join(change)
    if kind == "unknown":
        parent = draw(st.sampled_from([(), ("model",), ("data",), ("optim",), ("schedule",), ("eval",), ("run",)]))
        name = draw(st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12))
        node = _get(raw, parent)
        node[name + ("_x" if name in node else "")] = draw(st.integers() | st.text(max_size=5))
        return yaml.safe_dump(raw), "unknown key"
    if kind == "drop":
        required = [p for p, f in FIELDS.items() if f.is_required()] + [
            (s,) for s in Config.model_fields if s != "seed"
        ]
        path = draw(st.sampled_from(sorted(required)))
        _get(raw, path[:-1]).pop(path[-1])
        return yaml.safe_dump(raw), ".".join(path)
    text = yaml.safe_dump(raw)
    damage = draw(st.sampled_from(["duplicate", "binary", "list", "scalar", "tab", "unclosed", "empty"]))
    return {
        "duplicate": text + "experiment: again\n",
        "binary": b"\x89\xff\xfe\x00garbage".decode("latin-1") + text,
        "list": "- " + text.replace("\n", "\n  "),
        "scalar": "42\n",
        "tab": text.replace("  ", "\t", 1),
        "unclosed": text + "extra: [1, 2\n",
        "empty": "",
    }[damage], f"yaml {damage}"


def _named(what: str, path: Path) -> list[str]:
    """What the one line must name: the file for a YAML fault, else the key (its last part is
    enough where a section-level check words it in prose)."""
    if what.startswith("yaml"):
        return [str(path)]
    if what == "unknown key":
        return ["unknown key"]
    return [key.split(".")[-1] for key in what.split()]


def _get(tree, path):
    for part in path:
        tree = tree[part]
    return tree


def _set(tree, path, value):
    node = tree
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = value


def test_mutated_configs_are_refused_in_one_line(cifar_tar, tmp_path_factory, capsys):
    """Fault: a bad config: a wrong type, a boolean for a number, a non-finite or out-of-range value, an unknown choice, an impossible combination, a batch larger than the data, an unknown or missing key, a key given twice, a file that is binary, not a mapping, or not YAML.
    Injected: 300 configs drawn by hypothesis from the schema's own fields and bounds, one fault each.
    Suite: `reproduce check` and `reproduce train` both refuse each: exit status 2, one line naming the key or file, no traceback, no run directory and no MLflow store created.
    Lost: nothing; nothing starts."""

    @settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(broken_configs(cifar_tar))
    def refused(case):
        text, what = case
        folder = tmp_path_factory.mktemp("cfg")
        path = folder / "mutated.yaml"
        path.write_bytes(text.encode("latin-1") if what == "yaml binary" else text.encode())
        capsys.readouterr()
        assert cli.main(["check", str(path)]) == 2, (what, text)
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err and err.startswith("error "), (what, err)
        assert any(name in err for name in _named(what, path)), (what, err)
        os.chdir(folder)  # train must create nothing here: no runs/, no mlflow.db, no mlruns/
        code = cli.main(["train", "--config", str(path)])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, (what, err)
        assert sorted(p.name for p in folder.iterdir()) == ["mutated.yaml"], (what, list(folder.iterdir()))

    refused()


@pytest.mark.parametrize("damage", ["missing", "empty", "truncated", "not an archive"])
def test_bad_dataset_archive_is_refused_before_training(damage, cifar_tar, tmp_path, capsys):
    """Fault: the dataset archive is missing, empty, truncated or not an archive.
    Injected: data.path pointing at such a file.
    Suite: one line naming the file, exit status 2, before any MLflow run or checkpoint.
    Lost: nothing."""
    bad = tmp_path / "cifar.tar.gz"
    if damage == "empty":
        bad.write_bytes(b"")
    elif damage == "truncated":
        bad.write_bytes(cifar_tar.read_bytes()[: cifar_tar.stat().st_size // 2])
    elif damage == "not an archive":
        bad.write_bytes(gzip.compress(b"hello"))
    overrides = tiny_overrides(bad, 4, **{"run.dir": tmp_path / "run"})
    code = cli.main(["train", "--config", str(CIFAR), *overrides])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert str(bad) in err
    assert not Path("mlflow.db").exists() and not checkpoint.list_checkpoints(tmp_path / "run")


def test_undecodable_image_is_named(tmp_path, capsys):
    """Fault: one image in the dataset cannot be decoded.
    Injected: train/cat/0003.png overwritten with garbage in an image-folder tree.
    Suite: one line naming that file, exit status 2, before training.
    Lost: nothing."""
    tree = make_cifar_tree(tmp_path / "tree", train_per_class=4, test_per_class=1)
    (tree / "train" / "cat" / "0003.png").write_bytes(b"\x89PNG garbage")
    code = cli.main(["train", "--config", str(CIFAR), *tiny_overrides(tree, 4, **{"run.dir": tmp_path / "run"})])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "cannot decode image" in err and "train/cat/0003.png" in err and len(err.splitlines()) == 1, (
        err
    )


def test_prepare_refuses_an_out_that_is_a_file_and_a_negative_split(cifar_tree, tmp_path, capsys):
    """Fault: `reproduce prepare` given a file as --out, or a negative --val-split.
    Injected: --out naming an existing file; --val-split -100.
    Suite: one line each, exit status 2, before any .beton is written (before, a FileExistsError traceback, and a
    manifest recording val_split -100 with no validation file).
    Lost: nothing: the file given as --out is untouched."""
    from reproduce.data.ffcv import prepare

    taken = tmp_path / "notes.txt"
    taken.write_text("mine")
    assert prepare.main(["cifar10", "--source", str(cifar_tree), "--out", str(taken)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: --out {taken} is a file; give a folder for the .beton files (it is created if missing)"
    assert taken.read_text() == "mine"
    pytest.importorskip("ffcv", reason="the split is checked after FFCV is found")
    assert (
        prepare.main(["cifar10", "--source", str(cifar_tree), "--out", str(tmp_path / "out"), "--val-split", "-100"])
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert "validation split of -100 images" in err and "\n" not in err, err
    assert not list((tmp_path / "out").glob("*.beton"))
