"""run.amp and run.channels_last with `auto` decided for this machine: by capability (bf16 only
where it is fast), then by timing engine.train_step on each candidate."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from reproduce.engine import build_optimizer, train_step


@dataclass(frozen=True)
class Numerics:
    """bf16 autocast and the memory layout of a run, once `auto` is decided."""

    amp: bool
    channels_last: bool
    how: str  # how it was decided, for the log and the MLflow run

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format


def cpu_has_fast_bf16() -> bool:
    """AVX-512 BF16 or AMX: without either, bf16 on a CPU is emulated and many times slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


def resolve_numerics(cfg, device: torch.device, num_classes: int, batch: int, steps: int = 2) -> Numerics:
    """run.amp and run.channels_last with `auto` decided for this machine: candidates by
    capability (bf16 only on a CUDA GPU that has it, or a CPU with AVX-512 BF16 / AMX), then,
    when more than one remains, `steps` timed training steps of the configured network on a
    random batch of `batch` images for each. The RNG state is left as it was."""
    from reproduce.models import build_model

    amp, layout = cfg.run.amp, cfg.run.channels_last
    if amp != "auto" and layout != "auto":
        return Numerics(amp, layout, "as configured")
    if amp == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        amps = [True] if cuda_bf16 else [False, True] if device.type == "cpu" and cpu_has_fast_bf16() else [False]
    else:
        amps = [amp]
    layouts = [False, True] if layout == "auto" else [layout]
    combos = [(a, c) for a in amps for c in layouts]
    if len(combos) == 1:
        return Numerics(*combos[0], "by capability: " + ("bf16" if combos[0][0] else "no fast bf16 here, fp32"))
    size = 32 if cfg.data.dataset == "cifar10" else cfg.data.crop
    speeds = {}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for a, c in combos:
            fmt = torch.channels_last if c else torch.contiguous_format
            model = build_model(cfg.model.name, cfg.model.shortcut, cfg.model.variant, num_classes=num_classes)
            model.to(device, memory_format=fmt).train()
            optimizer = build_optimizer(model.parameters(), cfg.optim)
            images = torch.randn(batch, 3, size, size, device=device)
            labels = torch.randint(num_classes, (batch,), device=device)
            for i in range(steps + 1):  # the first step warms up (allocations, kernel choice)
                if i == 1:
                    _sync(device)
                    start = time.perf_counter()
                train_step(model, optimizer, images, labels, device, a, fmt)
            _sync(device)
            speeds[(a, c)] = steps * batch / (time.perf_counter() - start)
    best = max(speeds, key=speeds.get)
    shown = ", ".join(f"{'bf16' if a else 'fp32'} {'NHWC' if c else 'NCHW'} {v:.0f}" for (a, c), v in speeds.items())
    return Numerics(*best, f"measured images/s: {shown}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def torch_settings(deterministic: bool) -> None:
    """Determinism (run.deterministic) or cuDNN autotuning; TF32 matmuls on GPUs that have them."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    else:
        torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
