"""Marking a function's result as a constant for ``torch.compile`` without paying for it at import.

``torch.compiler.assume_constant_result`` imports ``torch._dynamo`` (about 2 s),
so applying it at import time would make ``import seqnorm`` slow for every
user, compiling or not.  It does nothing but set the attribute below, which
``tests/test_export.py`` holds to a ``fullgraph=True`` compile.
"""


def assume_constant_result(fn):
    """``torch.compiler.assume_constant_result(fn)``: dynamo calls ``fn`` at trace time and keeps its result."""
    fn._dynamo_marked_constant = True
    return fn
