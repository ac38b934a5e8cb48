# Averages the gradients first and takes the absolute value after, so gradients of opposite sign cancel.

# %% head_importance
def head_importance(gate_grads):
    """gate_grads: tensor (examples, layers, heads) of dL(x)/d xi. Return importance (layers, heads)."""
    return gate_grads.mean(dim=0).abs()
