"""slurm/: the job scripts linted and their requests checked; the launcher's exit-status and
requeue decisions with srun stubbed out; and the real scripts on a one-node SLURM cluster
(slurmctld, slurmd and munged started by a fixture as in ../shared/NOTES.md) running tiny CPU
jobs of two gloo processes under torchrun. One job finishes; one is signalled as before a time
limit, checkpoints, requeues itself, resumes and ends bit for bit where the first ends; one
fails on bad input and is not requeued."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest
import torch

from reproduce import checkpoint
from tests.conftest import REPO, tiny_overrides

SLURM = REPO / "slurm"
SCRIPTS = sorted(SLURM.glob("*.sh"))
IMAGENET = {
    "r18": ("resnet18", 1),
    "r34": ("resnet34", 1),
    "r50": ("resnet50", 1),
    "r101": ("resnet101", 2),
    "r152": ("resnet152", 2),
    "plain18": ("plain18", 1),
    "plain34": ("plain34", 1),
}
SBIN = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
ITERATIONS = 60  # 5-20 s for two gloo processes here; checkpoints every 10 leave time to signal one


def _sbatch_options(script: Path) -> dict[str, str]:
    """`#SBATCH --name=value` lines as {name: value}; a bare `--name` gives ''."""
    return {
        m["name"]: m["value"] or ""
        for m in re.finditer(r"^#SBATCH --(?P<name>[\w-]+)(?:=(?P<value>\S+))?$", script.read_text(), re.M)
    }


def _clean_env() -> dict[str, str]:
    """This environment without the variables of a SLURM job pytest may itself run in, and
    without settings of the scripts and MLflow that a user may have exported."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "REPRODUCE_", "CIFAR10_", "MLFLOW_"))
    }


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_parses(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_scripts_pass_shellcheck():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is absent (apt-get install shellcheck; .ci/run installs it)")
    result = subprocess.run(["shellcheck", *map(str, SCRIPTS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("name", [*IMAGENET, "cifar10"])
def test_job_script_requests_and_preemption(name):
    """Every job script: its resources, the stop signal before the time limit, requeue, one log."""
    script = SLURM / f"{name}.sh"
    options = _sbatch_options(script)
    assert options["signal"] == "B:USR1@120" and "requeue" in options and options["open-mode"] == "append"
    assert options["ntasks-per-node"] == "1"  # one torchrun per node
    if name == "cifar10":
        assert options["gpus-per-node"] == "1" and options["output"] == "slurm/logs/%x-%A_%a.out"
        return
    config, nodes = IMAGENET[name]
    assert options["nodes"] == str(nodes) and options["gpus-per-node"] == "8"
    assert options["output"] == "slurm/logs/%x-%j.out"
    assert (
        f"configs/imagenet/{config}.yaml" in script.read_text()
        and (REPO / "configs" / "imagenet" / f"{config}.yaml").is_file()
    )


def test_cifar10_array_index_picks_net_depth_and_seed(tmp_path):
    """Task i -> (net, depth, seed), seed fastest; lists from the environment; a task past the
    end is refused with the --array to use. (REPRODUCE_DRY_RUN prints the srun command.)"""

    def dry_run(task: int, **lists) -> subprocess.CompletedProcess:
        env = {
            **_clean_env(),
            "SLURM_ARRAY_TASK_ID": str(task),
            "REPRODUCE_DRY_RUN": "1",
            "REPRODUCE_WORKDIR": str(tmp_path),
            "REPRODUCE_OVERRIDES": "run.amp=true",
            **lists,
        }
        return subprocess.run(["bash", str(SLURM / "cifar10.sh")], capture_output=True, text=True, env=env, timeout=60)

    out = dry_run(7).stdout
    assert "-> plain44, seed 0" in out and f"--config {REPO}/configs/cifar10/plain44.yaml seed=0 run.amp=true" in out
    lists = {"CIFAR10_NETS": "resnet", "CIFAR10_DEPTHS": "56 110", "CIFAR10_SEEDS": "3 4 5"}
    out = dry_run(4, **lists).stdout
    assert f"--config {REPO}/configs/cifar10/resnet110.yaml seed=4 " in out
    refused = dry_run(6, **lists)
    assert refused.returncode == 2 and "--array=0-5" in refused.stderr


STUB_SRUN = """#!/usr/bin/env bash
# srun for the test: optionally waits for the USR1 that launch.sh forwards, then leaves the
# ranks' statuses as rank.sh would and exits as torchrun would.
stopped=""
trap 'stopped=1' USR1
touch "$STUB_DIR/started"
while [[ -n ${STUB_WAIT:-} && -z $stopped ]]; do sleep 0.05; done
rank=0
for code in $STUB_CODES; do echo "$code" > "$REPRODUCE_RANK_STATUS_DIR/rank-$rank"; rank=$((rank + 1)); done
exit "$STUB_EXIT"
"""
STUB_SCONTROL = """#!/usr/bin/env bash
echo "$*" >> "$STUB_DIR/scontrol.log"
[[ $1 != show ]] || echo node1
"""


@pytest.mark.parametrize(
    "signal_name, codes, srun_exit, status, requeued",
    [
        (None, "0 0", 0, 0, False),  # finished
        ("USR1", "143 143", 0, 143, True),  # time limit or preemption warning: checkpoint, requeue
        ("TERM", "143 143", 0, 143, False),  # scancel or preemption: checkpoint, no requeue
        (None, "2 2", 1, 2, False),  # bad config on every rank: its status, no requeue
        (None, "143 2", 1, 2, False),  # one rank failed, torchrun stopped the other with TERM
        (None, "1 1", 1, 1, False),  # non-finite loss
        ("USR1", "143", 1, 1, False),  # a rank left no status (killed): not a clean stop
    ],
    ids=["finished", "usr1", "term", "config-error", "one-failed", "nan", "rank-lost"],
)
def test_launcher_exit_status_and_requeue(tmp_path, signal_name, codes, srun_exit, status, requeued):
    """launch.sh's decisions, with srun and scontrol replaced by stubs: the status it reports
    comes from the ranks, and only a stop on USR1 is requeued."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", STUB_SRUN), ("scontrol", STUB_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {
        **_clean_env(),
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "STUB_DIR": str(tmp_path),
        "STUB_CODES": codes,
        "STUB_EXIT": str(srun_exit),
        "STUB_WAIT": "1" if signal_name else "",
        "SLURM_JOB_ID": "77",
        "SLURM_JOB_NODELIST": "node1",
        "SLURM_NNODES": "1",
        "REPRODUCE_NPROC_PER_NODE": "2",
        "REPRODUCE_STATUS_DIR": str(tmp_path / "status"),
        "REPRODUCE_WORKDIR": str(tmp_path),
    }
    launcher = subprocess.Popen(
        ["bash", str(SLURM / "launch.sh"), "configs/cifar10/resnet20.yaml"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    if signal_name:
        deadline = time.monotonic() + 30
        while not (tmp_path / "started").exists():
            assert time.monotonic() < deadline and launcher.poll() is None, launcher.communicate()[0]
            time.sleep(0.05)
        launcher.send_signal(getattr(signal, f"SIG{signal_name}"))
    out, _ = launcher.communicate(timeout=60)
    assert launcher.returncode == status, out
    assert f"reproduce: exit status {status} (" in out, out
    scontrol = (tmp_path / "scontrol.log").read_text() if (tmp_path / "scontrol.log").exists() else ""
    assert ("requeue 77" in scontrol) == requeued, (scontrol, out)
    assert not any((tmp_path / "status").iterdir())  # the ranks' statuses are cleaned up


def test_launcher_refuses_a_bad_config_before_srun(tmp_path):
    """The README's old CPU example (schedule.iterations=200 under milestones at 32k and 48k): one
    line naming the key, exit status 2, and srun never started."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(STUB_SRUN)
    (bin_dir / "srun").chmod(0o755)
    env = {
        **_clean_env(),
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "STUB_DIR": str(tmp_path),
        "STUB_CODES": "0",
        "STUB_EXIT": "0",
        "SLURM_JOB_ID": "78",
        "REPRODUCE_WORKDIR": str(tmp_path),
        "REPRODUCE_OVERRIDES": "run.device=cpu schedule.iterations=200",
    }
    result = subprocess.run(
        ["bash", str(SLURM / "launch.sh"), "configs/cifar10/resnet20.yaml"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "schedule.milestones: milestone 48000 is not below schedule.iterations=200" in result.stderr, result.stderr
    assert "exit status 2 (bad config, not started)" in result.stdout and not (tmp_path / "started").exists()


# --- a one-node cluster -------------------------------------------------------------------------


@dataclass
class Cluster:
    root: Path
    env: dict[str, str]  # SLURM_CONF for the client commands and, through sbatch, the jobs

    def run(self, *cmd: str, check: bool = True) -> str:
        result = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0 or not check, f"{' '.join(cmd)}: {result.stderr.strip()}"
        return result.stdout.strip()

    def sbatch(self, script: Path, *options: str, env: dict[str, str], cwd: Path) -> str:
        """Submit from `cwd` with this environment plus `env`; the job id."""
        out = subprocess.run(
            ["sbatch", "--parsable", *options, str(script)],
            env={**self.env, **env},
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
        return out.strip().split(";")[0]

    def state(self, job: str) -> str:
        """'STATE REASON' while the job is queued or running; '' once it is gone."""
        return self.run("squeue", "-h", "-j", job, "-o", "%T %r", check=False)

    def wait_gone(self, job: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while (state := self.state(job)) and time.monotonic() < deadline:
            # SLURM holds a requeued job for about two minutes before it may start again;
            # harmless on a cluster, it would double this file's time: let any such start now.
            for line in self.run("squeue", "-h", "-t", "PENDING", "-o", "%i %r", check=False).splitlines():
                held, reason = line.split(maxsplit=1)
                if reason == "BeginTime":
                    self.run("scontrol", "update", f"jobid={held}", "starttime=now", check=False)
            time.sleep(0.5)
        assert not state, f"job {job} still {state!r} after {timeout} s"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _munge_works() -> bool:
    try:
        cred = subprocess.run(["munge", "-n"], capture_output=True, timeout=10)
        return (
            cred.returncode == 0
            and subprocess.run(["unmunge"], input=cred.stdout, capture_output=True, timeout=10).returncode == 0
        )
    except (OSError, subprocess.TimeoutExpired):
        return False


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    missing = [
        name for name in ("slurmctld", "slurmd", "munged", "sbatch", "munge") if shutil.which(name, path=SBIN) is None
    ]
    if missing:
        pytest.skip(f"{', '.join(missing)} absent: apt-get install slurmctld slurmd slurm-client munge (.ci/run does)")
    if os.geteuid() != 0:
        pytest.skip("the one-node SLURM cluster runs its daemons as root")
    root = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool", "log"):
        (root / sub).mkdir()
    # NOTES.md's slurm.conf, on free ports so that it can run beside another test cluster.
    conf = root / "slurm.conf"
    conf.write_text(f"""\
ClusterName=test
SlurmctldHost=localhost
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
NodeName=localhost NodeAddr=127.0.0.1 CPUs={os.cpu_count() or 2} RealMemory=2000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
    env = {**_clean_env(), "PATH": SBIN, "SLURM_CONF": str(conf)}
    daemons: list[subprocess.Popen] = []

    def start(*cmd: str) -> None:
        with open(root / "log" / f"{Path(cmd[0]).name}-{len(daemons)}.out", "w") as out:
            daemons.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT))

    try:
        if not _munge_works():  # one munged serves the machine: start it only when none answers
            subprocess.run(["install", "-d", "-o", "munge", "-g", "munge", "-m", "0755", "/run/munge"], check=True)
            start("runuser", "-u", "munge", "--", shutil.which("munged", path=SBIN), "-F")
            deadline = time.monotonic() + 30
            while not _munge_works():
                assert time.monotonic() < deadline and daemons[-1].poll() is None, "munged did not start"
                time.sleep(0.2)
        start(shutil.which("slurmctld", path=SBIN), "-D", "-c", "-f", str(conf))
        start(shutil.which("slurmd", path=SBIN), "-D", "-N", "localhost", "-f", str(conf))
        cl = Cluster(root, env)
        deadline = time.monotonic() + 60
        while cl.run("sinfo", "-h", "-o", "%T", check=False) != "idle":
            if time.monotonic() > deadline or any(d.poll() is not None for d in daemons):
                logs = "\n".join(p.read_text()[-2000:] for p in sorted((root / "log").iterdir()))
                pytest.fail(f"the SLURM cluster did not come up:\n{logs}")
            time.sleep(0.3)
        yield cl
    finally:
        jobs = subprocess.run(["squeue", "-h", "-o", "%i"], env=env, capture_output=True, text=True).stdout.split()
        if jobs:  # training processes get TERM, checkpoint and exit
            subprocess.run(["scancel", *jobs], env=env, capture_output=True)
            deadline = time.monotonic() + 60
            while (
                subprocess.run(["squeue", "-h"], env=env, capture_output=True, text=True).stdout.strip()
                and time.monotonic() < deadline
            ):
                time.sleep(0.5)
        for daemon in reversed(daemons):  # slurmd, slurmctld, then munged if it was started here
            _stop(daemon)


def _job_env(cluster: Cluster, name: str, overrides: list[str], **extra: str) -> dict[str, str]:
    """A CPU job: 2 gloo processes on the one node, its own MLflow store."""
    return {
        "REPRODUCE_PYTHON": sys.executable,
        "REPRODUCE_NPROC_PER_NODE": "2",
        "REPRODUCE_RDZV_PORT": str(_free_port()),
        "REPRODUCE_STATUS_DIR": str(cluster.root / "status"),
        "REPRODUCE_OVERRIDES": " ".join(overrides),
        "MLFLOW_TRACKING_URI": f"sqlite:///{cluster.root / name}.db",
        "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false",
        "REPRODUCE_CACHE": str(cluster.root / "cache"),
        "OMP_NUM_THREADS": "1",
        **extra,
    }


# CPU only (the cluster has no GRES), one CPU per job so that two jobs run side by side.
CPU_JOB = ("--gpus-per-node=0", "--cpus-per-task=1")


@dataclass
class Job:
    id: str
    log: Path
    workdir: Path
    db: Path

    def runs(self):
        client = mlflow.MlflowClient(f"sqlite:///{self.db}")
        return client.search_runs([e.experiment_id for e in client.search_experiments()])

    def run_dir(self) -> Path | None:
        found = sorted((self.workdir / "runs" / "cifar10").glob("resnet20-s0-*"))
        return found[0] if found else None


@pytest.fixture(scope="module")
def jobs(cluster, cifar_tar) -> dict[str, Job]:
    """Three jobs submitted at once (two run side by side, the third when a CPU is free):
    - 'straight' and 'preempted': the same tiny ResNet-20 run through the real slurm/cifar10.sh.
      'straight' is submitted from the repository root with its runs in REPRODUCE_WORKDIR (task 0
      of the default lists); 'preempted' from a folder of its own with REPRODUCE_REPO (task 1 of
      lists that put resnet20 there), and gets USR1 on its batch shell, as
      --signal=B:USR1@120 sends it before the time limit, once its first checkpoint exists.
    - 'failed': slurm/r18.sh without data: every rank refuses the config with exit status 2.
    The tests wait for them and look at what they left."""
    tiny = tiny_overrides(cifar_tar, iterations=ITERATIONS, **{"run.checkpoint_every": 10, "run.log_every": 10})
    submissions = (
        ("straight", "cifar10.sh", ["--array=0"], REPO, tiny, {"REPRODUCE_WORKDIR": str(cluster.root / "straight")}),
        (
            "preempted",
            "cifar10.sh",
            ["--array=1"],
            cluster.root / "preempted",
            tiny,
            {"REPRODUCE_REPO": str(REPO), "CIFAR10_NETS": "resnet", "CIFAR10_DEPTHS": "56 20"},
        ),
        ("failed", "r18.sh", [], REPO, ["run.device=cpu"], {"REPRODUCE_WORKDIR": str(cluster.root / "failed")}),
    )
    submitted = {}
    for name, script, options, cwd, overrides, extra in submissions:
        workdir = Path(extra.get("REPRODUCE_WORKDIR", cwd))
        workdir.mkdir(parents=True, exist_ok=True)
        log = cluster.root / f"{name}.out"
        job = cluster.sbatch(
            SLURM / script,
            *options,
            *CPU_JOB,
            f"--output={log}",
            env=_job_env(cluster, name, overrides, **extra),
            cwd=cwd,
        )
        submitted[name] = Job(job, log, workdir, cluster.root / f"{name}.db")

    preempted = submitted["preempted"]
    deadline = time.monotonic() + 300
    while not ((run_dir := preempted.run_dir()) and checkpoint.list_checkpoints(run_dir)):
        assert cluster.state(preempted.id), f"job ended before its first checkpoint:\n{preempted.log.read_text()}"
        assert time.monotonic() < deadline, f"no checkpoint after 300 s:\n{preempted.log.read_text()}"
        time.sleep(0.2)
    cluster.run("scancel", "--signal=USR1", "--batch", preempted.id)
    return submitted


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint.list_checkpoints(run_dir)[-1], weights_only=True)["model"]


def _steps(db: Path, run_id: str, key: str) -> list[int]:
    return [m.step for m in mlflow.MlflowClient(f"sqlite:///{db}").get_metric_history(run_id, key)]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_cifar10_array_task_finishes_into_one_mlflow_run(cluster, jobs):
    job = jobs["straight"]
    cluster.wait_gone(job.id, timeout=400)
    log = job.log.read_text()
    assert "cifar10: array task 0 of 10 -> resnet20, seed 0" in log, log
    assert "exit status 0 (finished)" in log and "requeue" not in log, log
    slurm_job = re.search(r"reproduce: job (\d+) \(array task 0\), restart 0", log).group(1)
    (run,) = job.runs()
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    assert tags["reproduce.slurm_job_id"] == slurm_job and tags["reproduce.slurm_array_task"] == "0"
    assert tags["reproduce.world_size"] == "2" and tags["reproduce.launcher"] == "torchrun"
    assert _steps(job.db, run.info.run_id, "train_loss") == list(range(10, ITERATIONS + 1, 10))
    assert checkpoint.list_checkpoints(job.run_dir())[-1].name == f"ckpt-{ITERATIONS:08d}.pt"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_preempted_job_checkpoints_requeues_and_resumes_exactly(cluster, jobs):
    """After USR1 mid-run the ranks checkpoint and exit 143, the job requeues itself, the new
    start resumes into the same MLflow run, and the final weights equal the uninterrupted job's."""
    job = jobs["preempted"]
    cluster.wait_gone(job.id, timeout=500)
    log = job.log.read_text()
    events = [
        "-> resnet20, seed 0",
        "restart 0",
        "got SIGUSR1",
        "exit status 143 (stopped on request",
        "requeueing job",
        "restart 1",
        "resuming at iteration",
        "exit status 0 (finished)",
    ]
    positions = [log.find(e) for e in events]
    assert -1 not in positions and positions == sorted(positions), log
    assert log.count("requeueing") == 1, log
    (run,) = job.runs()  # one run: KILLED by the stop, then FINISHED by the resumed job
    assert run.info.status == "FINISHED" and run.data.tags["reproduce.resumes"] == "1"
    assert _steps(job.db, run.info.run_id, "train_loss") == list(range(10, ITERATIONS + 1, 10))
    assert checkpoint.list_checkpoints(job.run_dir())[-1].name == f"ckpt-{ITERATIONS:08d}.pt"

    straight = jobs["straight"]
    cluster.wait_gone(straight.id, timeout=400)
    a, b = _final_weights(straight.run_dir()), _final_weights(job.run_dir())
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_failed_imagenet_job_is_not_requeued(cluster, jobs):
    job = jobs["failed"]
    cluster.wait_gone(job.id, timeout=500)
    log = job.log.read_text()
    assert "config error: data.path is required for imagenet" in log, log
    assert "exit status 2 (bad config, not started)" in log, log  # refused by the launcher, before srun
    assert "requeueing" not in log and "reproduce: job " not in log, log


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_scancel_with_loader_workers_checkpoints_and_resubmission_resumes(cluster, jobs, cifar_tar):
    """Fault: `scancel JOB` of a running job whose ranks read through DataLoader worker processes.
    Injected: scancel (SIGTERM to every process of the job: batch shell, torchrun, both ranks and their workers) of a slurm/cifar10.sh task with data.workers=2, after its first checkpoint; then the same sbatch again.
    Suite: the workers leave the signal to the ranks, which checkpoint and exit 143; the launcher says stopped, not requeued; the MLflow run is KILLED; the resubmitted job resumes that run from the checkpoint, and the run records both job ids.
    Lost: nothing: the stop writes a checkpoint where it stops."""
    iterations = 3000  # long enough that scancel lands mid-run; the resumed job is stopped the same way below
    name = "cancelled"
    workdir = cluster.root / name
    workdir.mkdir()
    tiny = tiny_overrides(
        cifar_tar, iterations=iterations, **{"run.checkpoint_every": 10, "run.log_every": 10, "data.workers": 2}
    )
    env = _job_env(cluster, name, tiny, REPRODUCE_WORKDIR=str(workdir))
    job = Job("", cluster.root / f"{name}.out", workdir, cluster.root / f"{name}.db")

    def submit_and_cancel_after_a_checkpoint(newer_than: Path | None) -> tuple[str, Path]:
        job_id = cluster.sbatch(SLURM / "cifar10.sh", "--array=0", *CPU_JOB, f"--output={job.log}", env=env, cwd=REPO)
        deadline = time.monotonic() + 400
        while not (
            (run_dir := job.run_dir())
            and (saved := checkpoint.list_checkpoints(run_dir))
            and (newer_than is None or saved[-1] > newer_than)
        ):
            assert cluster.state(job_id), f"job ended before a checkpoint:\n{job.log.read_text()}"
            assert time.monotonic() < deadline, f"no checkpoint after 400 s:\n{job.log.read_text()}"
            time.sleep(0.2)
        cluster.run("scancel", job_id)
        cluster.wait_gone(job_id, timeout=200)
        return job_id, saved[-1]

    first_id, first = submit_and_cancel_after_a_checkpoint(None)
    log = job.log.read_text()
    assert "got SIGTERM" in log and "exit status 143 (stopped on request after SIGTERM; checkpoint written)" in log, log
    assert "not requeued: SIGTERM means cancelled or preempted" in log and "killed by signal" not in log, log
    assert checkpoint.list_checkpoints(job.run_dir())[-1] > first  # the stop wrote one of its own
    (run,) = job.runs()
    assert run.info.status == "KILLED"

    second_id, _ = submit_and_cancel_after_a_checkpoint(checkpoint.list_checkpoints(job.run_dir())[-1])
    log = job.log.read_text()
    assert log.count("exit status 143 (stopped on request after SIGTERM") == 2 and "resuming at iteration" in log, log
    (run,) = job.runs()  # the resubmitted job continued the same MLflow run
    assert run.info.status == "KILLED" and run.data.tags["reproduce.resumes"] == "1"
    assert run.data.tags["reproduce.slurm_job_id"] == first_id
    assert run.data.tags["reproduce.slurm_job_ids"] == f"{first_id},{second_id}"
    assert f"SLURM job {second_id}" in run.data.tags["reproduce.resume1"]
