"""`reproduce plan`: how long each experiment will take, measured on this machine before it runs.

  reproduce plan --study cifar10 --data ../shared/data/cifar10-jpeg.tar.gz
  reproduce plan --config configs/cifar10/resnet20.yaml configs/cifar10/resnet56.yaml --world-size 2
  reproduce plan --study imagenet --world-size 16 --nodes 2           (synthetic input without --data)
  reproduce plan --from results/bench/matrix.csv --world-size 8      (rates measured elsewhere)

Per experiment it times a few real training steps (bench/harness.py's bare step: engine.train_step)
with the numerics `run.amp=auto run.channels_last=auto` choose here (numerics.py; override them as
key=value), the config's loader and its batch per process (optim.batch_size / --world-size): the
first --warmup steps untimed (allocation, compilation), then --steps steps on a fixed batch (the model
alone; --repeats windows of them where the input is synthetic) and --repeats windows on the real input
(the loader feeding it, each at least --steps steps and --seconds long: a loader's rate is noisy over
a few steps); input-bound when the real rate is under 90%
of the model's. Configs with the same data and batch share one running loader, as a run's steps share
one: its start happens once, and before each config's windows the batches its workers prepared
ahead (workers x 2, while the previous measurement ran) are drawn untimed, so that no window starts
on a full queue a real run's steady state does not have. The
numerics `auto` chooses are timed once per family of layer shapes (CIFAR nets of every depth repeat
the same three stages; ImageNet basic or bottleneck blocks), on its first config, and reused for the
others. It also times an evaluation (engine.evaluate, a few batches) and a checkpoint write
(checkpoint.save), and the setup a run does (the data, the numerics).

The projection: iterations x (batch per process / images/s + one gradient all-reduce) + every
evaluation of the schedule (eval.every, the validation and test splits, the final protocol's views;
each process scores its share) + every checkpoint + setup. With more than one process the all-reduce
is measured here among fresh processes (bench/allreduce.py, at two sizes: latency and bandwidth) or
given (--bus-gbps); device-hours = wall time x processes. The assumptions are printed with the table.

--from FILE takes the training rates from a CSV instead: `model,images_per_sec` (optional columns
batch, eval_images_per_sec, checkpoint_s, setup_s, bound), `reproduce bench-matrix`'s matrix.csv
(the fastest cell per model, real input where measured) or a plan.csv. The table goes to --out
(plan.csv, written atomically) and to MLflow as a run tagged reproduce.kind=plan (--no-mlflow: not).
"""

from __future__ import annotations

import itertools
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd
import torch

from reproduce.bench.projection import (
    AllReduce,
    PlanRefused,
    Rate,
    dataset_sizes,
    job_of,
    project,
    rates_from,
)
from reproduce.errors import ArgumentParser, command
from reproduce.provenance import CONFIGS, RESULTS

AHEAD_PER_WORKER = 2  # torch DataLoader's prefetch_factor: batches each worker prepares ahead
COMPUTE_BOUND_SHARE = 0.9  # as bench-matrix: real input at >= 90% of the model's own speed keeps up
STUDIES = {
    "cifar10": [f"cifar10/{net}{d}" for net in ("plain", "resnet") for d in (20, 32, 44, 56, 110)],
    "imagenet": [f"imagenet/{m}" for m in ("plain18", "plain34", "resnet18", "resnet34", "resnet50")]
    + ["imagenet/resnet101", "imagenet/resnet152"],
}


def parse_args(argv):
    parser = ArgumentParser(prog="reproduce plan", description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--config", nargs="+", type=Path, help="config files to plan")
    which.add_argument("--study", choices=list(STUDIES), help="every config of a study")
    parser.add_argument("--data", help="data.path for every config (else the config's; synthetic where it has none)")
    parser.add_argument("--world-size", type=int, default=1, help="processes in all (one device each)")
    parser.add_argument("--nodes", type=int, default=1, help="machines the processes are spread over")
    parser.add_argument("--from", dest="from_file", type=Path, help="a CSV of measured rates: project from it")
    parser.add_argument("--bus-gbps", type=float, help="all-reduce bus bandwidth (GB/s) to assume, not measure")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before the timed ones")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per repeat")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (their spread is the noise)")
    parser.add_argument(
        "--seconds", type=float, default=1.5, help="least seconds of each timed window on the real input"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "plan", help="folder for plan.csv")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log the plan to MLflow")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="applied to every config")
    args = parser.parse_args(argv)
    if args.world_size < 1 or args.nodes < 1 or args.world_size % args.nodes:
        parser.error(f"--world-size {args.world_size} must be a positive multiple of --nodes {args.nodes}")
    if min(args.steps, args.repeats) < 1 or min(args.warmup, args.seconds) < 0 or (args.bus_gbps or 1) <= 0:
        parser.error("--steps and --repeats must be at least 1, --warmup and --seconds at least 0, --bus-gbps above 0")
    if not (args.config or args.study or args.from_file):
        parser.error("give --config FILE..., --study cifar10|imagenet or --from FILE")
    return args


def config_paths(args, file_models: list[str] | None) -> list[Path]:
    """The configs to plan: --config, --study's, or (with --from alone) the paper config of each model."""
    if args.config:
        return list(args.config)
    if args.study:
        return [CONFIGS / f"{name}.yaml" for name in STUDIES[args.study]]
    found = [p for m in file_models for p in (CONFIGS / "cifar10" / f"{m}.yaml", CONFIGS / "imagenet" / f"{m}.yaml")]
    return [p for p in found if p.exists()]


def load(path: Path, args, world: int):
    """The config of `path` as planned: `auto` numerics, --data (or synthetic input where the config
    has no data and none is set for the machine: no download, no ImageNet), the user's overrides last."""
    from reproduce.config import load_config

    extra = ["run.amp=auto", "run.channels_last=auto", "run.progress=false"]
    if args.data:
        return load_config(path, [*extra, f"data.path={args.data}", *args.overrides], world_size=world)
    cfg = load_config(path, [*extra, "data.synthetic=true", *args.overrides], world_size=world)
    if cfg.data.path is not None or (cfg.data.dataset == "cifar10" and os.environ.get("REPRODUCE_CIFAR10")):
        cfg = load_config(path, [*extra, "data.synthetic=false", *args.overrides], world_size=world)
    return cfg


def timed_rate(
    batches, step, args, batch: int, device, warmup: int, seconds: float = 0.0, repeats: int | None = None
) -> tuple[float, float]:
    """(median images/s, spread %) over `repeats` (--repeats) windows after `warmup` untimed steps; each
    window runs --steps steps, and more until it has lasted `seconds`."""
    from reproduce.bench.harness import sync

    batches = iter(batches)
    for _ in range(warmup):
        step(next(batches))
    rates = []
    for _ in range(repeats or args.repeats):
        sync(device)
        start, done = time.perf_counter(), 0
        while done < args.steps or time.perf_counter() - start < seconds:
            step(next(batches))
            done += 1
        sync(device)
        rates.append(done * batch / (time.perf_counter() - start))
    median = statistics.median(rates)
    return median, 100 * (max(rates) - min(rates)) / median


@dataclass
class Shared:
    """What the configs of one plan share: each data section's data (and its build seconds), each
    family's numerics, each (data, batch)'s running loader."""

    data: dict = field(default_factory=dict)
    numerics: dict = field(default_factory=dict)
    loaders: dict = field(default_factory=dict)

    def close(self) -> None:
        self.loaders.clear()  # the loaders' iterators go: their worker processes stop


def _numerics(cfg, data, info, shared: Shared):
    """`auto` numerics of cfg: timed on the first config of its family of layer shapes, reused after."""
    from reproduce.models import MODELS
    from reproduce.numerics import resolve_numerics

    spec = MODELS[cfg.model.name]
    key = (spec.family, spec.bottleneck, cfg.data.crop, cfg.optim.batch_size, cfg.run.amp, cfg.run.channels_last)
    if key not in shared.numerics:
        shared.numerics[key] = (
            cfg.model.name,
            resolve_numerics(cfg, info.device, data.num_classes, cfg.optim.batch_size),
        )
        return shared.numerics[key][1]
    first, numerics = shared.numerics[key]
    return replace(numerics, how=f"as timed on {first} (the same layer shapes): {numerics.how}")


def _running_loader(cfg, data, info, shared: Shared) -> Iterator:
    """This data and batch's running training loader, the batches its workers prepared ahead drawn
    (untimed, without a step). Configs after the first take batches from the same loader, as a run's
    steps do."""
    from reproduce.data import train_loader

    def endless():  # a schedule shorter than the measurement (a tiny test's) starts the loader again
        while True:
            yield from train_loader(data, cfg, info, 0)

    key = (cfg.data.model_dump_json(), cfg.seed, cfg.optim.batch_size)
    if key not in shared.loaders:
        shared.loaders[key] = endless()
    for _ in range(AHEAD_PER_WORKER * cfg.data.workers):
        next(shared.loaders[key])
    return shared.loaders[key]


def eval_rate(model, data, cfg, info, numerics) -> float:
    """Evaluation images/s per process: engine.evaluate over one batch of the first split a periodic
    evaluation reads, after an untimed one (the same call: allocations and kernels for that shape)."""
    from reproduce.data import eval_loader
    from reproduce.engine import evaluate

    split = data.val if data.val is not None else data.test
    images = min(cfg.eval.batch_size, len(split))
    for _ in range(2):
        capped = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"max_images": images})})
        start = time.perf_counter()
        evaluate(model, eval_loader(split, capped, info), info, numerics.amp, numerics.channels_last)
    return images / (time.perf_counter() - start)


def checkpoint_seconds(model, optimizer, cfg, numerics) -> float:
    """One checkpoint written as train.py writes it (checkpoint.save into a temporary folder)."""
    from reproduce import checkpoint
    from reproduce.provenance import code_state

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        state = checkpoint.contents(model, optimizer, 1, None, cfg, code_state(), numerics)
        checkpoint.save(Path(tmp), 1, state, keep=1)
        return time.perf_counter() - start


def measure(cfg, data, data_s: float, info, args, shared: Shared | None = None) -> Rate:
    """The Rate of `cfg` here (its batch per process), from its real steps, evaluation and checkpoint
    (`shared`: what earlier configs of the same plan measured or started, to reuse)."""
    from reproduce.bench.harness import bare_step, release

    shared = shared or Shared()
    began = time.perf_counter()
    numerics = _numerics(cfg, data, info, shared)
    setup_s = data_s + time.perf_counter() - began
    step, model, optimizer, numerics = bare_step(cfg, info, data.num_classes, numerics)
    size = 32 if cfg.data.dataset == "cifar10" else cfg.data.crop
    batch = cfg.optim.batch_size
    fixed = (torch.randn(batch, 3, size, size), torch.randint(data.num_classes, (batch,)))
    windows = args.repeats if cfg.data.synthetic else 1  # with real input only its own windows' spread is shown
    alone, spread = timed_rate(itertools.repeat(fixed), step, args, batch, info.device, args.warmup, repeats=windows)
    rate, bound = alone, "- (synthetic input)"
    if not cfg.data.synthetic:
        loader, seconds = _running_loader(cfg, data, info, shared), getattr(args, "seconds", 0.0)
        rate, spread = timed_rate(loader, step, args, batch, info.device, args.warmup, seconds)
        bound = "compute" if rate >= COMPUTE_BOUND_SHARE * alone else "input"
    result = Rate(
        images_per_sec=rate,
        eval_per_sec=eval_rate(model, data, cfg, info, numerics),
        checkpoint_s=checkpoint_seconds(model, optimizer, cfg, numerics),
        setup_s=setup_s,
        spread_pct=spread,
        model_per_sec=alone,
        bound=bound,
        numerics=f"{'bf16' if numerics.amp else 'fp32'} {'NHWC' if numerics.channels_last else 'NCHW'}",
    )
    release(info.device)
    return replace(result, measured_s=time.perf_counter() - began)


def grad_bytes(cfg) -> int:
    """Bytes of the fp32 gradients DDP all-reduces each step (the parameters' count x 4)."""
    from reproduce.models import MODELS, build_model

    with torch.device("meta"):
        model = build_model(cfg.model.name, cfg.model.shortcut, cfg.model.variant, MODELS[cfg.model.name].num_classes)
    return 4 * sum(p.numel() for p in model.parameters())


def measure_allreduce(args, device: torch.device) -> AllReduce:
    """The all-reduce a step of --world-size processes adds: measured here at two sizes (latency and
    bus bandwidth), given by --bus-gbps, or, where this machine cannot show it, none (stated)."""
    from reproduce.bench.allreduce import allreduce_bandwidth

    world, nodes = args.world_size, args.nodes
    if world == 1:
        return AllReduce(0.0, None, "one process: no all-reduce")
    if args.bus_gbps:
        return AllReduce(0.0, args.bus_gbps * 1e9, f"all-reduce at {args.bus_gbps:g} GB/s bus bandwidth (given)")
    here = torch.cuda.device_count() if device.type == "cuda" else os.cpu_count() or 1
    local = min(world // nodes, here)
    if local < 2:
        return AllReduce(0.0, None, f"all-reduce not measured ({here} device here): perfect scaling assumed")
    backend, factor = ("nccl" if device.type == "cuda" else "gloo"), 2 * (local - 1) / local
    try:  # seconds = bytes x factor / bus bandwidth, at 1 and 64 MiB: a line through both
        small, large = ((n, n * factor / (allreduce_bandwidth(backend, local, n) * 1e9)) for n in (1 << 20, 1 << 26))
    except RuntimeError as err:
        return AllReduce(0.0, None, f"all-reduce not measured ({err}): perfect scaling assumed")
    per_byte = max((large[1] - small[1]) / (large[0] - small[0]), 1e-15)
    across = "; between nodes assumed the same (not measured)" if nodes > 1 else ""
    fit = AllReduce(max(0.0, small[1] - small[0] * per_byte), factor / per_byte, "")
    return replace(
        fit,
        how=f"{backend} all-reduce measured among {local} processes here: {fit.latency_s * 1e3:.2f} ms + "
        f"{fit.bus_bytes_per_s / 1e9:.2f} GB/s bus bandwidth, not overlapped with the backward pass{across}",
    )


SHOWN = {  # printed column -> plan.csv column
    "experiment": "experiment",
    "numerics": "numerics",
    "batch/proc": "batch_per_process",
    "images/s": "images_per_sec",
    "spread %": "spread_pct",
    "bound": "bound",
    "iterations": "iterations",
    "epochs": "epochs",
    "train s": "train_s",
    "eval s": "eval_s",
    "ckpt s": "checkpoint_s",
    "setup s": "setup_s",
    "wall": "wall",
    "device-h": "device_hours",
}


@command
def main(argv=None) -> int:
    from reproduce import distributed
    from reproduce.bench.matrix import _device_name

    args = parse_args(sys.argv[1:] if argv is None else argv)
    if not args.no_mlflow:
        from reproduce.tracking import check_reachable

        check_reachable()  # before minutes of measuring
    file_rates = rates_from(args.from_file) if args.from_file else None
    cfgs = [(p, load(p, args, args.world_size)) for p in config_paths(args, sorted(file_rates or []))]
    if not cfgs:
        raise PlanRefused(f"--from {args.from_file}: none of its models has a config under {CONFIGS}")
    missing = [c.model.name for _, c in cfgs if file_rates is not None and c.model.name not in file_rates]
    if missing:
        raise PlanRefused(f"--from {args.from_file}: no rate for {', '.join(missing)}")
    info = distributed.setup(cfgs[0][1].run.device)
    allreduce = measure_allreduce(args, info.device)
    began, rows, shared = time.perf_counter(), [], Shared()
    for path, cfg in cfgs:
        name = f"{path.parent.name}/{path.stem}"
        rows.append(_plan_one(name, cfg, args, info, allreduce, file_rates, shared))
        print(f"  {name}: {rows[-1]['images_per_sec']:.0f} images/s per process -> {rows[-1]['wall']}", flush=True)
    shared.close()
    frame = pd.DataFrame(rows)
    text = _render(frame, args, _device_name(info.device), allreduce, time.perf_counter() - began)
    print(text)
    from reproduce.io import atomic_write_text

    csv = args.out / "plan.csv"
    atomic_write_text(csv, frame.to_csv(index=False))
    where = "" if args.no_mlflow else f"; MLflow run {_log_plan(frame, text, args, csv)}"
    print(f"wrote {csv}{where}")
    return 0


def _plan_one(name: str, cfg, args, info, allreduce: AllReduce, file_rates, shared: Shared) -> dict:
    """The projection row of one config: from its measured Rate here, or from the --from file's."""
    from reproduce.data import build_data

    per_process = cfg.model_copy(
        update={"optim": cfg.optim.model_copy(update={"batch_size": cfg.optim.batch_size // args.world_size})}
    )
    if file_rates is not None:
        rate, data = file_rates[cfg.model.name], None
        if rate.checkpoint_s != rate.checkpoint_s:  # NaN: not in the file, measured here
            rate = replace(rate, checkpoint_s=_checkpoint_here(per_process, info))
    else:
        key = cfg.data.model_dump_json(exclude={"workers"}) + str(cfg.seed)
        if key not in shared.data:
            start = time.perf_counter()
            shared.data[key] = build_data(cfg), time.perf_counter() - start
        data, data_s = shared.data[key]
        rate = measure(per_process, data, data_s, info, args, shared)
    sizes, train_images = dataset_sizes(cfg, data)
    return project(
        job_of(cfg, name, sizes, train_images, grad_bytes(cfg)), rate, args.world_size, args.nodes, allreduce
    )


def _checkpoint_here(cfg, info) -> float:
    """A checkpoint of the model and an SGD state with its momentum buffers, written here."""
    from reproduce.engine import build_optimizer
    from reproduce.models import MODELS, build_model
    from reproduce.numerics import Numerics

    model = build_model(cfg.model.name, cfg.model.shortcut, cfg.model.variant, MODELS[cfg.model.name].num_classes)
    optimizer = build_optimizer(model.parameters(), cfg.optim)
    for p in model.parameters():
        optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p)
    return checkpoint_seconds(model, optimizer, cfg, Numerics(False, False, "--from"))


def _render(frame: pd.DataFrame, args, device: str, allreduce: AllReduce, seconds: float) -> str:
    """The printed plan: where and how it was measured, the table, the assumptions."""
    world, nodes = args.world_size, args.nodes
    shown = frame.rename(columns={v: k for k, v in SHOWN.items()})[list(SHOWN)].fillna("-")
    if args.from_file:
        how = f"rates from {args.from_file} (the fastest row per model); checkpoints written here"
    else:
        how = (
            f"{args.warmup} untimed warm-up step(s), then {args.steps} timed steps per experiment on a fixed batch "
            f"({args.repeats} x {args.steps} where the input is synthetic), and {args.repeats} windows of at least "
            f"{args.steps} steps and {args.seconds:g} s on the real input (a shared running loader, the batches prepared ahead drawn first); spread = (max - min) / median of "
            "the repeats"
        )
    lines = [
        f"plan: {len(frame)} experiment(s) on {device}; {world} process(es) on {nodes} node(s); {seconds:.0f} s to make",
        f"measured: {how}",
        shown.to_string(index=False),
        "assumptions: each process has a device like this one; " + allreduce.how + ".",
        "wall = iterations x (batch per process / images/s + all-reduce) + evaluations (eval.every, validation and "
        "test splits, the final protocol's views) + checkpoints + setup (data, numerics); not counted: process "
        "start-up, MLflow, logging. device-h = wall x processes.",
    ]
    if args.from_file:
        lines.append(
            "from a file: evaluation at 3x the training rate (a forward pass is a third of a step) unless "
            "eval_images_per_sec is given; setup 0 unless setup_s is given"
        )
    return "\n".join(lines)


def _log_plan(frame: pd.DataFrame, text: str, args, csv: Path) -> str:
    """The plan as an MLflow run (experiment `plan`, tag reproduce.kind=plan): params, per-experiment
    metrics, plan.csv, and the printed plan as its description. Returns its id."""
    import mlflow

    from reproduce.provenance import code_state
    from reproduce.tracking import prepare_store

    prepare_store()
    mlflow.set_experiment("plan")
    git = code_state()
    tags = {
        "reproduce.kind": "plan",
        "reproduce.git_commit": git.commit,
        "reproduce.git_dirty": str(git.dirty).lower(),
        "mlflow.source.git.commit": git.commit,
        "reproduce.command": " ".join(["reproduce plan", *sys.argv[2:]])[:5000],
        "mlflow.note.content": f"```\n{text}\n```",
    }
    with mlflow.start_run(run_name=f"plan-{args.study or 'configs'}-w{args.world_size}", tags=tags) as run:
        mlflow.log_params({"world_size": args.world_size, "nodes": args.nodes, "from": str(args.from_file or "-")})
        keys = ("images_per_sec", "wall_s", "device_hours", "eval_s", "checkpoint_s")
        mlflow.log_metrics({f"{r['experiment']}.{k}": float(r[k]) for r in frame.to_dict("records") for k in keys})
        mlflow.log_artifact(str(csv))
    return run.info.run_id
