import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/reference.py

# Without a GPU the Triton kernels run in Triton's CPU interpreter; it has to be
# chosen before seqnorm.kernels is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
