"""`reproduce runs`: the runs of the tracking store as one compact table in the terminal.

  reproduce runs                          every training run of every experiment
  reproduce runs --experiment cifar10     one experiment
  reproduce runs --csv > runs.csv         the same rows as CSV (for pandas, spreadsheets)

One row per training run: experiment, model, family, depth, seed, status, iterations done of
the schedule, final (or latest) training / validation / test error in %, time to target (for each
error of eval.target_top1_err, the first iteration and training wall time at which the run's
validation, else test, error reached it: `20%@4000 (12.5 min)`, or `20%@-` not yet), start time
and run id, read with `mlflow.search_runs`. Only training runs (tag reproduce.kind = train, or none on older runs): evaluations and report runs are left out.
"""

from __future__ import annotations

import argparse
import json
import re
import sys

import pandas as pd

from reproduce.errors import ArgumentParser

COLUMNS = [
    "experiment",
    "model",
    "family",
    "depth",
    "seed",
    "status",
    "iterations",
    "train_top1_err",
    "val_top1_err",
    "test_top1_err",
    "to_target",
    "start_time",
    "run_id",
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="reproduce runs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", action="append", help="an MLflow experiment name (repeatable; default: all)")
    parser.add_argument("--csv", action="store_true", help="print CSV instead of the aligned table")
    return parser.parse_args(argv)


def training_runs(experiments: list[str] | None = None) -> pd.DataFrame:
    """The COLUMNS of every training run, typed (depth and seed integers, errors floats), ordered
    by experiment, plain before residual, depth, seed."""
    import mlflow

    client = mlflow.MlflowClient()
    names = {e.experiment_id: e.name for e in client.search_experiments()}  # read once: ids and their names
    ids = list(names)
    if experiments:
        missing = [name for name in experiments if name not in names.values()]
        if missing:
            known = ", ".join(names.values()) or "none"
            raise LookupError(
                f"no MLflow experiment {', '.join(missing)} at {mlflow.get_tracking_uri()} (experiments: {known})"
            )
        ids = [i for i, name in names.items() if name in experiments]
    frame = (
        mlflow.search_runs(experiment_ids=ids, filter_string="tags.`reproduce.recipe` != ''") if ids else pd.DataFrame()
    )
    if frame.empty:
        return pd.DataFrame(columns=COLUMNS)
    kind = frame.get("tags.reproduce.kind", pd.Series(index=frame.index, dtype=object))
    frame = frame[kind.isna() | (kind == "train")]  # training runs (older ones carry no kind)
    col = lambda name: frame[name] if name in frame else pd.Series(index=frame.index, dtype=object)  # noqa: E731
    total = pd.to_numeric(col("params.schedule.iterations"), errors="coerce")
    done = [_iterations_done(client, run_id, status, t) for run_id, status, t in zip(frame.run_id, frame.status, total)]
    rows = pd.DataFrame(
        {
            "experiment": frame.experiment_id.map(names),
            "model": col("params.model.name"),
            "family": col("params.model.family"),
            "depth": pd.to_numeric(col("params.model.depth"), errors="coerce").astype("Int64"),
            "seed": pd.to_numeric(col("params.seed"), errors="coerce").astype("Int64"),
            "status": frame.status,
            "iterations": [f"{d}/{int(t)}" if pd.notna(t) else str(d) for d, t in zip(done, total)],
            **{m: pd.to_numeric(col(f"metrics.{m}"), errors="coerce").round(2) for m in COLUMNS[7:10]},
            "to_target": [_to_target(run) for _, run in frame.iterrows()],
            "start_time": pd.to_datetime(frame.start_time).dt.strftime("%Y-%m-%d %H:%M"),
            "run_id": frame.run_id,
        }
    )
    from reproduce.models import MODELS

    known = rows.model.map(lambda m: MODELS.get(m))  # runs logged before model.family / model.depth were params
    rows["family"] = rows.family.fillna(
        known.map(lambda s: None if s is None else ("resnet" if s.residual else "plain"))
    )
    rows["depth"] = rows.depth.fillna(known.map(lambda s: None if s is None else s.depth)).astype("Int64")
    rows["_order"] = rows.family.ne("plain")
    return (
        rows.sort_values(["experiment", "_order", "depth", "model", "seed", "start_time"])
        .drop(columns="_order")
        .reset_index(drop=True)[COLUMNS]
    )


TO_TARGET = re.compile(r"metrics\.time_to_(?:val|test)_top1_err_(.+)_iteration")


def _to_target(run: pd.Series) -> str | None:
    """`20%@4000 (12.5 min), 10%@-`: each target (the run's eval.target_top1_err, and any it logged)
    with the iteration and wall time its error first reached it; None for a run without targets."""
    reached = {}
    for key, value in run.items():
        match = TO_TARGET.fullmatch(str(key))
        if match and pd.notna(value):
            seconds = run.get(key.removesuffix("_iteration") + "_s")
            took = f" ({seconds / 60:.1f} min)" if pd.notna(seconds) else ""
            reached[float(match[1])] = f"@{int(value)}{took}"
    try:
        targets = [float(t) for t in json.loads(run.get("params.eval.target_top1_err") or "[]")]
    except (ValueError, TypeError):  # a param this code did not write
        targets = []
    shown = sorted(set(targets) | set(reached), reverse=True)
    return ", ".join(f"{t:g}%{reached.get(t, '@-')}" for t in shown) or None


def _iterations_done(client, run_id: str, status: str, total) -> int:
    """Iterations a run has done: the whole schedule once FINISHED; for a stopped or failed run its
    latest checkpoint's (what a resume keeps); else, and for runs older than that metric, its
    latest logged step."""
    if status == "FINISHED" and pd.notna(total):
        return int(total)
    if status != "RUNNING":
        kept = [int(m.value) for m in client.get_metric_history(run_id, "checkpoint_iteration")]
        if kept:
            return max(kept)
    steps = [m.step for m in client.get_metric_history(run_id, "lr")]
    return max(steps, default=0)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import mlflow

    from reproduce.tracking.store import check_readable

    check_readable()  # a server that does not answer, or no store: one line, exit 2, nothing created
    try:
        rows = training_runs(args.experiment)
    except LookupError as err:
        print(f"error: {err.args[0]}", file=sys.stderr)
        return 2
    except mlflow.exceptions.MlflowException as err:
        print(
            f"error: cannot read the tracking store {mlflow.get_tracking_uri()} ({str(err).splitlines()[0][:200]})",
            file=sys.stderr,
        )
        return 2
    if args.csv:
        sys.stdout.write(rows.to_csv(index=False))
        return 0
    if rows.empty:
        print(f"no training runs at {mlflow.get_tracking_uri()}")
        return 0
    print(rows.to_string(index=False, na_rep="-"))
    print(f"{len(rows)} runs at {mlflow.get_tracking_uri()}; errors in % (final for FINISHED runs, latest otherwise)")
    return 0
