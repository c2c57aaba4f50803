"""lm: Penn Treebank (or any plain-text corpus) language modeling with seqnorm's normalized cells.

Run it as ``seqnorm-lm`` or ``python -m lm`` (train, eval, compare, generate,
data).  From Python::

    from lm import TrainConfig, train, load_model, evaluate, generate

The names below are loaded on first use, so that ``seqnorm-lm --help`` and
argument errors answer without importing torch.
"""
import importlib

_WHERE = {"CheckpointError": "checkpoint", "load_model": "checkpoint", "Corpus": "data", "load_corpus": "data",
          "evaluate": "evaluate", "generate": "generate", "ModelConfig": "config", "RNNLM": "model",
          "PRESETS": "presets", "TrainConfig": "config", "Trainer": "train", "train": "train"}
__all__ = list(_WHERE)


def __getattr__(name):
    if name not in _WHERE:
        raise AttributeError(f"module 'lm' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
