"""The pieces of one training iteration and of an evaluation, called by name from train.py."""

from __future__ import annotations

import contextlib
import time

import torch
import torch.nn.functional as F

from reproduce.config import OptimConfig, ScheduleConfig
from reproduce.distributed import DistInfo, all_reduce_sum


def lr_at(iteration: int, base_lr: float, schedule: ScheduleConfig) -> float:
    """Learning rate for `iteration` (0-based): a pure function, so a resumed run needs no
    scheduler state. Warm-up at warmup_lr, then base_lr times gamma per milestone passed."""
    if iteration < schedule.warmup_iterations:
        return schedule.warmup_lr
    passed = sum(iteration >= m for m in schedule.milestones)
    return base_lr * schedule.gamma**passed


def build_optimizer(params, optim: OptimConfig) -> torch.optim.Optimizer:
    """The paper's SGD (momentum, weight decay on every weight); the one place it is built."""
    return torch.optim.SGD(
        params, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay, nesterov=optim.nesterov
    )


def autocast(device: torch.device, enabled: bool):
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def train_step(
    model,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    device: torch.device,
    amp: bool,
    memory_format: torch.memory_format,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One SGD step on a batch: (loss, logits). train.py and the bare loop of bench.py share it,
    so the benchmark compares the same numerics and measures only what train.py adds."""
    images = images.to(device, non_blocking=True).contiguous(memory_format=memory_format)
    labels = labels.to(device, non_blocking=True)
    torch.compiler.cudagraph_mark_step_begin()  # a new step: CUDA graphs (compile_mode=reduce-overhead) may reuse buffers
    with autocast(device, amp):
        logits = model(images)
    loss = F.cross_entropy(logits.float(), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss, logits


def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[torch.Tensor]:
    """Number of samples whose label is among the k highest scores, for each k."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hit = top.eq(target.view(-1, 1))
    return [hit[:, :k].any(dim=1).sum() for k in ks]


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, info: DistInfo, amp: bool, channels_last: bool) -> dict[str, float]:
    """Top-1 and top-5 error (%) and mean loss over the whole split (all ranks' shares); top-5
    is left out when the network has five classes or fewer.
    A batch of shape (B, V, C, H, W) holds V views per image (10-crop): their softmax
    scores are averaged before ranking. A list is one such entry per scale (multiscale), each a
    (B, V, C, H, W) tensor or a list of B (V, C, H, W) tensors of different sizes: the scores of
    every view at every scale are averaged."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=info.device)  # loss, top-1 hits, top-5 hits, count
    classes = 0
    for images, labels in loader:
        labels = labels.to(info.device, non_blocking=True)
        if isinstance(images, list) or images.dim() == 5:  # several views per image
            scales = images if isinstance(images, list) else [images]  # multiscale: one entry per scale
            probs = sum(_view_probs(model, x, info.device, amp, channels_last) for x in scales) / len(scales)
            loss = F.nll_loss(probs.clamp_min(1e-12).log(), labels, reduction="sum")
            logits = probs
        else:
            images = images.to(info.device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast(info.device, amp):
                logits = model(images).float()
            loss = F.cross_entropy(logits, labels, reduction="sum")
        classes = logits.shape[1]
        top1, top5 = topk_correct(logits, labels)
        sums += torch.stack(
            [loss.double(), top1.double(), top5.double(), torch.tensor(len(labels), device=info.device).double()]
        )
    all_reduce_sum(sums, info)
    model.train(was_training)
    loss, top1, top5, count = sums.tolist()
    if count == 0:
        raise RuntimeError("evaluation split is empty")
    out = {"loss": loss / count, "top1_err": 100.0 * (1 - top1 / count)}
    if classes > 5:  # with five classes or fewer every label is in the top 5: the error is not defined, not 0
        out["top5_err"] = 100.0 * (1 - top5 / count)
    return out


def _view_probs(model, views, device: torch.device, amp: bool, channels_last: bool) -> torch.Tensor:
    """(B, classes) softmax scores averaged over the V views of (B, V, C, H, W), or of each
    (V, C, H, W) tensor of a list (images of different sizes, one forward each)."""
    if isinstance(views, list):
        return torch.cat([_view_probs(model, v.unsqueeze(0), device, amp, channels_last) for v in views])
    b, v = views.shape[:2]
    x = views.to(device, non_blocking=True).flatten(0, 1)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(device, amp):
        logits = model(x).float()
    return logits.softmax(dim=1).view(b, v, -1).mean(dim=1)


def param_groups(model: torch.nn.Module, pretrained: set[str], scale: float) -> list[dict]:
    """One group at optim.lr, plus one at lr x scale for the layers model.init provided (frozen
    when scale is 0: requires_grad off, and their batch norms keep the running statistics the
    weights came with: momentum 0, so training batches still normalise by their own statistics
    but do not move the stored ones)."""
    new = [p for n, p in model.named_parameters() if n not in pretrained]
    old = [p for n, p in model.named_parameters() if n in pretrained]
    if scale == 0:
        for p in old:
            p.requires_grad_(False)
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and f"{name}.weight" in pretrained:
                module.momentum = 0.0
    return [{"params": new, "lr_scale": 1.0}] + ([{"params": old, "lr_scale": scale}] if old else [])


class TrainingWindow:
    """The training statistics since the last log line (this rank's loss sum, errors and images) and
    the time they took; `metrics` sums them over ranks: the logged train_loss / train_top1_err / speed."""

    def __init__(self, device: torch.device):
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, wrong, images (this rank)
        self.restart()

    def restart(self) -> None:
        """Count time from now (after a log line; evaluation and checkpoint time is not training speed)."""
        self.start = time.perf_counter()

    @torch.no_grad()
    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        wrong = logits.argmax(dim=1).ne(labels).sum()
        self.sums += torch.stack(
            [loss.detach().double() * len(labels), wrong.double(), self.sums.new_tensor(len(labels))]
        )

    def metrics(self, info: DistInfo, iterations: int, global_batch: int) -> tuple[float, float, float]:
        """(mean loss, % wrong, images/s) over all ranks for the last `iterations` steps; then empty."""
        all_reduce_sum(self.sums, info)
        loss_sum, wrong_sum, seen = self.sums.tolist()  # sync point: once per log_every iterations
        speed = iterations * global_batch / (time.perf_counter() - self.start)
        self.sums.zero_()
        self.restart()
        return loss_sum / seen, 100.0 * wrong_sum / seen, speed


class TimeToTarget:
    """Time to accuracy: the first iteration, and the run's training wall time (s), at which its
    evaluated top-1 error reached each target of eval.target_top1_err (validation error where the
    run has a validation split, else test error). The clock counts from the run's first iteration,
    evaluations and checkpoints included, summed over its segments: a resumed run goes on from the
    time its checkpoint recorded, so the work a stopped segment did after its last checkpoint (redone
    after the resume) counts once. `state` goes into every checkpoint and `from_state` reads it back,
    so a resumed run neither logs a reached target again nor loses one."""

    def __init__(self, targets, reached: dict | None = None, elapsed_s: float | None = 0.0):
        self.targets = tuple(float(t) for t in targets)
        self.reached = dict(reached or {})  # target -> (iteration, wall s or None)
        self.before_s = elapsed_s  # None: not known (a resume from a checkpoint older than this record)
        self.restart()

    def restart(self) -> None:
        """Count this segment's time from now (when its loop starts)."""
        self.start = time.perf_counter()

    def elapsed(self) -> float | None:
        return None if self.before_s is None else self.before_s + time.perf_counter() - self.start

    def update(self, errors: dict[str, float], iteration: int) -> dict[str, float]:
        """The metrics of each target that the evaluation `errors` at `iteration` reached first."""
        split = "val" if "val_top1_err" in errors else "test"
        error, wall, out = errors.get(f"{split}_top1_err"), self.elapsed(), {}
        for target in self.targets:
            if error is not None and target not in self.reached and error <= target:
                self.reached[target] = (iteration, wall)
                out[f"time_to_{split}_top1_err_{target:g}_iteration"] = iteration
                if wall is not None:
                    out[f"time_to_{split}_top1_err_{target:g}_s"] = wall
        return out

    def state(self) -> dict:
        return {"elapsed_s": self.elapsed(), "reached": {str(t): list(v) for t, v in self.reached.items()}}

    @classmethod
    def from_state(cls, targets, state: dict) -> "TimeToTarget":
        reached = {float(t): tuple(v) for t, v in state["reached"].items()}
        return cls(targets, reached, state["elapsed_s"])
