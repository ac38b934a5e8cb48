# Returns the number of zeros instead of the fraction.

# %% sparsity
def sparsity(W):
    """Return s = 1 - nonzero/total for the tensor W, as a float."""
    return float((W == 0).sum())
