"""Carry an unfinished run to another machine through a folder that travels (a git repository).

  reproduce park RUN_DIR... --to FOLDER        the newest intact checkpoint and the run's MLflow record
  reproduce unpark FOLDER/NAME... [--run-dir DIR]   put them back, here, and resume with the same command

A run that takes longer than its machine lives (a 2-core CPU session, a preemptible node) needs two
things to go on elsewhere: its newest checkpoint (a few MB for a CIFAR network) and its MLflow run,
so that the resumed segments log into the same record and the report sees one run. `park` writes
both into FOLDER/<run dir name>/: `ckpt-<iteration>.pt` with its `.sha256`, and `run.json` (the MLflow
run's name, experiment, status, tags, params, dataset inputs and every metric's full history, and the
run directory the training command uses). The folder is replaced atomically: a stop mid-park leaves
the previous parked state.

`unpark` puts the checkpoint into the run directory (unless that already holds one as new or newer).
When this tracking store lacks the MLflow run (a fresh machine), the record is imported as a new run
with the same name, tags, params and history, tagged `reproduce.imported_from` = the original run id
(MLflow does not let a client choose run ids), and the checkpoint is re-saved pointing at it. Unparking
again reuses that imported run. Then the same training command resumes the run where it stopped.
Park reads the run directory and the store, never changes them; once the run has finished, delete
the parked folder (its final record belongs in the report's export).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

from reproduce import checkpoint
from reproduce.errors import ArgumentParser, Refused
from reproduce.io import atomic_write_json, fsync_dir

FORMAT = "reproduce-parked-run/1"
RECORD = "run.json"


class ParkError(Refused, ValueError):
    """A run directory, parked folder or MLflow run that cannot be parked or unparked; one line."""


# ---------------------------------------------------------------------------- park
def newest_intact(run_dir: Path) -> Path:
    """The newest checkpoint of `run_dir` that matches its digest; nothing is renamed (a reader)."""
    for path in reversed(checkpoint.list_checkpoints(run_dir)):
        if checkpoint.verify(path) is None:
            return path
    raise ParkError(
        f"{run_dir} holds no intact checkpoint (ckpt-*.pt with a matching .sha256); "
        "give the run directory of a run that has written one"
    )


def export_run(run_id: str) -> dict:
    """An MLflow run as plain data: enough to recreate it in another store."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ParkError(
            f"the tracking store {mlflow.get_tracking_uri()} does not hold MLflow run {run_id}; set "
            "MLFLOW_TRACKING_URI to the store the run logs to"
        ) from None
    history = {
        key: [
            [m.step, m.value, m.timestamp]
            for m in sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
        ]
        for key in run.data.metrics
    }
    inputs = [
        {
            "name": d.dataset.name,
            "digest": d.dataset.digest,
            "source_type": d.dataset.source_type,
            "source": d.dataset.source,
            "context": next((t.value for t in d.tags if t.key == "mlflow.data.context"), ""),
        }
        for d in (run.inputs.dataset_inputs if run.inputs else [])
    ]
    return {
        "run_id": run_id,
        "run_name": run.info.run_name,
        "experiment": client.get_experiment(run.info.experiment_id).name,
        "status": run.info.status,
        "start_time": run.info.start_time,
        "end_time": run.info.end_time,
        "tags": dict(run.data.tags),
        "params": dict(run.data.params),
        "history": history,
        "inputs": inputs,
    }


def park(run_dir: Path, to: Path) -> tuple[Path, dict | None]:
    """FOLDER/<run dir name>/ with the newest intact checkpoint and the run's MLflow record, and that
    record; for a run that has finished, (FOLDER/<name>, None): its parked folder, if any, is deleted."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ParkError(f"run directory {run_dir} does not exist; give the run.dir of a training run")
    latest = newest_intact(run_dir)
    state = checkpoint.load(latest)
    run_id = state.get("mlflow_run_id")
    if not run_id:
        raise ParkError(f"checkpoint {latest} names no MLflow run; nothing to carry but the checkpoint itself")
    record = {
        "format": FORMAT,
        "run_dir": str(run_dir),
        "iteration": state["iteration"],
        "checkpoint": latest.name,
        "config": state.get("config"),
        "git_commit": state.get("git_commit"),
        "mlflow": export_run(run_id),
    }
    dest = Path(to) / run_dir.name
    total = ((state.get("config") or {}).get("schedule") or {}).get("iterations")
    if record["mlflow"]["status"] == "FINISHED" and total is not None and state["iteration"] >= total:
        shutil.rmtree(dest, ignore_errors=True)  # finished: nothing left to carry
        return dest, None
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    staging.chmod(0o755)  # mkdtemp gives 0700; a parked run is read by whoever resumes it
    try:
        for path in (latest, latest.with_name(latest.name + ".sha256")):
            shutil.copyfile(path, staging / path.name)
        atomic_write_json(staging / RECORD, record, indent=1)
        old = dest.with_name(f".{dest.name}.old")
        if dest.exists():
            shutil.rmtree(old, ignore_errors=True)
            dest.rename(old)
        staging.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
        fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dest, record


# ---------------------------------------------------------------------------- unpark
def read_parked(folder: Path) -> tuple[dict, Path]:
    """The record of a parked folder and its checkpoint, checked against its digest."""
    folder = Path(folder)
    try:
        record = json.loads((folder / RECORD).read_text())
    except FileNotFoundError:
        raise ParkError(
            f"{folder} is not a parked run (no {RECORD}); give a folder written by `reproduce park`"
        ) from None
    except (OSError, ValueError) as err:
        raise ParkError(
            f"{folder / RECORD} cannot be read ({str(err).splitlines()[0][:120]}); park the run again"
        ) from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ParkError(f"{folder / RECORD} is not a `reproduce park` record (format {FORMAT} expected)")
    ckpt = folder / record["checkpoint"]
    problem = checkpoint.verify(ckpt) if ckpt.exists() else "it is missing"
    if problem:
        raise ParkError(
            f"parked checkpoint {ckpt} cannot be used: {problem}; park the run again from its run directory"
        )
    return record, ckpt


def import_run(run: dict) -> str:
    """The MLflow run this store holds for the exported `run`: itself, an earlier import of it, or a
    new import (same experiment, name, tags, params, history; status KILLED until it resumes)."""
    import mlflow
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.exceptions import MlflowException

    from reproduce.tracking import log_metric_batches, prepare_store

    prepare_store()
    client = mlflow.MlflowClient()
    try:
        if client.get_run(run["run_id"]).info.lifecycle_stage == "active":
            return run["run_id"]
    except MlflowException:
        pass
    experiment = mlflow.set_experiment(run["experiment"])
    earlier = client.search_runs(
        [experiment.experiment_id], f"tags.`reproduce.imported_from` = '{run['run_id']}'", max_results=1
    )
    if earlier:
        return earlier[0].info.run_id
    created = client.create_run(experiment.experiment_id, start_time=run["start_time"], run_name=run["run_name"])
    new_id = created.info.run_id
    tags = {k: v for k, v in run["tags"].items() if k != "mlflow.runName"} | {"reproduce.imported_from": run["run_id"]}
    client.log_batch(
        new_id, params=[Param(k, v) for k, v in run["params"].items()], tags=[RunTag(k, v) for k, v in tags.items()]
    )
    metrics = [
        Metric(key, value, timestamp, step)
        for key, points in run["history"].items()
        for step, value, timestamp in points
    ]
    log_metric_batches(client, new_id, metrics)
    if run["inputs"]:
        from mlflow.entities import Dataset, DatasetInput, InputTag

        client.log_inputs(
            new_id,
            [
                DatasetInput(
                    Dataset(d["name"], d["digest"], d["source_type"], d["source"]),
                    [InputTag("mlflow.data.context", d["context"])] if d["context"] else [],
                )
                for d in run["inputs"]
            ],
        )
    last = max((p[2] for points in run["history"].values() for p in points), default=run["start_time"])
    client.set_terminated(new_id, "KILLED", end_time=run.get("end_time") or last)
    return new_id


def unpark(folder: Path, run_dir: Path | None = None) -> tuple[Path, str, int]:
    """Checkpoint into the run directory, MLflow run into this store: (run dir, run id, iteration)."""
    import torch

    record, ckpt = read_parked(folder)
    run_dir = Path(run_dir or record["run_dir"])
    local = [p for p in checkpoint.list_checkpoints(run_dir) if checkpoint.verify(p) is None]
    if local and int(checkpoint.NAME.match(local[-1].name).group(1)) >= record["iteration"]:
        state = checkpoint.load(local[-1])
        return run_dir, state.get("mlflow_run_id"), state["iteration"]
    run_id = import_run(record["mlflow"])
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    state["mlflow_run_id"] = run_id
    checkpoint.save(run_dir, record["iteration"], state, keep=2)
    return run_dir, run_id, record["iteration"]


# ---------------------------------------------------------------------------- commands
def park_main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="reproduce park", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    parser.add_argument("--to", type=Path, required=True, metavar="FOLDER", help="where the parked runs go")
    args = parser.parse_args(argv)
    status = 0
    for run_dir in args.run_dirs:  # one run that cannot be parked does not keep the others from it
        if run_dir.is_dir() and not checkpoint.list_checkpoints(run_dir):
            print(f"{run_dir} has no checkpoint yet: nothing to park (it starts again from iteration 0)")
            continue
        try:
            dest, record = park(run_dir, args.to)
        except ParkError as err:
            print(f"error: {err}", file=sys.stderr)
            status = 2
            continue
        except OSError as err:
            print(
                f"error: cannot park {run_dir} into {args.to} ({err.strerror or err}); give a writable --to",
                file=sys.stderr,
            )
            status = 2
            continue
        if record is None:
            print(f"{run_dir} has finished: nothing to park ({dest} removed if it was there)")
            continue
        print(
            f"parked {run_dir} at iteration {record['iteration']} (MLflow run {record['mlflow']['run_id']}) in {dest}"
        )
    return status


def unpark_main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(
        prog="reproduce unpark",
        description="put parked runs back: checkpoint into the run directory, MLflow run into this tracking store",
    )
    parser.add_argument("folders", nargs="+", type=Path, metavar="FOLDER")
    parser.add_argument(
        "--run-dir",
        type=Path,
        help="where the checkpoint goes (default: the run.dir it was parked "
        "from, relative to this folder when it was relative); only with one FOLDER",
    )
    args = parser.parse_args(argv)
    if args.run_dir and len(args.folders) > 1:
        print("error: --run-dir takes one parked folder; unpark the others separately", file=sys.stderr)
        return 2
    for folder in args.folders:
        try:
            run_dir, run_id, iteration = unpark(folder, args.run_dir)
        except ParkError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(f"unparked {folder}: {run_dir} resumes at iteration {iteration} into MLflow run {run_id}")
    return 0
