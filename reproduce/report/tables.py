"""The report's table beside the paper's numbers (results/paper.csv), the provenance of every
run read, and table.md, which puts them together."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from reproduce.errors import Refused, one_line
from reproduce.provenance import RESULTS
from reproduce.report.runs import FINAL_METRICS, Group, Selection, display_name, model_key

PAPER_CSV = RESULTS / "paper.csv"
PROVENANCE_TAGS = [
    "git_commit",
    "git_dirty",
    "host",
    "gpu",
    "world_size",
    "launcher",
    "slurm_job_id",
    "torch",
    "cuda",
    "data_fingerprint",
]


# ---------------------------------------------------------------------------- the table
PAPER_COLUMNS = ["table", "model", "shortcut", "protocol", "metric", "value"]  # what paper_reference reads


class PaperRefused(Refused, ValueError):
    """The reference numbers (`--paper`) cannot be read; the message is one line naming the file and the fix."""


def load_paper(path: Path = PAPER_CSV) -> pd.DataFrame:
    """The paper's numbers; PaperRefused when `path` is not a readable CSV with PAPER_COLUMNS."""
    fix = f"give --paper a CSV with the columns {','.join(PAPER_COLUMNS)} (as results/paper.csv)"
    try:
        paper = pd.read_csv(path, keep_default_na=False, dtype={"value": float})
    except OSError as err:  # missing, a folder, unreadable
        raise PaperRefused(f"reference numbers {path}: {err.strerror or one_line(err)}; {fix}") from None
    except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:  # malformed, a value not a number
        raise PaperRefused(f"reference numbers {path} are not a valid CSV ({one_line(err)}); {fix}") from None
    missing = [column for column in PAPER_COLUMNS if column not in paper.columns]
    if missing:
        raise PaperRefused(f"reference numbers {path} lack the column(s) {', '.join(missing)}; {fix}")
    return paper


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
    return {
        "reference": values[base] if mean is None else mean,
        "reference_std": values.get(f"{base}_std", math.nan),
        "reference_best": math.nan if mean is None else values[base],
        "reference_source": ", ".join(dict.fromkeys(rows[rows.metric == base].table)),
    }


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
    return {
        "model": group.key[0],
        "shortcut": group.key[1],
        "variant": group.key[2],
        "protocol": group.key[3],
        "metric": metric,
        **ref,
        "n": n,
        "mean": mean,
        "std": std,
        "best": float(values.min()),
        "diff": diff,
        "within": within,
        "iterations": group.iterations,
        "recipe": group.recipe,
        "seeds": " ".join(t.get("reproduce.seed", "?") for t in tags),
        "data": " | ".join(dict.fromkeys(t.get("reproduce.data", "") for t in tags)),
        "data_fingerprint": " ".join(dict.fromkeys(t.get("reproduce.data_fingerprint", "") for t in tags)),
        "run_ids": " ".join(r["run_id"] for r in group.runs),
    }


def evaluation_table(runs: list[dict], study: str, paper: pd.DataFrame) -> pd.DataFrame:
    """One row per final metric of each `reproduce evaluate` run, beside the paper's number for
    the same model, shortcut and protocol."""
    rows = []
    for run in runs:
        key, tags = model_key(run), run["tags"]
        for metric in [m for m in FINAL_METRICS[study] if m in run["metrics"]]:
            ref = paper_reference(paper, key, metric)
            ours = float(run["metrics"][metric])
            source = tags.get("reproduce.weights", "?")
            rows.append(
                {
                    "weights": source if source.startswith(("runs:/", "models:/")) else Path(source).name,
                    "format": tags.get("reproduce.weights_format", ""),
                    "model": key[0],
                    "shortcut": key[1],
                    "variant": key[2],
                    "protocol": key[3],
                    "metric": metric,
                    **ref,
                    "ours": ours,
                    "diff": ours - ref["reference"],
                    "images": int(run["metrics"].get("images", 0)),
                    "data": tags.get("reproduce.data", ""),
                    "weights_sha256": tags.get("reproduce.weights_sha256", ""),
                    "run_id": run["run_id"],
                }
            )
    return pd.DataFrame(rows)


def build_table(groups: list[Group], study: str, paper: pd.DataFrame) -> pd.DataFrame:
    rows = [summarize(g, metric, paper) for g in groups for metric in FINAL_METRICS[study]]
    return pd.DataFrame(rows, columns=None if rows else ["model"])


def provenance(runs: list[dict], selection: Selection) -> pd.DataFrame:
    rows = []
    for run in runs:
        tags, params = run["tags"], run["params"]
        rows.append(
            {
                "run_id": run["run_id"],
                "experiment": run.get("experiment", ""),
                "model": model_key(run)[0],
                "shortcut": model_key(run)[1],
                "seed": tags.get("reproduce.seed", ""),
                "status": run["status"],
                "used": selection.why.get(run["run_id"], ""),
                "recipe": tags.get("reproduce.recipe", ""),
                "iterations": params.get("schedule.iterations", ""),
                "start_time": run["start_time"],
                "end_time": run["end_time"],
                **{t: tags.get(f"reproduce.{t}", "") for t in PROVENANCE_TAGS},
                "data": tags.get("reproduce.data", ""),
            }
        )
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------- Markdown
def _num(x: float, digits: int = 2) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def markdown(
    study: str,
    table: pd.DataFrame,
    other: pd.DataFrame,
    selection: Selection,
    prov: pd.DataFrame,
    figures: list[str],
    command: str,
    source: str,
    paper: pd.DataFrame,
    seeds: list[str] = (),
) -> str:
    """table.md: the table beside the paper, given weights evaluated, what was left out, other
    recipes, `seeds` (summary.markdown: over seeds and the paper's findings), figures, provenance."""
    title = {"cifar10": "CIFAR-10 (paper Table 6)", "imagenet": "ImageNet (paper Tables 2-4)"}[study]
    data_ids = {d: f"d{i + 1}" for i, d in enumerate(dict.fromkeys(table.get("data", [])))}
    out = [
        f"# {title}: reproduced vs. He et al., CVPR 2016",
        "",
        f"Built by `{command}` from {source}.",
        "",
        _md_rows(table, data_ids),
        "",
    ]
    if selection.evaluations:
        out += [
            "## Given weights evaluated (`reproduce evaluate`), beside the paper",
            "",
            _md_evaluations(evaluation_table(selection.evaluations, study, paper)),
            "",
        ]
    counts = ", ".join(f"{n} {reason}" for reason, n in sorted(selection.left_out.items())) or "none"
    out += [
        f"Runs left out of the table: {counts}.",
        "",
        "- ours: final test error (%) at step = schedule.iterations, under the row's protocol; mean ± sample "
        "std over the seeds (repeats of one `reproduce.recipe`); best = lowest.",
        "- Δ = our mean − the paper's number (its mean where it gives one). within: |Δ| ≤ 2 × the paper's std "
        "where it reports a spread, else ≤ 2 × our std (n ≥ 2); n/a for a single run.",
        "- Per model the recipe with the most finished runs is tabulated (ties: longer schedule, then newest); "
        "RUNNING, KILLED and FAILED runs never are.",
        "",
    ]
    prints = dict(zip(table.get("data", []), table.get("data_fingerprint", [])))
    out += [f"- {ident}: {desc} (fingerprint {prints[desc]})" for desc, ident in data_ids.items()] + [""]
    if len(other):
        out += ["## Other recipes (not in the table)", "", _md_rows(other, None), ""]
    if seeds:
        out += ["## Over seeds, and the paper's findings", "", *seeds, ""]
    if figures:
        out += ["## Figures", ""] + [f"![{f}]({f})" for f in figures] + [""]
    out += _md_provenance(prov, command, source)
    return "\n".join(out) + "\n"


PROVENANCE_COUNTS = [
    ("git_commit", "git commits"),
    ("git_dirty", "uncommitted changes"),
    ("host", "hosts"),
    ("gpu", "GPUs"),
    ("torch", "torch"),
    ("cuda", "CUDA"),
    ("data_fingerprint", "data fingerprints"),
]
PROVENANCE_COLUMNS = [
    "run_id",
    "model",
    "shortcut",
    "seed",
    "status",
    "used",
    "iterations",
    "git_commit",
    "host",
    "gpu",
    "start_time",
]


def _md_provenance(prov: pd.DataFrame, command: str, source: str) -> list[str]:
    """The report's provenance section: command and source, what the runs ran on, one row per run read."""
    out = ["## Provenance", "", f"- command: `{command}`", f"- source: {source}"]
    for col, label in PROVENANCE_COUNTS:
        counted = prov[col].value_counts() if len(prov) else {}
        out.append(f"- {label}: " + ", ".join(f"{v or '?'} ({n} runs)" for v, n in counted.items()))
    if len(prov):
        out.append(f"- run dates: {prov.start_time.min()} to {prov.end_time.max()}")
    cols = PROVENANCE_COLUMNS
    out += ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(str(row[c]) for c in cols) + " |" for _, row in prov.iterrows()]
    return out


def _md_evaluations(table: pd.DataFrame) -> str:
    head = ["weights", "model", "protocol", "metric", "paper", "source", "ours", "Δ", "images", "data", "run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in table.iterrows():
        variant = f" {r.variant}" if r.variant and r.variant != "v1" else ""
        cells = [
            f"{r.weights} ({r.format})",
            display_name((r.model, r.shortcut)) + variant,
            r.protocol,
            r.metric,
            _num(r.reference),
            r.reference_source or "–",
            _num(r.ours),
            _num(r["diff"]),
            str(r.images),
            r.data,
            r.run_id,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _md_rows(table: pd.DataFrame, data_ids: dict | None) -> str:
    head = [
        "model",
        "protocol",
        "metric",
        "paper",
        "source",
        "ours mean ± std",
        "n",
        "best",
        "Δ",
        "within",
        "iterations",
        "data",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in table.iterrows():
        paper = _num(r.reference) + (
            f" ± {_num(r.reference_std)} (best {_num(r.reference_best)})" if not math.isnan(r.reference_std) else ""
        )
        data = data_ids.get(r.data, r.data) if data_ids else f"recipe {r.recipe}"
        ours = _num(r["mean"]) + (f" ± {_num(r['std'])}" if r.n > 1 else " (1 run)")
        cells = [
            display_name((r.model, r.shortcut)),
            r.protocol,
            r.metric,
            paper,
            r.reference_source or "–",
            ours,
            str(r.n),
            _num(r.best),
            _num(r["diff"]),
            r.within or "–",
            str(r.iterations),
            data,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
