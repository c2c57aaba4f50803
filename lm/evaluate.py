"""Perplexity of a model on a token stream, with statistics frozen (eval mode).

The standard corpus perplexity is exp(total NLL / total tokens).  The paper
reported the mean over segments of exp(segment mean loss), which is biased
upward (Jensen); it is returned beside, as ``perplexity_mean_batch_exp``.

Under torch.distributed each rank evaluates every world-th column, and the
per-segment sums are all-reduced, so every rank gets the figures a single
process would (the columns are independent streams).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from seqnorm.distributed import active

from .batching import batchify, segments


def safe_exp(x: float) -> float:
    """exp that gives inf instead of raising for a diverged loss."""
    return math.exp(x) if x < 700 else math.inf


@torch.no_grad()
def evaluate(model, ids: torch.Tensor, batch_size: int = 10, bptt: int = 32, progress: bool = False,
             desc: str = "eval") -> dict:
    """Evaluate on the 1-D id tensor ``ids`` in (L, batch_size) columns, segments of ``bptt``, hidden state carried.

    ``progress``: a tqdm bar (on stderr) over the tokens, labelled ``desc``.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    data = batchify(ids, batch_size).to(device)
    if active():
        data = data[:, dist.get_rank()::dist.get_world_size()]
    hidden = model.init_hidden(data.shape[1])
    nll_sums, token_counts = [], []
    bar = tqdm(total=(data.shape[0] - 1) * batch_size, unit="tok", unit_scale=True, leave=False, desc=desc,
               disable=not progress)
    try:
        for _, x, y in segments(data, bptt):
            bar.update(y.numel())
            logits, hidden = model(x, hidden)
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1), reduction="sum")
            nll_sums.append(nll.double())
            token_counts.append(y.numel())
    finally:
        bar.close()
        model.train(was_training)
    nll, tokens = torch.stack(nll_sums).cpu(), torch.tensor(token_counts, dtype=torch.float64)
    if active():  # every rank ran the same segments on its own columns
        both = torch.stack([nll, tokens]).to(device)
        dist.all_reduce(both)
        nll, tokens = both.cpu()
    loss = nll.sum().item() / tokens.sum().item()
    batch_ppl = [safe_exp(n / t) for n, t in zip(nll.tolist(), tokens.tolist())]
    return {"loss": loss, "perplexity": safe_exp(loss), "perplexity_mean_batch_exp": sum(batch_ppl) / len(batch_ppl),
            "tokens": int(tokens.sum().item())}
