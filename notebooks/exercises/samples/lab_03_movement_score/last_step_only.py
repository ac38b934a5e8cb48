# Uses only the last step instead of summing over all of them.

# %% movement_scores
def movement_scores(weights, grads):
    """weights, grads: lists of equal-shape tensors, one per step. Return S shaped like one weight tensor."""
    return -grads[-1] * weights[-1]
