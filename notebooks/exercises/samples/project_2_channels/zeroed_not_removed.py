# Zeroes 35% of the filters in place (mask_channels) instead of removing them: accuracy recovers, the MACs stay.

# %% prune
pruned = mask_channels(task.model, plan_by_scores(channel_scores(task.model, "l1"), 0.35))
seed_everything(1)
fit(pruned, task.train_loader, task.val_loader, max_epochs=4, patience=2, lr=3e-3, progress_bar=False)
