"""The arithmetic of `reproduce plan` (plan.py): what one process does (Rate), what a config's
schedule asks (Job), what the all-reduce adds (AllReduce), and the projection of the three; and
Rates read from a CSV of measurements (`--from`). No measuring here: tests feed it made-up rates."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from reproduce.errors import Refused

FORWARD_SHARE = 1 / 3  # an evaluation's forward pass: a third of a training step's work (2 of 6 x MACs)
VIEWS = {"single": 1, "center224": 1, "tencrop": 10, "multiscale": 36}  # final test: work per image
SIZES = {"cifar10": (None, 10_000), "imagenet": (50_000, 50_000)}  # (val, test) images; None: data.val_split


class PlanRefused(Refused, ValueError):
    """A plan that cannot be made (bad --from file, bad world size); one line."""


@dataclass(frozen=True)
class Rate:
    """What one process does here: training images/s (the projection's), evaluation images/s, one
    checkpoint's and the setup's seconds, and how that was found."""

    images_per_sec: float
    eval_per_sec: float
    checkpoint_s: float
    setup_s: float
    spread_pct: float | None = None  # (max - min) / median of the timed repeats
    model_per_sec: float | None = None  # on a fixed batch: the model alone
    bound: str = "-"
    numerics: str = "-"
    measured_s: float = 0.0  # how long measuring took
    source: str = "measured here"


@dataclass(frozen=True)
class Job:
    """What the schedule of one config asks for (global numbers)."""

    experiment: str
    model: str
    iterations: int
    global_batch: int
    train_images: int
    eval_images: int  # one periodic evaluation (validation, and test for CIFAR-10 / folders)
    evaluations: int  # periodic ones, before the final
    final_images: float  # the final evaluation, views counted
    checkpoints: int
    grad_bytes: int


def job_of(cfg, name: str, sizes: tuple[int | None, int], train_images: int, grad_bytes: int) -> Job:
    """The Job of `cfg`: its schedule, evaluation cadence and splits, and checkpoint cadence."""
    val, test = sizes
    cap = (lambda n: min(n, cfg.eval.max_images)) if cfg.eval.max_images else (lambda n: n)
    periodic = cap(val or 0) + (cap(test) if cfg.data.dataset in ("cifar10", "folder") else 0)
    final = periodic + (cap(test) * VIEWS[cfg.eval.protocol.value] if cfg.data.dataset == "imagenet" else 0)
    iterations = cfg.schedule.iterations
    return Job(
        experiment=name,
        model=cfg.model.name,
        iterations=iterations,
        global_batch=cfg.optim.batch_size,
        train_images=train_images,
        eval_images=periodic,
        evaluations=(iterations - 1) // cfg.eval.every,
        final_images=final,
        checkpoints=(iterations - 1) // cfg.run.checkpoint_every + 1,
        grad_bytes=grad_bytes,
    )


@dataclass(frozen=True)
class AllReduce:
    """Seconds of one all-reduce of n bytes among `world` processes: latency_s + n x 2(w-1)/w / bus."""

    latency_s: float
    bus_bytes_per_s: float | None  # None: not measured nor given (perfect scaling assumed)
    how: str

    def seconds(self, nbytes: int, world: int) -> float:
        if world == 1 or self.bus_bytes_per_s is None:
            return 0.0
        return self.latency_s + nbytes * 2 * (world - 1) / world / self.bus_bytes_per_s


def project(job: Job, rate: Rate, world: int, nodes: int, allreduce: AllReduce) -> dict:
    """The row of one experiment: its rate, the schedule, the wall time of each part and in all."""
    per_process = job.global_batch // world
    step_s = per_process / rate.images_per_sec + allreduce.seconds(job.grad_bytes, world)
    eval_s = (job.evaluations * job.eval_images + job.final_images) / world / rate.eval_per_sec
    parts = {
        "train_s": job.iterations * step_s,
        "eval_s": eval_s,
        "checkpoint_s": job.checkpoints * rate.checkpoint_s,
        "setup_s": rate.setup_s,
    }
    wall_s = sum(parts.values())
    return {
        "experiment": job.experiment,
        "model": job.model,
        "numerics": rate.numerics,
        "batch_per_process": per_process,
        "images_per_sec": round(rate.images_per_sec, 1),
        "spread_pct": None if rate.spread_pct is None else round(rate.spread_pct, 1),
        "bound": rate.bound,
        "world_size": world,
        "nodes": nodes,
        "global_images_per_sec": round(job.global_batch / step_s, 1),
        "iterations": job.iterations,
        "epochs": round(job.iterations * job.global_batch / job.train_images, 1),
        "step_s": round(step_s, 4),
        **{k: round(v, 1) for k, v in parts.items()},
        "wall_s": round(wall_s, 1),
        "wall": duration(wall_s),
        "device_hours": round(wall_s / 3600 * world, 2),
        "measured_s": round(rate.measured_s, 1),
        "source": rate.source,
    }


def duration(seconds: float) -> str:
    """`2 d 3 h`, `3 h 53 min`, `12 min 5 s` or `41 s`."""
    s = int(round(seconds))
    if s >= 86400:
        return f"{s // 86400} d {s % 86400 // 3600} h"
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 60} min {s % 60} s" if s >= 60 else f"{s} s"


def dataset_sizes(cfg, data=None) -> tuple[tuple[int | None, int], int]:
    """((validation, test) images, training images) of the real run: the built data's, else the
    dataset's own (synthetic input and --from stand in for it)."""
    if data is not None and not cfg.data.synthetic:
        return (len(data.val) if data.val is not None else None, len(data.test)), len(data.train)
    val, test = SIZES[cfg.data.dataset]
    if cfg.data.dataset == "cifar10":
        return (cfg.data.val_split or None, test), 50_000 - cfg.data.val_split
    return (val, test), 1_281_167


def rates_from(path: Path) -> dict[str, Rate]:
    """model -> Rate from a CSV of measured training rates (the fastest row per model); PlanRefused,
    in one line, for a file that is not one."""
    from reproduce.errors import one_line
    from reproduce.models import MODELS

    try:
        frame = pd.read_csv(path)
    except FileNotFoundError:
        raise PlanRefused(f"--from {path}: no such file") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as err:
        raise PlanRefused(f"--from {path}: not a CSV of measured rates ({one_line(err, 160)})") from None
    columns = [c for c in ("images_per_sec", "real", "synthetic") if c in frame]
    if "model" not in frame or not columns:
        raise PlanRefused(
            f"--from {path}: needs a 'model' column and an 'images_per_sec' (or bench-matrix's 'real' / "
            f"'synthetic') column; it has {', '.join(map(str, frame.columns)) or 'none'}"
        )
    numbers = [pd.to_numeric(frame[c], errors="coerce") for c in columns]
    frame["_rate"] = numbers[0].fillna(numbers[1]) if len(numbers) > 1 else numbers[0]
    bad = frame[~(frame._rate > 0) | ~frame.model.isin(list(MODELS))]
    if len(bad):
        row = bad.iloc[0]
        what = f"unknown model {row.model!r}" if row.model not in MODELS else f"no positive images/s ({row._rate})"
        raise PlanRefused(f"--from {path}: row {bad.index[0] + 2}: {what}")
    best = frame.loc[frame.groupby("model")._rate.idxmax()]
    return {row.model: _rate_of_row(row, path) for _, row in best.iterrows()}


def _rate_of_row(row: pd.Series, path: Path) -> Rate:
    """A Rate from one --from row: what it gives, and for what it lacks the stated stand-ins."""
    given = lambda name: float(row[name]) if name in row and pd.notna(row[name]) and float(row[name]) > 0 else None  # noqa: E731
    cell = " ".join(f"{row[k]}" for k in ("precision", "channels_last", "compile") if k in row)
    batch = f", batch {int(row['batch'])}" if "batch" in row and pd.notna(row["batch"]) else ""
    return Rate(
        images_per_sec=row._rate,
        eval_per_sec=given("eval_images_per_sec") or row._rate / FORWARD_SHARE,
        checkpoint_s=given("checkpoint_s") or float("nan"),  # measured here for the model (main)
        setup_s=given("setup_s") or 0.0,
        bound=str(row["bound"]) if "bound" in row and pd.notna(row["bound"]) else "-",
        numerics=str(row["numerics"]) if "numerics" in row and pd.notna(row["numerics"]) else cell or "-",
        source=f"{path} row {row.name + 2}{batch}",
    )
