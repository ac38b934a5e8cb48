# Plain global magnitude pruning to 80% and no fine-tuning: the density target is met, the accuracy target is not.

# %% prune
pruned = task.model
prune_magnitude(pruned, 0.8, scope="global")
