# Prunes to 80% but removes the masks before fine-tuning, so the optimizer brings every pruned weight back.

# %% prune
pruned = task.model
prune_magnitude(pruned, 0.8, scope="global")
remove_masks(pruned)
seed_everything(1)
fit(pruned, task.train_loader, task.val_loader, max_epochs=5, patience=2, lr=1e-3, progress_bar=False)
