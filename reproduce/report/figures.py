"""The paper's figures from the runs the report tabulates: Fig. 4 / Fig. 6 (`depth_curves`) and
Fig. 7 (`response_figure`, from the `response_std` that `reproduce analyze responses` logs).

Figures are matplotlib `Figure`s (no pyplot state); `png` renders one to bytes, which the
report writes atomically.
"""
from __future__ import annotations

import io

from reproduce.report.runs import Group, depth_of, display_name


def mean_curve(runs: list[dict], key: str) -> tuple[list[int], list[float]]:
    """Mean over runs at the steps every run logged (the runs of one recipe log the same steps)."""
    histories = [dict((int(s), v) for s, v in r["history"].get(key, [])) for r in runs]
    steps = sorted(set.intersection(*(set(h) for h in histories))) if histories else []
    return steps, [sum(h[s] for h in histories) / len(histories) for s in steps]


def depth_curves(groups: list[Group], study: str):
    """Fig. 6 (CIFAR-10: train dashed, test bold) or Fig. 4 (ImageNet: train dashed, center-crop
    val bold): plain nets left, ResNets right, one colour per depth, each line the mean over
    the seeds of a recipe. Lines carry gid "<name>|train" / "<name>|<eval key>"."""
    from matplotlib.figure import Figure

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


def response_figure(groups: list[Group]):
    """Fig. 7 from the report's groups: for each model whose runs hold `response_std`, the
    first seed that has it; top panel in layer order, bottom sorted descending. None when no
    run has been analysed. Lines carry gid "<name>|original" / "<name>|sorted"."""
    from matplotlib.figure import Figure

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


def png(fig, dpi: int = 120) -> bytes:
    """The figure as PNG bytes (what savefig would write to a .png file)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()
