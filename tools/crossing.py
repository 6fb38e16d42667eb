"""Where a deeper network's training error drops below a shallower one's, from MLflow histories.

  MLFLOW_TRACKING_URI=sqlite:///mlflow.db python tools/crossing.py --experiment crossing \
      --shallow resnet20 --deep resnet56

For the study's third finding (ResNet-56 ahead of ResNet-20 in training error): it reads the logged
train_top1_err windows of every finished run of the two networks in --experiment (mean over their
seeds per iteration) and prints, per logged iteration, both curves, then

  curves cross   the first iteration from which the deep net's error, smoothed over --smooth windows,
                 stays below the shallow one's to the end of the runs
  study shows    the smallest run length n (a logged iteration) from which the study's own measure,
                 the mean over the last fifth of the run (report/summary.py's LAST_FRACTION), favours
                 the deep net at every longer length measured

Both hold for runs at a constant learning rate (the CPU study's recipe: lr 0.01, no milestones),
whose first n iterations are those of an n-iteration run; they say nothing about seed spread.
"""

from __future__ import annotations

import argparse
import sys

import mlflow
import pandas as pd

from reproduce.report.summary import LAST_FRACTION


def histories(experiment: str, models: list[str], unfinished: bool = False) -> dict[str, dict[str, pd.Series]]:
    """model -> seed -> its run's train_top1_err by iteration, for the finished runs of each model in
    `experiment` (with `unfinished`, also running or stopped runs: their curves so far)."""
    client = mlflow.MlflowClient()
    found = client.get_experiment_by_name(experiment)
    if found is None:
        sys.exit(f"crossing: no MLflow experiment {experiment!r} in {mlflow.get_tracking_uri()}; run the study first")
    runs = client.search_runs([found.experiment_id], "" if unfinished else "attributes.status = 'FINISHED'")
    found_runs = {}
    for model in models:
        mine = [r for r in runs if r.data.tags.get("reproduce.model") == model]
        if not mine:
            sys.exit(f"crossing: no {'' if unfinished else 'finished '}{model} run in experiment {experiment!r}")
        found_runs[model] = {
            r.data.tags.get("reproduce.seed", r.info.run_id): pd.Series(
                {m.step: m.value for m in client.get_metric_history(r.info.run_id, "train_top1_err")}
            )
            for r in mine
        }
    return found_runs


def curves(experiment: str, models: list[str], unfinished: bool = False) -> pd.DataFrame:
    """iteration x model: train_top1_err, the mean over the runs (seeds) of each model; see histories."""
    columns = {}
    for model, per_seed in histories(experiment, models, unfinished).items():
        columns[model] = pd.concat(per_seed.values(), axis=1).mean(axis=1)  # where a seed has no value yet: the others'
        columns[f"{model} runs"] = len(per_seed)
    return pd.DataFrame(columns).sort_index()


def per_seed(experiment: str, shallow: str, deep: str, smooth: int, unfinished: bool = False) -> pd.DataFrame:
    """One row per seed both networks ran: where its pair of curves crosses, from which run length
    its last-fifth margin favours the deep net, and that margin at the longest length both reached."""
    runs = histories(experiment, [shallow, deep], unfinished)
    rows = {}
    for seed in sorted(set(runs[shallow]) & set(runs[deep])):
        table = pd.DataFrame({shallow: runs[shallow][seed], deep: runs[deep][seed]}).sort_index().dropna()
        shows, margin = study_shows(table, shallow, deep)
        rows[seed] = {
            "curves cross": crossing(table, shallow, deep, smooth),
            "study shows from": shows,
            "iterations": int(table.index[-1]),
            "last-fifth margin": round(float(margin.iloc[-1]), 2),
        }
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("seed")


def crossing(table: pd.DataFrame, shallow: str, deep: str, smooth: int) -> int | None:
    """The first iteration from which the smoothed deep curve stays below the shallow one."""
    ahead = table[deep].rolling(smooth, min_periods=1).mean() < table[shallow].rolling(smooth, min_periods=1).mean()
    if not ahead.iloc[-1]:
        return None
    behind = ahead[~ahead]
    return int(table.index[0] if behind.empty else table.index[table.index > behind.index[-1]][0])


def study_shows(table: pd.DataFrame, shallow: str, deep: str) -> tuple[int | None, pd.Series]:
    """(smallest n from which the last-fifth means favour the deep net at every longer n, margins)."""
    margins = {}
    for n in table.index:
        last = table[(table.index > (1 - LAST_FRACTION) * n) & (table.index <= n)]
        margins[n] = last[shallow].mean() - last[deep].mean()
    margin = pd.Series(margins)
    if margin.iloc[-1] <= 0:
        return None, margin
    behind = margin[margin <= 0]
    return int(margin.index[0] if behind.empty else margin.index[margin.index > behind.index[-1]][0]), margin


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", default="crossing")
    parser.add_argument("--shallow", default="resnet20")
    parser.add_argument("--deep", default="resnet56")
    parser.add_argument("--smooth", type=int, default=5, help="logged windows in the rolling mean")
    parser.add_argument("--unfinished", action="store_true", help="read running or stopped runs too (so far)")
    args = parser.parse_args(argv)
    table = curves(args.experiment, [args.shallow, args.deep], args.unfinished)
    table = table.dropna(subset=[args.shallow, args.deep])  # the iterations both networks have reached
    cross = crossing(table, args.shallow, args.deep, args.smooth)
    shows, margin = study_shows(table, args.shallow, args.deep)
    shown = table[[args.shallow, args.deep]].assign(**{"last-fifth margin": margin}).round(2)
    print(shown.to_string())
    last = int(table.index[-1])
    runs = f"{table[f'{args.shallow} runs'].iloc[0]} + {table[f'{args.deep} runs'].iloc[0]} runs"
    print(
        f"curves cross (smoothed over {args.smooth} windows): " + (f"iteration {cross}" if cross else f"not by {last}")
    )
    print("study shows the deeper net ahead from a run length of: " + (f"{shows}" if shows else f"not by {last}"))
    print(f"({runs}; {mlflow.get_tracking_uri()}, experiment {args.experiment})")
    seeds = per_seed(args.experiment, args.shallow, args.deep, args.smooth, args.unfinished)
    if len(seeds) > 1:  # the spread the mean hides: each seed's pair of runs on its own
        print("per seed (a pair of runs each; None: not by its last iteration):")
        print(seeds.astype(object).where(seeds.notna(), None).to_string())
        margins = seeds["last-fifth margin"]
        print(f"last-fifth margin over {len(margins)} seeds: {margins.mean():.2f} +- {margins.std():.2f} points")
    return 0


if __name__ == "__main__":
    sys.exit(main())
