"""Every command in README.md runs, so none can go stale unnoticed.

The commands are read from the README's ```bash blocks. Each runs as written, in README order
within its lane (two lanes run side by side, see `lane`), in its lane's scratch folder with the
lane's own MLflow store, changed only in what a test machine needs
(the scratch folder links the checkout's configs/, reproduce/ and slurm/):
the data paths point at tiny generated data sets, training gets a tiny size (`key=value`
overrides appended, which the README's commands accept), torchrun gets 2 processes on this
host, and sbatch becomes the job script run with REPRODUCE_DRY_RUN=1 (the launcher checks the
config, prints its srun command and stops). Sweeps are expanded with --dry-run and each of
their runs checked with `reproduce check`. A README command that is neither run nor listed in
NOT_RUN with its reason fails the test.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO

NOT_RUN = {
    "python3 -m venv .venv && . .venv/bin/activate": "creates the environment this suite runs in",
    "pip install torch==2.14.1 torchvision==0.29.1 && pip install -e '.[test]'": "installs what this suite runs with",
    "python -m pytest": "this suite itself",
    "mkdir -p slurm/logs": "a folder the repository already holds",
    "export MLFLOW_TRACKING_URI=http://$(hostname):5000": "an environment setting for the server below",
    "python tools/gpu_session.py --out gpu-session --data ../shared/data/cifar10-jpeg.tar.gz --budget-min 14 "
    "--tests-min 4 --bench-min 2 --parallel 10": "a 14-minute GPU session; tests/test_gpu_session.py runs the same "
    "script on a CPU with a tiny budget",
}
# Long-running servers: tests/test_faults_tracking.py starts and stops a real `mlflow server`,
# tests/test_mlflow_ui.py the UI, with a real browser looking at it.
SERVER = ("mlflow server ", "mlflow ui ")
TINY = [
    "schedule.iterations=2",
    "schedule.milestones=[]",
    "schedule.warmup_iterations=0",
    "eval.every=2",
    "run.checkpoint_every=2",
    "optim.batch_size=8",
    "data.workers=0",
    "run.progress=false",
    "eval.max_images=16",
    "eval.batch_size=8",
    "run.device=cpu",
]
TINY_CIFAR = ["data.val_split=16"]
TINY_IMAGENET = ["data.crop=32", "data.scale=[36,44]"]


# Commands of the second lane: ImageNet, fine-tuning, FFCV preparation, sweep dry runs and
# torchrun. None of them reads or writes the CIFAR-10 runs that the first lane's RUN_ID commands,
# reports and listings read, and nothing in the first lane reads what they write, so the two
# lanes share no state and each keeps README order. They balance at about 3.5 min each on 2 cores.
SECOND_LANE = ("torchrun ", "reproduce prepare ", "reproduce sweep ")


def lane(command: str) -> int:
    """0 for commands that make or read the CIFAR-10 runs (and the CIFAR-10 dry runs), 1 for the rest."""
    return int(command.startswith(SECOND_LANE) or "imagenet" in command or "configs/transfer/" in command)


def readme_commands() -> list[str]:
    """The shell commands of README.md's bash blocks: continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands.append(re.sub(r"\s+", " ", line))
    return commands


def _imagenet_tree(root: Path) -> Path:
    """Two classes of small JPEGs in train/ and val/, as an ImageNet folder."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 12), ("val", 4)):
        for label, wnid in enumerate(("n01440764", "n02102040")):
            folder = root / split / wnid
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(rng.normal(60 + 120 * label, 30, (48, 56, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.JPEG", quality=90)
    return root


def _weights(tmp_path: Path) -> Path:
    """Stand-ins of the right shapes for the weights the README names: the public CIFAR-10 ResNet-56
    file (its format: `module.` prefix, `best_prec1`) and torchvision's ResNet-50 in the hub cache."""
    import torch
    from torchvision.models import resnet50

    from reproduce.models import build_model

    cifar = tmp_path / "cifar-resnet56.th"
    state = {f"module.{k}": v for k, v in build_model("resnet56").state_dict().items()}
    torch.save({"state_dict": state, "best_prec1": 93.0}, cifar)
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    torch.save(
        resnet50(weights=None, num_classes=2).state_dict(), hub / "resnet50-0676ba61.pth"
    )  # the tiny set's 2 classes
    torch.save(resnet50(weights=None).state_dict(), hub / "resnet50-11ad3fa6.pth")  # IMAGENET1K_V2
    return cifar


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny(command: str, paths: dict[str, str]) -> str:
    """The README command as this machine runs it at tiny size (see the module docstring)."""
    for original, replacement in paths.items():
        command = command.replace(original, replacement)
    imagenet = "configs/imagenet/" in command or "configs/transfer/folder-" in command
    overrides = " ".join(TINY + (TINY_IMAGENET if imagenet else TINY_CIFAR))
    if " sbatch " in f" {command}":
        env, _, rest = command.partition("sbatch ")
        script = rest.split()[-1]
        return f"{env} REPRODUCE_DRY_RUN=1 REPRODUCE_NPROC_PER_NODE=2 bash {script}"
    if command.startswith("torchrun "):
        command = command.replace("torchrun ", f"{sys.executable} -m torch.distributed.run ", 1)
        command = command.replace("--nproc_per_node 8", "--nproc_per_node 2").replace("--nnodes 2", "--nnodes 1")
        if "--rdzv_endpoint" not in command:
            command = command.replace("--nproc_per_node 2", f"--nproc_per_node 2 --master_port {_port()}")
        return f"{command} {overrides}"
    if command.startswith("python reproduce/train.py") or command.startswith("reproduce train "):
        return f"{command} {overrides}"
    if command.startswith("reproduce study "):
        return f"{command} --iterations 10 --models plain20 --seeds 0 " + " ".join(
            o for o in TINY + TINY_CIFAR if not o.startswith(("schedule.", "eval.every", "run.checkpoint"))
        )
    if command.startswith("reproduce evaluate "):
        return f"{command} eval.max_images=8 eval.batch_size=8 run.device=cpu" + (
            " data.crop=32" if "resnet50" in command else ""
        )
    if command.startswith("reproduce plan "):  # each net's steps at batch 8, numerics as given, no auto timing
        return f"{command} --steps 1 --repeats 1 --out plan-out {overrides} run.amp=false run.channels_last=false"
    if command.startswith("reproduce prepare cifar10 "):
        return f"{command} --val-split 16"
    if command.startswith("reproduce prepare imagenet "):
        return f"{command} --workers 1"
    if command.startswith("reproduce sweep "):
        return f"{command} --dry-run {overrides}"
    return command


def run_lane(commands: list[str], work: Path, env: dict[str, str], paths: dict[str, str]) -> list[str]:
    """Run `commands` in order in the scratch folder `work` (which holds the lane's MLflow store);
    AssertionError naming the README command at the first that fails. Returns those it ran."""
    work.mkdir()
    for name in ("configs", "reproduce", "slurm"):  # the README's commands run from the repository root
        (work / name).symlink_to(REPO / name)
    env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}
    ran = []
    for readme in commands:
        command = readme
        if "RUN_ID" in command:
            client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
            experiment = client.get_experiment_by_name("cifar10")
            trained = (
                [
                    r
                    for r in client.search_runs([experiment.experiment_id], "attributes.status = 'FINISHED'")
                    if "reproduce.run_dir" in r.data.tags
                ]
                if experiment
                else []
            )  # training runs (evaluations have no run dir)
            assert trained, f"README: {command}\nno finished CIFAR-10 training run before it in its lane"
            command = command.replace("RUN_ID", trained[0].info.run_id)
        line = tiny(command, paths)
        result = subprocess.run(["bash", "-c", line], cwd=work, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, (
            f"README: {command}\nran: {line}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
        )
        if "--dry-run" in line:  # each run of the sweep must pass the same checks train makes
            runs = [shlex.split(r)[2:] for r in result.stdout.splitlines() if r.startswith("reproduce train ")]
            assert runs, result.stdout
            by_overrides: dict[tuple, list[str]] = {}  # one `check` of all configs per set of overrides
            for args in runs:
                by_overrides.setdefault(tuple(args[2:]), []).append(args[1])
            for overrides, configs in by_overrides.items():
                check = subprocess.run(
                    [sys.executable, "-m", "reproduce.cli", "check", *configs, *overrides],
                    cwd=work,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=300,
                )
                assert check.returncode == 0, f"README: {command}\nruns: {configs} {overrides}\n{check.stderr}"
        if "REPRODUCE_DRY_RUN=1" in line:
            assert "reproduce: " in result.stdout and "srun " in result.stdout, result.stdout
        ran.append(readme)
    return ran


def test_lanes_split_the_commands_as_their_data_needs():
    """The commands that make CIFAR-10 runs and those that read them share a lane; ImageNet's
    preparation and its FFCV training share the other."""
    commands = [c for c in readme_commands() if c not in NOT_RUN and not c.startswith(SERVER)]
    first = [c for c in commands if lane(c) == 0]
    assert any(c.startswith("reproduce train --config configs/cifar10/") for c in first)
    assert all(lane(c) == 0 for c in commands if "RUN_ID" in c or c.startswith(("reproduce report ", "reproduce runs")))
    assert (
        lane("reproduce prepare imagenet --source /data/imagenet --out /data/imagenet-ffcv")
        == lane(
            "reproduce train --config configs/imagenet/resnet50.yaml data.loader=ffcv data.path=/data/imagenet-ffcv"
        )
        == 1
    )
    assert 0 < len(first) < len(commands)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_every_readme_command_runs(cifar_tar, tmp_path):
    commands = readme_commands()
    assert len(commands) > 20, commands  # the blocks were found
    imagenet = _imagenet_tree(tmp_path / "imagenet")
    weights = _weights(tmp_path)
    paths = {
        "../shared/data/pretrained/cifar-resnet56-4bfd9763.th": str(weights),
        "my_images/": str(imagenet),
        "../shared/data/cifar10-jpeg.tar.gz": str(cifar_tar),
        "/data/cifar-10-batches-py": str(cifar_tar),
        "/data/imagenet-ffcv": str(tmp_path / "imagenet-ffcv"),
        "/data/imagenet": str(imagenet),
        "$HEAD:29500": f"127.0.0.1:{_port()}",
    }
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "HEAD": "127.0.0.1",
        "REPRODUCE_PYTHON": sys.executable,
        "REPRODUCE_CIFAR10": str(cifar_tar),  # for the commands without data.path: tests never download
        "TORCH_HOME": str(tmp_path / "torch"),
    }  # the hub cache, holding torchvision-shaped weights made here
    # A scratch folder per lane that links the code and configs in keeps the commands' outputs
    # (runs/, results/, data/, sweep-logs/, mlflow.db) out of the checkout and out of the other lane.
    to_run = [c for c in commands if c not in NOT_RUN and not c.startswith(SERVER)]
    # FFCV is optional (the README's set-up installs it only on request): without it, its commands
    # are left out and the test ends skipped, naming them, after running all the others.
    without_ffcv = [] if importlib.util.find_spec("ffcv") else [c for c in to_run if needs_ffcv(c)]
    to_run = [c for c in to_run if c not in without_ffcv]
    lanes = [[c for c in to_run if lane(c) == i] for i in (0, 1)]
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(run_lane, cmds, tmp_path / f"work{i}", env, paths) for i, cmds in enumerate(lanes)]
        ran = [c for f in futures for c in f.result()]  # the first lane's failure is raised first
    assert sorted(ran) == sorted(to_run)
    if without_ffcv:
        pytest.skip(f"FFCV is not installed: {len(without_ffcv)} README commands not run ({'; '.join(without_ffcv)})")


def needs_ffcv(command: str) -> bool:
    return command.startswith("reproduce prepare ") or "data.loader=ffcv" in command


def test_the_ffcv_commands_are_recognised():
    ffcv = [c for c in readme_commands() if needs_ffcv(c)]
    assert any(c.startswith("reproduce prepare cifar10 ") for c in ffcv)
    assert any("data.loader=ffcv" in c and c.startswith("reproduce train ") for c in ffcv)
    assert not any(needs_ffcv(c) for c in readme_commands() if c.startswith("reproduce study "))
