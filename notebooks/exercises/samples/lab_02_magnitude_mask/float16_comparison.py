# Compares magnitudes in float16, so a weight a hair below the threshold rounds up to it and is kept.

# %% magnitude_mask
def magnitude_mask(W, threshold):
    """0/1 float tensor shaped like W: 1 where |w| >= threshold."""
    return (W.half().abs() >= threshold).float()
