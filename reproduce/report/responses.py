"""The paper's figures from stored runs, and the layer-response analysis behind Fig. 7.

  reproduce analyze responses --run RUN_ID [--split test] [--images N] [--data PATH]

Fig. 7 is drawn by `reproduce report` (reproduce/report/figures.py) from the runs it
tabulates; `responses` measures what it needs.

A layer's response is the output of the batch norm that follows a 3x3 convolution: after
BN, before the shortcut addition and the ReLU (paper §4.2, Fig. 7). Projection shortcuts
(1x1 convs) and the ImageNet 7x7 stem are not counted. The network runs in eval mode, so
BN uses its running statistics, as at test time.

The std of a layer is defined as: for each channel, the population standard deviation of
the response over all images and all spatial positions; then the mean over the channels.
(Per channel, so the spread between channel means, set by BN's beta, does not count.)

Layers are numbered 1, 2, ... in the order the forward pass reaches them (the stem conv
first). Logged to the run: metric `response_std` with step = layer number, and the
artifact `layer_responses.json` (names, stds in order and sorted, split, image count).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn

from reproduce.errors import ArgumentParser, command, one_line

DEFINITION = (
    "per-channel population std over images and positions of the BN output that follows each 3x3 conv "
    "(eval mode, before addition and ReLU), averaged over channels"
)


class ResponseStats:
    """Forward hooks that accumulate, per channel, the count, sum and sum of squares (float64)
    of every batch norm whose input is the output of a 3x3 convolution in the same forward."""

    def __init__(self, model: nn.Module):
        self._conv_outputs: dict[int, torch.Tensor] = {}
        self.sums: dict[str, list] = {}  # name -> [count, sum (C,), sum of squares (C,)], in forward order
        self._handles = []
        for name, module in model.named_modules():
            if isinstance(module, nn.Conv2d) and module.kernel_size == (3, 3):
                self._handles.append(module.register_forward_hook(self._conv))
            elif isinstance(module, nn.modules.batchnorm._BatchNorm):
                self._handles.append(module.register_forward_hook(partial(self._bn, name)))

    def _conv(self, module, inputs, output) -> None:
        # The tensor itself is kept (not only its id) so its id cannot be reused within the pass.
        self._conv_outputs[id(output)] = output

    def _bn(self, name, module, inputs, output) -> None:
        if self._conv_outputs.get(id(inputs[0])) is not inputs[0]:
            return  # this BN follows something else (a 1x1 projection)
        x = output.detach().double()
        count, total, squares = self.sums.setdefault(name, [0, 0.0, 0.0])
        self.sums[name] = [
            count + x.numel() // x.shape[1],
            total + x.sum((0, 2, 3)),
            squares + x.square().sum((0, 2, 3)),
        ]

    def end_batch(self) -> None:
        self._conv_outputs.clear()

    def stds(self) -> dict[str, float]:
        out = {}
        for name, (count, total, squares) in self.sums.items():
            mean = total / count
            var = (squares / count - mean.square()).clamp_min(0)
            out[name] = float(var.sqrt().mean())
        return out

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


@torch.no_grad()
def layer_response_stds(model: nn.Module, batches) -> dict[str, float]:
    """{BN module name: std} in forward order, over all images of `batches` (tensors or
    (images, labels) pairs)."""
    was_training = model.training
    model.eval()
    stats = ResponseStats(model)
    try:
        for batch in batches:
            images = batch[0] if isinstance(batch, (tuple, list)) else batch
            model(images)
            stats.end_batch()
    finally:
        stats.remove()
        model.train(was_training)
    return stats.stds()


def responses(
    run_id: str, split: str = "test", images: int | None = None, data_path: str | None = None, batch_size: int = 500
) -> dict:
    """Load the run's newest intact checkpoint, measure its layer responses on `split`, log them."""
    import mlflow
    from mlflow.entities import Metric

    from reproduce.data import build_data
    from reproduce.models import build_model
    from reproduce.tracking import log_metric_batches
    from reproduce.tracking.store import check_readable

    check_readable()  # a server that does not answer, or no store: one line, exit 2, nothing created
    client = mlflow.MlflowClient()
    found, state = _newest_checkpoint(client, run_id)
    cfg = _config(state, data_path)
    data = build_data(cfg)
    dataset = data.test if split == "test" else data.val
    if dataset is None:
        raise ValueError(f"run {run_id} has no {split} split (data.val_split = 0)")
    n = len(dataset) if images is None else min(images, len(dataset))
    # Evenly spread over the split: image trees are stored class by class.
    picked = np.linspace(0, len(dataset) - 1, n).round().astype(np.int64).tolist()
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, picked), batch_size=batch_size)
    model = build_model(cfg.model.name, cfg.model.shortcut, cfg.model.variant, num_classes=data.num_classes)
    model.load_state_dict(state["model"])
    stds = layer_response_stds(model, loader)

    result = {
        "run_id": run_id,
        "model": cfg.model.name,
        "checkpoint": found.name,
        "iteration": state["iteration"],
        "iterations": cfg.schedule.iterations,
        "split": split,
        "images": n,
        "definition": DEFINITION,
        "layers": list(stds),
        "std": list(stds.values()),
        "std_sorted": sorted(stds.values(), reverse=True),
    }
    now = int(time.time() * 1000)
    metrics = [Metric("response_std", value, now, step) for step, value in enumerate(stds.values(), start=1)]
    log_metric_batches(client, run_id, metrics)
    client.log_text(run_id, json.dumps(result, indent=1), "layer_responses.json")
    return result


def _newest_checkpoint(client, run_id: str) -> tuple[Path, dict]:
    """The run's newest intact checkpoint and its state; a damaged one is skipped and left as it is
    (a reader never changes the run directory it reads)."""
    from reproduce import checkpoint

    run_dir = client.get_run(run_id).data.tags.get("reproduce.run_dir")
    found = checkpoint.read_latest(Path(run_dir)) if run_dir else None
    if found is None:
        raise FileNotFoundError(f"run {run_id} has no checkpoint (reproduce.run_dir = {run_dir!r})")
    path, state, _ = found
    if state.get("mlflow_run_id") != run_id:  # a run directory reused by another run
        raise ValueError(f"{path} belongs to MLflow run {state.get('mlflow_run_id')}, not {run_id}")
    return path, state


def _config(state: dict, data_path: str | None):
    """The checkpoint's config, its data.path replaced by `data_path` when given (the data moved)."""
    from pydantic import ValidationError

    from reproduce.config import Config, ConfigError, _one_line

    raw = state["config"]
    if data_path is not None:
        raw = {**raw, "data": {**raw["data"], "path": data_path}}
    try:
        return Config.model_validate(raw)
    except ValidationError as err:  # e.g. --data naming no data: pydantic's many lines, as one
        raise ConfigError(_one_line(err)) from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="reproduce analyze", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="analysis", required=True)
    resp = sub.add_parser("responses", help="Fig. 7: std of the layer responses of a trained run")
    resp.add_argument("--run", required=True, help="MLflow run id of a finished CIFAR-10 run")
    resp.add_argument("--split", choices=["test", "val"], default="test")
    resp.add_argument("--images", type=int, help="use N images spread evenly over the split (default: all)")
    resp.add_argument("--data", help="data.path to use instead of the one in the checkpoint's config")
    resp.add_argument("--batch-size", type=int, default=500)
    return parser.parse_args(argv)


@command
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from mlflow.exceptions import MlflowException

    from reproduce.checkpoint import CheckpointError
    from reproduce.data import DataError

    try:
        result = responses(args.run, args.split, args.images, args.data, args.batch_size)
    except (
        FileNotFoundError,
        ValueError,
        DataError,
        MlflowException,
        CheckpointError,
    ) as err:  # ValueError: invalid configs
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    shown = ", ".join(f"{v:.3f}" for v in result["std"])
    if result["iteration"] < result["iterations"]:
        print(
            f"warning: the newest checkpoint is at iteration {result['iteration']} of {result['iterations']}: "
            "the run has not finished",
            file=sys.stderr,
        )
    print(
        f"{result['model']} ({result['checkpoint']}, {result['images']} {args.split} images): "
        f"{len(result['std'])} layers, std {shown}; logged to run {args.run} as response_std and layer_responses.json"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
