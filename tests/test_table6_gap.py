"""tools/table6_gap.py --decompose: the distance to the paper taken apart, from two exports and the
paired pixel measurements, with the numbers worked out by hand here."""

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("table6_gap", REPO / "tools" / "table6_gap.py")
gap = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gap)


def run(run_id, seed, err, *, val_split=0, world=2, status="FINISHED", start="2026-12-07 08:00:00 UTC", recipe="r50k"):
    return {
        "run_id": run_id,
        "experiment": "cifar10-table6",
        "status": status,
        "start_time": start,
        "end_time": start,
        "params": {
            "model.name": "resnet20",
            "model.shortcut": "A",
            "seed": str(seed),
            "data.val_split": str(val_split),
            "schedule.iterations": "64000",
        },
        "tags": {
            "reproduce.recipe": recipe,
            "reproduce.seed": str(seed),
            "reproduce.world_size": str(world),
            "reproduce.study": "cifar10",
        },
        "metrics": {"test_top1_err": err} if status == "FINISHED" else {},
        "history": {},
    }


def export(path, runs):
    path.write_text(json.dumps({"format": "reproduce-runs/1", "study": "cifar10", "experiment": "x", "runs": runs}))
    return path


def measured(out, rows):
    out.mkdir(exist_ok=True)
    networks = [
        {"label": label, "extra": {"mlflow_run_id": run_id}, "paired_exact_minus_jpeg": {"points": points, "std": std}}
        for label, run_id, points, std in rows
    ]
    (out / "measured.json").write_text(json.dumps({"networks": networks}))


def table(text):
    """The decomposition's rows as {first cell: (second, third) cells}."""
    rows = [
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in text.splitlines()
        if line.startswith("| ") and "---" not in line
    ]
    return {cells[0]: (cells[1], cells[2]) for cells in rows}


def test_two_seeds_each_measured(tmp_path):
    e45 = export(tmp_path / "45k.json", [run("f6de4846aa", 0, 13.45, val_split=5000, world=1, recipe="r45k")])
    e50 = export(
        tmp_path / "50k.json",
        [
            run("aaaa0000", 0, 12.0),
            run("bbbb1111", 1, 11.0, start="2026-12-07 14:00:00 UTC"),
            run("cccc2222", 1, 30.0, start="2026-12-07 09:00:00 UTC"),  # an older run of seed 1: not counted
            run("dddd3333", 2, None, status="KILLED"),  # unfinished: not counted
        ],
    )
    out = tmp_path / "gap"
    measured(out, [("resnet20 s0", "aaaa0000", -1.0, 0.8), ("resnet20 s1", "bbbb1111", -0.5, 0.6)])
    rows = table(gap.decompose(out, e45, e50))
    assert rows["ours: 50k, BN over 64 (2 processes), bf16, the JPEG copy"][0] == "11.50 ± 0.71 (n=2)"
    # one 45k run against the mean of two: 0.707 * sqrt(1 + 1/2)
    assert rows["from 45k to 50k images and from BN over 128 to 64, together (one run at 45k)"][1] == "-1.95 ± 0.87"
    # mean binomial std 0.7 (not divided by sqrt 2: same images), seed std of the change 0.354 / sqrt 2
    pixel = "tested on the original pixels instead of the JPEG copy (same 1,017 images, paired, 2 runs)"
    assert rows[pixel][1] == "-0.75 ± 0.74"
    assert rows["ours, as if tested on the original pixels (mean over the 2 runs)"][0] == "10.75 ± 0.74"
    left = rows["**left, not taken apart: trained on the JPEG copy, bf16 training, the seeds**"][1]
    assert left == "**+2.00 ± 0.74**"


def test_a_measurement_of_other_weights_is_not_used(tmp_path):
    """A row labelled with the seed but scored from another run's weights (a seed run again) is left
    out, and the pixel rows say which runs they rest on."""
    e50 = export(tmp_path / "50k.json", [run("aaaa0000", 0, 12.0), run("bbbb1111", 1, 11.0)])
    out = tmp_path / "gap"
    measured(out, [("resnet20 s0", "aaaa0000", -1.0, 0.8), ("resnet20 s1", "older999", -5.0, 0.6)])
    text = gap.decompose(out, tmp_path / "absent.json", e50)
    rows = table(text)
    assert (
        rows["tested on the original pixels instead of the JPEG copy (same 1,017 images, paired, 1 run of the 2: s0)"][
            1
        ]
        == "-1.00 ± 0.80"
    )
    assert rows["ours, as if tested on the original pixels (mean over the 1 run of the 2: s0)"][0] == "11.00 ± 0.80"
    assert not any(key.startswith("from 45k") for key in rows)  # no 45k export: no such step


def test_no_finished_run_says_so(tmp_path):
    e50 = export(tmp_path / "50k.json", [run("dddd3333", 0, None, status="KILLED")])
    assert "No run at the paper's protocol has finished yet" in gap.decompose(tmp_path, tmp_path / "absent.json", e50)
