"""engine.py: the evaluation's error metrics."""

from __future__ import annotations

import torch

from reproduce.distributed import DistInfo
from reproduce.engine import evaluate

CPU = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), launcher="python", slurm_job_id=None)


def _batches(classes: int, n: int = 32):
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(n, 3, 8, 8, generator=gen)
    return [(images, torch.randint(classes, (n,), generator=gen))]


def test_top5_error_is_absent_with_five_classes_or_fewer():
    for classes in (2, 5):
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, classes))
        result = evaluate(model, _batches(classes), CPU, amp=False, channels_last=False)
        assert "top5_err" not in result and 0 <= result["top1_err"] <= 100, result


def test_top5_error_is_measured_with_six_classes_or_more():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 6))
    with torch.no_grad():  # class 5 always scores lowest: it is never in the top 5
        model[1].weight.zero_()
        model[1].bias.copy_(torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.0]))
    images = torch.randn(10, 3, 8, 8)
    labels = torch.tensor([5] * 4 + [0] * 6)
    result = evaluate(model, [(images, labels)], CPU, amp=False, channels_last=False)
    assert result["top5_err"] == 40.0 and result["top1_err"] == 40.0


def _cfg(**run):
    from reproduce.config import load_config
    from tests.conftest import REPO

    return load_config(REPO / "configs" / "cifar10" / "resnet20.yaml", [f"run.{k}={v}" for k, v in run.items()])


def test_auto_numerics_measure_without_touching_the_rng(monkeypatch):
    from reproduce import engine

    monkeypatch.setattr(engine, "cpu_has_fast_bf16", lambda: False)
    before = torch.get_rng_state()
    numerics = engine.resolve_numerics(
        _cfg(amp="auto", channels_last="auto"), torch.device("cpu"), 10, batch=4, steps=1
    )
    assert torch.equal(torch.get_rng_state(), before)
    assert numerics.amp is False  # no fast bf16 on this CPU: fp32 without measuring it
    assert (
        numerics.how.startswith("measured images/s: fp32 NCHW ")
        and "fp32 NHWC" in numerics.how
        and "bf16" not in numerics.how
    )


def test_auto_numerics_consider_bf16_only_where_it_is_fast(monkeypatch):
    from reproduce import engine

    monkeypatch.setattr(engine, "cpu_has_fast_bf16", lambda: True)
    numerics = engine.resolve_numerics(
        _cfg(amp="auto", channels_last="false"), torch.device("cpu"), 10, batch=4, steps=1
    )
    assert "bf16 NCHW" in numerics.how and "fp32 NCHW" in numerics.how
    fixed = engine.resolve_numerics(_cfg(amp="false", channels_last="true"), torch.device("cpu"), 10, batch=4)
    assert (fixed.amp, fixed.channels_last, fixed.how) == (False, True, "as configured")
