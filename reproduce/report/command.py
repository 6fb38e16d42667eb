"""Rebuild the paper's tables and depth-curve figures from the stored runs.

  reproduce report --study cifar10                       runs of MLflow experiment `cifar10`
  reproduce report --study imagenet --experiment NAME --out DIR
  reproduce report --study cifar10 --export runs.json    also save the runs for an offline rebuild
  reproduce report --from-export runs.json               rebuild without MLflow
  reproduce report --study cifar10 --with-export runs.json --export runs.json
                                                         MLflow's runs together with an export's (runs finished
                                                         in another store), and the union saved again

Writes into results/<study>/ (relative to the working directory) or --out:
  table.md / table.csv   ours (mean ± std over seeds) next to results/paper.csv, per model
  summary.csv            per network n, mean and std of train and test error; the paper's findings'
                         margins with their seed spread (reproduce/report/summary.py; also in table.md)
  provenance.csv         every run read: status, why it is in or out, commit, host, GPU, data
  fig6.png (CIFAR-10) or fig4.png (ImageNet); fig7.png when `reproduce analyze responses` ran
and, read from MLflow, stores the same files as the artifacts of the run `report-<study>` of the
experiment (tag reproduce.kind=report; replaced by the next report; --no-mlflow: not stored).

Which runs make the table (the same rule for MLflow and for an export):
  * only FINISHED runs with a final test error; RUNNING, KILLED and FAILED runs are counted
    in a footnote;
  * runs sharing the `reproduce.recipe` tag (the config minus seed and housekeeping) are
    repeats of one recipe; per model (name, shortcut, variant, protocol) the recipe with the
    most finished runs is tabulated (ties: the longer schedule, then the newest run); the
    other recipes (e.g. a shortened schedule) are listed separately, not mixed in;
  * one run per seed: a repeated seed keeps its newest run.
The export is one JSON file (its format: reproduce/report/runs.py).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import pandas as pd

from reproduce.errors import ArgumentParser, Failed, Refused, command, one_line
from reproduce.io import atomic_write_bytes, atomic_write_text
from reproduce.report import summary
from reproduce.report.figures import depth_curves, png, response_figure
from reproduce.report.runs import FINAL_METRICS, load_mlflow_runs, merge_runs, read_export, select_runs, write_export
from reproduce.report.tables import PAPER_CSV, build_table, load_paper, markdown, provenance


# ---------------------------------------------------------------------------- command line
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="reproduce report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", choices=sorted(FINAL_METRICS), help="required unless --from-export names it")
    parser.add_argument("--experiment", help="MLflow experiment (default: the study's name)")
    parser.add_argument("--out", type=Path, help="output folder (default results/<study>)")
    parser.add_argument("--from-export", type=Path, metavar="FILE", help="read the runs from an export, not MLflow")
    parser.add_argument("--export", type=Path, metavar="FILE", help="also write the runs read to FILE (JSON)")
    parser.add_argument(
        "--with-export",
        type=Path,
        metavar="FILE",
        help="add the runs of an export to MLflow's "
        "(a run in both: MLflow's record; one carried by `reproduce unpark` replaces its original)",
    )
    parser.add_argument("--paper", type=Path, default=PAPER_CSV, help="reference numbers (default results/paper.csv)")
    parser.add_argument(
        "--no-mlflow",
        action="store_true",
        help="do not store the report in the tracking store (by "
        "default, read from MLflow, it becomes the artifacts of the run report-<study> in the experiment)",
    )
    return parser.parse_args(argv)


@command
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    paper = load_paper(args.paper)  # PaperRefused in one line, before anything is read or written
    study, experiment, runs, source = _from_export(args) if args.from_export else _from_mlflow(args)
    if args.export:
        try:
            write_export(args.export, runs, study, experiment)
        except OSError as err:
            raise Refused(
                f"cannot write the export {args.export} ({err.strerror or err}); give a writable path"
            ) from None
    if not runs:
        raise Failed(f"no {study} runs in {source}")
    out = args.out or Path("results") / study
    command_line = "reproduce report " + shlex.join(argv)
    try:
        out.mkdir(parents=True, exist_ok=True)
        written = write_report(runs, study, out, paper, command_line, source)
    except OSError as err:
        raise Refused(
            f"cannot write the report to {out} ({err.strerror or err}); give --out a writable folder"
        ) from None
    print("wrote " + ", ".join(str(out / name) for name in written))
    if not (args.from_export or args.no_mlflow):
        store_report(experiment, study, out, written, command_line)
    return 0


def _export(path: Path, study: str | None) -> dict:
    """The export at `path`, which must hold runs of `study` when one is given; Refused otherwise."""
    try:
        doc = read_export(path)
    except (OSError, ValueError) as err:
        raise Refused(one_line(err)) from None
    if study and study != doc["study"]:
        raise Refused(f"{path} holds {doc['study']} runs, not {study}")
    return doc


def _from_export(args: argparse.Namespace) -> tuple[str, str, list[dict], str]:
    """(study, experiment, runs, where they came from) of --from-export."""
    doc = _export(args.from_export, args.study)
    source = f"the export {args.from_export} (MLflow experiment `{doc['experiment']}`, exported {doc['exported_at']})"
    return doc["study"], doc["experiment"], doc["runs"], source


def _from_mlflow(args: argparse.Namespace) -> tuple[str, str, list[dict], str]:
    """(study, experiment, runs, where they came from) of the tracking store, with --with-export's runs."""
    if not args.study:
        raise Refused("--study is required (or --from-export FILE)")
    import mlflow

    from reproduce.tracking.store import check_readable

    study, experiment = args.study, args.experiment or args.study
    check_readable()  # a server that does not answer, or no store: one line, exit 2, nothing created
    runs = load_mlflow_runs(experiment, study)
    source = f"MLflow experiment `{experiment}` at {mlflow.get_tracking_uri()}"
    if args.with_export:
        doc = _export(args.with_export, study)
        runs = merge_runs(runs, doc["runs"])
        source += f" and the export {args.with_export} (exported {doc['exported_at']})"
    return study, experiment, runs, source


def store_report(experiment: str, study: str, out: Path, written: list[str], command: str) -> None:
    """The files just written, as the artifacts of the experiment's report run; a tracking store
    that fails here leaves the files in place, with a warning."""
    import mlflow

    from reproduce.provenance import code_state
    from reproduce.tracking import TrackingUnreachable, log_report

    try:
        run_id = log_report(experiment, study, out, written, command, code_state())
    except (TrackingUnreachable, mlflow.exceptions.MlflowException, OSError) as err:
        print(f"warning: the report is in {out} but not in MLflow ({str(err).splitlines()[0][:200]})", file=sys.stderr)
        return
    print(
        f"stored in MLflow: run report-{study} ({run_id}) of experiment `{experiment}` at {mlflow.get_tracking_uri()}"
    )


def write_report(runs: list[dict], study: str, out: Path, paper: pd.DataFrame, command: str, source: str) -> list[str]:
    """table.md, table.csv, provenance.csv and the figures in `out`, each written atomically."""
    selection = select_runs(runs, study)
    table = build_table(selection.main, study, paper)
    other = build_table(selection.other, study, paper)
    prov = provenance(runs, selection)
    networks, found = summary.summarize(selection.main)
    figures = {("fig6.png" if study == "cifar10" else "fig4.png"): depth_curves(selection.main, study)}
    fig7 = response_figure(selection.main) if study == "cifar10" else None
    if fig7 is not None:
        figures["fig7.png"] = fig7
    for name, fig in figures.items():
        atomic_write_bytes(out / name, png(fig, dpi=120))
    atomic_write_text(out / "table.csv", table.to_csv(index=False))
    atomic_write_text(out / "provenance.csv", prov.to_csv(index=False))
    atomic_write_text(out / "summary.csv", summary.frame(networks, found).to_csv(index=False))
    seeds = summary.markdown(networks, found)
    atomic_write_text(
        out / "table.md", markdown(study, table, other, selection, prov, list(figures), command, source, paper, seeds)
    )
    return ["table.md", "table.csv", "summary.csv", "provenance.csv", *figures]


if __name__ == "__main__":
    sys.exit(main())
