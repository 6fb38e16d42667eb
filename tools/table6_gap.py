"""What the lossy JPEG copy of CIFAR-10 does to a network's test error, measured (issue 28, item 4).

  python tools/table6_gap.py --net LABEL=WEIGHTS [--net ...] [--out results/cifar10/gap]
  python tools/table6_gap.py --decompose [--out results/cifar10/gap]

WEIGHTS: a run directory or checkpoint of this suite, or a public CIFAR-10 checkpoint (.th). Each
network is scored, single view, on
  - the JPEG copy's 10,000 test images (`--jpeg`, the data our runs train and test on), in fp32 and in
    bf16 autocast (the numerics our runs evaluated in: the two should agree with the run's own number);
  - the first 1,017 test images twice, paired: their original pixels (`--exact`,
    cifar10-exact-subset.npz) and their JPEG copies (the same images: class c, k-th of its class in
    the original order is the JPEG copy's test/<class>/<k>.jpg).
The paired difference (original minus JPEG, on the same images) has the std of a paired mean, which is
far smaller than two independent binomial stds. The input is normalised as the network was trained:
the suite's checkpoints with the per-pixel mean of the JPEG training images they trained on (their
data.val_split), the public files with ImageNet's statistics, as `reproduce evaluate` does.

--decompose writes OUT/README.md: per network with finished runs at the paper's protocol, the distance
from the paper's number taken apart, step by step, from the finished runs of both exports (the 45k run
of results/cifar10/runs.json, the 50k runs of results/cifar10/table6/runs.json) and the paired
measurement of measured.json (label "<model> s<seed>", e.g. "resnet20 s0", scored from that run's weights).

Writes OUT/measured.json (every count, so each number can be recomputed) and OUT/measured.md; networks
already there stay, one measured again under the same label is replaced.
This script is not part of the installed package; it uses this checkout's `reproduce`.
"""

from __future__ import annotations

import argparse
import datetime
import math
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from reproduce.checkpoint import load as load_checkpoint  # noqa: E402
from reproduce.data.cifar import cifar_split, cifar_stats, load_cifar10  # noqa: E402
from reproduce.io import atomic_write_json, atomic_write_text  # noqa: E402
from reproduce.provenance import code_state, host  # noqa: E402
from reproduce.weights import read_weights  # noqa: E402

DATA = REPO.parent / "shared" / "data"


def paired_images(jpeg_test_y: np.ndarray, exact: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(original pixels N x 32 x 32 x 3, labels, index of each in the JPEG copy's test split). The JPEG
    copy's test split is sorted by class folder, then by k, the image's rank within its class in the
    original order; the class folders sort as the class indices do."""
    with np.load(exact) as z:
        pixels, labels = z["test_batch_data_prefix"], z["test_batch_labels"].astype(np.int64)
    seen = np.zeros(10, np.int64)
    index = np.empty(len(pixels), np.int64)
    for i, label in enumerate(labels[: len(pixels)]):
        index[i] = label * 1000 + seen[label]
        seen[label] += 1
    if not np.array_equal(jpeg_test_y[index], labels[: len(pixels)]):
        raise SystemExit(f"error: the labels of {exact} and of the JPEG copy's test split do not pair up")
    return pixels, labels[: len(pixels)], index


def normalisation(weights, jpeg) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(mean, std, what) the network was trained with."""
    if weights.format == "checkpoint":
        data = load_checkpoint(Path(weights.source))["config"]["data"]
        train_idx, _ = cifar_split(len(jpeg.train_x), data["val_split"])
        images = torch.from_numpy(jpeg.train_x[train_idx]).permute(0, 3, 1, 2)
        mean, std = cifar_stats(images, data["normalize"])
        return mean, std, f"{data['normalize']} of the {len(train_idx)} JPEG training images"
    mean, std = cifar_stats(torch.zeros(1, 3, 32, 32, dtype=torch.uint8), weights.normalize or "imagenet")
    return mean, std, f"{weights.normalize or 'imagenet'} statistics"


@torch.no_grad()
def wrong(model, pixels: np.ndarray, labels: np.ndarray, mean, std, bf16: bool = False) -> np.ndarray:
    """Per image: 1 where the top-1 prediction is wrong, else 0."""
    out = []
    for start in range(0, len(pixels), 500):
        x = torch.from_numpy(pixels[start : start + 500]).permute(0, 3, 1, 2).float().div(255)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model((x - mean) / std)
        out.append((logits.float().argmax(1).numpy() != labels[start : start + 500]).astype(np.int64))
    return np.concatenate(out)


def error(w: np.ndarray) -> dict:
    p = float(w.mean())
    return {"errors": int(w.sum()), "images": len(w), "err": 100 * p, "std": 100 * math.sqrt(p * (1 - p) / len(w))}


def measure(label: str, source: str, jpeg, exact: Path) -> dict:
    weights = read_weights(source).resolve(None, None, None)
    model = weights.build("cpu").eval()
    mean, std, how = normalisation(weights, jpeg)
    pixels, labels, index = paired_images(jpeg.test_y, exact)
    on_exact = wrong(model, pixels, labels, mean, std)
    on_jpeg = wrong(model, jpeg.test_x[index], labels, mean, std)
    diff = on_exact - on_jpeg  # per image: -1, 0, +1
    return {
        "label": label,
        "weights": source,
        "weights_sha256": weights.sha256,
        "format": weights.format,
        "architecture": str(weights.arch),
        "extra": weights.extra,
        "normalisation": how,
        "jpeg_10k_fp32": error(wrong(model, jpeg.test_x, jpeg.test_y, mean, std)),
        "jpeg_10k_bf16": error(wrong(model, jpeg.test_x, jpeg.test_y, mean, std, bf16=True)),
        "exact_subset": error(on_exact),
        "jpeg_subset": error(on_jpeg),
        "paired_exact_minus_jpeg": {
            "points": 100 * float(diff.mean()),
            "std": 100 * float(diff.std(ddof=1)) / math.sqrt(len(diff)),
            "only_exact_wrong": int((diff == 1).sum()),
            "only_jpeg_wrong": int((diff == -1).sum()),
        },
    }


def markdown(rows: list[dict], command: str, when: str) -> str:
    def cell(e: dict) -> str:
        return f"{e['err']:.2f} ± {e['std']:.2f} ({e['errors']}/{e['images']})"

    lines = [
        "# Test error on the JPEG copy and on the original pixels, measured",
        "",
        f"Written by `{command}` on {when} ({host()}, commit {code_state().commit[:12]}); every count is in",
        "[`measured.json`](measured.json). Errors in %, ± the binomial std; the paired column is the",
        "difference on the same 1,017 images, ± the std of a paired mean (how tools/table6_gap.py says).",
        "",
        "| network | JPEG 10k fp32 | JPEG 10k bf16 | original 1,017 | JPEG same 1,017 | original − JPEG | normalisation |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        d = r["paired_exact_minus_jpeg"]
        lines.append(
            f"| {r['label']} | {cell(r['jpeg_10k_fp32'])} | {cell(r['jpeg_10k_bf16'])} | {cell(r['exact_subset'])} "
            f"| {cell(r['jpeg_subset'])} | {d['points']:+.2f} ± {d['std']:.2f} "
            f"(+{d['only_exact_wrong']}/−{d['only_jpeg_wrong']}) | {r['normalisation']} |"
        )
    lines += ["", "Networks:", ""]
    lines += [
        f"- {r['label']}: `{r['weights']}` ({r['format']}, {r['architecture']}, sha256 {r['weights_sha256'][:12]})"
        for r in rows
    ]
    return "\n".join(lines) + "\n"


def merged(path: Path, measured: list[dict]) -> list[dict]:
    """The rows already in `path` with `measured` added; a network measured again replaces its row."""
    import json

    old = json.loads(path.read_text())["networks"] if path.exists() else []
    new = {r["label"] for r in measured}
    return [r for r in old if r["label"] not in new] + measured


PAPER = {"resnet20": 8.75, "resnet32": 7.51, "plain20": None, "plain32": None}  # Table 6 (plain: Fig. 6 only)


def finished(export: Path) -> list[dict]:
    """The runs of an export that its report tabulates (reproduce.report.runs.select_runs: finished,
    per model the recipe with the most runs, the newest run of a seed): model, seed, val_split, world
    size, test error, run id and the run it was imported from (reproduce park / unpark), if any."""
    from reproduce.report.runs import read_export, select_runs

    if not export.exists():
        return []
    return [
        {
            "model": r["params"]["model.name"],
            "seed": int(r["params"]["seed"]),
            "val_split": int(r["params"]["data.val_split"]),
            "world_size": int(r["tags"].get("reproduce.world_size", 1)),
            "test_err": float(r["metrics"]["test_top1_err"]),
            "run_id": r["run_id"],
            "imported_from": r["tags"].get("reproduce.imported_from"),
        }
        for group in select_runs(read_export(export)["runs"], "cifar10").main
        for r in group.runs
    ]


def spread(values: list[float]) -> tuple[float, float | None]:
    """(mean, sample std or None for one value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def measured_row(run: dict, measured: dict) -> dict | None:
    """measured.json's row for `run`: label "<model> s<seed>", scored from this run's weights (the
    checkpoint's MLflow run id is the run's, or the one it was imported from); None if not measured."""
    row = measured.get(f"{run['model']} s{run['seed']}")
    if row is None:
        return None
    scored = (row.get("extra") or {}).get("mlflow_run_id")
    return row if scored in (run["run_id"], run["imported_from"]) else None


def decomposition(model: str, runs45: list[dict], runs50: list[dict], measured: dict) -> list[str]:
    """The rows of one network's table: from the paper's number to ours, each step measured."""
    ours = [r for r in runs50 if r["model"] == model and r["val_split"] == 0 and r["world_size"] == 2]
    if not ours:
        return []
    n = len(ours)
    mean50, std50 = spread([r["test_err"] for r in ours])
    pm = lambda std: f" ± {std:.2f}" if std is not None else ""  # noqa: E731
    ids = ", ".join(f"s{r['seed']} `{r['run_id'][:8]}`" for r in ours)
    paper = PAPER.get(model)
    rows = [
        f"| the paper (Table 6): 50k, original pixels, BN over 64 on 2 GPUs, fp32 | {paper if paper else '-'} | | He et al. |"
    ]
    for r in [r for r in runs45 if r["model"] == model and r["val_split"] == 5000]:
        rows.append(
            f"| ours: 45k, BN over 128 (1 process), bf16, the JPEG copy | {r['test_err']:.2f} (n=1) | | run `{r['run_id'][:8]}` |"
        )
        change = mean50 - r["test_err"]
        # one run at 45k against the mean of n at 50k, both with the 50k runs' seed spread
        noise = std50 * math.sqrt(1 + 1 / n) if std50 is not None else None
        what = "from 45k to 50k images and from BN over 128 to 64, together (one run at 45k)"
        rows.append(f"| {what} | | {change:+.2f}{pm(noise)} | the two rows' runs |")
    rows.append(
        f"| ours: 50k, BN over 64 (2 processes), bf16, the JPEG copy | {mean50:.2f}{pm(std50)} (n={n}) | | {ids} |"
    )
    scored = [(r, row["paired_exact_minus_jpeg"]) for r in ours if (row := measured_row(r, measured))]
    if scored:
        m = len(scored)
        # Every run is scored on the same 1,017 images, so the measurements' errors are not
        # independent: their binomial std is taken at its mean over the runs, not divided by sqrt(m).
        binomial = sum(p["std"] for _, p in scored) / m
        diff, diff_sd = spread([p["points"] for _, p in scored])
        as_if, as_if_sd = spread([r["test_err"] + p["points"] for r, p in scored])
        diff_noise = math.sqrt(binomial**2 + (diff_sd**2 / m if diff_sd is not None else 0))
        noise = math.sqrt(binomial**2 + (as_if_sd**2 / m if as_if_sd is not None else 0))
        which = f"{m} run" if m == 1 else f"{m} runs"
        if m < n:
            which += f" of the {n}: " + ", ".join(f"s{r['seed']}" for r, _ in scored)
        rows.append(
            f"| tested on the original pixels instead of the JPEG copy (same 1,017 images, paired, {which}) "
            f"| | {diff:+.2f} ± {diff_noise:.2f} | tools/table6_gap.py |"
        )
        rows.append(
            f"| ours, as if tested on the original pixels (mean over the {which}) | {as_if:.2f} ± {noise:.2f} | | "
            "each run's test error plus its own pixel change |"
        )
        if paper:
            rows.append(
                f"| **left, not taken apart: trained on the JPEG copy, bf16 training, the seeds** | | **{as_if - paper:+.2f} ± {noise:.2f}** | ours as if tested on original pixels − the paper |"
            )
    return rows


def decompose(out: Path, export45: Path | None = None, export50: Path | None = None) -> str:
    import json

    results = REPO / "results" / "cifar10"
    runs45 = finished(export45 or results / "runs.json")
    runs50 = finished(export50 or results / "table6" / "runs.json")
    path = out / "measured.json"
    measured = {r["label"]: r for r in json.loads(path.read_text())["networks"]} if path.exists() else {}
    lines = [
        "# CIFAR-10: the distance to the paper's Table 6, taken apart by measurement (issue 28)",
        "",
        f"Built by `python tools/table6_gap.py --decompose` (commit {code_state().commit[:12]}) from `results/cifar10/runs.json` (the 45k run),",
        "`results/cifar10/table6/runs.json` (the 50k runs its table holds) and [`measured.md`](measured.md) (each",
        "network scored on the same 1,017 test images as original pixels and as JPEG). Test error in %, single",
        "view. ± on a row of ours (n runs): the seed-to-seed sample std, n ≥ 2. ± on a change, and on the rows",
        "built from changes: the standard error of that estimate, the seed-to-seed std / √n (where n ≥ 2)",
        "combined with the measurement's own std (for the pixel rows, the paired std of the 1,017-image",
        "difference, averaged over the runs and not divided by √n: every run is scored on the same images).",
        "No ± where only one run and no measurement enter. The pixel rows' change, measured on the first",
        "1,017 test images (all the original pixels this machine has), is applied to the 10,000-image error:",
        "the subset is taken as representative (the public ResNet-20, trained on the original pixels, scores",
        "on it about what the paper reports on all 10,000; see measured.md).",
        "",
    ]
    for model in sorted({r["model"] for r in runs50}):
        rows = decomposition(model, runs45, runs50, measured)
        if rows:
            lines += [f"## {model}", "", "| step | test error | change (points) | from |", "|---|---|---|---|"]
            lines += rows + [""]
    if not runs50:
        lines += ["No run at the paper's protocol has finished yet (`results/cifar10/table6/protocol.md`).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--net", action="append", default=[], metavar="LABEL=WEIGHTS")
    parser.add_argument(
        "--decompose", action="store_true", help="write OUT/README.md from the exports and measured.json"
    )
    parser.add_argument("--jpeg", type=Path, default=DATA / "cifar10-jpeg.tar.gz")
    parser.add_argument("--exact", type=Path, default=DATA / "cifar10-exact-subset.npz")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "cifar10" / "gap")
    args = parser.parse_args(argv)
    if args.decompose:
        atomic_write_text(args.out / "README.md", decompose(args.out))
        print(decompose(args.out))
        return 0
    if not args.net:
        parser.error("give --net LABEL=WEIGHTS (one or more) or --decompose")
    for path in (args.jpeg, args.exact):
        if not path.exists():
            parser.error(f"{path} does not exist; give the file (see ../shared/data/README.md)")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    jpeg = load_cifar10(args.jpeg)
    measured = [measure(*net.split("=", 1), jpeg, args.exact) for net in args.net]
    rows = merged(args.out / "measured.json", measured)
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = "python tools/table6_gap.py " + " ".join(f"--net '{r['label']}={r['weights']}'" for r in rows)
    atomic_write_json(
        args.out / "measured.json",
        {"command": command, "date": when, "host": host(), "commit": code_state().commit, "networks": rows},
        indent=1,
    )
    atomic_write_text(args.out / "measured.md", markdown(rows, command, when))
    print(markdown(rows, command, when))
    return 0


if __name__ == "__main__":
    sys.exit(main())
