"""lm: Penn Treebank (or any plain-text corpus) language modeling with seqnorm's normalized cells.

Run it as ``seqnorm-lm`` or ``python -m lm`` (train, eval, compare, generate,
data).  From Python::

    from lm import TrainConfig, train, load_model, evaluate, generate
"""
from .checkpoint import CheckpointError, load_model
from .data import Corpus, load_corpus
from .evaluate import evaluate
from .generate import generate
from .model import ModelConfig, RNNLM
from .presets import PRESETS
from .train import TrainConfig, Trainer, train

__all__ = ["CheckpointError", "load_model", "Corpus", "load_corpus", "evaluate", "generate", "ModelConfig", "RNNLM",
           "PRESETS", "TrainConfig", "Trainer", "train"]
