"""Structured pruning: remove whole heads, neurons, channels and filters.

Two files, one idea each:
- `chapter11.structured.channels`: importance of conv filters and MLP neurons
  (L1/L2 norm, first-order Taylor), soft masking, and physical removal that
  shrinks dependent layers together (Linear pairs, conv -> batch-norm -> conv,
  torchvision ResNet-18 with its residual connections).
- `chapter11.structured.heads`: attention-head importance from the gradient of
  a head gate (Michel et al., 2019), head masking, and physical removal of
  q/k/v/o slices in our `TransformerClassifier`, BERT (all-MiniLM-L6-v2) and
  LLaMA, with `save_pruned`/`load_pruned` for uneven heads per layer.
"""

from .channels import *  # noqa: F401,F403
from .heads import *  # noqa: F401,F403
