"""Linear recurrences over rows: h[n+1] = a[n] * h[n] + b[n].

Every per-row update of Online Normalization (docs/design.md §2) has this form:
the forward mean and variance and the backward accumulator ``u`` with a
constant coefficient (alpha_fwd, alpha_bkw), the backward accumulator ``v``
with a per-row coefficient ``1 - (1 - alpha_bkw) * y**2``.  Running them as
scans instead of Python loops over rows is what makes the CPU path fast.

All functions return ``h`` of shape (N + 1, ...): ``h[n]`` is the state
*before* row n is processed and ``h[N]`` the state after the last row.
"""
import functools
import math

import torch

_CHUNK = 256  # rows per matmul block in const_scan; bounds the matrix size


@functools.lru_cache(maxsize=64)
def const_matrix(alpha: float, scale: float, n: int, dtype, device) -> torch.Tensor:
    """(n+1, n+1) matrix M with [h0; b] -> h for h[k+1] = alpha*h[k] + scale*b[k].

    M[i, 0] = alpha**i and M[i, k+1] = scale * alpha**(i-1-k) for k < i.
    """
    i = torch.arange(n + 1, dtype=torch.float64)
    k = torch.arange(n, dtype=torch.float64)
    expo = i[:, None] - 1 - k[None, :]
    m = torch.zeros(n + 1, n + 1, dtype=torch.float64)
    m[:, 0] = alpha**i
    m[:, 1:] = torch.where(expo >= 0, scale * alpha ** expo.clamp_min(0), 0.0)
    return m.to(dtype=dtype, device=device)


def const_scan(h0: torch.Tensor, b: torch.Tensor, alpha: float, scale: float = 1.0) -> torch.Tensor:
    """h[k+1] = alpha * h[k] + scale * b[k] for b of shape (N, C); returns (N+1, C)."""
    n = b.shape[0]
    out = b.new_empty((n + 1,) + b.shape[1:])
    out[0] = h0
    for start in range(0, n, _CHUNK):
        rows = min(_CHUNK, n - start)
        m = const_matrix(float(alpha), float(scale), rows, b.dtype, b.device)
        block = torch.cat([out[start : start + 1], b[start : start + rows]])
        torch.mm(m[1:], block, out=out[start + 1 : start + rows + 1])
    return out


def _hillis_steele(h0: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Inclusive scan of affine maps in log2(N) doubling steps; any sign of a."""
    coef = torch.cat([torch.zeros_like(h0)[None], a])
    acc = torch.cat([h0[None], b])
    step = 1
    while step < acc.shape[0]:
        acc = torch.cat([acc[:step], torch.addcmul(acc[step:], coef[step:], acc[:-step])])
        coef = torch.cat([coef[:step], coef[step:] * coef[:-step]])
        step *= 2
    return acc


def var_scan(h0: torch.Tensor, a: torch.Tensor, b: torch.Tensor, prod: torch.Tensor | None = None,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """h[k+1] = a[k] * h[k] + b[k] with per-row a; a, b of shape (N, C).

    With ``prod = cumprod(a)`` given (and every a > 0, see ``cumprod_is_safe``)
    this is the closed form h[n] = P[n] * (h0 + sum_{k<n} b[k] / P[k+1]) with
    P[n] = prod(a[:n]): a handful of ops.  Otherwise a Hillis-Steele scan.
    ``out`` (N+1, C), if given, receives the result; it may hold h0 in row 0.
    """
    if out is None:
        out = b.new_empty((b.shape[0] + 1,) + b.shape[1:])
    if prod is None:
        return out.copy_(_hillis_steele(h0, a, b))
    torch.mul(torch.cumsum(b / prod, 0).add_(h0), prod, out=out[1:])
    out[0] = h0
    return out


def cumprod_is_safe(a: torch.Tensor, min_prod: float = 1e-20) -> list[bool]:
    """Per leading index: whether var_scan's closed form is safe for a (..., N, C).

    Needs every coefficient positive and the running product far from underflow
    (bounded below by min(a)**N), so that dividing by it loses no precision.
    """
    rows = a.shape[-2]
    lowest = a.amin((-2, -1)).reshape(-1).tolist()
    return [low > 0 and rows * math.log(low) > math.log(min_prod) for low in lowest]
