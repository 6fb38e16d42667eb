"""The parent MLflow run of a `reproduce study` or `reproduce sweep`: one per experiment (tag
reproduce.kind=study), found again by its recipes (reproduce.study_key), so a resumed or extended
(more seeds) study reuses it. Its training runs nest under it (REPRODUCE_PARENT_RUN_ID, read by
reproduce.tracking's Tracker, and adopted at the end); at the end it holds `reproduce report`'s files
as artifacts, the summary over seeds (reproduce/report/summary.py) as metrics and the tables as its
description."""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import replace
from pathlib import Path

from reproduce.tracking import check_reachable


def study_key(recipes: set[str]) -> str:
    """What names a study or sweep in its experiment: its recipes (not its seeds, so more seeds
    extend it), hashed."""
    return hashlib.sha256(" ".join(sorted(recipes)).encode()).hexdigest()[:16]


def open_parents(runs: list, kind: str, command: str) -> list:
    """The runs, each with the parent run of its experiment (one per experiment: opened again when
    the experiment has this study's, else new, named <kind>-<models>)."""
    from reproduce.provenance import code_state
    from reproduce.tracking import open_parent

    check_reachable()
    git, parents = code_state(), {}
    for experiment in dict.fromkeys(p.cfg.experiment for p in runs):
        mine = [p.cfg for p in runs if p.cfg.experiment == experiment]
        name = f"{kind}-" + "-".join(dict.fromkeys(c.model.name for c in mine))
        parents[experiment] = open_parent(
            experiment, study_key({c.recipe_hash() for c in mine}), name[:80], command, git
        )
    return [replace(p, parent=parents[p.cfg.experiment]) for p in runs]


def recipe_runs(experiment: str, dataset: str, recipes: set[str]) -> list[dict]:
    """The runs of these recipes in the experiment (it may hold others: earlier studies, other
    lengths), read from MLflow once, in the report's run format (with their histories)."""
    from reproduce.report.runs import load_mlflow_runs

    return [r for r in load_mlflow_runs(experiment, dataset) if r["tags"].get("reproduce.recipe") in recipes]


def sweep_report(planned, runs: list, command: str) -> None:
    """The report of the runs that share `planned`'s parent, into that parent (its files written to
    a temporary folder: a sweep has no output folder of its own)."""
    from reproduce.report.command import write_report
    from reproduce.report.runs import FINAL_METRICS
    from reproduce.report.tables import load_paper
    from reproduce.tracking import adopt

    dataset, experiment = planned.cfg.data.dataset, planned.cfg.experiment
    recipes = {p.cfg.recipe_hash() for p in runs if p.parent == planned.parent}
    if dataset not in FINAL_METRICS:  # no report of image-folder runs: they are nested, the parent finished
        adopt(planned.parent, [r["run_id"] for r in recipe_runs(experiment, "folder", recipes)])
        end_parent(planned.parent, "FINISHED")
        return
    found = recipe_runs(experiment, dataset, recipes)
    with tempfile.TemporaryDirectory() as folder:
        source = f"MLflow experiment `{experiment}`"
        files = write_report(found, dataset, Path(folder), load_paper(), command, source)
        report_to_parent(planned.parent, found, dataset, Path(folder), files, f"The sweep `{command}`.")


def report_to_parent(parent: str, runs: list[dict], study: str, folder: Path, files: list[str], head: str) -> None:
    """A study's or sweep's parent run at its end: `runs` nested under it, the report's `files` of
    `folder` as its artifacts, the summary over seeds as its metrics, and as its description `head`,
    the summary's tables and the report's table.md."""
    import re

    from reproduce.report import summary
    from reproduce.report.runs import select_runs
    from reproduce.tracking import adopt, store
    from reproduce.tracking.reports import readable

    networks, found = summary.summarize(select_runs(runs, study).main)
    adopt(parent, [r["run_id"] for r in runs])
    table = (folder / "table.md").read_text()
    table = re.sub(r"## Over seeds, and the paper's findings\n.*?(?=\n## )", "", table, flags=re.S)  # above instead
    note = "\n".join(
        [
            head,
            "",
            "## Over seeds, and the paper's findings",
            "",
            *summary.markdown(networks, found),
            "",
            readable(table),
        ]
    )
    store(parent, {"mlflow.note.content": note[:60000]}, summary.metrics(networks, found), folder, files)


def end_parent(parent: str, status: str) -> None:
    """The parent run ended without a report (stopped: KILLED, as its runs; no report possible: FINISHED)."""
    from reproduce.tracking import store

    store(parent, {}, {}, Path("."), [], status)
