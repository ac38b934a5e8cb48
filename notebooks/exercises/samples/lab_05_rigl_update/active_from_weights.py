# Takes the active set from weight != 0 instead of the mask, so a just-regrown weight (exactly 0) counts as inactive.

# %% rigl_update
def rigl_update(weight, grad, mask, n):
    """Return the new 0/1 mask (same shape as mask) after dropping n and growing n connections."""
    active_now = weight.flatten() != 0
    new = active_now.float()
    active = torch.nonzero(active_now).flatten()
    new[active[weight.flatten()[active].abs().argsort(stable=True)[:n]]] = 0.0
    scores = torch.where(~active_now, grad.flatten().abs(), torch.full_like(new, -1.0))
    if n:
        new[scores.argsort(descending=True, stable=True)[:n]] = 1.0
    return new.view(mask.shape)
