# Plain magnitude pruning to 50% (no calibration data): the sparsity target is met, perplexity is far above 2x dense.

# %% prune
pruned = task.model
prune_llm(pruned, None, method="magnitude", sparsity=0.5, progress_bar=False)
