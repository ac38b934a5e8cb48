# Sums gradient times weight without the minus sign: weights moving toward zero score high.

# %% movement_scores
def movement_scores(weights, grads):
    """weights, grads: lists of equal-shape tensors, one per step. Return S shaped like one weight tensor."""
    return sum(g * w for w, g in zip(weights, grads))
