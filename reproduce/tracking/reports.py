"""Reports in the tracking store: the tables and figures of `reproduce report` as the artifacts of
one run per study (reproduce.kind=report), and the parent run of a `reproduce study` or `reproduce
sweep` (reproduce.kind=study), under which its training runs nest (MLflow's mlflow.parentRunId),
holding the report, the summary over seeds as metrics, and the table as its description."""

from __future__ import annotations

import re
from pathlib import Path

from reproduce.provenance import GitState
from reproduce.tracking.describe import describe_experiment
from reproduce.tracking.store import check_reachable, log_metric_batches, prepare_store

STUDY_KEY = "reproduce.study_key"  # what identifies a study's parent run: its recipes, not its seeds


def _experiment(client, name: str):
    """The experiment `name`, created (and described) where it is not there yet."""
    exp = client.get_experiment_by_name(name) or client.get_experiment(client.create_experiment(name))
    describe_experiment(exp)
    return exp


def _found(client, experiment_id: str, tags: dict[str, str]):
    """The newest run of the experiment with these tags, or None."""
    query = " and ".join(f"tags.`{key}` = '{value}'" for key, value in tags.items())
    runs = client.search_runs(
        [experiment_id], filter_string=query, max_results=1, order_by=["attributes.start_time DESC"]
    )
    return runs[0] if runs else None


def _code_tags(command: str, git: GitState) -> dict[str, str]:
    return {
        "reproduce.git_commit": git.commit,
        "reproduce.git_dirty": str(git.dirty).lower(),
        "mlflow.source.git.commit": git.commit,
        "reproduce.command": command[:5000],
    }


def log_report(experiment: str, study: str, folder: Path, files: list[str], command: str, git: GitState) -> str:
    """The report's tables and figures as artifacts of one run per study in `experiment`
    (tag reproduce.kind=report, named report-<study>), so the UI shows the paper beside the
    reproduction; a later report replaces its files. Returns the run id."""
    import mlflow

    check_reachable()
    prepare_store()
    client = mlflow.MlflowClient()
    exp = _experiment(client, experiment)
    kind = {"reproduce.kind": "report", "reproduce.report_of": study}
    found = _found(client, exp.experiment_id, kind)
    table = (folder / "table.md").read_text() if (folder / "table.md").exists() else ""
    note = (
        f"The report of `{command}` ({study}; commit {git}): the paper's numbers beside ours, figures as "
        f"artifacts ({', '.join(files)}).\n\n" + readable(table)
    )
    tags = {**kind, **_code_tags(command, git), "mlflow.note.content": note[:60000]}
    run_id = (
        found.info.run_id if found else client.create_run(exp.experiment_id, run_name=f"report-{study}").info.run_id
    )
    store(run_id, tags, {}, folder, files)
    return run_id


def readable(markdown: str) -> str:
    """Markdown as a run's description shows it: image links (files it cannot show) named as artifacts."""
    return re.sub(r"!\[([^\]]*)\]\([^)]*\)", r"\1 (an artifact of this run)", markdown)


def open_parent(experiment: str, key: str, name: str, command: str, git: GitState) -> str:
    """The parent run of a study or sweep (tags reproduce.kind=study, STUDY_KEY=key): the one the
    experiment holds already (a study resumed or extended by more seeds), marked RUNNING again,
    or a new one named `name`. Returns its id; runs started with it as their parent nest under it."""
    import mlflow

    prepare_store()
    client = mlflow.MlflowClient()
    exp = _experiment(client, experiment)
    kind = {"reproduce.kind": "study", STUDY_KEY: key}
    found = _found(client, exp.experiment_id, kind)
    if found:
        client.update_run(found.info.run_id, status="RUNNING")
        run_id = found.info.run_id
    else:
        run_id = client.create_run(exp.experiment_id, run_name=name, tags=kind).info.run_id
    for tag, value in _code_tags(command, git).items():
        client.set_tag(run_id, tag, value)
    return run_id


def adopt(parent_id: str, run_ids: list[str]) -> None:
    """Nest these runs under the parent (runs trained before it existed, or by an earlier parent)."""
    import mlflow

    client = mlflow.MlflowClient()
    for run_id in run_ids:
        if client.get_run(run_id).data.tags.get("mlflow.parentRunId") != parent_id:
            client.set_tag(run_id, "mlflow.parentRunId", parent_id)


def store(
    run_id: str, tags: dict[str, str], metrics: dict[str, float], folder: Path, files: list[str], status="FINISHED"
) -> None:
    """Tags, metrics (step 0: a later call's values are the latest) and the files of `folder` as
    artifacts of the run, which then ends with `status`."""
    import mlflow

    client = mlflow.MlflowClient()
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    if metrics:
        from mlflow.entities import Metric
        from mlflow.utils.time import get_current_time_millis

        now = get_current_time_millis()
        log_metric_batches(client, run_id, [Metric(k, v, now, 0) for k, v in metrics.items()])
    for name in files:
        client.log_artifact(run_id, str(folder / name))
    client.set_terminated(run_id, status)
