"""Fused Triton kernels for the layer recurrence (``step``) and the autograd Function using them (``recurrence``).

Imported only when the Triton backend is used (``seqnorm.backend``): Triton
decides at import time whether the kernels are compiled for the GPU or run in
its CPU interpreter (``TRITON_INTERPRET=1``).
"""
