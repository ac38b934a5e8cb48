# Counts non-zeros with |w| > 0, so NaN (for which every comparison is false) counts as a zero.

# %% sparsity
def sparsity(W):
    """Return s = 1 - nonzero/total for the tensor W, as a float."""
    return 1.0 - float((W.abs() > 0).sum()) / W.numel()
