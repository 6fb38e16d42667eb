"""The paper's figures from stored runs, and the layer-response analysis behind Fig. 7.

  reproduce analyze responses --run RUN_ID [--split test] [--images N] [--data PATH]

Fig. 4 / Fig. 6 (`depth_curves`) and Fig. 7 (`response_figure`) are drawn by
`reproduce report` from the runs it tabulates; `responses` measures what Fig. 7 needs.

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

DEFINITION = ("per-channel population std over images and positions of the BN output that follows each 3x3 conv "
              "(eval mode, before addition and ReLU), averaged over channels")


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
        self.sums[name] = [count + x.numel() // x.shape[1], total + x.sum((0, 2, 3)), squares + x.square().sum((0, 2, 3))]

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


def responses(run_id: str, split: str = "test", images: int | None = None, data_path: str | None = None,
              batch_size: int = 500) -> dict:
    """Load the run's newest checkpoint, measure its layer responses on `split`, log them."""
    import mlflow
    from mlflow.entities import Metric

    from reproduce import checkpoint
    from reproduce.config import Config
    from reproduce.data import build_data
    from reproduce.models import build_model

    client = mlflow.MlflowClient()
    run_dir = client.get_run(run_id).data.tags.get("reproduce.run_dir")
    found = checkpoint.list_checkpoints(Path(run_dir)) if run_dir else []
    if not found:
        raise FileNotFoundError(f"run {run_id} has no checkpoint (reproduce.run_dir = {run_dir!r})")
    state = torch.load(found[-1], map_location="cpu", weights_only=True)
    if state.get("mlflow_run_id") != run_id:  # a run directory reused by another run
        raise ValueError(f"{found[-1]} belongs to MLflow run {state.get('mlflow_run_id')}, not {run_id}")
    raw = state["config"]
    if data_path is not None:  # the data moved since training
        raw = {**raw, "data": {**raw["data"], "path": data_path}}
    cfg = Config.model_validate(raw)
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

    result = {"run_id": run_id, "model": cfg.model.name, "checkpoint": found[-1].name, "iteration": state["iteration"],
              "iterations": cfg.schedule.iterations, "split": split, "images": n, "definition": DEFINITION, "layers": list(stds),
              "std": list(stds.values()), "std_sorted": sorted(stds.values(), reverse=True)}
    now = int(time.time() * 1000)
    metrics = [Metric("response_std", value, now, step) for step, value in enumerate(stds.values(), start=1)]
    for first in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics per batch
        client.log_batch(run_id, metrics=metrics[first:first + 1000])
    client.log_text(run_id, json.dumps(result, indent=1), "layer_responses.json")
    return result


def mean_curve(runs: list[dict], key: str) -> tuple[list[int], list[float]]:
    """Mean over runs at the steps every run logged (the runs of one recipe log the same steps)."""
    histories = [dict((int(s), v) for s, v in r["history"].get(key, [])) for r in runs]
    steps = sorted(set.intersection(*(set(h) for h in histories))) if histories else []
    return steps, [sum(h[s] for h in histories) / len(histories) for s in steps]


def depth_curves(groups, study: str):
    """Fig. 6 (CIFAR-10: train dashed, test bold) or Fig. 4 (ImageNet: train dashed, center-crop
    val bold): plain nets left, ResNets right, one colour per depth, each line the mean over
    the seeds of a recipe. Lines carry gid "<name>|train" / "<name>|<eval key>"."""
    from matplotlib.figure import Figure

    from reproduce.report import depth_of, display_name

    eval_key = "test_top1_err" if study == "cifar10" else "val_top1_err"
    if study == "imagenet":  # Fig. 4 shows the 18- and 34-layer nets, with option A shortcuts
        groups = [g for g in groups if depth_of(g.key[0]) <= 34]
    # One line per network (a colour is a depth): of several shortcut options, the paper's A.
    preference = {"A": 0, "": 1, "B": 2, "C": 3}
    best = {}
    for g in sorted(groups, key=lambda g: preference.get(g.key[1], 4)):
        best.setdefault(g.key[0], g)
    groups = list(best.values())
    depths = sorted({depth_of(g.key[0]) for g in groups})
    colours = {d: f"C{i % 10}" for i, d in enumerate(depths)}
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for ax, plain in zip(axes, (True, False)):
        for g in (g for g in groups if g.key[0].startswith("plain") == plain):
            name, colour = display_name(g.key), colours[depth_of(g.key[0])]
            steps, values = mean_curve(g.runs, "train_top1_err")
            ax.plot(steps, values, "--", lw=1, color=colour, gid=f"{name}|train", label="_train")
            steps, values = mean_curve(g.runs, eval_key)
            ax.plot(steps, values, "-", lw=2.2, color=colour, gid=f"{name}|{eval_key}", label=f"{name} (n={len(g.runs)})")
        ax.set_title("plain networks" if plain else "ResNets")
        ax.set_xlabel("iterations")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no runs", transform=ax.transAxes, ha="center")
    axes[0].set_ylabel("error (%)")
    axes[0].set_ylim(bottom=0)
    split = "test" if study == "cifar10" else "val (center crop)"
    fig.suptitle(f"{'Fig. 6' if study == 'cifar10' else 'Fig. 4'}: dashed = training error, bold = {split} error; "
                 "mean over seeds", fontsize=10)
    return fig


def response_figure(groups):
    """Fig. 7 from the report's groups: for each model whose runs hold `response_std`, the
    first seed that has it; top panel in layer order, bottom sorted descending. None when no
    run has been analysed. Lines carry gid "<name>|original" / "<name>|sorted"."""
    from matplotlib.figure import Figure

    from reproduce.report import depth_of, display_name

    chosen = []
    for group in groups:
        run = next((r for r in group.runs if r["history"].get("response_std")), None)
        if run is not None:
            chosen.append((display_name(group.key), depth_of(group.key[0]), group.key[0].startswith("plain"), run))
    if not chosen:
        return None
    depths = sorted({depth for _, depth, _, _ in chosen})
    fig = Figure(figsize=(7, 7), layout="constrained")
    top, bottom = fig.subplots(2, 1)
    for name, depth, plain, run in chosen:
        values = [v for _, v in run["history"]["response_std"]]
        style = dict(color=f"C{depths.index(depth) % 10}", ls="--" if plain else "-", lw=1.5)
        label = f"{name} (seed {run['tags'].get('reproduce.seed', '?')})"
        top.plot(range(1, len(values) + 1), values, gid=f"{name}|original", label=label, **style)
        bottom.plot(range(1, len(values) + 1), sorted(values, reverse=True), gid=f"{name}|sorted", label=label, **style)
    top.set_xlabel("layer index (original)")
    bottom.set_xlabel("layer index (sorted by magnitude)")
    for ax in (top, bottom):
        ax.set_ylabel("std")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Fig. 7: std of layer responses (BN output of each 3x3 conv) on CIFAR-10", fontsize=10)
    return fig


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="reproduce analyze", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="analysis", required=True)
    resp = sub.add_parser("responses", help="Fig. 7: std of the layer responses of a trained run")
    resp.add_argument("--run", required=True, help="MLflow run id of a finished CIFAR-10 run")
    resp.add_argument("--split", choices=["test", "val"], default="test")
    resp.add_argument("--images", type=int, help="use N images spread evenly over the split (default: all)")
    resp.add_argument("--data", help="data.path to use instead of the one in the checkpoint's config")
    resp.add_argument("--batch-size", type=int, default=500)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from mlflow.exceptions import MlflowException

    from reproduce.data import DataError

    try:
        result = responses(args.run, args.split, args.images, args.data, args.batch_size)
    except (FileNotFoundError, ValueError, DataError, MlflowException) as err:  # ValueError covers invalid configs
        print(f"error: {err}", file=sys.stderr)
        return 2
    shown = ", ".join(f"{v:.3f}" for v in result["std"])
    if result["iteration"] < result["iterations"]:
        print(f"warning: the newest checkpoint is at iteration {result['iteration']} of {result['iterations']}: "
              "the run has not finished", file=sys.stderr)
    print(f"{result['model']} ({result['checkpoint']}, {result['images']} {args.split} images): "
          f"{len(result['std'])} layers, std {shown}; logged to run {args.run} as response_std and layer_responses.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
