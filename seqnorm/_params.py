"""Parameter helpers shared by the normalizer modules."""
import torch
from torch import nn


def add_affine(module: nn.Module, num_features: int, affine: bool, device=None, dtype=None) -> None:
    """Per-feature gain ``weight`` (init 1) and ``bias`` (init 0), or None for both."""
    if affine:
        module.weight = nn.Parameter(torch.ones(num_features, device=device, dtype=dtype))
        module.bias = nn.Parameter(torch.zeros(num_features, device=device, dtype=dtype))
    else:
        module.register_parameter("weight", None)
        module.register_parameter("bias", None)
