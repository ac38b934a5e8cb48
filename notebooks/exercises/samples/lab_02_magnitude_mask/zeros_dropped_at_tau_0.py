# Special-cases threshold 0 and drops the exact zeros, which |w| >= 0 keeps.

# %% magnitude_mask
def magnitude_mask(W, threshold):
    """0/1 float tensor shaped like W: 1 where |w| >= threshold."""
    if threshold == 0:
        return (W != 0).float()
    return (W.abs() >= threshold).float()
