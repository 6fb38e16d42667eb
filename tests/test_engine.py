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
