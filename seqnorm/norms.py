"""The normalizers a cell can put on its pre-activations, chosen by ``norm=``.

- ``"online"``: ``OnlineNorm`` over all gate features, ECM grouped per gate.
- ``"layer"``: ``GroupLayerNorm``, layer norm of each sample over each gate's
  features (one group per gate), then a per-feature affine.
- ``None`` (or ``"none"``): no normalization.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import _checks
from ._params import add_affine
from .ecm import ECM_CHOICES
from .online_norm import OnlineNorm

NORM_CHOICES = ("online", "layer", None)


def canonical_norm(norm):
    """"online", "layer", or None (also spelled "none"); a ValueError that lists them for anything else."""
    if norm is None or norm == "none":
        return None
    if norm not in NORM_CHOICES:
        raise ValueError(f"norm must be 'online', 'layer', or None (or 'none'), got {norm!r}")
    return norm


@dataclass(frozen=True)
class OnlineNormConfig:
    """Online Normalization hyperparameters for a cell or layer (docs/design.md §2)."""

    alpha_fwd: float = 1 - 2**-13
    alpha_bkw: float = 1 - 2**-5
    eps: float = 1e-5
    affine: bool = True
    ecm: str = "ls"
    clamp_value: float = 5.0
    ls_eps: float = 1e-5
    v_decay_min: float | None = 1e-5  # floor on v's per-row decay (eq. 11); None: the paper's printed equations

    def __post_init__(self):
        _checks.check_alpha("alpha_fwd", self.alpha_fwd)
        _checks.check_alpha("alpha_bkw", self.alpha_bkw)
        _checks.check_positive("eps", self.eps)
        _checks.check_positive("ls_eps", self.ls_eps)
        _checks.check_positive("clamp_value", self.clamp_value)
        _checks.check_choice("ecm", self.ecm, ECM_CHOICES)
        _checks.check_v_decay_min(self.v_decay_min)


def make_config(config: OnlineNormConfig | None, fields: dict, base: OnlineNormConfig = OnlineNormConfig()):
    """``config``, or ``base`` with the OnlineNormConfig ``fields`` given as keywords to a cell or layer."""
    if config is not None:
        if fields:
            raise TypeError(f"pass config= or OnlineNormConfig fields as keywords, not both (got {sorted(fields)})")
        return config
    unknown = sorted(set(fields) - set(vars(base)))
    if unknown:
        raise TypeError(f"unexpected keyword arguments {unknown}; OnlineNormConfig fields are {sorted(vars(base))}")
    return OnlineNormConfig(**{**vars(base), **fields})


class GroupLayerNorm(nn.Module):
    """Layer norm of (N, C) per sample over each of C // group_size groups, then affine."""

    def __init__(self, num_features: int, group_size: int, eps: float = 1e-5, affine: bool = True, device=None, dtype=None):
        super().__init__()
        if num_features % group_size:
            raise ValueError(f"group_size {group_size} must divide num_features {num_features}")
        self.num_features, self.group_size, self.eps, self.affine = num_features, group_size, eps, affine
        add_affine(self, num_features, affine, device, dtype)

    def forward(self, x: torch.Tensor, features: slice | None = None) -> torch.Tensor:
        """``features``: x holds only these features (whole groups), for gates normalized in turn."""
        start, stop, _ = (slice(0, self.num_features) if features is None else features).indices(self.num_features)
        if start % self.group_size or stop % self.group_size or x.shape[-1] != stop - start:
            raise ValueError(f"input with {x.shape[-1]} features as features {start}:{stop} of {self.num_features} "
                             f"in groups of {self.group_size}")
        n = x.shape[0]
        y = F.layer_norm(x.reshape(n, -1, self.group_size), (self.group_size,), eps=self.eps).reshape(x.shape)
        return y * self.weight[start:stop] + self.bias[start:stop] if self.affine else y

    def extra_repr(self) -> str:
        return f"{self.num_features}, group_size={self.group_size}, eps={self.eps}, affine={self.affine}"


def build_norm(norm, num_features: int, group_size: int, config: OnlineNormConfig, device=None, dtype=None):
    """The normalizer module for ``norm``, or None for no normalization."""
    if norm == "online":
        return OnlineNorm(
            num_features, config.alpha_fwd, config.alpha_bkw, config.eps, config.affine, config.ecm,
            config.clamp_value, config.ls_eps, ls_group_size=group_size, v_decay_min=config.v_decay_min,
            device=device, dtype=dtype,
        )
    if norm == "layer":
        return GroupLayerNorm(num_features, group_size, config.eps, config.affine, device=device, dtype=dtype)
    return None
