"""numerics.py: `auto` bf16 and memory layout, decided by capability and by timed steps."""

from __future__ import annotations

import torch

from reproduce import numerics as autotune


def _cfg(**run):
    from reproduce.config import load_config
    from tests.conftest import REPO

    return load_config(REPO / "configs" / "cifar10" / "resnet20.yaml", [f"run.{k}={v}" for k, v in run.items()])


def test_auto_numerics_measure_without_touching_the_rng(monkeypatch):
    monkeypatch.setattr(autotune, "cpu_has_fast_bf16", lambda: False)
    before = torch.get_rng_state()
    numerics = autotune.resolve_numerics(
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
    monkeypatch.setattr(autotune, "cpu_has_fast_bf16", lambda: True)
    numerics = autotune.resolve_numerics(
        _cfg(amp="auto", channels_last="false"), torch.device("cpu"), 10, batch=4, steps=1
    )
    assert "bf16 NCHW" in numerics.how and "fp32 NCHW" in numerics.how
    fixed = autotune.resolve_numerics(_cfg(amp="false", channels_last="true"), torch.device("cpu"), 10, batch=4)
    assert (fixed.amp, fixed.channels_last, fixed.how) == (False, True, "as configured")
