"""Rebuild the paper's tables and depth-curve figures from the stored runs.

  reproduce report --study cifar10                       runs of MLflow experiment `cifar10`
  reproduce report --study imagenet --experiment NAME --out DIR
  reproduce report --study cifar10 --export runs.json    also save the runs for an offline rebuild
  reproduce report --from-export runs.json               rebuild without MLflow

Writes into results/<study>/ (relative to the working directory) or --out:
  table.md / table.csv   ours (mean ± std over seeds) next to results/paper.csv, per model
  provenance.csv         every run read: status, why it is in or out, commit, host, GPU, data
  fig6.png (CIFAR-10) or fig4.png (ImageNet); fig7.png when `reproduce analyze responses` ran

Which runs make the table (the same rule for MLflow and for an export):
  * only FINISHED runs with a final test error; RUNNING, KILLED and FAILED runs are counted
    in a footnote;
  * runs sharing the `reproduce.recipe` tag (the config minus seed and housekeeping) are
    repeats of one recipe; per model (name, shortcut, variant, protocol) the recipe with the
    most finished runs is tabulated (ties: the longer schedule, then the newest run); the
    other recipes (e.g. a shortened schedule) are listed separately, not mixed in;
  * one run per seed: a repeated seed keeps its newest run.
The export is one JSON file: {"format", "study", "experiment", "runs": [{run_id, status,
start_time, end_time, params, tags, metrics (final values), history {key: [[step, value]]}}]}.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import sys
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

PAPER_CSV = Path(__file__).resolve().parent.parent / "results" / "paper.csv"
EXPORT_FORMAT = "reproduce-runs/1"
FINAL_METRICS = {"cifar10": ["test_top1_err"], "imagenet": ["test_top1_err", "test_top5_err"]}
# Histories kept for the figures: training error (dashed), test (CIFAR, Fig. 6) or val
# (ImageNet, Fig. 4) error (bold), and the layer responses of `reproduce analyze` (Fig. 7).
HISTORY_KEYS = ["train_top1_err", "val_top1_err", "test_top1_err", "response_std"]
PROVENANCE_TAGS = ["git_commit", "git_dirty", "host", "gpu", "world_size", "launcher", "slurm_job_id",
                   "torch", "cuda", "data_fingerprint"]


# ---------------------------------------------------------------------------- reading runs
def load_mlflow_runs(experiment: str, study: str) -> list[dict]:
    """The study's runs of one experiment, as plain dicts (the export's run format)."""
    import mlflow

    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    frame = mlflow.search_runs(experiment_ids=[exp.experiment_id], filter_string=f"tags.`reproduce.study` = '{study}'",
                               order_by=["attributes.start_time ASC"])
    runs = []
    for row in frame.to_dict("records"):
        run = {"run_id": row["run_id"], "experiment": experiment, "status": row["status"],
               "start_time": _iso(row["start_time"]), "end_time": _iso(row["end_time"]),
               "params": _prefixed(row, "params."), "tags": _prefixed(row, "tags."),
               "metrics": _prefixed(row, "metrics."), "history": {}}
        if run["status"] == "FINISHED":  # only finished runs can reach the figures
            for key in HISTORY_KEYS:
                if key in run["metrics"]:
                    run["history"][key] = _history(client.get_metric_history(run["run_id"], key))
        runs.append(run)
    return runs


def _prefixed(row: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in row.items() if k.startswith(prefix) and v is not None and not
            (isinstance(v, float) and math.isnan(v))}


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
    doc = {"format": EXPORT_FORMAT, "study": study, "experiment": experiment,
           "exported_at": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"), "runs": runs}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1))


def read_export(path: Path) -> dict:
    doc = json.loads(Path(path).read_text())
    if doc.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{path} is not a `reproduce report --export` file (format {doc.get('format')!r})")
    return doc


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


def model_key(run: dict) -> tuple[str, str, str, str]:
    p = run["params"]
    shortcut = p.get("model.shortcut", "")
    return (p.get("model.name", run["tags"].get("reproduce.model", "?")), "" if shortcut == "None" else shortcut,
            p.get("model.variant", ""), run["tags"].get("reproduce.eval_protocol", p.get("eval.protocol", "")))


def select_runs(runs: list[dict], study: str) -> Selection:
    left_out, why, recipes = Counter(), {}, {}
    for run in runs:
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
        groups.append(Group(key, recipe, sorted(by_seed.values(), key=lambda r: int(r["tags"].get("reproduce.seed", 0)))))
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
    return Selection(sorted(main.values(), key=_order), sorted(other, key=_order), left_out, why)


def _order(group: Group):
    name = group.key[0]
    return (not name.startswith("plain"), depth_of(name), group.key[1:], group.iterations)


def depth_of(name: str) -> int:
    digits = re.findall(r"\d+", name)
    return int(digits[-1]) if digits else 0


# ---------------------------------------------------------------------------- the table
def load_paper(path: Path = PAPER_CSV) -> pd.DataFrame:
    return pd.read_csv(path, keep_default_na=False, dtype={"value": float})


def paper_reference(paper: pd.DataFrame, key: tuple, metric: str) -> dict:
    """The paper's number for a model and final metric under the same protocol: its mean and
    std where it gives them (ResNet-110), else its single number. Our shortcut "" (the
    model's default) takes the first matching row in the file, which lists the defaults first."""
    model, shortcut, _, protocol = key
    base = metric.removeprefix("test_")
    rows = paper[(paper.model == model) & (paper.protocol == protocol) & paper.metric.str.startswith(base)]
    if shortcut:
        rows = rows[rows.shortcut.isin([shortcut, ""])]
    elif len(rows):
        rows = rows[rows.shortcut == rows.shortcut.iloc[0]]
    values = {m: float(v) for m, v in zip(rows.metric, rows.value)}
    if base not in values:
        return {"reference": math.nan, "reference_std": math.nan, "reference_best": math.nan, "reference_source": ""}
    mean = values.get(f"{base}_mean")
    return {"reference": values[base] if mean is None else mean,
            "reference_std": values.get(f"{base}_std", math.nan),
            "reference_best": math.nan if mean is None else values[base],
            "reference_source": ", ".join(dict.fromkeys(rows[rows.metric == base].table))}


def summarize(group: Group, metric: str, paper: pd.DataFrame) -> dict:
    values = pd.Series([r["metrics"][metric] for r in group.runs], dtype=float)
    n, mean = len(values), float(values.mean())
    std = float(values.std(ddof=1)) if n > 1 else math.nan  # sample std over seeds
    ref = paper_reference(paper, group.key, metric)
    diff = mean - ref["reference"]
    if math.isnan(diff):
        within = ""
    elif not math.isnan(ref["reference_std"]):
        within = ("yes" if abs(diff) <= 2 * ref["reference_std"] else "no") + " (paper ±2 std)"
    elif n > 1:
        within = ("yes" if abs(diff) <= 2 * std else "no") + " (ours ±2 std)"
    else:
        within = "n/a (1 run)"
    tags = [r["tags"] for r in group.runs]
    return {"model": group.key[0], "shortcut": group.key[1], "variant": group.key[2], "protocol": group.key[3],
            "metric": metric, **ref, "n": n, "mean": mean, "std": std, "best": float(values.min()), "diff": diff,
            "within": within, "iterations": group.iterations, "recipe": group.recipe,
            "seeds": " ".join(t.get("reproduce.seed", "?") for t in tags),
            "data": " | ".join(dict.fromkeys(t.get("reproduce.data", "") for t in tags)),
            "data_fingerprint": " ".join(dict.fromkeys(t.get("reproduce.data_fingerprint", "") for t in tags)),
            "run_ids": " ".join(r["run_id"] for r in group.runs)}


def build_table(groups: list[Group], study: str, paper: pd.DataFrame) -> pd.DataFrame:
    rows = [summarize(g, metric, paper) for g in groups for metric in FINAL_METRICS[study]]
    return pd.DataFrame(rows, columns=None if rows else ["model"])


def provenance(runs: list[dict], selection: Selection) -> pd.DataFrame:
    rows = []
    for run in runs:
        tags, params = run["tags"], run["params"]
        rows.append({"run_id": run["run_id"], "experiment": run.get("experiment", ""), "model": model_key(run)[0],
                     "shortcut": model_key(run)[1], "seed": tags.get("reproduce.seed", ""), "status": run["status"],
                     "used": selection.why.get(run["run_id"], ""), "recipe": tags.get("reproduce.recipe", ""),
                     "iterations": params.get("schedule.iterations", ""), "start_time": run["start_time"],
                     "end_time": run["end_time"], **{t: tags.get(f"reproduce.{t}", "") for t in PROVENANCE_TAGS},
                     "data": tags.get("reproduce.data", "")})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------- Markdown
def _num(x: float, digits: int = 2) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def display_name(key: tuple) -> str:
    model, shortcut = key[0], key[1]
    m = re.fullmatch(r"(plain|resnet)(\d+)", model)
    name = f"{'plain' if m.group(1) == 'plain' else 'ResNet'}-{m.group(2)}" if m else model
    return f"{name} {shortcut}" if shortcut and not model.startswith("plain") else name


def markdown(study: str, table: pd.DataFrame, other: pd.DataFrame, selection: Selection, prov: pd.DataFrame,
             figures: list[str], command: str, source: str) -> str:
    title = {"cifar10": "CIFAR-10 (paper Table 6)", "imagenet": "ImageNet (paper Tables 2-4)"}[study]
    data_ids = {d: f"d{i + 1}" for i, d in enumerate(dict.fromkeys(table.get("data", [])))}
    out = [f"# {title}: reproduced vs. He et al., CVPR 2016", "",
           f"Built by `{command}` from {source}.", "", _md_rows(table, data_ids), ""]
    counts = ", ".join(f"{n} {reason}" for reason, n in sorted(selection.left_out.items())) or "none"
    out += [f"Runs left out of the table: {counts}.", "",
            "- ours: final test error (%) at step = schedule.iterations, under the row's protocol; mean ± sample "
            "std over the seeds (repeats of one `reproduce.recipe`); best = lowest.",
            "- Δ = our mean − the paper's number (its mean where it gives one). within: |Δ| ≤ 2 × the paper's std "
            "where it reports a spread, else ≤ 2 × our std (n ≥ 2); n/a for a single run.",
            "- Per model the recipe with the most finished runs is tabulated (ties: longer schedule, then newest); "
            "RUNNING, KILLED and FAILED runs never are.", ""]
    prints = dict(zip(table.get("data", []), table.get("data_fingerprint", [])))
    out += [f"- {ident}: {desc} (fingerprint {prints[desc]})" for desc, ident in data_ids.items()] + [""]
    if len(other):
        out += ["## Other recipes (not in the table)", "", _md_rows(other, None), ""]
    if figures:
        out += ["## Figures", ""] + [f"![{f}]({f})" for f in figures] + [""]
    out += ["## Provenance", "", f"- command: `{command}`", f"- source: {source}"]
    for col, label in [("git_commit", "git commits"), ("git_dirty", "uncommitted changes"), ("host", "hosts"),
                       ("gpu", "GPUs"), ("torch", "torch"), ("cuda", "CUDA"), ("data_fingerprint", "data fingerprints")]:
        counted = prov[col].value_counts() if len(prov) else {}
        out.append(f"- {label}: " + ", ".join(f"{v or '?'} ({n} runs)" for v, n in counted.items()))
    if len(prov):
        out.append(f"- run dates: {prov.start_time.min()} to {prov.end_time.max()}")
    cols = ["run_id", "model", "shortcut", "seed", "status", "used", "iterations", "git_commit", "host", "gpu", "start_time"]
    out += ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(str(row[c]) for c in cols) + " |" for _, row in prov.iterrows()]
    return "\n".join(out) + "\n"


def _md_rows(table: pd.DataFrame, data_ids: dict | None) -> str:
    head = ["model", "protocol", "metric", "paper", "source", "ours mean ± std", "n", "best", "Δ", "within",
            "iterations", "data"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in table.iterrows():
        paper = _num(r.reference) + (f" ± {_num(r.reference_std)} (best {_num(r.reference_best)})"
                                     if not math.isnan(r.reference_std) else "")
        data = data_ids.get(r.data, r.data) if data_ids else f"recipe {r.recipe}"
        ours = _num(r["mean"]) + (f" ± {_num(r['std'])}" if r.n > 1 else " (1 run)")
        cells = [display_name((r.model, r.shortcut)), r.protocol, r.metric, paper, r.reference_source or "–", ours,
                 str(r.n), _num(r.best), _num(r["diff"]), r.within or "–", str(r.iterations), data]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- command line
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="reproduce report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", choices=sorted(FINAL_METRICS), help="required unless --from-export names it")
    parser.add_argument("--experiment", help="MLflow experiment (default: the study's name)")
    parser.add_argument("--out", type=Path, help="output folder (default results/<study>)")
    parser.add_argument("--from-export", type=Path, metavar="FILE", help="read the runs from an export, not MLflow")
    parser.add_argument("--export", type=Path, metavar="FILE", help="also write the runs read to FILE (JSON)")
    parser.add_argument("--paper", type=Path, default=PAPER_CSV, help="reference numbers (default results/paper.csv)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.from_export:
        try:
            doc = read_export(args.from_export)
        except (OSError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        if args.study and args.study != doc["study"]:
            print(f"error: {args.from_export} holds {doc['study']} runs, not {args.study}", file=sys.stderr)
            return 2
        study, experiment, runs = doc["study"], doc["experiment"], doc["runs"]
        source = f"the export {args.from_export} (MLflow experiment `{experiment}`, exported {doc['exported_at']})"
    else:
        if not args.study:
            print("error: --study is required (or --from-export FILE)", file=sys.stderr)
            return 2
        import mlflow

        study, experiment = args.study, args.experiment or args.study
        runs = load_mlflow_runs(experiment, study)
        source = f"MLflow experiment `{experiment}` at {mlflow.get_tracking_uri()}"
    if args.export:
        write_export(args.export, runs, study, experiment)
    if not runs:
        print(f"error: no {study} runs in {source}", file=sys.stderr)
        return 1
    out = args.out or Path("results") / study
    out.mkdir(parents=True, exist_ok=True)
    written = write_report(runs, study, out, load_paper(args.paper), "reproduce report " + shlex.join(argv), source)
    print("wrote " + ", ".join(str(out / name) for name in written))
    return 0


def write_report(runs: list[dict], study: str, out: Path, paper: pd.DataFrame, command: str, source: str) -> list[str]:
    from reproduce.analyze import depth_curves, response_figure

    selection = select_runs(runs, study)
    table = build_table(selection.main, study, paper)
    other = build_table(selection.other, study, paper)
    prov = provenance(runs, selection)
    figures = {("fig6.png" if study == "cifar10" else "fig4.png"): depth_curves(selection.main, study)}
    fig7 = response_figure(selection.main) if study == "cifar10" else None
    if fig7 is not None:
        figures["fig7.png"] = fig7
    for name, fig in figures.items():
        fig.savefig(out / name, dpi=120)
    table.to_csv(out / "table.csv", index=False)
    prov.to_csv(out / "provenance.csv", index=False)
    (out / "table.md").write_text(markdown(study, table, other, selection, prov, list(figures), command, source))
    return ["table.md", "table.csv", "provenance.csv", *figures]


if __name__ == "__main__":
    sys.exit(main())
