"""The report of `reproduce report` stored in the tracking store: its tables and figures as the
artifacts of one run per study, beside the training runs it summarises."""

from __future__ import annotations

import re
from pathlib import Path

from reproduce.provenance import GitState
from reproduce.tracking.describe import describe_experiment
from reproduce.tracking.store import check_reachable, prepare_store


def log_report(experiment: str, study: str, folder: Path, files: list[str], command: str, git: GitState) -> str:
    """The report's tables and figures as artifacts of one run per study in `experiment`
    (tag reproduce.kind=report, named report-<study>), so the UI shows the paper beside the
    reproduction; a later report replaces its files. Returns the run id."""
    import mlflow

    check_reachable()
    prepare_store()
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(experiment) or client.get_experiment(client.create_experiment(experiment))
    describe_experiment(exp)
    found = client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`reproduce.kind` = 'report' and tags.`reproduce.report_of` = '{study}'",
        max_results=1,
        order_by=["attributes.start_time DESC"],
    )
    table = (folder / "table.md").read_text() if (folder / "table.md").exists() else ""
    table = re.sub(r"!\[([^\]]*)\]\([^)]*\)", r"\1 (an artifact of this run)", table)  # the note cannot show files
    note = (
        f"The report of `{command}` ({study}; commit {git}): the paper's numbers beside ours, figures as "
        f"artifacts ({', '.join(files)}).\n\n" + table
    )
    tags = {
        "reproduce.kind": "report",
        "reproduce.report_of": study,
        "reproduce.git_commit": git.commit,
        "reproduce.git_dirty": str(git.dirty).lower(),
        "mlflow.source.git.commit": git.commit,
        "reproduce.command": command[:5000],
        "mlflow.note.content": note[:60000],
    }
    run = (
        client.get_run(found[0].info.run_id)
        if found
        else client.create_run(exp.experiment_id, run_name=f"report-{study}", tags=tags)
    )
    for key, value in tags.items():
        client.set_tag(run.info.run_id, key, value)
    for name in files:
        client.log_artifact(run.info.run_id, str(folder / name))
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id
