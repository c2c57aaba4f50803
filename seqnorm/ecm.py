"""Error-compensation mechanisms applied after Online Normalization's affine.

- layer scaling, paper eq. (9): z = a / sqrt(mean(a**2 over the group) + ls_eps),
  per sample; its exact gradient is eq. (10), which autograd derives here.
- activation clamping (seed 002): z = clamp(a, -c, c), gradient only where |a| < c.
"""
import torch

ECM_CHOICES = ("ls", "ac", "none")


def layer_scale(a: torch.Tensor, group_size: int, eps: float) -> torch.Tensor:
    """Eq. (9) for a of shape (N, C, *L): groups of ``group_size`` features, all L elements."""
    n, c = a.shape[:2]
    grouped = a.reshape(n, c // group_size, -1)
    scale = torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + eps)
    return (grouped * scale).view_as(a)


def clamp(a: torch.Tensor, value: float) -> torch.Tensor:
    """Activation clamping; the gradient passes only where |a| < value."""
    return torch.where(a.abs() < value, a, a.detach().clamp(-value, value))


def apply_ecm(a: torch.Tensor, ecm: str, group_size: int, ls_eps: float, clamp_value: float) -> torch.Tensor:
    if ecm == "ls":
        return layer_scale(a, group_size, ls_eps)
    if ecm == "ac":
        return clamp(a, clamp_value)
    return a
