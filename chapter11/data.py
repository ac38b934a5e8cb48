"""Offline datasets with fixed seeds: nothing here touches the network.

- `mnist1d(...)`: MNIST-1D signals (40 samples long, 10 classes), generated
  locally by `mnist1d.data.make_dataset`. Default 4,000 train + 1,000 test.
- `digits(...)`: scikit-learn's bundled 8x8 digits (1,797 images, 10 classes).
- `stdlib_docstrings(...)`: (text, label) pairs, the docstrings of the
  standard library's own source, labelled by the package they come from. Read
  with `ast` from the installed source files, so nothing is imported or run.
- `python_text(...)`: a plain-text corpus of Python's own documentation
  (`pydoc_data.topics`) and docstrings, for language models.
- `pydoc_topics(part)` and `text_tokens(...)`: the help topics split into a
  calibration half and an evaluation half that share no topic, tokenised for
  a pretrained LLM (one-shot pruning calibrates on one half and measures
  perplexity on the other).
- `ByteTokenizer`: bytes as tokens (vocabulary 256), so a tiny LM needs no
  tokenizer download.
- `with_validation(...)`: carve a validation set out of the training set, so
  every choice (stopping, allocation, thresholds) is made without the test set.
- `loaders(...)`, `eval_loader(...)` and `lm_batches(...)`: tensors into
  `DataLoader`s / batches.

But: the exact docstring corpus depends on the Python version (3.11 and 3.12
ship different docstrings); sizes are documented per function, not promised
across versions.
"""

from __future__ import annotations

import ast
import functools
import sysconfig
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler, TensorDataset

__all__ = [
    "Split",
    "with_validation",
    "mnist1d",
    "digits",
    "loaders",
    "eval_loader",
    "validation_loader",
    "stdlib_docstrings",
    "DEFAULT_PACKAGES",
    "python_text",
    "LLM_PARTS",
    "pydoc_topics",
    "text_tokens",
    "ByteTokenizer",
    "lm_batches",
]


@dataclass(frozen=True)
class Split:
    """Train and test tensors of a classification task, and optionally a validation set.

    `X_val`/`y_val` are None until `with_validation` carves them out of train.
    """

    X_train: torch.Tensor
    y_train: torch.Tensor
    X_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    X_val: torch.Tensor | None = None
    y_val: torch.Tensor | None = None

    def __repr__(self) -> str:
        val = "" if self.X_val is None else f"val={tuple(self.X_val.shape)}, "
        return (
            f"Split(train={tuple(self.X_train.shape)}, {val}test={tuple(self.X_test.shape)}, "
            f"num_classes={self.num_classes})"
        )


def with_validation(split: Split, fraction: float = 0.2, seed: int = 0) -> Split:
    """A copy of `split` whose last `fraction` of a seeded shuffle of train becomes the validation set.

    The test set is untouched, so it can be reported once, after every choice
    was made on validation.

    >>> s = Split(torch.zeros(10, 2), torch.arange(10), torch.zeros(4, 2), torch.arange(4), 10)
    >>> with_validation(s, 0.2)
    Split(train=(8, 2), val=(2, 2), test=(4, 2), num_classes=10)
    """
    if split.X_val is not None:
        raise ValueError("split already has a validation set")
    if not isinstance(fraction, float) or not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be a float in (0, 1), got {fraction!r}")
    n = len(split.y_train)
    n_val = round(n * fraction)
    if not 0 < n_val < n:
        raise ValueError(f"fraction={fraction} of {n} training examples leaves an empty train or validation set")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    keep, val = order[: n - n_val], order[n - n_val :]
    return Split(split.X_train[keep], split.y_train[keep], split.X_test, split.y_test, split.num_classes,
                 split.X_train[val], split.y_train[val])


def _check_positive(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


@functools.lru_cache(maxsize=4)
def _mnist1d_arrays(num_samples: int, seed: int):
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = seed
    args.train_split = 0.8
    state = np.random.get_state()
    try:
        data = make_dataset(args)  # local generation; never get_dataset (it downloads)
    finally:
        np.random.set_state(state)
    return data["x"], data["y"], data["x_test"], data["y_test"]


def mnist1d(num_samples: int = 5000, seed: int = 42) -> Split:
    """MNIST-1D generated locally: 80% train, 20% test, X of shape (N, 40).

    The default 5,000 samples give 4,000 train and 1,000 test examples and take
    about 2 s to generate (cached per process).
    """
    _check_positive(num_samples, "num_samples")
    x, y, xt, yt = _mnist1d_arrays(num_samples, seed)
    return Split(
        torch.tensor(x, dtype=torch.float32),
        torch.tensor(y, dtype=torch.long),
        torch.tensor(xt, dtype=torch.float32),
        torch.tensor(yt, dtype=torch.long),
        10,
    )


def digits(test_fraction: float = 0.25, seed: int = 0, flatten: bool = False) -> Split:
    """scikit-learn's bundled 8x8 digits, scaled to [0, 1].

    X has shape (N, 1, 8, 8), or (N, 64) with `flatten=True`; 1,347 train and
    450 test images at the default split.
    """
    from sklearn.datasets import load_digits

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    bunch = load_digits()
    X = torch.tensor(bunch.data / 16.0, dtype=torch.float32)  # (N, 64)
    y = torch.tensor(bunch.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    X, y = X[order], y[order]
    n_test = round(len(y) * test_fraction)
    if not flatten:
        X = X.reshape(-1, 1, 8, 8)  # (N, C, H, W)
    return Split(X[n_test:], y[n_test:], X[:n_test], y[:n_test], 10)


def eval_loader(X: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> DataLoader:
    """An unshuffled loader over (X, y), for evaluation."""
    _check_positive(batch_size, "batch_size")
    if len(X) != len(y):
        raise ValueError(f"X and y must have the same length, got {len(X)} and {len(y)}")
    return _indexed_loader(TensorDataset(X, y), batch_size)


def _indexed_loader(data: TensorDataset, batch_size: int, generator: torch.Generator | None = None) -> DataLoader:
    """A DataLoader whose batches are `X[indices]`: one indexing operation each instead of `batch_size` lookups and a stack.

    The batches are bit for bit the ones `DataLoader(data, batch_size,
    shuffle=generator is not None, generator=generator)` gives, epoch after
    epoch: the same sampler draws the same order from the same generator, and
    the loader draws its per-epoch seed from it first, as torch's does. Only
    the fetch differs. For the small MNIST-1D models that fetch was about a
    third of a fine-tuning step; 400 steps of notebook 01 ran 1.31x faster (medians of
    interleaved runs, AMD EPYC) with identical weights, and
    `tests/test_core.py::test_loaders_give_torchs_shuffled_batches_bit_for_bit`
    checks the batches.
    """
    order = SequentialSampler(data) if generator is None else RandomSampler(data, generator=generator)
    return DataLoader(data, batch_size=None, sampler=BatchSampler(order, batch_size, drop_last=False), generator=generator)


def validation_loader(split: Split, batch_size: int = 512) -> DataLoader:
    """An unshuffled loader over the validation set of `split` (see `with_validation`)."""
    if split.X_val is None:
        raise ValueError("split has no validation set: call with_validation(split) first")
    return eval_loader(split.X_val, split.y_val, batch_size)


def loaders(split: Split, batch_size: int = 64, seed: int = 0) -> tuple[DataLoader, DataLoader]:
    """(train_loader, test_loader); training order is shuffled with `seed`."""
    _check_positive(batch_size, "batch_size")
    train = _indexed_loader(TensorDataset(split.X_train, split.y_train), batch_size, torch.Generator().manual_seed(seed))
    return train, eval_loader(split.X_test, split.y_test)


DEFAULT_PACKAGES = ("asyncio", "email", "http", "importlib", "logging", "multiprocessing", "tkinter", "unittest", "xml")


def _stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _docstrings_of(path: Path, min_chars: int) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
    except SyntaxError:
        return []
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = " ".join((ast.get_docstring(node) or "").split())
            if len(doc) >= min_chars:
                found.append(doc)
    return found


@functools.lru_cache(maxsize=8)
def _docstring_corpus(packages: tuple[str, ...], min_chars: int) -> tuple[tuple[str, str], ...]:
    root = _stdlib_dir()
    pairs = []
    for package in packages:
        folder = root / package
        if not folder.is_dir():
            raise ValueError(f"packages: {package!r} is not a standard-library package folder under {root}")
        for path in sorted(folder.rglob("*.py")):
            if "test" in path.relative_to(folder).parts[:-1]:
                continue
            pairs += [(text, package) for text in _docstrings_of(path, min_chars)]
    return tuple(pairs)


def stdlib_docstrings(
    packages: tuple[str, ...] = DEFAULT_PACKAGES,
    min_chars: int = 40,
    max_per_class: int | None = None,
    seed: int = 0,
) -> tuple[list[str], list[int], list[str]]:
    """Docstrings of standard-library packages, labelled by package.

    Returns `(texts, labels, class_names)`, shuffled with `seed`. Each text is
    one docstring (whitespace collapsed) of at least `min_chars` characters
    from a module, class or function in that package's source (test folders
    left out). `max_per_class` caps each class, to balance the task. With the
    defaults on Python 3.11 that is 2,323 examples over 9 classes
    (tkinter 634, asyncio 297, email 267, importlib 263, logging 224, xml 202,
    multiprocessing 159, unittest 154, http 123).
    """
    packages = tuple(packages)
    if not packages:
        raise ValueError("packages must name at least one standard-library package")
    pairs = list(_docstring_corpus(packages, min_chars))
    rng = np.random.default_rng(seed)
    rng.shuffle(pairs)
    if max_per_class is not None:
        _check_positive(max_per_class, "max_per_class")
        taken: Counter = Counter()
        kept = []
        for text, package in pairs:
            if taken[package] < max_per_class:
                taken[package] += 1
                kept.append((text, package))
        pairs = kept
    index = {p: i for i, p in enumerate(packages)}
    return [t for t, _ in pairs], [index[p] for _, p in pairs], list(packages)


@functools.lru_cache(maxsize=2)
def python_text(max_chars: int | None = 2_000_000) -> str:
    """Python's own documentation as one string: `pydoc_data.topics` first.

    The help topics hold about 0.7 MB of English prose and code; docstrings
    of `DEFAULT_PACKAGES` follow until `max_chars` is reached.
    """
    from pydoc_data.topics import topics

    parts = [topics[k] for k in sorted(topics)]
    parts += [text for text, _ in _docstring_corpus(DEFAULT_PACKAGES, 40)]
    text = "\n\n".join(parts)
    return text if max_chars is None else text[:max_chars]


LLM_PARTS = ("calibration", "evaluation")


def pydoc_topics(part: str) -> list[str]:
    """Python's help topics (`pydoc_data.topics`), split in two halves that share no topic.

    Topics are sorted by name and a text that repeats an earlier one is
    dropped (3.11 ships `if` and `else` with the same text); then even
    positions (0, 2, 4, ...) form the `"calibration"` half and odd positions
    the `"evaluation"` half. Pruning methods see only calibration text;
    perplexity is measured on evaluation text. On Python 3.11 that is 39
    topics in each half (about 0.19 MB and 0.28 MB of text).
    """
    from pydoc_data.topics import topics

    if part not in LLM_PARTS:
        raise ValueError(f"part must be one of {LLM_PARTS}, got {part!r}")
    unique = list(dict.fromkeys(topics[k] for k in sorted(topics)))
    return unique[LLM_PARTS.index(part) :: 2]


def text_tokens(tokenizer, texts: list[str] | str, max_tokens: int | None = None) -> torch.Tensor:
    """Token ids of `texts` joined by blank lines, as one 1-D LongTensor (no special tokens).

    `tokenizer` is any Hugging Face tokenizer or our `ByteTokenizer`;
    `max_tokens` keeps the first that many.
    """
    text = texts if isinstance(texts, str) else "\n\n".join(texts)
    if not text:
        raise ValueError("texts is empty")
    if isinstance(tokenizer, ByteTokenizer):
        ids = tokenizer.encode(text)
    else:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if max_tokens is not None:
        ids = ids[: _check_positive(max_tokens, "max_tokens")]
    return torch.tensor(ids, dtype=torch.long)


class ByteTokenizer:
    """UTF-8 bytes as token ids; vocab_size 256, lossless.

    >>> tok = ByteTokenizer()
    >>> tok.encode("hi")
    [104, 105]
    >>> tok.decode([104, 105])
    'hi'
    """

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def lm_batches(tokens: torch.Tensor, block_size: int, batch_size: int, num_batches: int, seed: int = 0):
    """Yield `num_batches` (x, y) pairs of shape (batch_size, block_size), y = x shifted by one."""
    _check_positive(block_size, "block_size")
    _check_positive(batch_size, "batch_size")
    if tokens.dim() != 1 or len(tokens) <= block_size + 1:
        raise ValueError(f"tokens must be 1-D and longer than block_size + 1 = {block_size + 1}, got shape {tuple(tokens.shape)}")
    g = torch.Generator().manual_seed(seed)
    for _ in range(num_batches):
        starts = torch.randint(0, len(tokens) - block_size - 1, (batch_size,), generator=g)
        x = torch.stack([tokens[s : s + block_size] for s in starts.tolist()])  # (B, T)
        y = torch.stack([tokens[s + 1 : s + block_size + 1] for s in starts.tolist()])  # (B, T)
        yield x, y
