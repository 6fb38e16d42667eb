"""What the benchmarks share: the bare training loop, device synchronisation, the timing of
a stream of steps, and the device's measured matrix-multiplication rate.

The bare loop is train.py's step (engine.build_optimizer, engine.train_step) with nothing
around it: no tracking, no progress bar, no checkpoints, no evaluation.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import torch


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so a clock reading covers it (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def release(device: torch.device) -> None:
    """Return cached GPU memory between cells (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def items_per_sec(
    batches: Iterable, step: Callable, iterations: int, warmup: int, batch: int, device: torch.device
) -> float:
    """Run `step(b)` on the first `iterations` of `batches`; the rate (batch x steps / s) of
    those after the first `warmup`, timed between two device synchronisations."""
    start = None
    for it, item in zip(range(iterations), batches):
        if it == warmup:
            sync(device)
            start = time.perf_counter()
        step(item)
    sync(device)
    return (iterations - warmup) * batch / (time.perf_counter() - start)


def bare_step(cfg, info, num_classes: int, numerics=None):
    """(step, unwrapped model, optimizer, numerics): `step(batch)` is forward, backward and SGD step
    only, train.py's numerics (run.amp / run.channels_last, `auto` decided here unless given)."""
    from reproduce.engine import build_optimizer, train_step
    from reproduce.models import build_model
    from reproduce.numerics import resolve_numerics

    if numerics is None:
        numerics = resolve_numerics(cfg, info.device, num_classes, cfg.optim.batch_size // info.world_size)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model.name, cfg.model.shortcut, cfg.model.variant, num_classes=num_classes)
    fmt = numerics.memory_format
    model.to(info.device, memory_format=fmt).train()
    optimizer = build_optimizer(model.parameters(), cfg.optim)
    compiled = torch.compile(model, mode=cfg.run.compile_mode) if cfg.run.compile else model

    def one_step(batch) -> None:
        images, labels = batch
        train_step(compiled, optimizer, images, labels, info.device, numerics.amp, fmt)

    return one_step, model, optimizer, numerics


def bare_loop(cfg, batches, info, iterations: int, warmup: int, num_classes: int) -> float:
    """Images/s of forward, backward and step only over `batches`: no tracking, no progress,
    no checkpoints. The first `warmup` steps (compilation, autotuning) are not timed."""
    step = bare_step(cfg, info, num_classes)[0]
    return items_per_sec(batches, step, iterations, warmup, cfg.optim.batch_size, info.device)


def loader_alone(batches, device: torch.device, iterations: int, warmup: int, batch: int) -> float:
    """Images/s of the loader by itself: each batch moved to the device, nothing else."""

    def move(pair) -> None:
        images, labels = pair
        images.to(device, non_blocking=True), labels.to(device, non_blocking=True)

    return items_per_sec(batches, move, iterations, warmup, batch, device)


def measure_peak(device: torch.device) -> tuple[float, str]:
    """(TFLOP/s, what was measured): a square bf16 matrix product on a GPU, fp32 on a CPU."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(device)
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < 1.0:
        a @ b
        reps += 1
        if reps % 10 == 0:
            sync(device)
    sync(device)
    rate = 2 * n**3 * reps / (time.perf_counter() - start) / 1e12
    return rate, f"{str(dtype).removeprefix('torch.')} {n}x{n} matmul"
