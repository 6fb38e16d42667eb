"""The one place that turns a weights file or name into a state_dict and the architecture it
was made for (`reproduce evaluate --weights`, `model.init`).

Accepted sources:
  RUN_DIR                          the suite's run directory: its newest intact checkpoint
  .../ckpt-NNNNNNNN.pt             one of the suite's checkpoints (sha256 checked)
  runs:/<run id>[/model], models:/<name>/<version>   a network the suite logged to MLflow
                                   (run.log_model); its architecture is in the model's metadata
  torchvision:resnet50.IMAGENET1K_V1   torchvision's named weights, read from the local torch
                                   hub cache (torch.hub.get_dir()/checkpoints); never downloaded
  model.pt2                        a torch.export program written by the suite (export.py: fp32, bf16
                                   or int8), scored as it is; its architecture is in its reproduce.json
  any other file                   a state_dict (or a dict holding one under `state_dict`), keys
                                   optionally prefixed `module.` (DDP): torchvision-style ImageNet
                                   ResNets and the suite's / the public CIFAR-10 ResNets

The architecture (model name, shortcut option, bottleneck variant) comes from, in order:
the suite's checkpoint (it stores it); what the tensors tell (family, depth, basic or
bottleneck blocks, where the projection shortcuts are: none / where the shape changes (B) /
everywhere (C), number of classes); what the source's format says; what the user states
(`--model`, `model.shortcut`, `model.variant`). What none of them tells is refused, never
guessed:
  * v1 and v1.5 bottlenecks have identical tensors (only a stride moves), so a foreign
    bottleneck state_dict needs `model.variant` stated; torchvision's named weights are v1.5
    (torchvision's layout), and the suite's checkpoints say which they are;
  * a net without projection tensors is a ResNet with option A or a plain net: the model name
    must say which, except for the public CIFAR-10 checkpoints (`state_dict` + `best_prec1`),
    which are option-A ResNets.
A stated option that contradicts the weights is refused in one line naming both.
"""

from reproduce.models import Arch
from reproduce.weights.init import CLASSIFIERS, initialise
from reproduce.weights.records import RawWeights, Weights, check_fits
from reproduce.weights.sources import MLFLOW_PREFIXES, TORCHVISION_PREFIX, load_weights, read_weights
from reproduce.weights.tensors import WeightsError, check_same

__all__ = [
    "CLASSIFIERS",
    "MLFLOW_PREFIXES",
    "TORCHVISION_PREFIX",
    "Arch",
    "RawWeights",
    "Weights",
    "WeightsError",
    "check_fits",
    "check_same",
    "initialise",
    "load_weights",
    "read_weights",
]
