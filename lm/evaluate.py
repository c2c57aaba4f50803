"""Perplexity of a model on a token stream, with statistics frozen (eval mode).

The standard corpus perplexity is exp(total NLL / total tokens).  The paper
reported the mean over segments of exp(segment mean loss), which is biased
upward (Jensen); it is returned beside, as ``perplexity_mean_batch_exp``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm import tqdm

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
    hidden = model.init_hidden(batch_size)
    total_nll, total_tokens, batch_ppl = 0.0, 0, []
    bar = tqdm(total=(data.shape[0] - 1) * batch_size, unit="tok", unit_scale=True, leave=False, desc=desc,
               disable=not progress)
    try:
        for _, x, y in segments(data, bptt):
            bar.update(y.numel())
            logits, hidden = model(x, hidden)
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1), reduction="sum").item()
            total_nll += nll
            total_tokens += y.numel()
            batch_ppl.append(safe_exp(nll / y.numel()))
    finally:
        bar.close()
        model.train(was_training)
    loss = total_nll / total_tokens
    return {"loss": loss, "perplexity": safe_exp(loss), "perplexity_mean_batch_exp": sum(batch_ppl) / len(batch_ppl),
            "tokens": total_tokens}
