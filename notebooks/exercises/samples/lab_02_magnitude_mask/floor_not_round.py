# Prunes floor(s n) weights instead of round(s n): too few whenever s n has a fraction above one half.

# %% threshold_for_sparsity
def threshold_for_sparsity(W, sparsity):
    """A float tau such that magnitude_mask(W, tau) prunes round(sparsity * W.numel()) weights (0 prunes none)."""
    n = W.numel()
    k = math.floor(sparsity * n)
    if k == 0:
        return 0.0
    if k >= n:
        return math.inf
    return W.detach().abs().flatten().sort().values[k].item()
