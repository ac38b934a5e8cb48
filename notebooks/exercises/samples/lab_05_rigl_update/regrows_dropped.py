# Grows among every inactive connection after the drop, so a connection it has just dropped can come straight back.

# %% rigl_update
def rigl_update(weight, grad, mask, n):
    """Return the new 0/1 mask (same shape as mask) after dropping n and growing n connections."""
    new = mask.clone().float().flatten()
    active = torch.nonzero(new).flatten()
    new[active[weight.flatten()[active].abs().argsort(stable=True)[:n]]] = 0.0
    scores = torch.where(new == 0, grad.flatten().abs(), torch.full_like(new, -1.0))
    if n:
        new[scores.argsort(descending=True, stable=True)[:n]] = 1.0
    return new.view(mask.shape)
