"""The numbers a study answers with: per network the mean and std over seeds of its final errors and
n, and the margin of each of the paper's findings with its seed spread. `reproduce report` writes
them (summary.csv, a section of table.md), `reproduce study` prints them with a verdict per finding,
and a study's or sweep's parent MLflow run holds them as metrics (`metrics`) and in its description.

  train error  the mean of the logged train_top1_err windows over the last LAST_FRACTION of the run
               (each window the error on the augmented batches since the previous log line): the
               paper's dashed curves, smoothed; what the findings compare
  test error   the final test_top1_err (at step = schedule.iterations)
  margin       worse network's mean minus the better one's, in points; positive = the paper's way
  spread       what a finding's margin is held against: it is shown when its training-error margin
               exceeds it (nan with one seed). Where the two networks ran two or more seeds in common,
               the runs pair by seed (a seed fixes the batches, their order and their augmentation,
               whatever the network: data/order.py), and margin and spread are the mean and the
               range (max - min) of the per-seed differences; else the difference of the means and
               the larger seed-to-seed range of the two networks
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd

from reproduce.report.runs import Group, display_name

LAST_FRACTION = 0.2
# (worse, better, short name, claim): the paper's findings a CIFAR-10 depth study can show
FINDINGS = (
    ("plain56", "plain20", "degradation", "degradation (the deeper plain net trains worse, Fig. 6 left)"),
    ("plain56", "resnet56", "residual56", "residual learning (at 56 layers the ResNet trains better)"),
    ("resnet20", "resnet56", "deeper_resnet", "deeper ResNets are better (Fig. 6 middle, Table 6)"),
    ("plain20", "resnet20", "residual20", "residual learning at 20 layers"),
)
ERRORS = ("train", "test")  # the two errors summarised: train (last fifth, smoothed) and final test


def train_error(run: dict) -> float:
    """Training error (%) over the last LAST_FRACTION of the run's schedule, nan without history."""
    iterations = int(run["params"].get("schedule.iterations", 0))
    history = run["history"].get("train_top1_err", [])
    tail = [value for step, value in history if step > iterations * (1 - LAST_FRACTION)]
    return sum(tail) / len(tail) if tail else math.nan


def stats(values: list[float]) -> tuple[float, float, float]:
    """(mean, sample std, range max - min) over the values that are numbers; nan where undefined."""
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan, math.nan
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, math.nan, math.nan
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return mean, std, max(values) - min(values)


@dataclass
class Network:
    """One network's runs (one per seed) and their errors."""

    model: str  # the model's name (plain20); with its shortcut, variant and protocol where one model has several rows
    label: str  # as the paper writes it: plain-20, ResNet-56 A
    train: list[float]
    test: list[float]
    run_ids: list[str]
    seeds: list[str] = field(default_factory=list)  # each run's seed, in run_ids' order (empty: unknown)

    def by_seed(self, error: str) -> dict[str, float]:
        """seed -> this error of its run, for the runs whose seed is known and whose error is a number."""
        return {s: v for s, v in zip(self.seeds, getattr(self, error)) if not math.isnan(v)}

    @property
    def n(self) -> int:
        return len(self.run_ids)

    def stats(self, error: str) -> tuple[float, float, float]:
        return stats(getattr(self, error))


def network(group: Group, ident: str) -> Network:
    runs = group.runs
    return Network(
        ident,
        display_name(group.key),
        [train_error(r) for r in runs],
        [float(r["metrics"].get("test_top1_err", math.nan)) for r in runs],
        [r["run_id"] for r in runs],
        [r["tags"].get("reproduce.seed", r["params"].get("seed", "")) for r in runs],
    )


@dataclass
class Finding:
    worse: Network
    better: Network
    name: str
    claim: str

    @property
    def key(self) -> str:
        return f"{self.worse.model}-{self.better.model}"

    def pairs(self, error: str) -> dict[str, float]:
        """seed -> worse minus better, over the seeds both networks ran (with this error measured)."""
        worse, better = self.worse.by_seed(error), self.better.by_seed(error)
        return {s: worse[s] - better[s] for s in worse if s and s in better}

    def paired(self, error: str = "train") -> bool:
        """Whether the margin is taken over pairs of runs of one seed (two or more in common)."""
        return len(self.pairs(error)) >= 2

    def margin(self, error: str) -> tuple[float, float]:
        """(margin, spread) in points: paired, the mean and range of the per-seed differences; else the
        worse mean minus the better, and the larger seed range of the two."""
        if self.paired(error):
            mean, _, spread = stats(list(self.pairs(error).values()))
            return mean, spread
        (w, _, w_range), (b, _, b_range) = self.worse.stats(error), self.better.stats(error)
        return w - b, max(w_range, b_range)

    @property
    def shown(self) -> bool | None:
        """True/False when the training-error margin can be held against a spread, else None."""
        margin, spread = self.margin("train")
        return None if math.isnan(margin) or math.isnan(spread) else margin > spread


def findings(networks: list[Network]) -> list[Finding]:
    """The paper's findings whose two networks are among `networks`."""
    by_model = {n.model: n for n in networks}
    return [
        Finding(by_model[worse], by_model[better], name, claim)
        for worse, better, name, claim in FINDINGS
        if worse in by_model and better in by_model
    ]


def summarize(groups: list[Group]) -> tuple[list[Network], list[Finding]]:
    """The networks of the table's groups and their findings. A network is named by its model
    (plain20), or where the table has several rows of one model (ResNet-34 A, B, C) by the row's key."""
    names = [g.key[0] for g in groups]
    networks = [network(g, g.key[0] if names.count(g.key[0]) == 1 else "-".join(p for p in g.key if p)) for g in groups]
    return networks, findings(networks)


def metrics(networks: list[Network], found: list[Finding], digits: int = 4) -> dict[str, float]:
    """The summary as MLflow metrics (rounded to `digits` for display; nan left out):
    <model>/n, <model>/<train|test>_err_mean and _std, margin/<worse>-<better>/<train|test>_err
    and _spread. Sections of the UI group them by model and put the margins together."""
    out: dict[str, float] = {}
    for net in networks:
        out[f"{net.model}/n"] = net.n
        for error in ERRORS:
            mean, std, _ = net.stats(error)
            out[f"{net.model}/{error}_err_mean"], out[f"{net.model}/{error}_err_std"] = mean, std
    for finding in found:
        for error in ERRORS:
            margin, spread = finding.margin(error)
            out[f"margin/{finding.key}/{error}_err"], out[f"margin/{finding.key}/{error}_err_spread"] = margin, spread
    return {k: round(float(v), digits) for k, v in out.items() if not math.isnan(v)}


def frame(networks: list[Network], found: list[Finding]) -> pd.DataFrame:
    """summary.csv: one row per network and one per finding, full precision."""
    rows = []
    for net in networks:
        row = {"kind": "network", "name": net.model, "n": net.n}
        for error in ERRORS:
            mean, std, spread = net.stats(error)
            row.update({f"{error}_err_mean": mean, f"{error}_err_std": std, f"{error}_err_range": spread})
        rows.append({**row, "run_ids": " ".join(net.run_ids)})
    for finding in found:
        row = {
            "kind": "finding",
            "name": f"{finding.name} ({finding.key})",
            "n": len(finding.pairs("train")) if finding.paired() else min(finding.worse.n, finding.better.n),
            "paired": finding.paired(),
        }
        for error in ERRORS:
            margin, spread = finding.margin(error)
            row.update({f"{error}_err_margin": margin, f"{error}_err_spread": spread})
        rows.append({**row, "shown": "" if finding.shown is None else str(finding.shown).lower()})
    return pd.DataFrame(rows)


def _cell(mean: float, std: float) -> str:
    return "–" if math.isnan(mean) else f"{mean:.2f}" + ("" if math.isnan(std) else f" ± {std:.2f}")


def markdown(networks: list[Network], found: list[Finding]) -> list[str]:
    """Two Markdown tables: the networks (mean ± sample std over seeds) and the findings' margins."""
    out = [
        "| network | n | train err % (mean ± std) | test err % (mean ± std) |",
        "|---|---|---|---|",
    ]
    for net in networks:
        out.append(f"| {net.label} | {net.n} | {_cell(*net.stats('train')[:2])} | {_cell(*net.stats('test')[:2])} |")
    if found:
        out += [
            "",
            "| finding | margin, train err (points) | seed spread | shown | margin, test err (points) |",
            "|---|---|---|---|---|",
        ]
        for f in found:
            (train, spread), (test, _) = f.margin("train"), f.margin("test")
            shown = {True: "yes", False: "no", None: "n/a (one seed)"}[f.shown] if not math.isnan(train) else "–"
            pairs = f" ({len(f.pairs('train'))} pairs)" if f.paired() else ""
            out.append(
                f"| {f.claim}: {f.worse.label} − {f.better.label} | {_num(train)} | {_num(spread)}{pairs} | {shown} | {_num(test)} |"
            )
    out += [
        "",
        f"train err: mean of the logged training-error windows over the last {LAST_FRACTION:.0%} of each run "
        "(augmented batches); test err: the final test error. std: sample std over seeds. margin: the first "
        "network's mean minus the second's; seed spread: the larger max − min over seeds of the two; shown: "
        "margin > spread. Where the two networks ran two or more seeds in common (n pairs), the runs of a "
        "seed saw the same batches in the same order, and margin and spread are the mean and the max − min "
        "of the per-seed differences.",
    ]
    return out


def _num(x: float) -> str:
    return "–" if math.isnan(x) else f"{x:.2f}"
