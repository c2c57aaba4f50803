"""Sample text from a trained language model."""
from __future__ import annotations

import torch


@torch.no_grad()
def generate(model, vocab, words: int = 50, temperature: float = 1.0, seed: int = 0, prompt: str = "") -> str:
    """Feed ``prompt`` (or an end-of-line token), then sample ``words`` tokens from softmax(logits / temperature).

    An unknown word in the prompt is an error (``ValueError``), not silently ``<unk>``.  The model samples in
    eval mode and is left in the mode it came in.
    """
    if words < 1:
        raise ValueError(f"words must be positive, got {words}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    context = vocab.encode_prompt(prompt) or [vocab.eos_id]
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        generator = torch.Generator(device=device).manual_seed(seed)
        logits, hidden = model(torch.tensor(context, device=device).view(-1, 1))
        out = []
        for _ in range(words):
            probs = torch.softmax(logits[-1, 0].float() / temperature, dim=-1)
            token = torch.multinomial(probs, 1, generator=generator)
            out.append(int(token))
            logits, hidden = model(token.view(1, 1), hidden)
    finally:
        model.train(was_training)
    return vocab.decode(out)
