"""Structured pruning: remove whole heads, neurons, channels and filters.

Four files, one idea each:
- `chapter11.structured.channels`: importance of conv filters and MLP neurons
  (L1/L2 norm, first-order Taylor), soft masking, and physical removal that
  shrinks dependent layers together (Linear pairs, conv -> batch-norm -> conv,
  torchvision ResNet-18 with its residual connections).
- `chapter11.structured.heads`: attention-head importance from the gradient of
  a head gate (Michel et al., 2019), head masking, and physical removal of
  q/k/v/o slices in our `TransformerClassifier`, BERT (all-MiniLM-L6-v2) and
  LLaMA (grouped-query attention included).
- `chapter11.structured.llm`: decoder LLMs beyond heads: MLP-neuron scores
  and removal, whole-block removal by block influence (ShortGPT), and what
  it costs (parameters, MACs per part, time per part, prefill and decode
  speed).
- `chapter11.structured.checkpoint`: `save_pruned`/`load_pruned`, so uneven
  heads per layer and uneven MLP widths survive a round trip.
"""

from .channels import *  # noqa: F401,F403
from .heads import *  # noqa: F401,F403
from .llm import *  # noqa: F401,F403
from .checkpoint import *  # noqa: F401,F403
