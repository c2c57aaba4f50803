"""Penn Treebank word-level language modeling with seqnorm layers (see README)."""
