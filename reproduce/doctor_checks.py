"""The checks of `reproduce doctor` (reproduce/doctor.py): what is here (versions, devices) and each
capability proven by doing it, every one returning a Check; a check that raises becomes a FAIL
naming the error and its fix (FIXES)."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from reproduce import provenance
from reproduce.bench.allreduce import allreduce_bandwidth, child, kill_group, reply_of

READ_LIMIT_S, READ_LIMIT_BYTES = 3.0, 2 << 30  # --data: read for at most 3 s or 2 GiB
ALLREDUCE_BYTES = 256 << 20


@dataclass
class Check:
    name: str
    status: str  # ok, FAIL, skip, unknown (not proven in time), info (a measurement)
    detail: str
    fix: str = ""
    needed: bool = False  # a training job cannot run without it
    seconds: float = 0.0


def _run(name: str, check, *args) -> Check:
    """check(*args) -> Check, timed; an exception becomes a FAIL naming it."""
    start = time.perf_counter()
    try:
        result = check(*args)
    except Exception as err:  # noqa: BLE001 (every failure is reported, none ends the diagnosis)
        result = Check(name, "FAIL", one_line(err), FIXES.get(name, "see the error above"))
    result.name, result.seconds = name, round(time.perf_counter() - start, 2)
    return result


def one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200] if text else ''}"


FIXES = {
    "fp32_step": "torch cannot train on this device: check `nvidia-smi` and that torch's CUDA build suits the driver "
    "(torch.version.cuda), or train with run.device=cpu",
    "bf16_step": "leave run.amp=false (or auto) on this machine",
    "channels_last_step": "leave run.channels_last=false (or auto) on this machine",
    "compile_step": "leave run.compile=false; torch.compile needs a C++ compiler (CPU) or Triton (GPU)",
    "nccl": "DDP across these GPUs will fail: check NCCL_DEBUG=INFO output, or train one run per GPU (reproduce sweep --parallel)",
    "ffcv": "apt-get install -y libturbojpeg0-dev libopencv-dev pkg-config, then pip install -e '.[ffcv]'; or use data.loader=gpu / torchvision",
    "tracking": "start the server, fix MLFLOW_TRACKING_URI, or point it at a writable sqlite:///DIR/mlflow.db",
    "data": "point --data at a readable file or folder",
}


# ---------------------------------------------------------------------------- what is here
def versions() -> dict:
    import torch
    import torchvision

    try:
        nccl = ".".join(map(str, torch.cuda.nccl.version()))
    except Exception:  # noqa: BLE001 (a build without NCCL)
        nccl = "none"
    return {
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cuda": str(torch.version.cuda),
        "cudnn": str(torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None),
        "nccl": nccl,
        "driver": provenance.driver_version(),
        "python": platform.python_version(),
    }


def devices() -> list[dict]:
    """Each CUDA device with its memory, then the CPU."""
    import psutil
    import torch

    from reproduce.provenance import machine

    out = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        free, _ = torch.cuda.mem_get_info(i)
        out.append(
            {
                "device": f"cuda:{i}",
                "name": props.name,
                "memory_gib": props.total_memory / 2**30,
                "note": f"{free / 2**30:.1f} GiB free, compute capability {props.major}.{props.minor}",
            }
        )
    out.append(
        {
            "device": "cpu",
            "name": machine().split(", ")[0],
            "memory_gib": psutil.virtual_memory().total / 2**30,
            "note": f"{os.cpu_count()} CPUs, torch uses {torch.get_num_threads()} threads",
        }
    )
    return out


def _listed_devices() -> list[dict]:
    """devices(), or one line saying why they cannot be listed (a broken driver): the checks say the rest."""
    try:
        return devices()
    except Exception as err:  # noqa: BLE001
        return [{"device": "?", "name": f"devices not listed: {one_line(err)}", "memory_gib": 0.0}]


# ---------------------------------------------------------------------------- checks
def tiny_steps(device, amp: bool, channels_last: bool, compile_mode: str | None = None, steps: int = 2) -> float:
    """`steps` real SGD steps of ResNet-20 on 8 random images (engine.train_step); the last
    loss. Raises when the loss is not finite, the weights did not move, or bf16 / the layout
    was not in effect."""
    import torch

    from reproduce.config import OptimConfig
    from reproduce.engine import build_optimizer, train_step
    from reproduce.models import build_model

    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = build_model("resnet20").to(device, memory_format=fmt).train()
    optimizer = build_optimizer(model.parameters(), OptimConfig(batch_size=8, lr=0.01))
    net = torch.compile(model, mode=compile_mode) if compile_mode else model
    images, labels = torch.randn(8, 3, 32, 32, device=device), torch.randint(10, (8,), device=device)
    first = next(model.parameters())  # the stem's 3x3 convolution
    before = first.detach().clone()
    for _ in range(steps):
        loss, logits = train_step(net, optimizer, images, labels, device, amp, fmt)
    value = float(loss.detach())  # waits for the device
    if not torch.isfinite(loss):
        raise RuntimeError(f"the loss is {value}")
    if torch.equal(before, first.detach()):
        raise RuntimeError("the weights did not change")
    if amp and logits.dtype != torch.bfloat16:
        raise RuntimeError(f"autocast gave {logits.dtype} logits, not bfloat16")
    if channels_last and not first.is_contiguous(memory_format=torch.channels_last):
        raise RuntimeError("the weights left the channels_last layout")
    return value


def check_step(device, amp: bool, channels_last: bool) -> Check:
    what = "bf16 autocast" if amp else "channels_last" if channels_last else "fp32"
    loss = tiny_steps(device, amp, channels_last)
    return Check("", "ok", f"2 SGD steps of resnet20 on {device}, {what}: loss {loss:.2f}")


class CompileProbe:
    """tiny_steps under torch.compile in a child process (its own session, so it and the
    compiler's workers can be stopped together): reduce-overhead (CUDA graphs) on a GPU,
    default on a CPU, 3 steps (CUDA graphs record on the second and replay on the third)."""

    def __init__(self, device):
        self.mode = "reduce-overhead" if device.type == "cuda" else "default"
        self.start = time.perf_counter()
        # A private compiler cache: a probe stopped at its deadline can leave a half-written
        # artefact, which would break every later torch.compile that shares the cache.
        self.cache = tempfile.mkdtemp(prefix="reproduce-doctor-inductor-")
        self.proc = child(
            "reproduce.doctor_checks",
            "compile_probe",
            str(device),
            self.mode,
            env={"TORCHINDUCTOR_CACHE_DIR": self.cache, "TRITON_CACHE_DIR": os.path.join(self.cache, "triton")},
        )

    def result(self, timeout: float) -> Check:
        try:
            return self._result(timeout)
        finally:
            shutil.rmtree(self.cache, ignore_errors=True)

    def _result(self, timeout: float) -> Check:
        left = max(0.0, timeout - (time.perf_counter() - self.start))
        try:
            out, err = self.proc.communicate(timeout=left)
        except subprocess.TimeoutExpired:
            kill_group(self.proc)
            return Check(
                "compile_step",
                "unknown",
                f"mode {self.mode} not proven: still compiling after {timeout:.0f} s",
                f"a cold compile takes a minute or more on few CPU cores; rerun (the cache warms) or pass --compile-timeout {4 * timeout:.0f}",
                seconds=round(timeout, 2),
            )
        seconds = round(time.perf_counter() - self.start, 2)
        reply = reply_of(self.proc, out, err)
        if "error" in reply:
            return Check("compile_step", "FAIL", reply["error"], FIXES["compile_step"], seconds=seconds)
        return Check(
            "compile_step",
            "ok",
            f"3 compiled steps of resnet20, mode {self.mode}: loss {reply['loss']:.2f} "
            f"({seconds:.0f} s with compilation)",
            seconds=seconds,
        )


def compile_probe(device: str, mode: str) -> dict:
    """In the child of CompileProbe."""
    import torch

    return {"loss": tiny_steps(torch.device(device), False, False, mode, steps=3)}


def check_fast_bf16(device) -> Check:
    import torch

    from reproduce.numerics import cpu_has_fast_bf16

    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        fast = torch.cuda.is_bf16_supported() and major >= 8
        why = f"compute capability {major}.{minor}" + (
            " has bf16 tensor cores" if fast else ": no bf16 tensor cores (before 8.0)"
        )
    else:
        fast = cpu_has_fast_bf16()
        why = (
            "AVX-512 BF16 or AMX in /proc/cpuinfo"
            if fast
            else "no AVX-512 BF16 or AMX: bf16 is emulated, run.amp=auto keeps fp32"
        )
    return Check("", "info", f"{'yes' if fast else 'no'}: {why}")


def check_matmul(device) -> Check:
    from reproduce.bench.harness import measure_peak

    rate, what = measure_peak(device)
    shown = f"{rate:.1f} TFLOP/s" if rate >= 1 else f"{rate * 1e3:.0f} GFLOP/s"
    return Check("", "info", f"{shown} ({what}, 1 s on {device})")


def check_nccl(gpus: int) -> Check:
    if gpus < 2:
        return Check(
            "", "skip", f"needs 2 or more GPUs, {gpus} visible (one process per GPU; nothing to all-reduce across)"
        )
    busbw = allreduce_bandwidth("nccl", gpus, ALLREDUCE_BYTES)
    return Check(
        "", "ok", f"{busbw:.0f} GB/s bus bandwidth, all-reduce of {ALLREDUCE_BYTES >> 20} MiB across {gpus} GPUs"
    )


def check_ffcv() -> Check:
    """FFCV imports (as data.loader=ffcv imports it) and its JPEG decoder (libjpeg-turbo,
    the one its loaders call) decodes a JPEG written here by PIL as PIL does."""
    import numpy as np
    from PIL import Image

    from reproduce.data import ffcv_module
    from reproduce.data.ffcv.manifest import ffcv_version

    ffcv_module("reproduce doctor")  # DataError with the install line when FFCV is missing
    from ffcv.libffcv import imdecode

    h, w = 40, 48
    ramp = np.stack([*np.meshgrid(np.linspace(0, 255, w), np.linspace(0, 255, h)), np.full((h, w), 128.0)], axis=-1)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "doctor.jpg"
        Image.fromarray(ramp.astype(np.uint8)).save(path, quality=90)
        encoded = np.frombuffer(path.read_bytes(), dtype=np.uint8)
        reference = np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)
    decoded = np.zeros((h, w, 3), dtype=np.uint8)
    code = imdecode(encoded, decoded, h, w, h, w, 0, 0, 1, 1, False, False)
    diff = float(np.abs(decoded.astype(np.int16) - reference).mean())
    if code != 0 or diff > 4.0:
        raise RuntimeError(f"FFCV's decoder returned {code} and pixels {diff:.1f} levels from PIL's on average")
    return Check(
        "", "ok", f"ffcv {ffcv_version()}: decoded a {w}x{h} JPEG as PIL does (mean difference {diff:.1f} levels)"
    )


def check_tracking() -> Check:
    """The MLflow store a run would log to: a server answers, or a local store opens."""
    import mlflow

    from reproduce.tracking import check_reachable, prepare_store
    from reproduce.tracking.store import local_store_path

    uri = mlflow.get_tracking_uri()
    check_reachable()  # TrackingUnreachable (one line) for a server that does not answer
    local = local_store_path(uri)
    if local is not None and not local.exists():  # never create a store here: a training job does
        return Check(
            "", "ok", f"{uri} does not exist yet; {_probe_new_store(local, uri)}: a training job will create it"
        )
    db = Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None
    existed = db is not None and db.exists()
    prepare_store()  # a local sqlite store: created (tables and all) under the suite's lock
    mlflow.MlflowClient().search_experiments(max_results=1)
    how = "server answers" if uri.startswith("http") else "opened" if existed or db is None else "created"
    return Check("", "ok", f"{uri} {how}")


def _probe_new_store(path: Path, uri: str) -> str:
    """Whether a store could be made at `path`, proven by making one (sqlite: its tables, as a job
    would) in a temporary folder beside it and removing it; OSError or MLflow's error when not."""
    import mlflow

    parent = next((p for p in [path.parent, *path.parent.parents] if p.exists()), Path("/"))
    probe = Path(tempfile.mkdtemp(prefix=".reproduce-doctor-", dir=parent))  # OSError where it cannot be written
    try:
        if uri.startswith("sqlite:///"):
            mlflow.MlflowClient(tracking_uri=f"sqlite:///{probe / 'probe.db'}").search_experiments(max_results=1)
            return f"a store made and removed in {parent} works"
        return f"{parent} is writable"
    finally:
        shutil.rmtree(probe, ignore_errors=True)


def check_data(path: Path | None) -> Check:
    """Read speed of `path`: its files in order for READ_LIMIT_S or READ_LIMIT_BYTES (the page
    cache may hold them: a second reading shows the cache, not the disk)."""
    if path is None:
        return Check("", "skip", "no --data given")
    if not path.exists():
        return Check("", "FAIL", f"{path} does not exist", FIXES["data"])
    if not (path.is_file() or path.is_dir()):  # a named pipe, a socket, a device: opening it may wait forever
        return Check("", "FAIL", f"{path} is not a regular file or folder", FIXES["data"])
    files = [path] if path.is_file() else _files_in_order(path)
    buf = bytearray(8 << 20)
    count, total, start = 0, 0, time.perf_counter()
    for file in files:
        with open(file, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                total += n
        count += 1
        if time.perf_counter() - start > READ_LIMIT_S or total > READ_LIMIT_BYTES:
            break
    seconds = time.perf_counter() - start
    if count == 0:
        return Check("", "FAIL", f"{path} holds no files", FIXES["data"])
    files_per_s = f", {count / seconds:.0f} files/s" if path.is_dir() else ""
    return Check(
        "",
        "ok",
        f"{total / 1e6 / seconds:.0f} MB/s{files_per_s} ({count} file{'s' if count > 1 else ''}, "
        f"{total / 1e6:.1f} MB of {path} in {seconds:.1f} s; may be the page cache)",
    )


# ---------------------------------------------------------------------------- helpers
def _files_in_order(folder: Path):
    """The regular files under `folder` (a named pipe, socket or device is never opened: reading one
    may wait forever), folder by folder in name order, found as they are read."""
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        for name in sorted(names):
            if (Path(root) / name).is_file():  # follows a link, as open() would
                yield Path(root) / name
