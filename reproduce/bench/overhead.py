"""Overhead benchmark: images/s of the full training loop (train.py: MLflow, progress bar,
checkpoints, evaluation bookkeeping) against a bare loop with the same model, data, batch
and numerics, measured side by side in one process. The goal is a ratio of at least 0.95.

  reproduce bench [--config configs/cifar10/resnet20.yaml] [--iterations 200] [key=value ...]

Both loops run `iterations` steps from the same start and the first `--warmup` steps of
each are not timed. They alternate (bare, full, bare, full, ..., bare: `--rounds` full runs)
and the medians are compared, so drift of the machine's speed largely cancels out.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch

from reproduce.bench.harness import bare_loop
from reproduce.errors import ArgumentParser
from reproduce.provenance import CONFIGS


def parse_args(argv):
    parser = ArgumentParser(prog="reproduce bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(CONFIGS / "cifar10" / "resnet20.yaml"))
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2, help="full-loop runs, each between two bare-loop runs")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    return parser.parse_args(argv)


def full_loop(args, run_dir: Path, round_: int) -> tuple[float, str]:
    """(images/s of train.py itself, from the images_per_sec it logged after the warm-up; its MLflow run id)."""
    import mlflow

    from reproduce import train

    overrides = [
        *args.overrides,
        f"schedule.iterations={args.iterations}",
        "schedule.milestones=[]",
        f"run.log_every={args.warmup}",
        f"eval.every={args.iterations}",
        f"run.checkpoint_every={args.iterations // 2}",
        f"run.dir={run_dir}",
        "experiment=bench",
        f"seed={round_}",
    ]
    code = train.main(["--config", args.config, *overrides])
    if code != 0:
        raise SystemExit(code)
    run = mlflow.search_runs(
        experiment_names=["bench"], order_by=["attributes.start_time DESC"], max_results=1, output_format="list"
    )[0]
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "images_per_sec")
    windows = [m.value for m in sorted(history, key=lambda m: m.step) if m.step > args.warmup]
    # Each window's speed weighs by its length: the harmonic mean of equal-length windows.
    return len(windows) / sum(1 / v for v in windows), run.info.run_id


def main(argv=None) -> int:
    import tempfile

    from reproduce import distributed
    from reproduce.config import load_config
    from reproduce.data import build_data, train_loader

    args = parse_args(argv)
    if args.iterations < 2 * args.warmup or args.iterations % args.warmup:
        raise SystemExit("error: --iterations must be a multiple of --warmup and at least twice it")
    cfg = load_config(args.config, args.overrides)
    info = distributed.setup(cfg.run.device)
    data = build_data(cfg)

    def bare() -> float:
        return bare_loop(cfg, train_loader(data, cfg, info, 0), info, args.iterations, args.warmup, data.num_classes)

    bare_speeds, full, run_ids = [bare()], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            speed, run_id = full_loop(args, Path(tmp) / f"run{round_}", round_)
            full.append(speed)
            run_ids.append(run_id)
            bare_speeds.append(bare())
    device = torch.cuda.get_device_name() if info.device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(
        f"{cfg.model.name}, global batch {cfg.optim.batch_size}, {args.iterations - args.warmup} timed iterations, {device}"
    )
    print(
        f"bare loop   median {statistics.median(bare_speeds):8.1f} images/s  (runs: {', '.join(f'{v:.1f}' for v in bare_speeds)})"
    )
    print(f"train.py    median {statistics.median(full):8.1f} images/s  (runs: {', '.join(f'{v:.1f}' for v in full)})")
    print(f"ratio       {statistics.median(full) / statistics.median(bare_speeds):.3f}  (goal >= 0.95)")
    import mlflow

    print(f"MLflow runs of train.py (experiment 'bench', {mlflow.get_tracking_uri()}): {', '.join(run_ids)}")
    return 0
