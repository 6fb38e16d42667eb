"""`reproduce evaluate`: any ResNet weights under the paper's test protocols.

  reproduce evaluate --weights runs/cifar10/resnet20-s0-1a2b3c4d --model resnet20 --data cifar-10-batches-py
  reproduce evaluate --weights cifar-resnet56-4bfd9763.th --model resnet56 --data cifar10-exact-subset.npz
  reproduce evaluate --weights torchvision:resnet50.IMAGENET1K_V1 --model resnet50 --protocol tencrop --data /data/imagenet
  reproduce evaluate --weights runs:/<MLflow run id> --data cifar-10-batches-py
  reproduce evaluate --weights cifar-resnet20-*.th --model resnet20 --data cifar10-jpeg.tar.gz --numerics int8 --save r20-int8.pt2
  reproduce evaluate --weights r20-int8.pt2 --data cifar10-jpeg.tar.gz
  torchrun --nproc_per_node 8 -m reproduce.evaluate --weights FILE --config configs/imagenet/resnet50.yaml

--weights: a run directory, a checkpoint, a state_dict file, a network the suite logged to MLflow
(runs:/<run id>, models:/<name>/<version>) or torchvision:<model>.<WEIGHTS> (see
reproduce/weights/ for how the architecture is found and when it must be stated; --model may be
left out where the weights store it). The network is the weights' architecture; --model /
--config / model.* overrides must agree with it. Only the
test split is read (ImageNet-style: data.path/val/<class>/*; data.dataset=folder, for networks
fine-tuned on your own images: its val/, transformed as in training; CIFAR-10: its test images, normalised
as the weights were trained where they say so: the suite's checkpoints and MLflow models record
data.normalize, the public CIFAR-10 checkpoints take imagenet; data.normalize=... on the command
line overrides that, else the config's value is used).
--numerics int8 scores the network quantized to int8 (PT2E, x86 CPU backend, calibrated on --calibrate
training images as the test split transforms them; reproduce/weights/export.py), bf16 in bf16 weights
and activations; --save writes the network scored as a torch.export program (.pt2), which --weights
reads back and scores as it is. Each error comes with its binomial standard deviation (*_std).
Each evaluation is one MLflow run (tag reproduce.kind=evaluation) in the experiment of --config,
else the dataset's name; its numbers also go to --out as JSON. Under torchrun each rank evaluates
a disjoint share and the sums are exact.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from reproduce import distributed
from reproduce.config import Config, ConfigError, ModelConfig, Normalize, Protocol, load_config
from reproduce.data import Data, DataError, Split, build_data, eval_loader
from reproduce.engine import evaluate
from reproduce.errors import ArgumentParser
from reproduce.io import atomic_write_json
from reproduce.models import MODELS
from reproduce.provenance import code_state, device_name, host
from reproduce.weights import RawWeights, Weights, WeightsError, read_weights
from reproduce.weights.export import NUMERICS, SUFFIX, export_program, in_numerics, save_program

log = logging.getLogger("reproduce.evaluate")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="reproduce evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--weights",
        required=True,
        help="run dir, checkpoint, state_dict file, runs:/<MLflow run id>, "
        "models:/<name>/<version> or torchvision:NAME.WEIGHTS",
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--config", help="a YAML file under configs/ (model, data and eval settings)")
    which.add_argument(
        "--model",
        help="a registry name (`reproduce models`), with defaults for the rest; may be "
        "left out for weights that say which network they are (the suite's run dirs, checkpoints, runs:/) "
        "or whose tensors do (a ResNet with projection shortcuts, the public CIFAR-10 files)",
    )
    parser.add_argument(
        "--protocol",
        choices=[p.value for p in Protocol],
        help="default: the config's, else single (CIFAR) / center224 (ImageNet)",
    )
    parser.add_argument("--data", help="data.path: CIFAR-10 source, or a folder with val/<class>/*")
    parser.add_argument(
        "--out",
        type=Path,
        help="JSON result (default runs/evaluations/<model>-<protocol>-<weights sha>-data<fingerprint>[-<numerics>].json)",
    )
    parser.add_argument("--numerics", choices=NUMERICS, default="fp32", help="score the network in this numerics")
    parser.add_argument("--calibrate", type=_positive, default=512, help="int8: training images to calibrate on")
    parser.add_argument("--save", type=Path, help="write the network scored as a torch.export program (FILE.pt2)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. eval.batch_size=64 model.variant=v1.5")
    args = parser.parse_intermixed_args(argv)  # overrides may come before and after options
    if args.save is not None and args.save.suffix != SUFFIX:
        parser.error(f"--save {args.save}: the file name must end in {SUFFIX}")
    return args


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return int(text)  # overrides may come before and after options


def eval_config(args: argparse.Namespace, world_size: int = 1) -> Config:
    overrides = (
        ([f"eval.protocol={args.protocol}"] if args.protocol else [])
        + ([f"data.path={args.data}"] if args.data else [])
        + list(args.overrides)
    )
    base = None
    if args.model:
        spec = MODELS.get(args.model)
        dataset = "imagenet" if spec is not None and spec.family == "imagenet" else "cifar10"
        data = {"dataset": dataset}
        if "data.dataset=folder" in args.overrides:  # your own images: always ImageNet's statistics (data/folder.py)
            data = {"dataset": "folder", "normalize": "imagenet"}
        base = {
            "experiment": dataset,
            "model": {"name": args.model},
            "data": data,
            "optim": {"batch_size": world_size, "lr": 0.1},
            "schedule": {"iterations": 1},
            "eval": {"every": 1, "protocol": "center224" if dataset == "imagenet" else "single"},
            "run": {"checkpoint_every": 1},
        }
    return load_config(args.config, overrides, world_size=world_size, base=base)


def stated_model(cfg: Config) -> tuple:
    """(name, shortcut, variant) as the user gave them; None where not given."""
    given = cfg.model.model_fields_set
    return cfg.model.name, cfg.model.shortcut, cfg.model.variant if "variant" in given else None


def with_weights(cfg: Config, weights: Weights, overrides: list[str] = ()) -> Config:
    """cfg with the weights' architecture (options the user left unset, resolved) and, for CIFAR
    weights that say how their input was normalised (the suite's checkpoints and MLflow models,
    the public CIFAR-10 files), that normalisation: a config's default or YAML value would score
    them on the wrong statistics. Only data.normalize given on the command line overrides it."""
    arch = weights.arch
    model = ModelConfig(name=arch.name, shortcut=arch.shortcut, variant=arch.variant)
    data = cfg.data
    given = any(o.startswith("data.normalize=") for o in overrides)
    if cfg.data.dataset == "cifar10" and weights.normalize and weights.normalize != data.normalize.value:
        if given:
            log.warning(
                "data.normalize=%s as given, though %s was trained with data.normalize=%s",
                data.normalize.value,
                weights.source,
                weights.normalize,
            )
        else:
            log.info(
                "data.normalize=%s: what %s was trained with (the config says %s)",
                weights.normalize,
                weights.source,
                data.normalize.value,
            )
            data = data.model_copy(update={"normalize": Normalize(weights.normalize)})
    return cfg.model_copy(update={"model": model, "data": data})


def test_split(cfg: Config) -> tuple[Split, int, str, str]:
    """(test split, number of classes, fingerprint, description): only what evaluation reads; an
    image folder's test split (val/) is made as its training run made it (data/folder.py)."""
    if cfg.data.dataset in ("cifar10", "folder") or cfg.data.synthetic:
        data: Data = build_data(cfg)
        return data.test, data.num_classes, data.fingerprint, data.description
    from reproduce.data.imagenet import eval_transform, image_folder

    if cfg.data.path is None:
        raise DataError("data.path is required for imagenet: a folder with val/<class>/*")
    val = image_folder(cfg.data.path, "val", None)
    listing = "\n".join(
        f"{Path(p).relative_to(cfg.data.path)}:{label}" for p, label in val.samples
    ).encode()  # as data/imagenet.py
    return (
        Split(val, eval_transform(cfg.data.crop, cfg.eval.protocol.value)),
        len(val.classes),
        hashlib.sha256(listing).hexdigest()[:16],
        f"ImageNet-style val/ at {cfg.data.path}: {len(val)} images, {len(val.classes)} classes",
    )


def main(argv: list[str] | None = None) -> int:
    from reproduce.tracking import TrackingUnreachable, check_reachable

    args = parse_args(argv)
    _, _, _, world_size = distributed.launch_env()
    if problem := _out_problem(
        args.out or Path("runs") / "evaluations" / "result.json"
    ):  # before any work: a result that cannot be recorded would be lost
        print(f"error: {problem}", file=sys.stderr)
        return 2
    read = None  # the weights, where they must be read to name the network; run() reads them otherwise
    try:
        check_reachable()
        if not (args.config or args.model):  # the network the weights store, else the one their tensors tell
            read = read_weights(args.weights)
            args.model = read.model_name()
    except (TrackingUnreachable, WeightsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        cfg = eval_config(args, world_size)
        info = distributed.setup(cfg.run.device, timeout_s=cfg.run.collective_timeout_s)
    except distributed.JoinFailed as err:  # the environment failed, not the command
        print(f"error: {err}", file=sys.stderr)
        return 1
    except (ConfigError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        return run(args, cfg, info, read)
    except (WeightsError, DataError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        distributed.teardown(info)


def _out_problem(out: Path) -> str | None:
    """Why the JSON result could not be written to `out`, or None. Tried where it can be: the
    nearest existing folder must take a file named as io.atomic_write_json names its temporary
    one (a read-only file system, a name too long), made and removed at once; the folders still
    to be made must be makeable. Nothing is left behind."""
    if out.is_dir():
        return f"--out {out} is a folder; give the JSON file to write, e.g. {out / 'result.json'}"
    target = out.absolute()
    parent = next((p for p in target.parents if p.exists()), None)
    if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        return f"--out {out} cannot be written ({parent} is not a writable folder); give a writable path"
    longest = os.pathconf(parent, "PC_NAME_MAX")
    for folder in (p for p in target.parents if len(p.parts) > len(parent.parts)):  # to be made
        if folder.is_symlink():
            return f"--out {out} cannot be written ({folder} is a link to nothing); give a writable path"
        if len(os.fsencode(folder.name)) > longest:
            return f"--out {out} cannot be written (the folder name {folder.name[:40]}... is too long); give a writable path"
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=parent)
    except OSError as err:
        return f"--out {out} cannot be written ({err.strerror or err}); give a writable path"
    os.close(fd)
    os.unlink(probe)
    return None


def run(args: argparse.Namespace, cfg: Config, info: distributed.DistInfo, read: RawWeights | None = None) -> int:
    """The evaluation; `read`: the weights where main has read them already (each is read once)."""
    read = read_once(args.weights, info, read)
    stated = stated_model(cfg)
    # Rank 0 checks first (all ranks refuse together); then the others resolve the same.
    weights = distributed.agree(lambda: read.resolve(*stated), info) or read.resolve(*stated)
    cfg = with_weights(cfg, weights, args.overrides)
    split, classes, fingerprint, description = distributed.agree(lambda: test_split(cfg), info) or test_split(cfg)
    if classes != weights.num_classes:
        raise WeightsError(
            f"{weights.source} has {weights.num_classes} classes but the data has {classes}; "
            "evaluate on data with the classes it was trained for"
        )
    model = deployed(args, cfg, weights.build(info.device), weights, info)
    if cfg.run.channels_last:
        model = model.to(memory_format=torch.channels_last)
    amp, layout = cfg.run.amp is True, cfg.run.channels_last is True
    images = len(split) if cfg.eval.max_images is None else min(cfg.eval.max_images, len(split))  # all ranks' shares
    start = time.perf_counter()
    result = evaluate(model, eval_loader(split, cfg, info), info, amp, layout)
    seconds = time.perf_counter() - start
    result = {**{f"test_{k}": v for k, v in result.items()}, "images": images, "images_per_sec": images / seconds}
    result.update(
        {f"{k}_std": binomial_std(result[k], images) for k in ("test_top1_err", "test_top5_err") if k in result}
    )
    if args.numerics != "fp32":
        weights = replace(weights, extra={**weights.extra, "numerics": args.numerics})
    return record(args, cfg, info, weights, result, fingerprint, description) if info.is_main else 0


def binomial_std(error_pct: float, images: int) -> float:
    """The standard deviation (%) of an error rate measured on `images` independent images."""
    return (error_pct * (100.0 - error_pct) / images) ** 0.5


def calibration(cfg: Config, count: int, batch: int = 64) -> list[torch.Tensor]:
    """`count` training images (a fixed shuffle's first), transformed as the test split's single
    view, in batches: what int8 observes its activation ranges on."""
    data = build_data(cfg)
    plain = Split(data.train.base, (data.val or data.test).transform, data.train.indices)
    order = torch.randperm(len(plain), generator=torch.Generator().manual_seed(0))[:count].tolist()
    return list(torch.stack([plain[i][0] for i in order]).split(batch))


def deployed(args, cfg: Config, model: torch.nn.Module, weights: Weights, info) -> torch.nn.Module:
    """The network in --numerics (int8: quantized here, on the CPU), written to --save where asked."""
    if (args.numerics != "fp32" or weights.program is not None) and cfg.eval.protocol == Protocol.MULTISCALE:
        raise WeightsError("an exported or bf16/int8 network takes one input size; use another --protocol")
    if args.numerics != "fp32" and weights.program is not None:
        raise WeightsError(f"{weights.source} is an exported program already; leave --numerics out")
    if args.numerics == "int8" and info.device.type != "cpu":
        raise WeightsError("int8 is quantized for the x86 CPU backend; evaluate it with run.device=cpu")
    if args.numerics == "fp32" and args.save is None:
        return model
    batches = calibration(cfg, args.calibrate) if args.numerics == "int8" else []
    example = batches[0] if batches else test_example(cfg)
    model = in_numerics(model, args.numerics, batches, example.to(info.device))
    if args.save is not None and info.is_main:
        meta = {
            "architecture": weights.arch.as_dict(),
            "num_classes": weights.num_classes,
            "normalize": cfg.data.normalize.value,
            "numerics": weights.extra.get("numerics", args.numerics),
        }
        save_program(export_program(model, example[:2].to(info.device)), args.save, meta)
        log.info("wrote %s", args.save)
    return model


def test_example(cfg: Config) -> torch.Tensor:
    """One test image as the network takes it (a batch of one; of a multi-view protocol, one view)."""
    image = test_split(cfg)[0][0][0]
    return image.reshape(-1, *image.shape[-3:])[:1]


def read_once(source: str, info: distributed.DistInfo, read: RawWeights | None = None) -> RawWeights:
    """The weights of `source`, read once on this rank (`read`: already read). Rank 0 reads first,
    so that all ranks refuse together, and of a run directory it picks the checkpoint; a rank that
    read another one (a checkpoint written meanwhile) reads rank 0's pick instead."""
    first = distributed.agree(lambda: read or read_weights(source), info)
    given = distributed.broadcast_object(first.given if info.is_main else None, info)
    if info.is_main:
        return first
    return read if read is not None and read.given == given else read_weights(given)


def record(args, cfg: Config, info, weights: Weights, result: dict, fingerprint: str, description: str) -> int:
    """One MLflow run and the JSON file, on rank 0. A tracking store that fails now (the server
    went away during the evaluation) still leaves the JSON file, and the exit status says so."""
    import mlflow

    from reproduce.tracking import TrackingUnreachable

    git = code_state()
    tags = _tags(cfg, info, weights, fingerprint, description, git)
    try:
        run_id, failure = _log_evaluation(cfg, tags, result), None
    except (TrackingUnreachable, mlflow.exceptions.MlflowException, OSError) as err:
        run_id, failure = None, str(err).splitlines()[0][:300] if str(err) else type(err).__name__
    numerics = "" if getattr(args, "numerics", "fp32") == "fp32" else f"-{args.numerics}"
    name = f"{cfg.model.name}-{cfg.eval.protocol.value}-{weights.sha256[:8]}-data{fingerprint[:8]}{numerics}.json"
    out = args.out or Path("runs") / "evaluations" / name  # one file per weights, protocol, data and numerics
    doc = {
        **result,
        "model": cfg.model.name,
        "architecture": weights.arch.as_dict(),
        "protocol": cfg.eval.protocol.value,
        "weights": tags["reproduce.weights"],
        "weights_sha256": weights.sha256,
        "weights_format": weights.format,
        "weights_extra": weights.extra,
        "data": description,
        "data_fingerprint": fingerprint,
        "world_size": info.world_size,
        "git_commit": git.commit,
        "git_dirty": git.dirty,
        "mlflow_run_id": run_id,
    }
    return _write_and_say(out, doc, f"{weights.arch} {cfg.eval.protocol.value}", result, run_id, failure)


def _tags(cfg: Config, info, weights: Weights, fingerprint: str, description: str, git) -> dict:
    """The MLflow tags of an evaluation: what was evaluated, on what data, with which code, where."""
    return {
        "reproduce.kind": "evaluation",
        "reproduce.eval_protocol": cfg.eval.protocol.value,
        "reproduce.weights": weights.extra.get("weights", weights.source),
        "reproduce.weights_sha256": weights.sha256,
        "reproduce.weights_format": weights.format,
        "reproduce.model": cfg.model.name,
        "reproduce.architecture": str(weights.arch),
        "reproduce.study": cfg.data.dataset,
        "reproduce.data_fingerprint": fingerprint,
        "reproduce.data": description,
        "reproduce.git_commit": git.commit,
        "reproduce.git_dirty": str(git.dirty).lower(),
        "reproduce.host": host(),
        "reproduce.gpu": device_name(info.device),
        "reproduce.world_size": str(info.world_size),
        "reproduce.launcher": info.launcher,
        "reproduce.torch": torch.__version__,
        "reproduce.numerics": weights.extra.get("numerics", "fp32"),
    }


def _write_and_say(out: Path, doc: dict, what: str, result: dict, run_id: str | None, failure: str | None) -> int:
    """The JSON file written and the result said, with where it is kept: 0, or 1 when the file or
    the MLflow run (`failure`) could not be written."""
    shown = ", ".join(f"{k} {v:.2f}" for k, v in result.items() if k != "images")
    try:
        atomic_write_json(out, doc, indent=1)
    except OSError as err:  # checked before the evaluation, but a disk can fill up since
        logged = f"is in MLflow run {run_id}" if run_id is not None else f"is not in MLflow either ({failure})"
        print(f"{what} on {result['images']} images: {shown}")
        print(f"error: the result could not be written to {out} ({err.strerror or err}); it {logged}", file=sys.stderr)
        return 1
    if failure is not None:
        print(f"{what} on {result['images']} images: {shown}; wrote {out}")
        print(f"error: the result is in {out} but not in MLflow ({failure})", file=sys.stderr)
        return 1
    print(f"{what} on {result['images']} images: {shown}; MLflow run {run_id}; wrote {out}")
    return 0


def _log_evaluation(cfg: Config, tags: dict, result: dict) -> str:
    """The evaluation as one MLflow run; its id."""
    import mlflow

    from reproduce.tracking import check_reachable, describe_experiment, prepare_store

    check_reachable()
    prepare_store()
    describe_experiment(mlflow.set_experiment(cfg.experiment))
    with mlflow.start_run(run_name=f"eval-{cfg.model.name}-{cfg.eval.protocol.value}", tags=tags) as active:
        mlflow.log_params({k: v for k, v in cfg.flat().items() if k.split(".")[0] in ("model", "data", "eval")})
        mlflow.log_metrics({k: float(v) for k, v in result.items()})
        return active.info.run_id


if __name__ == "__main__":
    from reproduce.stop import exit_with

    exit_with(main())
