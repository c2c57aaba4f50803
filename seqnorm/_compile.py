"""Keeping ``torch.compile`` out of the recurrences without paying for it at import.

``torch.compiler.disable`` imports ``torch._dynamo`` (about 2 s) wherever it is
applied, so decorating at import time made ``import seqnorm`` slow for every
user, compiling or not.  ``opaque_to_compile`` calls the function directly in
eager mode and wraps it in ``torch.compiler.disable`` only while a compile is
tracing it, when dynamo is loaded anyway.
"""
import functools

import torch


def opaque_to_compile(fn):
    """``fn``, run eagerly as one opaque call inside ``torch.compile``; dynamo is not imported before that."""

    @functools.wraps(fn)
    def call(*args):
        if torch.compiler.is_compiling():
            return torch.compiler.disable(fn)(*args)
        return fn(*args)

    return call
