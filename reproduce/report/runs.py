"""The runs of a study, read from MLflow or from an export file, and the choice of the ones
that make the table (the rule is stated in reproduce/report/command.py).

The export is one JSON file: {"format", "study", "experiment", "runs": [{run_id, status,
start_time, end_time, params, tags, metrics (final values), history {key: [[step, value]]}}]}.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from reproduce.io import atomic_write_text
from reproduce.tracking.describe import DISPLAY

EXPORT_FORMAT = "reproduce-runs/1"
FINAL_METRICS = {"cifar10": ["test_top1_err"], "imagenet": ["test_top1_err", "test_top5_err"]}
# Histories kept for the figures: training error (dashed), test (CIFAR, Fig. 6) or val
# (ImageNet, Fig. 4) error (bold), and the layer responses of `reproduce analyze` (Fig. 7).
HISTORY_KEYS = ["train_top1_err", "val_top1_err", "test_top1_err", "response_std"]
# Errors are read by their plain names (full precision, every run so far); a run that has one only
# under its display name (DISPLAY + name, rounded: reproduce.tracking) is read from that.


# ---------------------------------------------------------------------------- reading runs
def load_mlflow_runs(experiment: str, study: str) -> list[dict]:
    """The study's runs of one experiment, as plain dicts (the export's run format)."""
    import mlflow

    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    frame = mlflow.search_runs(
        experiment_ids=[exp.experiment_id],
        filter_string=f"tags.`reproduce.study` = '{study}'",
        order_by=["attributes.start_time ASC"],
    )
    runs = []
    for row in frame.to_dict("records"):
        run = {
            "run_id": row["run_id"],
            "experiment": experiment,
            "status": row["status"],
            "start_time": _iso(row["start_time"]),
            "end_time": _iso(row["end_time"]),
            "params": _prefixed(row, "params."),
            "tags": _prefixed(row, "tags."),
            "metrics": _prefixed(row, "metrics."),
            "history": {},
        }
        stored = set(run["metrics"])
        for key in [
            k for k in stored if k.startswith(DISPLAY)
        ]:  # a run that logged an error under its display name only
            run["metrics"].setdefault(key[len(DISPLAY) :], run["metrics"][key])
        if run["status"] == "FINISHED":  # only finished runs can reach the figures
            for key in HISTORY_KEYS:
                if key in run["metrics"]:
                    name = key if key in stored else DISPLAY + key
                    run["history"][key] = _history(client.get_metric_history(run["run_id"], name))
        runs.append(run)
    return runs


def _prefixed(row: dict, prefix: str) -> dict:
    return {
        k[len(prefix) :]: v
        for k, v in row.items()
        if k.startswith(prefix) and v is not None and not (isinstance(v, float) and math.isnan(v))
    }


def _iso(stamp) -> str:
    return "" if stamp is None or pd.isna(stamp) else pd.Timestamp(stamp).strftime("%Y-%m-%d %H:%M:%S UTC")


def _history(metrics) -> list[list]:
    """[[step, value]] by step; a step logged twice (a resumed run, a repeated analysis) keeps
    its newest value."""
    latest = {}
    for m in sorted(metrics, key=lambda m: (m.step, m.timestamp)):
        latest[m.step] = m.value
    return [[step, value] for step, value in sorted(latest.items())]


def write_export(path: Path, runs: list[dict], study: str, experiment: str) -> None:
    doc = {
        "format": EXPORT_FORMAT,
        "study": study,
        "experiment": experiment,
        "exported_at": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "runs": runs,
    }
    atomic_write_text(path, json.dumps(doc, indent=1))


def read_export(path: Path) -> dict:
    """The export at `path`; ValueError in one line naming the file and the fix when it is not one."""
    try:
        doc = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{path} is not valid JSON ({err.msg} at line {err.lineno}); write it again with "
            "`reproduce report --study S --export FILE`"
        ) from None
    if (
        not isinstance(doc, dict)
        or doc.get("format") != EXPORT_FORMAT
        or not isinstance(doc.get("runs"), list)
        or "study" not in doc
    ):
        found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise ValueError(
            f"{path} is not a `reproduce report --export` file (format {EXPORT_FORMAT} expected, found "
            f"{found!r}); write one with `reproduce report --study S --export FILE`"
        )
    doc.setdefault("experiment", doc["study"])
    doc.setdefault("exported_at", "?")
    return doc


def merge_runs(*sources: list[dict]) -> list[dict]:
    """The runs of several sources (MLflow, exports) as one list: a run id seen twice keeps its
    finished record over an unfinished one (a store can be older than an export), else the first
    source's; a run carried to another store by `reproduce park` / `unpark` (tag
    reproduce.imported_from) replaces the record it was imported from."""
    seen: dict[str, dict] = {}
    for runs in sources:
        for run in runs:
            kept = seen.setdefault(run["run_id"], run)
            if run["status"] == "FINISHED" and kept["status"] != "FINISHED":
                seen[run["run_id"]] = run
    replaced = {run["tags"].get("reproduce.imported_from") for run in seen.values()}
    return [run for run_id, run in seen.items() if run_id not in replaced]


# ---------------------------------------------------------------------------- choosing runs
@dataclass
class Group:
    """The runs of one recipe: same config but the seed."""

    key: tuple[str, str, str, str]  # model, shortcut ("" = none / model default), variant, protocol
    recipe: str
    runs: list[dict] = field(default_factory=list)

    @property
    def iterations(self) -> int:
        return int(self.runs[0]["params"].get("schedule.iterations", 0))


@dataclass
class Selection:
    main: list[Group]  # one per model: the rows of the table
    other: list[Group]  # other recipes of the same models, reported separately
    left_out: Counter  # reason -> number of runs
    why: dict[str, str]  # run_id -> "table" / "other recipe" / the reason it is left out
    evaluations: list[dict] = field(default_factory=list)  # finished `reproduce evaluate` runs (given weights)


def model_key(run: dict) -> tuple[str, str, str, str]:
    p = run["params"]
    shortcut = p.get("model.shortcut", "")
    return (
        p.get("model.name", run["tags"].get("reproduce.model", "?")),
        "" if shortcut in ("None", "none") else shortcut,
        p.get("model.variant", ""),
        run["tags"].get("reproduce.eval_protocol", p.get("eval.protocol", "")),
    )


def select_runs(runs: list[dict], study: str) -> Selection:
    left_out, why, recipes, evaluations = Counter(), {}, {}, []
    for run in runs:
        if is_evaluation(run):  # weights evaluated, not trained: listed beside the table, never in it
            if run["status"] == "FINISHED":
                evaluations.append(run)
            why[run["run_id"]] = "evaluation" if run["status"] == "FINISHED" else run["status"]
            continue
        if run["status"] != "FINISHED":
            reason = run["status"]
        elif any(m not in run["metrics"] for m in FINAL_METRICS[study]):
            reason = "no final test error"
        elif "reproduce.recipe" not in run["tags"]:
            reason = "no recipe tag"
        else:
            recipes.setdefault((model_key(run), run["tags"]["reproduce.recipe"]), []).append(run)
            continue
        left_out[reason] += 1
        why[run["run_id"]] = reason
    groups = []
    for (key, recipe), members in recipes.items():
        by_seed = {}
        for run in sorted(members, key=lambda r: r["start_time"]):  # newest run of a seed wins
            seed = run["tags"].get("reproduce.seed", run["params"].get("seed"))
            if seed in by_seed:
                left_out["repeated seed (older run)"] += 1
                why[by_seed[seed]["run_id"]] = "repeated seed (older run)"
            by_seed[seed] = run
        groups.append(
            Group(key, recipe, sorted(by_seed.values(), key=lambda r: int(r["tags"].get("reproduce.seed", 0))))
        )
    main, other = {}, []
    rank = lambda g: (len(g.runs), g.iterations, max(r["start_time"] for r in g.runs))  # noqa: E731
    for group in sorted(groups, key=rank, reverse=True):
        if group.key in main:
            other.append(group)
            left_out["other recipe (listed separately)"] += len(group.runs)
        else:
            main[group.key] = group
    for group in main.values():
        why.update({r["run_id"]: "table" for r in group.runs})
    for group in other:
        why.update({r["run_id"]: f"other recipe {group.recipe}" for r in group.runs})
    return Selection(
        sorted(main.values(), key=_order),
        sorted(other, key=_order),
        left_out,
        why,
        sorted(evaluations, key=lambda r: (depth_of(model_key(r)[0]), model_key(r)[1:], r["start_time"])),
    )


def is_evaluation(run: dict) -> bool:
    return run["tags"].get("reproduce.kind") == "evaluation"


def _order(group: Group):
    name = group.key[0]
    return (not name.startswith("plain"), depth_of(name), group.key[1:], group.iterations)


# ---------------------------------------------------------------------------- naming models
def depth_of(name: str) -> int:
    digits = re.findall(r"\d+", name)
    return int(digits[-1]) if digits else 0


def display_name(key: tuple) -> str:
    model, shortcut = key[0], key[1]
    m = re.fullmatch(r"(plain|resnet)(\d+)", model)
    name = f"{'plain' if m.group(1) == 'plain' else 'ResNet'}-{m.group(2)}" if m else model
    return f"{name} {shortcut}" if shortcut and not model.startswith("plain") else name
