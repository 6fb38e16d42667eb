"""Deployable forms of a network: int8 by post-training quantization, and torch.export programs
(`.pt2` files) that `reproduce evaluate --weights model.pt2` scores as they are.

int8 is PyTorch's own PT2E flow, which lives in torchao now (torch 2.14 ships no PT2E quantizer):
the network is captured by torch.export, observed on calibration images by X86InductorQuantizer's
default config (per-channel symmetric int8 weights, per-tensor affine uint8 activations; the x86
CPU backend, oneDNN) and converted to a graph of quantize/dequantize around fp32 operators. Run
as it is (eager, or loaded from a .pt2), that graph computes in fp32 what int8 would: the accuracy
of int8, not its speed. torch.compile (Inductor) fuses each pattern into oneDNN's int8 kernels:
that is the fast form. torchao is needed to quantize (`pip install -e '.[deploy]'`), not to read
a saved int8 program: its operators are torch's own (quantized_decomposed).

A .pt2 written here holds `reproduce.json`: the architecture, the number of classes, the input
normalisation the network expects and its numerics, so it is evaluated on the right inputs.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import logging
import types
import zipfile
from collections.abc import Iterable
from pathlib import Path

import torch

from reproduce.io import atomic_write_bytes
from reproduce.models import Arch
from reproduce.weights.records import RawWeights
from reproduce.weights.tensors import WeightsError

SUFFIX = ".pt2"
META = "reproduce.json"
NUMERICS = ("fp32", "bf16", "int8")
MAX_BATCH = 4096  # the exported programs' batch dimension is dynamic up to this


class Deployed(torch.nn.Module):
    """An exported (or PT2E-converted) graph as a module the suite can call like a network. Such a
    graph is fixed in inference mode and refuses train()/eval(): here they only set the flag."""

    def __init__(self, graph: torch.nn.Module, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.graph, self.dtype = graph, dtype

    def train(self, mode: bool = True) -> Deployed:
        self.training = mode
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.graph(images.to(self.dtype)).float()


def require_torchao():
    """torchao's PT2E quantization API, or Refused in one line naming the install."""
    try:
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as x86
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    except ImportError as err:
        raise WeightsError(f"int8 needs torchao's PT2E quantization ({err}); pip install -e '.[deploy]'") from None
    return x86, prepare_pt2e, convert_pt2e


def capture(model: torch.nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    """`model` (put in eval mode by the caller: a converted graph refuses eval()) as a torch.export
    program whose batch dimension is dynamic."""
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    if len(example) < 2:  # traced at batch 1, the batch dimension would be fixed at 1
        example = example[:1].expand(2, *example.shape[1:]).contiguous()
    with torch.no_grad():
        return torch.export.export(model, (example,), dynamic_shapes=({0: batch},))


def relu_per_call(model: torch.nn.Module) -> torch.nn.Module:
    """`model`, or a copy whose torchvision blocks call one nn.ReLU module per activation. torchvision's
    BasicBlock and Bottleneck call their one `relu` two or three times; PT2E groups the calls of a
    module into one partition, and X86InductorQuantizer refuses such a partition ("Input partition
    has more than one output node"). The copy computes the same: same weights, same operations."""
    from torchvision.models import resnet as tv

    from reproduce.models.imagenet import PlainBasicBlock, PlainBottleneck

    forwards = [(PlainBasicBlock, _plain_basic), (PlainBottleneck, _plain_bottleneck)]
    forwards += [(tv.BasicBlock, _basic), (tv.Bottleneck, _bottleneck)]  # after their plain subclasses
    if not any(isinstance(m, (tv.BasicBlock, tv.Bottleneck)) for m in model.modules()):
        return model
    model = copy.deepcopy(model)
    for block in model.modules():
        forward = next((f for kind, f in forwards if isinstance(block, kind)), None)
        if forward is not None:
            block.relu_mid, block.relu_out = torch.nn.ReLU(), torch.nn.ReLU()
            block.forward = types.MethodType(forward, block)
    return model


def _plain_basic(b, x):
    return b.relu_out(b.bn2(b.conv2(b.relu(b.bn1(b.conv1(x))))))


def _basic(b, x):
    out = b.bn2(b.conv2(b.relu(b.bn1(b.conv1(x)))))
    return b.relu_out(out + (x if b.downsample is None else b.downsample(x)))


def _plain_bottleneck(b, x):
    return b.relu_out(b.bn3(b.conv3(b.relu_mid(b.bn2(b.conv2(b.relu(b.bn1(b.conv1(x)))))))))


def _bottleneck(b, x):
    out = b.bn3(b.conv3(b.relu_mid(b.bn2(b.conv2(b.relu(b.bn1(b.conv1(x))))))))
    return b.relu_out(out + (x if b.downsample is None else b.downsample(x)))


def quantize_int8(model: torch.nn.Module, calibration: Iterable[torch.Tensor], example: torch.Tensor) -> Deployed:
    """`model` as int8 by PT2E post-training quantization for the x86 CPU backend, its activation
    ranges observed on the `calibration` batches (CPU tensors, normalised as the network expects)."""
    x86, prepare_pt2e, convert_pt2e = require_torchao()
    quantizer = x86.X86InductorQuantizer()
    quantizer.set_global(x86.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(capture(relu_per_call(model).cpu(), example.cpu()).module(), quantizer)
    with torch.no_grad():
        for images in calibration:
            prepared(images)
    return Deployed(convert_pt2e(prepared))


def in_numerics(model: torch.nn.Module, numerics: str, calibration, example: torch.Tensor) -> torch.nn.Module:
    """The eval-mode network computing in `numerics` (fp32, bf16 weights and activations, or int8);
    `calibration` (batches) is read for int8 only."""
    if numerics not in NUMERICS:
        raise WeightsError(f"numerics {numerics!r}: choose from {', '.join(NUMERICS)}")
    model = model.eval()
    if numerics == "int8":
        return quantize_int8(model, calibration, example)
    if numerics == "bf16":
        return Deployed(model.to(torch.bfloat16), torch.bfloat16)
    return model


def export_program(model: torch.nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    """`model` (a network, or a Deployed one in any numerics) as a torch.export program."""
    graph, dtype = (model.graph, model.dtype) if isinstance(model, Deployed) else (model, torch.float32)
    return capture(graph, example.to(dtype))


def save_program(program: torch.export.ExportedProgram, path: str | Path, meta: dict) -> Path:
    """`program` as a .pt2 file, atomically, with `meta` (architecture, num_classes, normalize, numerics)."""
    buffer = io.BytesIO()
    torch.export.save(program, buffer, extra_files={META: json.dumps(meta, sort_keys=True)})
    return atomic_write_bytes(path, buffer.getvalue())


def load_program(path: str | Path) -> tuple[Deployed, dict]:
    """The program of a .pt2 file as a callable network, and its `reproduce.json`; a file that is
    not one is refused in one line."""
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers int8 programs' quantize/dequantize ops)

    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise WeightsError(f"{path} is not a torch.export program (not a .pt2 zip archive); export it again")
    extra = {META: ""}
    quiet = logging.getLogger("torch.export")  # it logs the reader's traceback as a warning before raising
    level, quiet.level = quiet.level, logging.CRITICAL
    try:
        program = torch.export.load(path, extra_files=extra)
    except Exception as err:  # noqa: BLE001 (a damaged archive, a foreign version: any error of the reader)
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        first = "a damaged or incomplete archive" if first.startswith("We ran into an error") else first
        raise WeightsError(f"{path} cannot be read as a torch.export program ({first}); export it again") from None
    finally:
        quiet.level = level
    meta = json.loads(extra[META]) if extra[META] else {}
    dtype = torch.bfloat16 if meta.get("numerics") == "bf16" else torch.float32
    return Deployed(program.module(), dtype), meta


def read_program(path: Path) -> RawWeights:
    """A .pt2 file as weights for `reproduce evaluate`: the program itself, its architecture and
    classes from its `reproduce.json` (a program without one is refused: nothing would say its input)."""
    module, meta = load_program(path)
    if "architecture" not in meta or "num_classes" not in meta:
        raise WeightsError(f"{path} has no {META} (architecture, classes); export it with this suite")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return RawWeights(
        {},
        "exported",
        str(path),
        str(path),
        digest,
        {"numerics": meta.get("numerics", "fp32"), "num_classes": int(meta["num_classes"])},
        normalize=meta.get("normalize"),
        stored=Arch.from_dict(meta["architecture"]),
        program=module,
    )
