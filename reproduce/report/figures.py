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
    val bold), as the paper draws them: plain nets left, ResNets right (and, for CIFAR-10 when
    both ran, a third panel of ResNet-110 against ResNet-1202), one colour per depth, each line
    the mean over the seeds of a recipe, iterations in units of 1e4, a marker where a curve has
    a single point. Lines carry gid "<name>|train" / "<name>|<eval key>"."""
    from matplotlib.figure import Figure

    eval_key = "test_top1_err" if study == "cifar10" else "val_top1_err"
    groups = _one_line_per_network(groups, study)
    depths = sorted({depth_of(g.key[0]) for g in groups})
    colours = {d: f"C{i % 10}" for i, d in enumerate(depths)}
    panels = _panels({g.key[0] for g in groups})
    fig = Figure(figsize=(5.5 * len(panels), 4.2), layout="constrained")
    axes = fig.subplots(1, len(panels), sharey=True)
    for ax, (title, member) in zip(axes, panels):
        for g in (g for g in groups if member(g)):
            name, colour = display_name(g.key), colours[depth_of(g.key[0])]
            for key, style, width, label in (
                ("train_top1_err", "--", 1, "_train"),
                (eval_key, "-", 2.2, f"{name} (n={len(g.runs)})"),
            ):
                steps, values = mean_curve(g.runs, key)
                ax.plot(
                    [s / 1e4 for s in steps],
                    values,
                    style,
                    lw=width,
                    color=colour,
                    marker="o" if len(steps) == 1 else None,
                    gid=f"{name}|{'train' if key == 'train_top1_err' else key}",
                    label=label,
                )
        ax.set_title(title)
        ax.set_xlabel("iter. (1e4)")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no runs", transform=ax.transAxes, ha="center")
    axes[0].set_ylabel("error (%)")
    axes[0].set_ylim(bottom=0)
    split = "test" if study == "cifar10" else "val (center crop)"
    fig.suptitle(
        f"{'Fig. 6' if study == 'cifar10' else 'Fig. 4'}: dashed = training error, bold = {split} error; "
        "mean over seeds",
        fontsize=10,
    )
    return fig


def _one_line_per_network(groups: list[Group], study: str) -> list[Group]:
    """The groups Fig. 6 / Fig. 4 draws: one per network (of several shortcut options, the paper's A);
    for ImageNet the 18- and 34-layer nets, as Fig. 4."""
    if study == "imagenet":
        groups = [g for g in groups if depth_of(g.key[0]) <= 34]
    preference = {"A": 0, "": 1, "B": 2, "C": 3}
    best = {}
    for g in sorted(groups, key=lambda g: preference.get(g.key[1], 4)):
        best.setdefault(g.key[0], g)
    return list(best.values())


def _panels(names: set[str]) -> list[tuple]:
    """(title, which groups) per panel: plain nets, ResNets, and ResNet-110 beside 1202 when both ran."""
    panels = [
        ("plain networks", lambda g: g.key[0].startswith("plain")),
        ("ResNets", lambda g: not g.key[0].startswith("plain") and g.key[0] != "resnet1202"),
    ]
    if {"resnet110", "resnet1202"} <= names:
        panels.append(("ResNet-110 and ResNet-1202", lambda g: g.key[0] in ("resnet110", "resnet1202")))
    elif "resnet1202" in names:
        panels[1] = ("ResNets", lambda g: not g.key[0].startswith("plain"))
    return panels


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
        ax.set_yscale("log")  # one diverging run must not flatten the others
        ax.set_ylabel("std (log scale)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Fig. 7: std of layer responses (BN output of each 3x3 conv) on CIFAR-10", fontsize=10)
    return fig


def png(fig, dpi: int = 120) -> bytes:
    """The figure as PNG bytes (what savefig would write to a .png file)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()
