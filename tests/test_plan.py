"""`reproduce plan`: the projection's arithmetic against made-up rates, `--from` files (good and bad),
and a real measurement at tiny size (numbers are for an idle machine, never asserted here)."""

from __future__ import annotations

import mlflow
import pandas as pd
import pytest

from reproduce.bench import plan
from reproduce.bench.projection import FORWARD_SHARE, AllReduce, Rate, job_of, project, rates_from
from reproduce.cli import main as cli
from reproduce.config import load_config
from tests.conftest import REPO

CIFAR = REPO / "configs" / "cifar10" / "resnet20.yaml"
IMAGENET = REPO / "configs" / "imagenet" / "resnet50.yaml"
RATE = Rate(images_per_sec=1000.0, eval_per_sec=4000.0, checkpoint_s=0.5, setup_s=10.0)
NONE = AllReduce(0.0, None, "none")


def test_projection_of_a_cifar_schedule_on_one_process():
    cfg = load_config(CIFAR)
    job = job_of(cfg, "cifar10/resnet20", (5000, 10_000), 45_000, grad_bytes=1_000_000)
    row = project(job, RATE, 1, 1, NONE)
    # 64k iterations of 128 images at 1,000 images/s; an evaluation (5k validation + 10k test images)
    # after every 2,000 iterations but the last, plus the final one; a checkpoint every 2,000 (the last
    # is the final one); the setup once.
    assert row["step_s"] == pytest.approx(0.128)
    assert row["train_s"] == pytest.approx(64_000 * 0.128)
    assert row["eval_s"] == pytest.approx((31 + 1) * 15_000 / 4000)
    assert row["checkpoint_s"] == pytest.approx(32 * 0.5)
    assert row["wall_s"] == pytest.approx(8192 + 120 + 16 + 10)
    assert row["device_hours"] == pytest.approx(8338 / 3600, abs=0.01)
    assert row["epochs"] == pytest.approx(64_000 * 128 / 45_000, abs=0.1)
    assert row["global_images_per_sec"] == pytest.approx(1000.0) and row["wall"] == "2 h 18 min"


def test_projection_scales_with_the_processes_and_their_all_reduce():
    cfg = load_config(CIFAR)
    job = job_of(cfg, "cifar10/resnet20", (5000, 10_000), 45_000, grad_bytes=4_000_000)
    allreduce = AllReduce(latency_s=0.002, bus_bytes_per_s=2e9, how="test")
    row = project(job, RATE, 4, 2, allreduce)
    step = 32 / 1000 + 0.002 + 4_000_000 * 2 * 3 / 4 / 2e9
    assert row["batch_per_process"] == 32 and row["step_s"] == pytest.approx(step, rel=1e-3)
    assert row["eval_s"] == pytest.approx(32 * 15_000 / 4 / 4000)  # each process scores a quarter
    assert row["wall_s"] == pytest.approx(64_000 * step + 30 + 16 + 10, rel=1e-4)
    assert row["device_hours"] == pytest.approx(row["wall_s"] * 4 / 3600, abs=0.01)
    assert row["global_images_per_sec"] == pytest.approx(128 / step, rel=1e-3)
    perfect = project(job, RATE, 4, 1, NONE)  # not measured: perfect scaling, as stated
    assert perfect["step_s"] == pytest.approx(0.032) and perfect["train_s"] == pytest.approx(64_000 * 0.032)


def test_an_imagenet_schedule_counts_the_final_protocols_views():
    cfg = load_config(IMAGENET, ["data.synthetic=true"])
    job = job_of(cfg, "imagenet/resnet50", (50_000, 50_000), 1_281_167, grad_bytes=1)
    assert job.evaluations == 59 and job.checkpoints == 120 and job.eval_images == 50_000
    assert job.final_images == 50_000 + 10 * 50_000  # the validation pass, then ten crops of each test image
    capped = job_of(load_config(IMAGENET, ["data.synthetic=true", "eval.max_images=100"]), "x", (50_000, 50_000), 1, 1)
    assert capped.eval_images == 100 and capped.final_images == 100 + 1000


def _plan(tmp_path, *args, capsys=None) -> pd.DataFrame:
    assert plan.main(["--out", str(tmp_path / "out"), *map(str, args)]) == 0
    return pd.read_csv(tmp_path / "out" / "plan.csv")


def test_from_a_users_csv(tmp_path):
    rates = tmp_path / "rates.csv"
    rates.write_text("model,images_per_sec,checkpoint_s\nresnet20,1000,0.5\nresnet20,800,0.5\nresnet50,90,2\n")
    table = _plan(tmp_path, "--from", rates, "--no-mlflow")  # every model of the file, its paper config
    assert list(table.experiment) == ["cifar10/resnet20", "imagenet/resnet50"]
    r20 = table.iloc[0]
    assert r20.images_per_sec == 1000  # the fastest row of a model
    assert r20.train_s == pytest.approx(64_000 * 128 / 1000, rel=1e-3)
    eval_rate = 1000 / FORWARD_SHARE  # no eval_images_per_sec column: a forward pass is a third of a step
    assert r20.eval_s == pytest.approx(32 * 15_000 / eval_rate, rel=1e-3)
    assert r20.checkpoint_s == pytest.approx(32 * 0.5) and r20.setup_s == 0
    assert r20.wall_s == pytest.approx(r20.train_s + r20.eval_s + r20.checkpoint_s + r20.setup_s, abs=0.2)
    two = _plan(tmp_path, "--from", rates, "--config", CIFAR, "--world-size", 2, "--bus-gbps", 1, "--no-mlflow")
    assert two.iloc[0].step_s > 64 / 1000 and two.iloc[0].device_hours == pytest.approx(
        two.iloc[0].wall_s * 2 / 3600, abs=0.01
    )


def test_from_bench_matrix_takes_the_fastest_cell_and_is_logged_to_mlflow(tmp_path, capsys):
    matrix = tmp_path / "matrix.csv"
    matrix.write_text(
        "model,input_size,batch,precision,channels_last,compile,synthetic,real,loader,bound\n"
        "resnet20,32,128,fp32,off,off,900,,,-\n"
        "resnet20,32,128,bf16,on,off,2000,1500,1600,input-bound\n"
    )
    table = _plan(tmp_path, "--from", matrix, "--config", CIFAR)  # checkpoint time measured here
    row = table.iloc[0]
    assert row.images_per_sec == 1500 and row.bound == "input-bound" and row.numerics == "bf16 on off"
    assert row.checkpoint_s > 0
    run_id = capsys.readouterr().out.strip().rsplit("MLflow run ", 1)[1]
    run = mlflow.get_run(run_id)
    assert run.data.tags["reproduce.kind"] == "plan" and run.data.params["world_size"] == "1"
    assert run.data.metrics["cifar10/resnet20.wall_s"] == pytest.approx(row.wall_s)
    assert "plan.csv" in {a.path for a in mlflow.MlflowClient().list_artifacts(run_id)}


@pytest.mark.parametrize(
    "content, fragment",
    [
        (None, "no such file"),
        (b"\x00\x01\xff\xfe binary", "not a CSV of measured rates"),
        (b"", "not a CSV of measured rates"),
        (b"name,speed\nresnet20,5\n", "needs a 'model' column"),
        (b"model,images_per_sec\nresnet20,-5\n", "row 2: no positive images/s"),
        (b"model,images_per_sec\nresnet20,fast\n", "row 2: no positive images/s"),
        (b"model,images_per_sec\nresnet21,5\n", "row 2: unknown model 'resnet21'"),
        (b"model,images_per_sec\nresnet56,5\n", "no rate for resnet20"),
    ],
)
def test_bad_from_files_are_refused_in_one_line(content, fragment, tmp_path, capsys):
    path = tmp_path / "rates.csv"
    if content is not None:
        path.write_bytes(content)
    code = cli(["plan", "--from", str(path), "--config", str(CIFAR), "--no-mlflow", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and fragment in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--world-size", "3", "--nodes", "2"], "must be a positive multiple of --nodes"),
        (["--world-size", "3"], "optim.batch_size"),  # 128 does not split over 3 processes
        (["--steps", "0"], "--steps and --repeats must be at least 1"),
        ([], "give --config FILE..., --study cifar10|imagenet or --from FILE"),
    ],
)
def test_bad_arguments_are_refused_in_one_line(args, fragment, tmp_path, capsys):
    given = ["--config", str(CIFAR)] if args else []
    try:
        code = cli(["plan", *given, *args, "--no-mlflow", "--out", str(tmp_path / "o")])
    except SystemExit as exit:  # argparse's errors (errors.ArgumentParser: one line, status 2)
        code = exit.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and fragment in err, err


def test_rates_from_reads_back_its_own_plan_csv(tmp_path):
    table = _plan(tmp_path, "--from", _write(tmp_path, "model,images_per_sec\nresnet20,700\n"), "--no-mlflow")
    again = rates_from(tmp_path / "out" / "plan.csv")
    assert again["resnet20"].images_per_sec == table.iloc[0].images_per_sec == 700


def _write(tmp_path, text: str):
    path = tmp_path / "given.csv"
    path.write_text(text)
    return path


def test_a_measured_plan_on_real_input(cifar_tar, tmp_path, capsys):
    """Real steps of ResNet-20 at a tiny batch on the real loader: the rate, its noise, the verdict
    and the parts of the wall time are all there, and add up."""
    tiny = ["optim.batch_size=8", "data.workers=0", "eval.batch_size=16", "data.val_split=40", "run.device=cpu"]
    numerics = ["run.amp=false", "run.channels_last=false"]  # as given: no timing of each candidate
    table = _plan(tmp_path, "--config", CIFAR, "--data", cifar_tar, "--steps", 1, "--repeats", 2, *tiny, *numerics)
    out = capsys.readouterr().out
    row = table.iloc[0]
    assert row.images_per_sec > 0 and row.spread_pct >= 0 and row.bound in ("compute", "input")
    assert row.numerics == "fp32 NCHW" and row.batch_per_process == 8 and row.iterations == 64_000
    assert row.measured_s > 0 and row.eval_s > 0 and row.checkpoint_s > 0
    assert row.setup_s >= 0  # a cached dataset opens in milliseconds: 0.0 once rounded to 0.1 s
    assert row.wall_s == pytest.approx(row.train_s + row.eval_s + row.checkpoint_s + row.setup_s, abs=0.2)
    assert row.train_s == pytest.approx(64_000 * 8 / row.images_per_sec, rel=1e-2)
    assert (
        "then 1 timed steps per experiment on a fixed batch" in out and "2 windows of at least 1 steps and 1.5 s" in out
    )
    assert "one process: no all-reduce" in out


def test_a_schedule_shorter_than_the_measurement_is_planned(cifar_tar, tmp_path):
    """2 iterations in all, fewer than the steps measured: the loader starts again instead of running out."""
    tiny = ["optim.batch_size=8", "data.workers=0", "eval.batch_size=16", "data.val_split=40", "run.device=cpu"]
    short = ["schedule.iterations=2", "schedule.milestones=[]", "eval.every=2", "run.checkpoint_every=2"]
    args = ("--config", CIFAR, "--data", cifar_tar, "--steps", 2, "--repeats", 2, "--seconds", 0)
    table = _plan(tmp_path, *args, "--no-mlflow", *tiny, *short, "run.amp=false", "run.channels_last=false")
    assert table.iloc[0].iterations == 2 and table.iloc[0].images_per_sec > 0


def test_configs_of_one_data_share_a_running_loader_and_one_numerics_timing(cifar_tar, tmp_path, monkeypatch):
    """plain-20 after ResNet-20 (same data, batch, layer shapes): one loader started, the batches prepared
    ahead (2 per worker) drawn untimed before each config's windows, the numerics timed once; each
    real-input window lasts --seconds."""
    import reproduce.data
    import reproduce.numerics

    started, timed, windows, drawn, stepped = [], [], [], [], []

    def counted(batches):
        for b in batches:
            drawn.append(1)
            yield b

    real_loader, real_numerics, real_rate = (
        reproduce.data.train_loader,
        reproduce.numerics.resolve_numerics,
        plan.timed_rate,
    )
    monkeypatch.setattr(reproduce.data, "train_loader", lambda *a: started.append(1) or counted(real_loader(*a)))
    monkeypatch.setattr(reproduce.numerics, "resolve_numerics", lambda *a: timed.append(1) or real_numerics(*a))

    def rate(batches, step, args, batch, device, warmup, seconds=0.0, repeats=None):
        begin, counting = plan.time.perf_counter(), seconds > 0  # the real input's windows

        def step_counted(b):
            stepped.append(counting)
            return step(b)

        result = real_rate(batches, step_counted, args, batch, device, warmup, seconds, repeats)
        windows.append((warmup, seconds, plan.time.perf_counter() - begin))
        return result

    monkeypatch.setattr(plan, "timed_rate", rate)
    tiny = ["optim.batch_size=8", "data.workers=2", "eval.batch_size=16", "data.val_split=40", "run.device=cpu"]
    plain = REPO / "configs" / "cifar10" / "plain20.yaml"
    args = ("--config", CIFAR, plain, "--data", cifar_tar, "--steps", 1, "--repeats", 2, "--seconds", 0.3)
    table = _plan(tmp_path, *args, "--no-mlflow", *tiny, "run.amp=auto", "run.channels_last=false")
    assert list(table.experiment) == ["cifar10/resnet20", "cifar10/plain20"] and len(started) == len(timed) == 1
    real = [w for w in windows if w[1] > 0]  # the fixed-batch windows have no least seconds
    assert [w[0] for w in real] == [1, 1] and all(w[2] >= 2 * 0.3 for w in real), windows
    assert len(drawn) == sum(stepped) + 2 * (2 * 2)  # 2 configs x 2 workers x 2 batches ahead, drawn unstepped


@pytest.mark.slow
def test_two_processes_measure_their_all_reduce(cifar_tar, tmp_path, capsys):
    tiny = ["optim.batch_size=8", "data.workers=0", "eval.batch_size=16", "run.device=cpu", "data.synthetic=true"]
    table = _plan(tmp_path, "--config", CIFAR, "--world-size", 2, "--steps", 1, "--repeats", 2, "--no-mlflow", *tiny)
    out = capsys.readouterr().out
    assert "gloo all-reduce measured among 2 processes here" in out
    row = table.iloc[0]
    assert row.batch_per_process == 4 and row.step_s > 4 / row.images_per_sec  # the all-reduce adds to each step
