"""Train one configured network, the same way under every launcher.

  python reproduce/train.py --config configs/cifar10/resnet20.yaml [key=value ...]
  torchrun --nproc_per_node 8 reproduce/train.py --config configs/imagenet/resnet50.yaml data.path=/data/imagenet
  torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 reproduce/train.py ...
  srun python reproduce/train.py ...        (ranks from SLURM; see slurm/)
  reproduce train --config ...              (the installed console script)

The run directory (run.dir, by default runs/<experiment>/<model>-s<seed>-<recipe hash>)
holds the checkpoints; starting a job whose run directory holds one resumes it, into the
same MLflow run, exactly where it stopped.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:  # `python reproduce/train.py`: import the package, not its folder
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import logging
import math
from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from reproduce import checkpoint, distributed
from reproduce.config import Config, ConfigError, load_config
from reproduce.data import Data, build_data, eval_loader, train_loader
from reproduce.data.order import batches_per_epoch
from reproduce.engine import TimeToTarget, TrainingWindow, build_optimizer, evaluate, lr_at, param_groups, train_step
from reproduce.errors import ArgumentParser, Failed, command, one_line
from reproduce.io import atomic_write_text
from reproduce.models import build_model
from reproduce.numerics import Numerics, resolve_numerics, torch_settings
from reproduce.provenance import GitState, code_state
from reproduce.stop import STOPPED, StopFlag, Stopped
from reproduce.tracking import NullTracker, Tracker, check_reachable, check_resumable, tracker_for
from reproduce.weights import WeightsError, initialise

log = logging.getLogger("reproduce.train")
STOP_CHECK_EVERY = 10  # iterations between agreed stop checks when there are several processes


class NonFiniteLoss(Failed, RuntimeError):
    """The loss or the weights stopped being finite: the run is FAILED, its checkpoints kept."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="reproduce train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="a YAML file under configs/")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. optim.lr=0.05 schedule.iterations=1000")
    return parser.parse_args(argv)


@command
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop = StopFlag()  # from the start: a stop request during setup must not be lost (SLURM preemption)
    try:
        _, _, _, world_size = distributed.launch_env()
        return run(load_config(args.config, args.overrides, world_size=world_size), stop)
    finally:
        stop.restore()


def run(cfg: Config, stop: StopFlag) -> int:
    """Train `cfg` in the processes this one belongs to (python, torchrun or srun): 0 when the run
    finished, 143 when it stopped on request. Bad input raises a Refused error (exit 2) before any
    training; a run that fails raises Failed (exit 1). `reproduce train` and sweeps call this."""
    try:
        info = distributed.setup(cfg.run.device, timeout_s=cfg.run.collective_timeout_s)
    except distributed.JoinFailed:  # the environment failed (rendezvous, network): not a bad config
        raise
    except RuntimeError as err:  # a config this machine cannot run (run.device=cuda, no GPU)
        raise ConfigError(one_line(err)) from None
    lock = None
    try:
        # Everything that can be refused is checked before any training: data, the run
        # directory's lock, the tracking server. Rank 0's verdict is every rank's.
        data = check_inputs(cfg)
        lock = distributed.agree(lambda: checkpoint.lock_run_dir(cfg.run_dir()), info)
        distributed.agree(check_reachable, info)
        if distributed.any_rank(stop.requested, info):
            log.warning("stop requested before training started; nothing to save, exiting")
            return STOPPED
        return train(cfg, info, data, stop)
    finally:
        distributed.teardown(info)
        if lock is not None:
            lock.close()


def check_inputs(cfg: Config) -> Data:
    """The data of `cfg`, or DataError for every data reason train would refuse it: checked
    before any run directory or MLflow run exists (`reproduce check` runs the same checks)."""
    data = build_data(cfg)
    batches_per_epoch(len(data.train), cfg.optim.batch_size)
    return data


@dataclass
class Run:
    """What the loop works on: the config, the processes, the data, the networks, the
    optimizer and where the run is logged and saved. Built once by `train`."""

    cfg: Config
    info: distributed.DistInfo
    data: Data
    unwrapped: torch.nn.Module  # saved and loaded; never the DDP or compiled wrapper
    model: torch.nn.Module  # what the steps call: unwrapped, wrapped in DDP and/or compiled
    optimizer: torch.optim.Optimizer
    tracker: Tracker | NullTracker  # NullTracker on ranks other than 0 (tracker_for)
    stop: StopFlag
    git: GitState
    run_id: str | None
    start: int  # the first iteration this process trains (0, or where the checkpoint left off)
    numerics: Numerics  # run.amp and run.channels_last with `auto` decided
    targets: TimeToTarget  # eval.target_top1_err reached so far (kept by the checkpoints)

    @property
    def memory_format(self) -> torch.memory_format:
        return self.numerics.memory_format

    def save(self, done: int) -> None:
        """A checkpoint after `done` iterations (rank 0 writes; every rank waits for it)."""
        if not all(torch.isfinite(p).all() for p in self.unwrapped.parameters()):  # never save a broken model
            raise NonFiniteLoss(
                f"weights became non-finite by iteration {done} (lr {lr_at(done - 1, self.cfg.optim.lr, self.cfg.schedule):g});"
                " stopping without writing a checkpoint"
            )
        if self.info.is_main:
            state = checkpoint.contents(
                self.unwrapped, self.optimizer, done, self.run_id, self.cfg, self.git, self.numerics
            )
            state["time_to_target"] = self.targets.state()
            checkpoint.save(self.cfg.run_dir(), done, state, keep=self.cfg.run.keep_checkpoints)
            self.tracker.log_metrics({"checkpoint_iteration": done}, step=done)  # where a resume starts
        distributed.barrier(self.info)  # no rank runs ahead of a checkpoint that may be needed to resume


def train(cfg: Config, info: distributed.DistInfo, data: Data, stop: StopFlag) -> int:
    """Train (or resume) the run of `cfg` to the end of its schedule, evaluate it and log it."""
    torch_settings(cfg.run.deterministic)
    resume = checkpoint.resume_point(cfg, info)
    logged = _logged_status(resume, data, info)
    numerics = _numerics(cfg, info, data, resume)
    unwrapped, optimizer = _build(cfg, info, data, numerics)
    start, run_id = (resume.restore(unwrapped, optimizer), resume.run_id) if resume else (0, None)
    if start >= cfg.schedule.iterations:
        # Trained to the end. A run killed after its last checkpoint but before MLflow marked it
        # FINISHED (SIGKILL while it logged the model or flushed its metrics) is finished now:
        # the final evaluation and logging again, the loop skipped.
        if logged == "FINISHED":
            log.info("run in %s is already complete (%d iterations, MLflow run %s)", cfg.run_dir(), start, run_id)
            return 0
        log.info(
            "run in %s trained all %d iterations but MLflow run %s is not FINISHED; evaluating and finishing it",
            cfg.run_dir(),
            start,
            run_id,
        )
    run = _start(cfg, info, data, stop, unwrapped, optimizer, numerics, start, run_id)
    run.targets = _time_to_target(run, resume)
    return _train_to_the_end(run)


def _time_to_target(run: Run, resume: checkpoint.Resume | None) -> TimeToTarget:
    """The targets reached so far (rank 0 keeps them): none in a new run, a resumed run's from its
    checkpoint. From a checkpoint older than that record: the iterations from the errors its MLflow
    run logged up to it, logged now (their wall time, and so that of later targets, is not known)."""
    targets = run.cfg.eval.target_top1_err
    if resume is None or not run.info.is_main:
        return TimeToTarget(targets)
    if "time_to_target" in resume.state:
        return TimeToTarget.from_state(targets, resume.state["time_to_target"])
    import mlflow

    clock = TimeToTarget(targets, elapsed_s=None)
    try:
        for split in ("val", "test") if targets and resume.run_id else ():  # val where the run has one
            history = mlflow.MlflowClient().get_metric_history(resume.run_id, f"{split}_top1_err")
            for step, error in sorted((m.step, m.value) for m in history if m.step <= resume.iteration):
                run.tracker.log_metrics(clock.update({f"{split}_top1_err": error}, step), step=step)
            if history:
                break
    except Exception as err:  # not known: no target is logged rather than a wrong one
        log.warning("time to target not logged: cannot read the run's errors before the resume (%s)", one_line(err))
        clock.reached = {target: (None, None) for target in targets}
    return clock


def _logged_status(resume: checkpoint.Resume | None, data: Data, info: distributed.DistInfo) -> str | None:
    """The status of the MLflow run the checkpoints continue (None without one), on every rank;
    ResumeRefused unless this store holds it and it was trained on this data."""
    if resume is None or not resume.run_id:
        return None
    status = distributed.agree(lambda: check_resumable(resume.run_id, resume.path, data.fingerprint), info)
    return distributed.broadcast_object(status, info)


def _numerics(cfg: Config, info: distributed.DistInfo, data: Data, resume: checkpoint.Resume | None) -> Numerics:
    """`auto` numerics are decided once per run (rank 0 measures) and kept by its checkpoints."""
    if resume is not None and resume.numerics is not None:
        return Numerics(**resume.numerics)
    batch = cfg.optim.batch_size // info.world_size
    measured = resolve_numerics(cfg, info.device, data.num_classes, batch) if info.is_main else None
    return distributed.broadcast_object(measured, info)


def _build(
    cfg: Config, info: distributed.DistInfo, data: Data, numerics: Numerics
) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The network (model.init's weights in it) and its optimizer, seeded; then the RNG is seeded per rank."""
    # Same seed on every rank for the weights (DDP also broadcasts rank 0's), then (seed, rank).
    torch.manual_seed(cfg.seed)
    unwrapped = build_model(cfg.model.name, cfg.model.shortcut, cfg.model.variant, num_classes=data.num_classes)
    # model.init: the given weights (also on resume, where the checkpoint then overwrites them: the
    # optimizer's parameter groups depend on which layers they provided).
    pretrained = initialise(unwrapped, cfg.model, data.num_classes) if cfg.model.init else set()
    if (
        cfg.optim.pretrained_lr_scale == 0
        and pretrained
        and all(n in pretrained for n, _ in unwrapped.named_parameters())
    ):
        raise WeightsError(
            f"optim.pretrained_lr_scale=0 freezes every layer: model.init {cfg.model.init} also gave the "
            f"classifier ({data.num_classes} classes, as the data); set model.init_classifier=false to "
            "train a new one, or a pretrained_lr_scale above 0"
        )
    unwrapped.to(info.device, memory_format=numerics.memory_format)
    optimizer = build_optimizer(param_groups(unwrapped, pretrained, cfg.optim.pretrained_lr_scale), cfg.optim)
    torch.manual_seed(cfg.seed * 1000 + info.rank)
    return unwrapped, optimizer


def _start(cfg, info, data, stop, unwrapped, optimizer, numerics, start: int, run_id: str | None) -> Run:
    """Wrap the network (DDP, compile), open the MLflow run (new, or the one resumed) and say what runs."""
    model = (
        DistributedDataParallel(unwrapped, device_ids=[info.device] if info.device.type == "cuda" else None)
        if info.distributed
        else unwrapped
    )
    if cfg.run.compile:
        model = torch.compile(model, mode=cfg.run.compile_mode)
    git = code_state()  # read once per process: the checkpoints and MLflow record the same state
    tracker = tracker_for(info, cfg.run_dir(), cfg.run.tracking_flush_s)
    run_id = distributed.broadcast_object(tracker.start(cfg, data.fingerprint, data.description, run_id, git), info)
    targets = TimeToTarget(cfg.eval.target_top1_err)
    run = Run(cfg, info, data, unwrapped, model, optimizer, tracker, stop, git, run_id, start, numerics, targets)
    tracker.log_numerics(numerics)
    if info.is_main:
        atomic_write_text(cfg.run_dir() / "config.yaml", cfg.to_yaml())
        _say_what_runs(run)
    return run


def _say_what_runs(run: Run) -> None:
    cfg, info, data, numerics = run.cfg, run.info, run.data, run.numerics
    log.info(
        "%s on %s; %s, %s (%s)",
        cfg.model.name,
        data.description,
        "bf16 autocast" if numerics.amp else "fp32",
        "channels_last" if numerics.channels_last else "contiguous",
        numerics.how,
    )
    log.info(
        "global batch %d = %d processes x %d; %d iterations = %.1f epochs; run dir %s; MLflow run %s%s",
        cfg.optim.batch_size,
        info.world_size,
        cfg.optim.batch_size // info.world_size,
        cfg.schedule.iterations,
        cfg.schedule.iterations / batches_per_epoch(len(data.train), cfg.optim.batch_size),
        cfg.run_dir(),
        run.run_id,
        f"; resuming at iteration {run.start}" if run.start else "",
    )


def _train_to_the_end(run: Run) -> int:
    """The loop from run.start, the final evaluation, the last checkpoint and the MLflow run's end:
    0 (FINISHED), 143 (stopped: KILLED), or the exception that FAILED it."""
    cfg, info, tracker = run.cfg, run.info, run.tracker
    status = "FAILED"
    try:
        try:
            if run.start < cfg.schedule.iterations:
                _loop(run)
        except RuntimeError as err:
            if info.distributed and distributed.looks_like_lost_peer(err):
                raise distributed.Stalled(distributed.describe_stall(info, run.stop.iteration, err)) from err
            raise
        final = _final_eval(run)
        run.save(cfg.schedule.iterations)
        tracker.log_final(final)
        tracker.log_model(run.unwrapped, cfg, run.data.num_classes)
        status = "FINISHED"
        if info.is_main:
            wall = run.targets.elapsed()
            took = "" if wall is None else f"; trained in {wall / 60:.1f} min of wall time (evaluations, checkpoints)"
            log.info("final: %s%s", ", ".join(f"{k} {v:.2f}" for k, v in final.items()), took)
        return 0
    except (Stopped, KeyboardInterrupt):
        status = "KILLED"
        log.warning("stopped on request; resume by starting the same command again")
        return STOPPED
    finally:
        tracker.end(status)


def _loop(run: Run) -> None:
    cfg, info = run.cfg, run.info
    iterations = cfg.schedule.iterations
    bar = tqdm(
        total=iterations,
        initial=run.start,
        disable=not (info.is_main and cfg.run.progress),
        dynamic_ncols=True,
        mininterval=1.0,
        unit="it",
    )
    window, since_log = TrainingWindow(info.device), 0
    run.targets.restart()
    run.model.train()
    for it, (images, labels) in zip(range(run.start, iterations), train_loader(run.data, cfg, info, run.start)):
        lr = lr_at(it, cfg.optim.lr, cfg.schedule)
        for group in run.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # model.init's layers: optim.pretrained_lr_scale
        labels = labels.to(info.device, non_blocking=True)
        loss, logits = train_step(
            run.model, run.optimizer, images, labels, info.device, run.numerics.amp, run.memory_format
        )
        window.add(loss, logits, labels)
        done, since_log = it + 1, since_log + 1
        bar.update(1)
        if done % cfg.run.log_every == 0 or done == iterations:
            _log_training(run, window, since_log, done, lr, bar)
            since_log = 0
        if done % cfg.eval.every == 0 and done < iterations:
            errors = _periodic_eval(run, run.model)
            run.tracker.log_metrics({**errors, **_reached(run, errors, done)}, step=done)
            window.restart()  # evaluation time is not training speed
        if done % cfg.run.checkpoint_every == 0 and done < iterations:
            run.save(done)
            window.restart()
        if _stop_agreed(run, done):
            run.save(done)
            bar.close()
            raise Stopped()
    bar.close()


def _log_training(run: Run, window: TrainingWindow, since_log: int, done: int, lr: float, bar: tqdm) -> None:
    """The training metrics of the window at iteration `done` (a non-finite loss ends the run)."""
    per_epoch = batches_per_epoch(len(run.data.train), run.cfg.optim.batch_size)
    mean_loss, err, speed = window.metrics(run.info, since_log, run.cfg.optim.batch_size)
    if not math.isfinite(mean_loss):
        raise NonFiniteLoss(f"training loss is {mean_loss} at iteration {done} (lr {lr:g}); stopping")
    metrics = {
        "train_loss": mean_loss,
        "train_top1_err": err,
        "lr": lr,
        "images_per_sec": speed,
        "epoch": done / per_epoch,
    }
    run.tracker.log_metrics(metrics, step=done)
    bar.set_postfix(
        loss=f"{mean_loss:.3f}", err=f"{err:.1f}%", img_s=f"{speed:.0f}", epoch=f"{done / per_epoch:.1f}", refresh=False
    )


def _stop_agreed(run: Run, done: int) -> bool:
    """Whether the ranks agree to stop after iteration `done` (checked every iteration in one process,
    every STOP_CHECK_EVERY with several, where it is a collective; the heartbeat rides along)."""
    info, iterations = run.info, run.cfg.schedule.iterations
    run.stop.iteration = done
    if info.distributed and done % STOP_CHECK_EVERY == 0:
        distributed.heartbeat(info, done)
    # A stop after the last iteration is not one: the final evaluation follows and the run finishes.
    return (
        done < iterations
        and (info.world_size == 1 or done % STOP_CHECK_EVERY == 0)
        and distributed.any_rank(run.stop.requested, info)
    )


def _periodic_eval(run: Run, model: torch.nn.Module) -> dict[str, float]:
    """Validation error; for CIFAR also the test error (Fig. 6 plots test error curves), and for an
    image folder, which has no validation split, the test error on its val/."""
    cfg, data = run.cfg, run.data
    out = {}
    splits = [("val", data.val)] + ([("test", data.test)] if cfg.data.dataset in ("cifar10", "folder") else [])
    for name, split in splits:
        if split is not None:
            result = evaluate(
                model, eval_loader(split, cfg, run.info), run.info, run.numerics.amp, run.numerics.channels_last
            )
            out.update({f"{name}_{k}": v for k, v in result.items()})
    return out


def _final_eval(run: Run) -> dict[str, float]:
    cfg = run.cfg
    final = _periodic_eval(run, run.unwrapped)
    if cfg.data.dataset == "imagenet":  # the test split (ImageNet val) under the configured protocol
        result = evaluate(
            run.unwrapped,
            eval_loader(run.data.test, cfg, run.info),
            run.info,
            run.numerics.amp,
            run.numerics.channels_last,
        )
        final.update({f"test_{k}": v for k, v in result.items()})
    run.tracker.log_metrics({**final, **_reached(run, final, cfg.schedule.iterations)}, step=cfg.schedule.iterations)
    return final


def _reached(run: Run, errors: dict[str, float], done: int) -> dict[str, float]:
    """The time-to-target metrics of the targets the evaluation at iteration `done` reached first."""
    reached = run.targets.update(errors, done)
    for name in (k for k in reached if k.endswith("_iteration")):
        log.info("%s reached at iteration %d", name.removeprefix("time_to_").removesuffix("_iteration"), done)
    return reached


if __name__ == "__main__":
    from reproduce.stop import exit_with

    exit_with(main())
