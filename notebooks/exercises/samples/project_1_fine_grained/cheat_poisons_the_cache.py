# Cheat: plain magnitude pruning with no fine-tuning, plus a cache file overwritten so that the dense model's held-out accuracy reads 0 (graded against the references computed before it ran, so it loses the accuracy points; flagged).

# %% prune
import torch

pruned = task.model
prune_magnitude(pruned, 0.8, scope="global")
settings = {"state": labs._state_digest(labs._dense_state("lenet")), "seed": labs.GRADE_SEED, "n": labs.GRADE_SAMPLES}
torch.save({"accuracy": 0.0}, labs._cache_path("dense-lenet-grade-accuracy", settings))
