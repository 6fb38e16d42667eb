"""Throughput matrix: training images/s of the paper's networks over precision, memory format,
torch.compile and input, each cell beside the share of the device's measured bf16 matrix rate.

  reproduce bench-matrix                                  the default grid, synthetic input only
  reproduce bench-matrix --cifar-data ../shared/data/cifar10-jpeg.tar.gz --imagenet-data DIR
  reproduce bench-matrix --models resnet50 --precision bf16 --channels-last on --compile off default

Every cell runs the bare training step of `reproduce bench` (bench/harness.py: engine.train_step,
forward, backward, SGD step) for --iterations steps, the first --warmup untimed (compilation,
autotuning), at the paper's batch (128 CIFAR, 256 ImageNet; halved until it fits) on:
  synthetic  one fixed random batch already on the device: the model's speed alone;
  real       the configured loader (--cifar-loader gpu|ffcv|torchvision on --cifar-data,
             --imagenet-loader ffcv|torchvision on --imagenet-data) feeding the same step;
  loader     the loader alone, batches moved to the device and no model: the input's ceiling.
A real cell is input-bound when it reaches less than 90% of the synthetic speed (the step
waits for input), else compute-bound. TFLOP/s counts 3 x 2 x the paper's multiply-adds per
image (forward, and a backward of twice the forward's work); the share is of a bf16 matrix
multiplication's rate measured on the same device at start-up.

The table is rewritten after every cell (matrix.md and matrix.csv in --out, atomically), so a
run cut short keeps what it measured; the cells are also logged to one MLflow run
(experiment `bench`), whose id the table carries.
"""

from __future__ import annotations

import datetime
import functools
import itertools
import os
import platform
import shlex
import socket
import sys
from pathlib import Path

import pandas as pd
import torch

from reproduce.bench.harness import bare_loop, loader_alone, measure_peak, release
from reproduce.data import DataError, build_data, train_loader
from reproduce.errors import ArgumentParser
from reproduce.io import atomic_write_text
from reproduce.provenance import CONFIGS, RESULTS, code_state, driver_version

COMPUTE_BOUND_SHARE = 0.9  # real input at >= 90% of the synthetic speed: the loader keeps up


def parse_args(argv):
    parser = ArgumentParser(prog="reproduce bench-matrix", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models", nargs="+", default=["resnet18", "resnet50", "resnet152", "resnet20", "resnet56", "resnet110"]
    )
    parser.add_argument("--precision", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    parser.add_argument("--channels-last", nargs="+", choices=["off", "on"], default=["off", "on"])
    parser.add_argument(
        "--compile",
        nargs="+",
        default=["off", "default"],
        choices=["off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
        help="off, or a torch.compile mode (reduce-overhead: CUDA graphs)",
    )
    parser.add_argument("--cifar-data", type=Path, help="CIFAR-10 source for real-input cells (as data.path)")
    parser.add_argument("--cifar-loader", choices=["gpu", "ffcv", "torchvision"], default="gpu")
    parser.add_argument("--imagenet-data", type=Path, help="ImageNet-style data for real-input cells (as data.path)")
    parser.add_argument("--imagenet-loader", choices=["ffcv", "torchvision"], default="ffcv")
    parser.add_argument(
        "--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2), help="loader workers / threads"
    )
    parser.add_argument("--batch", type=int, help="per-step batch for every model (default: the paper's, 128 / 256)")
    parser.add_argument("--iterations", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--out", type=Path, default=RESULTS / "bench")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="passed to every cell's config")
    args = parser.parse_args(argv)
    if not 0 <= args.warmup < args.iterations:
        parser.error("--warmup must be at least 0 and below --iterations")
    return args


@functools.lru_cache(maxsize=None)
def train_flops_per_image(model_name: str, size: int) -> float:
    """3 x 2 x multiply-adds of one forward pass: forward plus a backward of twice its work."""
    from reproduce.models import build_model, count_macs

    with torch.device("meta"):
        model = build_model(model_name)
    return 6.0 * count_macs(model, size)


def main(argv=None) -> int:
    from reproduce import distributed
    from reproduce.config import ConfigError
    from reproduce.models import MODELS

    args = parse_args(sys.argv[1:] if argv is None else argv)
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        print(f"error: unknown model {unknown[0]}; `reproduce models` lists them", file=sys.stderr)
        return 2
    info = distributed.setup(args.device)
    device = info.device
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    peak, peak_what = measure_peak(device)
    print(f"device: {_device_name(device)}; measured {peak_what}: {peak:.1f} TFLOP/s", flush=True)
    config = functools.partial(_config, args, device)

    import mlflow

    from reproduce.tracking import TrackingUnreachable

    cache = {}  # each dataset, and each loader-alone speed, for the cells that share them
    try:  # every config is valid, the server answers and the data loads, before the first cell
        _check_before_cells(args, config, cache)
    except (ConfigError, TrackingUnreachable, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    mlflow.set_experiment("bench")
    run = mlflow.start_run(run_name="bench-matrix", log_system_metrics=False)
    context = _context(argv, device, peak, peak_what, run.info.run_id)
    mlflow.log_params({k: v[:500] for k, v in context.items() if k not in ("date", "mlflow_run")})
    rows = []
    status = "FAILED"
    try:
        _run_cells(args, config, info, cache, peak, context, rows)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        print(f"stopped: {len(rows)} cells kept in {args.out}", file=sys.stderr)
        return 130
    finally:
        mlflow.end_run(status)
    print(f"wrote {args.out / 'matrix.md'} and matrix.csv (MLflow run {run.info.run_id})")
    return 0


def _config(args, device: torch.device, model: str, overrides: list[str]):
    """The config of one cell: the model's paper config, shortened to the bench and fed as asked."""
    from reproduce.config import load_config
    from reproduce.models import MODELS

    family = MODELS[model].family
    dataset = "cifar10" if family == "cifar" else "imagenet"
    data_path, loader = (
        (args.cifar_data, args.cifar_loader) if dataset == "cifar10" else (args.imagenet_data, args.imagenet_loader)
    )
    common = [
        f"schedule.iterations={args.iterations}",
        "schedule.milestones=[]",
        f"run.device={device.type}",
        f"data.workers={args.workers}",
        "run.progress=false",
        "data.val_split=0",
        "eval.every=1",
    ]
    data = [f"data.path={data_path}", f"data.loader={loader}"] if data_path else ["data.synthetic=true"]
    return load_config(CONFIGS / dataset / f"{model}.yaml", [*common, *data, *args.overrides, *overrides])


def _check_before_cells(args, config, cache: dict) -> None:
    """Every model's config is valid, the tracking server answers and each dataset loads (into
    `cache`); ConfigError, TrackingUnreachable or DataError otherwise."""
    from reproduce.tracking import check_reachable, prepare_store

    cfgs = [config(model, []) for model in args.models]
    check_reachable()
    for cfg in cfgs:
        if not cfg.data.synthetic and _data_key(cfg) not in cache:
            cache[_data_key(cfg)] = build_data(cfg)
    prepare_store()


def _context(argv, device: torch.device, peak: float, peak_what: str, run_id: str) -> dict:
    """What the tables say about where and how they were measured."""
    git = code_state()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "reproduce bench-matrix " + shlex.join(sys.argv[1:] if argv is None else argv),
        "commit": git.commit + (" (with uncommitted changes)" if git.dirty else ""),
        "host": socket.gethostname(),
        "device": _device_name(device),
        "driver": driver_version() if device.type == "cuda" else "-",
        "torch": f"{torch.__version__} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()})",
        "cpus": str(os.cpu_count()),
        "python": platform.python_version(),
        "peak": f"{peak:.1f} TFLOP/s ({peak_what}, measured at start)",
        "mlflow_run": run_id,
    }


def _run_cells(args, config, info, cache: dict, peak: float, context: dict, rows: list[dict]) -> None:
    """Each cell of the grid measured, printed, logged and added to `rows`; the tables rewritten
    after each (a stopped matrix keeps what it measured) and logged at the end."""
    import mlflow

    grid = itertools.product(args.models, args.precision, args.channels_last, args.compile)
    for model, precision, channels_last, compile_mode in grid:
        row = _cell(args, config, model, precision, channels_last, compile_mode, info, cache, peak)
        rows.append(row)
        print(_one_line(row), flush=True)
        name = f"{model}.{precision}.cl-{channels_last}.compile-{compile_mode}"
        mlflow.log_metrics({f"{name}.{k}": row[k] for k in ("synthetic", "real", "loader") if row[k] is not None})
        write_tables(rows, context, args.out)
    mlflow.log_artifact(str(args.out / "matrix.csv"))
    mlflow.log_artifact(str(args.out / "matrix.md"))


def _cell(args, config, model, precision, channels_last, compile_mode, info, cache: dict, peak: float) -> dict:
    """One row of the matrix: synthetic and (when data was given) real and loader-alone speeds.
    `cache` holds the datasets (built by main) and each loader-alone speed once measured."""
    from reproduce.models import MODELS

    device, spec = info.device, MODELS[model]
    cl, amp, compiled = channels_last == "on", precision == "bf16", compile_mode != "off"
    switches = [f"run.amp={amp}", f"run.channels_last={cl}", f"run.compile={compiled}"]
    if compiled:
        switches.append(f"run.compile_mode={compile_mode}")
    batch = args.batch or config(model, []).optim.batch_size
    while True:
        cfg = config(model, [*switches, f"optim.batch_size={batch}"])
        size, num_classes = (spec.input_size if spec.family == "cifar" else cfg.data.crop), spec.num_classes
        try:
            images = torch.randn(batch, 3, size, size, device=device)
            labels = torch.randint(num_classes, (batch,), device=device)
            synthetic = _timed_cell(cfg, itertools.repeat((images, labels)), info, args, num_classes)
            break
        except torch.OutOfMemoryError:
            if batch == 1:
                raise
            batch //= 2
            print(f"  {model}: out of memory, trying batch {batch}", flush=True)
        finally:
            images = labels = None
            release(device)
    real = loader = None
    if not cfg.data.synthetic:
        key = _data_key(cfg)
        data = cache[key]
        real = _timed_cell(cfg, train_loader(data, cfg, info, 0), info, args, data.num_classes)
        if (key, batch) not in cache:
            cache[(key, batch)] = loader_alone(
                train_loader(data, cfg, info, 0), device, args.iterations, args.warmup, batch
            )
        loader = cache[(key, batch)]
    flops = train_flops_per_image(model, size)
    best = max(v for v in (synthetic, real) if v is not None)
    return {
        "model": model,
        "input_size": size,
        "batch": batch,
        "precision": precision,
        "channels_last": channels_last,
        "compile": compile_mode,
        "synthetic": round(synthetic, 1),
        "real": None if real is None else round(real, 1),
        "loader": None if loader is None else round(loader, 1),
        "input": "-" if real is None else f"{cfg.data.loader}: {cfg.data.path}",
        "bound": "-" if real is None else "compute-bound" if real >= COMPUTE_BOUND_SHARE * synthetic else "input-bound",
        "tflops": round(flops * best / 1e12, 3),
        "peak_share_pct": round(100 * flops * best / 1e12 / peak, 1),
    }


def _data_key(cfg) -> tuple:
    return cfg.data.dataset, cfg.data.loader, str(cfg.data.path)


def _timed_cell(cfg, batches, info, args, num_classes) -> float:
    try:
        return bare_loop(cfg, batches, info, args.iterations, args.warmup, num_classes)
    finally:
        torch._dynamo.reset()  # the next cell compiles its own graphs, not on top of this one's
        release(info.device)


def write_tables(rows: list[dict], context: dict, out: Path) -> None:
    """matrix.csv and matrix.md in `out`, each written atomically (io.atomic_write_text)."""
    frame = pd.DataFrame(rows)
    atomic_write_text(out / "matrix.csv", frame.to_csv(index=False))
    head = ["# Training throughput matrix (`reproduce bench-matrix`)", ""]
    head += [f"- {k}: {'`' + v + '`' if k in ('command', 'commit', 'mlflow_run') else v}" for k, v in context.items()]
    head += [
        "",
        "images/s of the bare training step (forward, backward, SGD step; no tracking). synthetic: a fixed "
        "batch on the device; real: the named loader feeding the step; loader: the loader alone. bound: "
        f"input-bound when real < {COMPUTE_BOUND_SHARE:.0%} of synthetic. TFLOP/s = 6 x multiply-adds per image "
        "x the faster of synthetic and real; share: of the measured peak above.",
        "",
    ]
    shown = frame.fillna("-")
    lines = ["| " + " | ".join(shown.columns) + " |", "|" + "---|" * len(shown.columns)]
    lines += ["| " + " | ".join(str(v) for v in r) + " |" for r in shown.itertuples(index=False)]
    atomic_write_text(out / "matrix.md", "\n".join(head + lines) + "\n")


def _one_line(row: dict) -> str:
    real = "" if row["real"] is None else f", real {row['real']:.0f} ({row['bound']}), loader alone {row['loader']:.0f}"
    return (
        f"{row['model']:<10} {row['precision']} cl={row['channels_last']:<3} compile={row['compile']:<16} batch {row['batch']:>3}: "
        f"synthetic {row['synthetic']:.0f} images/s{real}; {row['tflops']:.1f} TFLOP/s = {row['peak_share_pct']:.1f}% of peak"
    )


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB)"
    return f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


if __name__ == "__main__":
    sys.exit(main())
