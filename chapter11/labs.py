"""Labs an instructor can assign and grade: nbgrader notebooks, project-lab graders, one build command.

The labs live in `notebooks/exercises/source/<lab>/<lab>.ipynb`, nbgrader's
source layout: solutions between `### BEGIN SOLUTION` / `### END SOLUTION`,
test cells with points, and hidden tests between `### BEGIN HIDDEN TESTS` /
`### END HIDDEN TESTS` wherever a visible test would give the answer away.

- Function labs (`lab_01` ... `lab_06`): write one small function; the test
  cells call `chapter11.check`, whose messages never show the answer.
- Project labs: the answer is a pruned model, graded by running it on
  held-out data the student never picks (`GRADE_SEED`, below):
  1. `project_1_fine_grained`: sensitivity-guided fine-grained pruning of
     LeNet-300-100 on MNIST-1D, at most 20% of the weights left and test
     accuracy at most 2 points below dense (`grade_fine_grained`);
  2. `project_2_channels`: channel pruning of SmallCNN, at least 2x fewer
     MACs and at most 3 points below dense, plus a measured speedup (checked
     against the grader's own timing) and a written explanation
     (`grade_channels`, `check_latency`);
  3. `project_3_llm`: SmolLM2-135M one-shot pruned to 50% of the weights of
     every decoder projection, held-out perplexity at most 2x dense
     (`grade_llm`).
  Each project lab gets a task object (`fine_grained_task()`, ...) holding
  the trained dense model and the data the student may use.

`main(argv)` (`python -m chapter11 labs`, `make labs`) builds an nbgrader
course in `build/labs/`: the student release without solutions in
`build/labs/release/`, the reference solutions and the wrong sample
submissions of `notebooks/exercises/samples/` autograded by nbgrader, and
`build/labs/scores.csv` with one row per lab and submission. It exits with
1 unless every reference scores full marks and every sample loses points.

    >>> round(MAX_DENSITY, 2), MAX_DROP_FINE, MAX_DROP_CHANNELS, MIN_MAC_REDUCTION, MAX_PERPLEXITY_RATIO
    (0.2, 0.02, 0.03, 2.0, 2.0)

The graders run inside the student's kernel (nbgrader's way), so what a
submission can reach is kept out of the grade:
- the dense references a project is compared with (held-out accuracy,
  perplexity, the grading data's digest, the evaluation tokens) are computed
  from scratch by the grading process before any submission runs
  (`grading_references`) and handed to every kernel in the environment
  variable `CH11_LABS_REFERENCES`; files under `cache_dir()`, which a
  submission can overwrite, are then never trusted;
- the function labs' checkers are fixed when `chapter11.check` is imported;
- solution cells that import the library in a function lab, rebind or patch
  checkers and graders, reach into their private state or change the
  environment are flagged in the score table (`flagged_cells`).
A determined student can still fool code that shares its process; the flags
tell the instructor which notebooks to read. Manually graded cells (project
2's explanation) are left to the instructor (`nbgrader formgrader`); the
score table lists their points as pending. For students the dense models,
their held-out accuracies and the MNIST-1D draws are made once per machine
and cached under `chapter11.models.cache_dir()/labs`.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import functools
import hashlib
import io
import json
import math
import os
import re
import shutil
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "GRADE_SEED",
    "MAX_DENSITY",
    "MAX_DROP_FINE",
    "MAX_DROP_CHANNELS",
    "MIN_MAC_REDUCTION",
    "MAX_PERPLEXITY_RATIO",
    "LLM_SPARSITY",
    "ClassificationTask",
    "fine_grained_task",
    "channel_task",
    "grading_loader",
    "FineGrainedReport",
    "grade_fine_grained",
    "ChannelReport",
    "grade_channels",
    "check_latency",
    "measure_latency",
    "grading_references",
    "configure_nbgrader",
    "cell_timeout",
    "LLMTask",
    "llm_task",
    "LLMReport",
    "grade_llm",
    "lab_names",
    "reference_answers",
    "sample_answers",
    "fill_release",
    "build",
    "main",
]

ROOT = Path(__file__).resolve().parent.parent
EXERCISES = ROOT / "notebooks" / "exercises"
SOURCE = EXERCISES / "source"
SAMPLES = EXERCISES / "samples"
CONFIG = EXERCISES / "nbgrader_config.py"
BUILD = ROOT / "build" / "labs"

# ---------------------------------------------------------------- targets

MAX_DENSITY = 0.20  # project 1: at most 20% of the weights remain
MAX_DROP_FINE = 0.02  # project 1: accuracy at most 2 points below dense
MAX_DROP_CHANNELS = 0.03  # project 2: accuracy at most 3 points below dense
MIN_MAC_REDUCTION = 2.0  # project 2: at least 2x fewer multiply-accumulates
MAX_PERPLEXITY_RATIO = 2.0  # project 3: held-out perplexity at most 2x dense
LLM_SPARSITY = 0.5  # project 3: half of every decoder projection's weights are zero
LLM_SPARSITY_SLACK = 1e-3  # 49.9% passes (rounding of per-row counts), 49% does not

GRADE_SEED = 1119  # the grader's MNIST-1D draw: never given to students
GRADE_SAMPLES = 5000  # all of that draw (train and test halves) is graded
CACHE_VERSION = 1

LATENCY_BATCH = 256  # project 2: both latencies are measured on this many signals
LATENCY_TOLERANCE = 2.0  # project 2: the student's speedup must be within 2x of the grader's own measurement

# nbgrader's limit per cell, in seconds: a function lab runs in seconds, so a
# runaway loop costs two minutes per student; the projects fine-tune and run an LLM.
CELL_TIMEOUT_S = {"lab": 120, "project": 1200}
REFERENCES_ENV = "CH11_LABS_REFERENCES"


# ---------------------------------------------------------------- tasks (what students get)


@dataclass
class ClassificationTask:
    """A trained dense model and the data a student may use to prune and fine-tune it.

    `model` is a fresh copy (prune it freely); `dense` is another copy to
    compare with. `split` has train, validation and the student's own test
    set (seed 42); the grader uses a different draw the student never sees.
    """

    model: nn.Module
    dense: nn.Module
    split: object
    train_loader: object
    val_loader: object
    test_loader: object
    dense_val_accuracy: float


def _cache_path(name: str, settings: Mapping) -> Path:
    from .models import cache_dir

    key = json.dumps({**settings, "torch": torch.__version__, "version": CACHE_VERSION}, sort_keys=True)
    return cache_dir() / "labs" / f"{name}-{hashlib.sha1(key.encode()).hexdigest()[:12]}.pt"


_FROM_SCRATCH: dict[Path, object] | None = None  # set by grading_references: nothing cached is read, what is made is kept


def _cached(name: str, settings: Mapping, make):
    """`make()` (a dict of tensors and numbers), saved once per machine under cache_dir()/labs."""
    from .report import atomic_torch_save

    path = _cache_path(name, settings)
    if _FROM_SCRATCH is not None and path in _FROM_SCRATCH:
        return _FROM_SCRATCH[path]
    if path.is_file() and _FROM_SCRATCH is None:
        try:
            return torch.load(path, weights_only=True)
        except Exception:  # a damaged cache file is rebuilt
            pass
    value = make()
    atomic_torch_save(value, path)
    if _FROM_SCRATCH is not None:
        _FROM_SCRATCH[path] = value
    return value


def _mnist1d(num_samples: int, seed: int):
    """`chapter11.data.mnist1d(num_samples, seed)`, its tensors cached on disk (generating them costs ~2 s per kernel)."""
    from importlib.metadata import version

    from .data import Split, mnist1d

    def make():
        split = mnist1d(num_samples=num_samples, seed=seed)
        return {"X_train": split.X_train, "y_train": split.y_train, "X_test": split.X_test, "y_test": split.y_test}

    t = _cached("mnist1d", {"num_samples": num_samples, "seed": seed, "mnist1d": version("mnist1d")}, make)
    return Split(t["X_train"], t["y_train"], t["X_test"], t["y_test"], 10)


@functools.lru_cache(maxsize=1)
def _split():
    from .data import with_validation

    return with_validation(_mnist1d(5000, 42), fraction=0.2, seed=0)


_DENSE = {
    # name: (constructor, fit settings); trained on _split() with seed 0, early stopping on validation
    "lenet": ({"in_features": 40}, {"max_epochs": 40, "patience": 5, "lr": 1e-3}),
    "cnn": ({"dims": 1}, {"max_epochs": 30, "patience": 4, "lr": 3e-3}),
}


def _new_model(name: str) -> nn.Module:
    from .models import LeNet300100, SmallCNN

    kwargs = _DENSE[name][0]
    return LeNet300100(**kwargs) if name == "lenet" else SmallCNN(**kwargs)


def _dense_state(name: str) -> dict:
    """The dense model's state_dict: trained once (about 4 s for LeNet, 15 s for the CNN on 2 cores), then cached."""
    from .data import loaders, validation_loader
    from .train import fit, seed_everything

    kwargs, fit_kwargs = _DENSE[name]
    settings = {"model": name, "kwargs": kwargs, "fit": fit_kwargs, "data": "mnist1d-5000-42-val0.2", "threads": 2}

    def make():
        threads = torch.get_num_threads()
        torch.set_num_threads(2)
        try:
            seed_everything(0)
            model = _new_model(name)
            train_loader, _ = loaders(_split(), batch_size=128, seed=0)
            fit(model, train_loader, validation_loader(_split()), progress_bar=False, **fit_kwargs)
        finally:
            torch.set_num_threads(threads)
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    return _cached(f"dense-{name}", settings, make)


def _dense(name: str) -> nn.Module:
    model = _new_model(name)
    model.load_state_dict(_dense_state(name))
    return model.eval()


def _task(name: str) -> ClassificationTask:
    from .data import loaders, validation_loader
    from .train import evaluate

    split = _split()
    train_loader, test_loader = loaders(split, batch_size=128, seed=0)
    val_loader = validation_loader(split)
    dense = _dense(name)
    return ClassificationTask(copy.deepcopy(dense), dense, split, train_loader, val_loader, test_loader,
                              evaluate(dense, val_loader)["accuracy"])


def fine_grained_task() -> ClassificationTask:
    """Project 1: a trained LeNet-300-100 (40-300-100-10) on MNIST-1D, with its data."""
    return _task("lenet")


def channel_task() -> ClassificationTask:
    """Project 2: a trained SmallCNN (conv 32-64-64, 1-D) on MNIST-1D, with its data."""
    return _task("cnn")


@functools.lru_cache(maxsize=1)
def _grading_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """The grader's draw; under trusted references, checked against their digest and made afresh if a file was changed."""
    def draw():
        d = _mnist1d(GRADE_SAMPLES, GRADE_SEED)
        return torch.cat([d.X_train, d.X_test]), torch.cat([d.y_train, d.y_test])  # (N, 40), (N,)

    X, y = draw()
    want = _REFERENCES.get("grading_data")
    if want and _tensor_digest(X, y) != want:
        with _from_scratch():
            X, y = draw()
        if _tensor_digest(X, y) != want:
            raise RuntimeError("the grading data made here differ from the references the grading process computed "
                               f"({REFERENCES_ENV}); was the library changed during grading?")
    return X, y


def _tensor_digest(*tensors: torch.Tensor) -> str:
    return _state_digest({str(i): t for i, t in enumerate(tensors)})


def grading_loader():
    """The grader's held-out examples: all of MNIST-1D drawn with `GRADE_SEED` (5,000 signals)."""
    from .data import eval_loader

    return eval_loader(*_grading_tensors())


def _grade_accuracy(model: nn.Module) -> float:
    from .train import evaluate

    model = copy.deepcopy(model).cpu().eval()
    with torch.inference_mode():
        return evaluate(model, grading_loader())["accuracy"]


def _dense_grade_accuracy(name: str) -> float:
    if name in _REFERENCES:
        return float(_REFERENCES[name]["accuracy"])
    settings = {"state": _state_digest(_dense_state(name)), "seed": GRADE_SEED, "n": GRADE_SAMPLES}
    return float(_cached(f"dense-{name}-grade-accuracy", settings,
                         lambda: {"accuracy": _grade_accuracy(_dense(name))})["accuracy"])


def _state_digest(state: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha1()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


# ---------------------------------------------------------------- trusted references


_PROJECT_REFERENCE = {"project_1_fine_grained": "lenet", "project_2_channels": "cnn", "project_3_llm": "smollm"}


def _load_references() -> dict:
    """The references handed over in CH11_LABS_REFERENCES, read once when the module is imported (before student code)."""
    text = os.environ.get(REFERENCES_ENV)
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        raise RuntimeError(f"{REFERENCES_ENV} is set but is not the JSON that labs.grading_references writes") from None
    return value if isinstance(value, dict) else {}


_REFERENCES: dict = _load_references()


@contextlib.contextmanager
def _from_scratch():
    """Inside: `_cached` makes every value instead of reading it, rewrites its file, and remembers it."""
    global _FROM_SCRATCH
    outer, _FROM_SCRATCH = _FROM_SCRATCH, {} if _FROM_SCRATCH is None else _FROM_SCRATCH
    _split.cache_clear()
    try:
        yield _FROM_SCRATCH
    finally:
        _FROM_SCRATCH = outer
        _split.cache_clear()


def grading_references(labs: Sequence[str] | None = None, full: bool = False) -> tuple[dict, dict]:
    """(references, made): what the project graders compare with, computed without reading anything cached.

    `labs` names the labs to be graded (all when None); only the projects
    among them need a reference: the grading data's digest always, the dense
    LeNet's and CNN's held-out accuracy (each dense model trained again
    from its seed, the same as the cached one on this machine), SmolLM2's
    evaluation tokens, configuration and dense perplexity (de-quantised
    afresh from the GGUF file). `made` maps each cache file written on the
    way to its value, so a build can put back what a submission overwrote
    (`_restore`). Most of its time is the CNN's training and SmolLM2's
    de-quantisation.
    """
    from .data import pydoc_topics, text_tokens
    from .models import load_smollm

    wanted = {_PROJECT_REFERENCE[n] for n in (lab_names() if labs is None else labs) if n in _PROJECT_REFERENCE}
    global _REFERENCES
    outer, _REFERENCES = _REFERENCES, {}
    _grading_tensors.cache_clear()
    try:
        with _from_scratch() as made:
            refs = {"grading_data": _tensor_digest(*_grading_tensors())}
            for name in ("lenet", "cnn"):
                if name in wanted:
                    refs[name] = {"accuracy": _dense_grade_accuracy(name)}
            if "smollm" in wanted:
                model, tokenizer = load_smollm(cache=False)
                tokens = text_tokens(tokenizer, pydoc_topics("evaluation"), max_tokens=LLM_EVAL_BLOCKS[full] * LLM_BLOCK + 1)
                refs["smollm"] = {"full": full, "tokens": tokens.tolist(), "perplexity": _llm_perplexity(model, tokens),
                                  "config": json.loads(model.config.to_json_string(use_diff=False))}
    finally:
        _REFERENCES = outer
        _grading_tensors.cache_clear()
    return refs, made


def _restore(made: Mapping[Path, object]) -> None:
    """Write back the values `grading_references` made (a submission may have overwritten their files)."""
    from .report import atomic_torch_save

    for path, value in made.items():
        atomic_torch_save(value, path)


def _named_labs(argv: Sequence[str]) -> list[str]:
    names = lab_names()
    return [n for n in names if any(a.strip("/").split("/")[-1] == n for a in argv)]


def cell_timeout(labs: Sequence[str]) -> int:
    """nbgrader's limit per cell (s) for grading `labs`: CELL_TIMEOUT_S["lab"] when all are function labs.

    >>> cell_timeout(["lab_04_csr"]), cell_timeout(["lab_04_csr", "project_3_llm"]), cell_timeout([])
    (120, 1200, 1200)
    """
    return CELL_TIMEOUT_S["lab"] if labs and all(n.startswith("lab_") for n in labs) else CELL_TIMEOUT_S["project"]


def configure_nbgrader(c, argv: Sequence[str]) -> None:
    """What `nbgrader_config.py` asks of the labs, for the nbgrader command in `argv` (`sys.argv`).

    The cell time limit follows the labs named on the command line
    (`cell_timeout`). For `nbgrader autograde`, the references are computed
    here, in nbgrader's own process before any submission runs, and put in
    the environment that every kernel inherits (`grading_references`).
    """
    named = _named_labs(argv[1:])
    c.Execute.timeout = cell_timeout(named)
    if list(argv[1:2]) == ["autograde"]:
        refs, _ = grading_references(named or None, full=os.environ.get("CH11_FULL") == "1")
        os.environ[REFERENCES_ENV] = json.dumps(refs)


def _check_module(model, argument: str = "model") -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{argument} must be an nn.Module (your pruned model), got {type(model).__name__}")
    return model


def _plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """state_dict with torch.nn.utils.prune's weight_orig * weight_mask folded back into weight; mask buffers dropped."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    for key in [k for k in state if k.endswith("_orig")]:
        base = key[: -len("_orig")]
        mask = state.pop(base + "_mask", None)
        orig = state.pop(key)
        state[base] = orig * mask if mask is not None else orig
    return {k: v for k, v in state.items() if not k.endswith("_mask")}


def _load_submitted(fresh: nn.Module, state: Mapping[str, torch.Tensor], message: str, shown: int | None = None) -> nn.Module:
    """`fresh` with the submitted `state` loaded; ValueError(`message` with {missing} and {wrong} filled in) if it does not fit."""
    expected = fresh.state_dict()
    missing = sorted(set(expected) - set(state))
    wrong = sorted(k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape))
    if missing or wrong:
        raise ValueError(message.format(missing=missing[:shown], wrong=wrong[:shown]))
    fresh.load_state_dict({k: state[k].to(expected[k].dtype) for k in expected})
    return fresh


# ---------------------------------------------------------------- project 1: fine-grained


@dataclass(frozen=True)
class FineGrainedReport:
    """What `grade_fine_grained` measured; `density_ok` and `accuracy_ok` are the two graded targets."""

    density: float
    accuracy: float
    dense_accuracy: float
    examples: int

    @property
    def drop(self) -> float:
        return self.dense_accuracy - self.accuracy

    @property
    def density_ok(self) -> bool:
        return self.density <= MAX_DENSITY + 1e-12

    @property
    def accuracy_ok(self) -> bool:
        return self.drop <= MAX_DROP_FINE + 1e-12

    def __str__(self) -> str:
        mark = {True: "ok", False: "MISSED"}
        return (f"weights remaining: {self.density:.1%} (target <= {MAX_DENSITY:.0%}): {mark[self.density_ok]}\n"
                f"accuracy on {self.examples:,} held-out signals: {self.accuracy:.3f}, dense {self.dense_accuracy:.3f}, "
                f"drop {100 * self.drop:+.1f} points (target <= {100 * MAX_DROP_FINE:.0f}): {mark[self.accuracy_ok]}")


def grade_fine_grained(model: nn.Module) -> FineGrainedReport:
    """Grade project 1: load `model`'s weights into a fresh LeNet-300-100 and measure it.

    Density counts the non-zero entries of fc1, fc2 and fc3's weight
    matrices (biases are not weights here); accuracy is measured on the
    grader's held-out draw, as is the dense model's. Masks of
    `chapter11.masks` and of `torch.nn.utils.prune` are both understood.
    """
    from .masks import prunable_parameters
    from .sparsity import count

    model = _check_module(model)
    fresh = _load_submitted(_new_model("lenet"), _plain_state(model),
                            "model: expected the lab's LeNet-300-100 (fc1 300x40, fc2 100x300, fc3 10x100); "
                            "missing {missing}, wrong shape {wrong}")
    nonzero, total = 0, 0
    for param in prunable_parameters(fresh).values():
        nz, n = count(param)
        nonzero, total = nonzero + nz, total + n
    return FineGrainedReport(nonzero / total, _grade_accuracy(fresh.eval()), _dense_grade_accuracy("lenet"),
                             len(_grading_tensors()[1]))


# ---------------------------------------------------------------- project 2: channels


@dataclass(frozen=True)
class ChannelReport:
    """What `grade_channels` measured; `macs_ok` and `accuracy_ok` are the graded targets."""

    macs: int
    dense_macs: int
    accuracy: float
    dense_accuracy: float
    examples: int
    channels: tuple[int, ...]

    @property
    def mac_reduction(self) -> float:
        return self.dense_macs / self.macs

    @property
    def drop(self) -> float:
        return self.dense_accuracy - self.accuracy

    @property
    def macs_ok(self) -> bool:
        return self.mac_reduction >= MIN_MAC_REDUCTION

    @property
    def accuracy_ok(self) -> bool:
        return self.drop <= MAX_DROP_CHANNELS + 1e-12

    def __str__(self) -> str:
        mark = {True: "ok", False: "MISSED"}
        return (f"channels {self.channels}; MACs per signal {self.macs:,} vs dense {self.dense_macs:,}: "
                f"{self.mac_reduction:.2f}x fewer (target >= {MIN_MAC_REDUCTION:.0f}x): {mark[self.macs_ok]}\n"
                f"accuracy on {self.examples:,} held-out signals: {self.accuracy:.3f}, dense {self.dense_accuracy:.3f}, "
                f"drop {100 * self.drop:+.1f} points (target <= {100 * MAX_DROP_CHANNELS:.0f}): {mark[self.accuracy_ok]}")


def grade_channels(model: nn.Module) -> ChannelReport:
    """Grade project 2: MACs of a (physically smaller) SmallCNN and its held-out accuracy.

    Only the submitted weights are graded, never the submitted object: the
    widths are read from the state dict's shapes, a fresh `SmallCNN` of the
    reference class is built with them, the weights are loaded into it, and
    that model is measured. So a subclass whose `forward` special-cases the
    MAC-counting input, or calls `F.conv1d` past the counting hooks, is
    graded as the plain network its weights make. MACs are counted for one
    40-sample signal with `chapter11.structured.channels.count_macs`, so
    zeroed filters that are still there count in full.
    """
    from .models import SmallCNN
    from .structured.channels import count_macs

    model = _check_module(model)
    if not isinstance(model, SmallCNN):
        raise TypeError(f"model must be the lab's SmallCNN with channels removed (remove_channels), got {type(model).__name__}")
    dense = _new_model("cnn").eval()  # MACs depend on the shapes only: nothing cached is read
    state = _plain_state(model)
    try:
        widths = tuple(int(state[f"conv{i}.weight"].shape[0]) for i in (1, 2, 3))
    except KeyError as err:
        raise ValueError(f"model: its state dict has no {err.args[0]}; expected the lab's SmallCNN (conv1..conv3, bn1..bn3, fc)") from None
    dense_widths = tuple(getattr(dense, f"conv{i}").out_channels for i in (1, 2, 3))
    if any(w > d for w, d in zip(widths, dense_widths)):
        raise ValueError(f"model: conv widths {widths} exceed the dense {dense_widths}")
    fresh = _load_submitted(SmallCNN(channels=widths), state,
                            f"model: its weights do not make a SmallCNN of widths {widths}: " + "missing {missing}, wrong shape {wrong}")
    fresh.eval()
    x = torch.zeros(1, 40)  # (B, L): one signal
    return ChannelReport(count_macs(fresh, x), count_macs(dense, x), _grade_accuracy(fresh), _dense_grade_accuracy("cnn"),
                         len(_grading_tensors()[1]), widths)


def measure_latency(report: ChannelReport, repeats: int = 15) -> dict[str, float]:
    """The grader's own timing (ms): a dense SmallCNN and one of `report.channels` on the same LATENCY_BATCH signals.

    Medians of `repeats` interleaved calls (`chapter11.bench.compare`) in
    inference mode. Only the shapes matter for the time, so no weights are
    loaded.
    """
    from .bench import compare
    from .models import SmallCNN

    X = _grading_tensors()[0][:LATENCY_BATCH]
    nets = {"dense": _new_model("cnn").eval(), "pruned": SmallCNN(channels=tuple(report.channels)).eval()}

    def runner(net):
        def call():
            with torch.inference_mode():
                net(X)
        return call

    timing = compare({k: runner(net) for k, net in nets.items()}, repeats=repeats, warmup=2)
    return {k: 1000 * v for k, v in timing["median_s"].items()}


def check_latency(latency_ms, report: ChannelReport, measured: Mapping[str, float] | None = None) -> bool:
    """Project 2's latency point: the student's measured speedup agrees with the grader's own measurement.

    `latency_ms` is {"dense": ms, "pruned": ms}, both positive and finite
    (ValueError naming what is wrong otherwise). The grader times the same
    two shapes itself on LATENCY_BATCH signals (`measure_latency`, or
    `measured` when given) and raises AssertionError, with both numbers,
    unless the student's speedup is within LATENCY_TOLERANCE (2x) of its own:
    made-up numbers lose the point, an honest measurement on another busy
    moment keeps it.

    >>> r = ChannelReport(100, 300, 0.9, 0.9, 10, (16, 32, 32))
    >>> check_latency({"dense": 2.0, "pruned": 1.25}, r, measured={"dense": 1.0, "pruned": 0.8})
    your speedup 1.60x; the grader's on 256 signals 1.25x; 3.00x fewer MACs
    True
    >>> check_latency({"dense": 9.0, "pruned": 1.0}, r, measured={"dense": 1.0, "pruned": 0.8})
    Traceback (most recent call last):
    ...
    AssertionError: latency_ms: your speedup 9.00x is not within 2x of the grader's 1.25x for the same networks on 256 signals; time both on task.split.X_test[:256], interleaved
    """
    if not isinstance(latency_ms, Mapping) or set(latency_ms) != {"dense", "pruned"}:
        raise ValueError(f"latency_ms must be a dict with keys 'dense' and 'pruned' (milliseconds), got {latency_ms!r}")
    values = {}
    for key in ("dense", "pruned"):
        v = latency_ms[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"latency_ms[{key!r}] must be a measured time in ms (a number > 0), got {v!r}")
        values[key] = float(v)
    measured = measure_latency(report) if measured is None else measured
    yours, grader = values["dense"] / values["pruned"], measured["dense"] / measured["pruned"]
    print(f"your speedup {yours:.2f}x; the grader's on {LATENCY_BATCH} signals {grader:.2f}x; "
          f"{report.mac_reduction:.2f}x fewer MACs")
    if not 1 / LATENCY_TOLERANCE <= yours / grader <= LATENCY_TOLERANCE:
        raise AssertionError(f"latency_ms: your speedup {yours:.2f}x is not within {LATENCY_TOLERANCE:g}x of the grader's "
                             f"{grader:.2f}x for the same networks on {LATENCY_BATCH} signals; "
                             f"time both on task.split.X_test[:{LATENCY_BATCH}], interleaved")
    return True


# ---------------------------------------------------------------- project 3: LLM


def _full() -> bool:
    return os.environ.get("CH11_FULL") == "1"


LLM_BLOCK = 128
LLM_EVAL_BLOCKS = {False: 8, True: 32}  # CI: 8 x 128 held-out tokens; CH11_FULL=1: 32 x 128


@dataclass
class LLMTask:
    """SmolLM2-135M and the text a student may use: calibration and validation tokens from the calibration half."""

    model: nn.Module
    tokenizer: object
    calibration: torch.Tensor
    validation: torch.Tensor
    block_size: int


def llm_task(calibration_tokens: int = 8192, validation_tokens: int = 1024 + 1) -> LLMTask:
    """Project 3: a freshly loaded SmolLM2 and token ids from `pydoc_topics("calibration")` only.

    The first `calibration_tokens` are for calibration, the next
    `validation_tokens` for checking a choice; the grader measures on the
    evaluation half, which shares no topic with these.
    """
    from .data import pydoc_topics, text_tokens
    from .models import load_smollm

    model, tokenizer = load_smollm()
    tokens = text_tokens(tokenizer, pydoc_topics("calibration"), max_tokens=calibration_tokens + validation_tokens)
    return LLMTask(model.eval(), tokenizer, tokens[:calibration_tokens], tokens[calibration_tokens:], LLM_BLOCK)


def _llm_projections(model: nn.Module) -> dict[str, torch.Tensor]:
    """{name: weight} of q, k, v, o, gate, up and down in every decoder layer."""
    names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    found = {n: m.weight for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in names}
    if not found:
        raise ValueError("model: no decoder projections (q_proj, ..., down_proj) found; pass the SmolLM2 you pruned")
    return found


@dataclass(frozen=True)
class LLMReport:
    """What `grade_llm` measured; `sparsity_ok` and `perplexity_ok` are the graded targets."""

    sparsity: float
    min_layer_sparsity: float
    perplexity: float
    dense_perplexity: float
    tokens: int

    @property
    def ratio(self) -> float:
        return self.perplexity / self.dense_perplexity

    @property
    def sparsity_ok(self) -> bool:  # every projection matrix, not the average: the lab asks for 50% of each
        return self.min_layer_sparsity >= LLM_SPARSITY - LLM_SPARSITY_SLACK

    @property
    def perplexity_ok(self) -> bool:
        return math.isfinite(self.perplexity) and self.ratio <= MAX_PERPLEXITY_RATIO

    def __str__(self) -> str:
        mark = {True: "ok", False: "MISSED"}
        return (f"decoder projections: lowest matrix {self.min_layer_sparsity:.1%} zeros, all of them {self.sparsity:.1%} "
                f"(target >= {LLM_SPARSITY:.0%} in every matrix): {mark[self.sparsity_ok]}\n"
                f"perplexity on {self.tokens:,} held-out tokens: {self.perplexity:.2f}, dense {self.dense_perplexity:.2f}, "
                f"{self.ratio:.2f}x (target <= {MAX_PERPLEXITY_RATIO:.0f}x): {mark[self.perplexity_ok]}")


def _smollm_reference(full: bool) -> dict | None:
    ref = _REFERENCES.get("smollm")
    return ref if ref and ref.get("full") == full else None


@functools.lru_cache(maxsize=2)
def _llm_eval_tokens(full: bool) -> torch.Tensor:
    from .data import pydoc_topics, text_tokens
    from .models import load_smollm

    if (ref := _smollm_reference(full)) is not None:
        return torch.tensor(ref["tokens"], dtype=torch.long)
    _, tokenizer = load_smollm()
    return text_tokens(tokenizer, pydoc_topics("evaluation"), max_tokens=LLM_EVAL_BLOCKS[full] * LLM_BLOCK + 1)


def _llm_perplexity(model: nn.Module, tokens: torch.Tensor) -> float:
    from .train import perplexity

    with torch.inference_mode():
        return perplexity(model, tokens, block_size=LLM_BLOCK, batch_size=8)


def _dense_llm_perplexity(full: bool) -> float:
    from .models import load_smollm, smollm_path

    if (ref := _smollm_reference(full)) is not None:
        return float(ref["perplexity"])
    tokens = _llm_eval_tokens(full)
    settings = {"model": smollm_path().name, "size": smollm_path().stat().st_size,
                "tokens": hashlib.sha1(tokens.numpy().tobytes()).hexdigest()[:12], "block": LLM_BLOCK}
    return float(_cached("dense-smollm-perplexity", settings,
                         lambda: {"perplexity": _llm_perplexity(load_smollm()[0], tokens)})["perplexity"])


def grade_llm(model: nn.Module) -> LLMReport:
    """Grade project 3: zeros in every decoder projection and perplexity on held-out text.

    Only the submitted weights are graded: they are loaded into a fresh
    SmolLM2 (built from the configuration in the trusted references, else
    `chapter11.models.load_smollm`), so a model object with its own
    `forward` cannot change what is measured. Each of the 210
    projection matrices must be at least 50% zeros (`LLM_SPARSITY`, less
    `LLM_SPARSITY_SLACK`), not their average. Perplexity is measured on the
    first 8 x 128 tokens of `pydoc_topics("evaluation")` (32 x 128 with
    CH11_FULL=1), for the submitted weights and for the dense SmolLM2.
    """
    from .models import load_smollm

    model = _check_module(model)
    _llm_projections(model)  # a clear error for what is not a decoder LLM
    if (ref := _smollm_reference(_full())) is not None:  # nothing cached is read: the architecture comes from the references
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.for_model(**ref["config"])
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    else:
        fresh = load_smollm()[0]
    _load_submitted(fresh, _plain_state(model), "model: its weights do not fit SmolLM2-135M: missing {missing}, wrong shape {wrong}",
                    shown=4)
    weights = _llm_projections(fresh)
    zeros = {n: int((w == 0).sum()) / w.numel() for n, w in weights.items()}
    overall = sum(int((w == 0).sum()) for w in weights.values()) / sum(w.numel() for w in weights.values())
    tokens = _llm_eval_tokens(_full())
    return LLMReport(overall, min(zeros.values()), _llm_perplexity(fresh.eval(), tokens), _dense_llm_perplexity(_full()),
                     len(tokens) - 1)


# ---------------------------------------------------------------- notebooks: answers and submissions

BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"


def lab_names(source: Path = SOURCE) -> list[str]:
    """The labs: every folder of `source` holding a notebook of the same name."""
    return sorted(p.name for p in source.iterdir() if (p / f"{p.name}.ipynb").is_file())


def _notebook(lab: str, folder: Path) -> Path:
    return folder / lab / f"{lab}.ipynb"


def _nbgrader(cell) -> dict:
    return cell.get("metadata", {}).get("nbgrader", {})


def _strip_markers(text: str) -> str:
    """A solution cell's text without the BEGIN/END SOLUTION lines (what a student who solved it would submit)."""
    return "\n".join(line for line in text.splitlines() if line.strip() not in (BEGIN, END))


def reference_answers(lab: str, source: Path = SOURCE) -> dict[str, str]:
    """{grade_id: text} of every solution cell of the lab's source notebook, markers removed."""
    import nbformat

    nb = nbformat.read(_notebook(lab, source), as_version=4)
    return {_nbgrader(c)["grade_id"]: _strip_markers(c.source) for c in nb.cells if _nbgrader(c).get("solution")}


def sample_answers(path: Path) -> tuple[str, dict[str, str]]:
    """(what is wrong, {grade_id: text}) from a sample file.

    A sample is a .py file: comment lines up to the first `# %% <grade_id>`
    say what is wrong; each `# %% <grade_id>` section replaces that solution
    cell. Solution cells a sample does not name keep the reference answer.

    >>> import tempfile
    >>> p = Path(tempfile.mkdtemp()) / "s.py"
    >>> _ = p.write_text("# counts instead of a fraction\\n\\n# %% sparsity\\ndef sparsity(W):\\n    return 1\\n")
    >>> sample_answers(p)
    ('counts instead of a fraction', {'sparsity': 'def sparsity(W):\\n    return 1'})
    """
    note, answers, current = [], {}, None
    for line in path.read_text().splitlines():
        if line.startswith("# %% "):
            current = line[5:].strip()
            answers[current] = []
        elif current is None:
            if line.startswith("#"):
                note.append(line.lstrip("# ").strip())
        else:
            answers[current].append(line)
    if not answers:
        raise ValueError(f"{path}: no '# %% <grade_id>' section; a sample must replace at least one solution cell")
    return " ".join(n for n in note if n), {k: "\n".join(v).strip("\n") for k, v in answers.items()}


def fill_release(release_nb: Path, answers: Mapping[str, str], target: Path) -> Path:
    """Write the release notebook with the solution cells named in `answers` replaced: a submission."""
    import nbformat

    from .report import atomic_write_text

    nb = nbformat.read(release_nb, as_version=4)
    solution_ids = {_nbgrader(c)["grade_id"] for c in nb.cells if _nbgrader(c).get("solution")}
    unknown = sorted(set(answers) - solution_ids)
    if unknown:
        raise ValueError(f"answers: {unknown} are not solution cells of {release_nb.name}; choose from {sorted(solution_ids)}")
    for cell in nb.cells:
        grade_id = _nbgrader(cell).get("grade_id")
        if _nbgrader(cell).get("solution") and grade_id in answers:
            cell.source = answers[grade_id]
    return atomic_write_text(nbformat.writes(nb), target)


# ---------------------------------------------------------------- the nbgrader course


@contextlib.contextmanager
def _grading_environment(course: Path, full: bool, references: Mapping | None = None):
    """Environment for nbgrader and its kernels: the venv's bin on PATH, quiet thread pools, no progress bars.

    nbgrader 0.9 runs the `alembic` executable by name to create its gradebook,
    so the interpreter's own bin folder must be on PATH even when the venv is
    not activated (make calls .venv/bin/python directly). The `python3`
    kernel is pinned to this interpreter (a user's own `python3` kernelspec
    would otherwise win), and kernels get their own IPython folder (no user
    startup files, no per-kernel transport warning).
    """
    ipython = course / ".ipython" / "profile_default"
    ipython.mkdir(parents=True, exist_ok=True)
    (ipython / "ipython_kernel_config.py").write_text('c.IPKernelApp.log_level = "ERROR"\n')
    kernel = course / ".jupyter" / "kernels" / "python3"
    kernel.mkdir(parents=True, exist_ok=True)
    (kernel / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (chapter11)", "language": "python"}))
    settings = {"PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
                "JUPYTER_PATH": str(course / ".jupyter") + os.pathsep + os.environ.get("JUPYTER_PATH", ""),
                "IPYTHONDIR": str(course / ".ipython"),
                "CH11_PROGRESS": "0", "CH11_FULL": "1" if full else "0",
                "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
                "OPENBLAS_THREAD_TIMEOUT": os.environ.get("OPENBLAS_THREAD_TIMEOUT", "4"),
                "PYDEVD_DISABLE_FILE_VALIDATION": "1"}
    if references is not None:
        settings[REFERENCES_ENV] = json.dumps(references)
    old = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module="nbgrader")  # SQLAlchemy autoflush notices from inside nbgrader
            warnings.filterwarnings("ignore", message=".*not in session.*")
            yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _api(course: Path, timeout: int | None = None):
    from nbgrader.apps import NbGraderAPI
    from nbgrader.coursedir import CourseDirectory
    from traitlets.config import Config
    from traitlets.config.loader import PyFileConfigLoader

    config = PyFileConfigLoader(str(course / "nbgrader_config.py")).load_config() if (course / "nbgrader_config.py").is_file() else Config()
    config.CourseDirectory.root = str(course)
    config.NbGraderAPI.log_level = "WARN"
    if timeout is not None:
        config.Execute.timeout = timeout
    return NbGraderAPI(coursedir=CourseDirectory(config=config), config=config)


def _require(result: dict, what: str) -> None:
    if not result.get("success"):
        log = (result.get("error") or "") + (result.get("log") or "")
        raise RuntimeError(f"nbgrader {what} failed:\n{log[-4000:]}")


def _report_lines(course: Path, lab: str, student: str) -> list[str]:
    """The grader's measured lines (those naming a target) printed in a project's autograded notebook."""
    try:
        nb = json.loads(_notebook(lab, course / "autograded" / student).read_text())
    except (OSError, ValueError):
        return []
    texts = ["".join(o.get("text", "")) for c in nb.get("cells", []) if c.get("cell_type") == "code" for o in c.get("outputs", [])]
    return [line.strip() for t in texts for line in t.splitlines() if "(target" in line or line.startswith("your speedup")]


def _error_line(result: dict) -> str:
    """The last exception line of a failed nbgrader call (nbgrader's own summary line says nothing).

    >>> _error_line({"error": "Traceback ...\\n    ValueError: bad cell\\nNbGraderException: Please see the above"})
    'ValueError: bad cell'
    """
    text = (result.get("error") or "") + "\n" + (result.get("log") or "")
    lines = [x.strip() for x in text.splitlines() if ("Error" in x or "Exception" in x) and ": " in x
             and "NbGraderException" not in x and not x.strip().startswith("raise ")]
    return lines[-1][:200] if lines else "autograde failed"


def _scores(course: Path, lab: str, student: str) -> dict:
    """Autograded points, their maximum, manual points pending and the test cells that lost points."""
    from nbgrader.api import Gradebook

    with Gradebook(f"sqlite:///{course / 'gradebook.db'}") as gb:
        submission = gb.find_submission(lab, student)
        score = maximum = manual = 0.0
        failed = []
        for nb in submission.notebooks:
            for grade in nb.grades:
                if grade.cell.cell_type == "markdown":  # a written answer: graded by hand (nbgrader formgrader)
                    manual += grade.max_score if grade.manual_score is None else 0.0
                    continue
                score += grade.auto_score or 0.0
                maximum += grade.max_score
                if (grade.auto_score or 0.0) < grade.max_score:
                    failed.append(grade.name)
    return {"score": score, "max_score": maximum, "manual_pending": manual, "failed_tests": " ".join(sorted(failed))}


_FLAGS = (  # (pattern in a solution cell, what the score table says); checked on code, comments stripped
    (re.compile(r"^\s*(import\s+chapter11|from\s+chapter11(\.[\w.]+)?\s+import)", re.M), "imports chapter11"),
    (re.compile(r"\b(check|labs|chapter11(\.\w+)*)\.\w+\s*=[^=]"), "assigns to chapter11's checkers or graders"),
    (re.compile(r"\b(setattr|monkeypatch)\s*\(|__dict__\s*\["), "patches attributes at run time"),
    (re.compile(r"^\s*(import\s+scipy|from\s+scipy(\.[\w.]+)?\s+import)", re.M), "imports scipy"),
    (re.compile(r"\b(check|labs)\._\w+|\bcache_dir\s*\("), "reaches into the graders' private state or cache"),
    (re.compile(r"\bos\.environ\s*(\[[^\]]*\]\s*=[^=]|\.(update|pop|setdefault|clear)\b)|\b(putenv|unsetenv)\s*\("),
     "changes the environment the graders read"),
)


def flagged_cells(notebook: Path, imports: bool = True) -> list[str]:
    """What a submission's solution cells do that the labs' rule forbids, for the score table's note.

    A function lab is for writing the function: importing `chapter11` (which
    holds every answer) or `scipy` (lab 4's CSR), or rebinding the checkers
    and graders, their private state (`labs._...`, the cache) or the
    environment, can score full marks without it. Such submissions are
    flagged, not failed: the instructor reads them. `imports=False` (the
    projects, which are meant to use the library) flags only the patching.

    >>> import tempfile
    >>> nb = Path(tempfile.mkdtemp()) / "n.ipynb"
    >>> cell = {"cell_type": "code", "source": "from chapter11.csr import to_csr\\ncheck.check_to_csr = lambda f: True",
    ...         "metadata": {"nbgrader": {"solution": True, "grade_id": "to_csr"}}}
    >>> _ = nb.write_text(json.dumps({"cells": [cell]}))
    >>> flagged_cells(nb)
    ['to_csr: imports chapter11', "to_csr: assigns to chapter11's checkers or graders"]
    """
    try:
        cells = json.loads(Path(notebook).read_text()).get("cells", [])
    except (OSError, ValueError):
        return []
    found = []
    for cell in cells:
        meta = cell.get("metadata", {}).get("nbgrader", {})
        if cell.get("cell_type") != "code" or not meta.get("solution"):
            continue
        source = cell.get("source", "")
        source = "".join(source) if isinstance(source, list) else source
        code = "\n".join(line.split("#", 1)[0] for line in source.splitlines())
        found += [f"{meta.get('grade_id', '?')}: {what}" for pattern, what in _FLAGS
                  if pattern.search(code) and (imports or not what.startswith("imports"))]
    return found


def _samples(lab: str, samples: Path = SAMPLES) -> list[Path]:
    folder = samples / lab
    return sorted(folder.glob("*.py")) if folder.is_dir() else []


def _ours(student: str) -> bool:
    """The build's own submitters: the reference solution and the wrong samples."""
    return student == "reference" or student.startswith("sample-")


def course_state(course: Path) -> list[str]:
    """What in `course` belongs to a real course: submissions, grades or feedback of real students.

    The build never removes any of it; `build` refuses to write beside it
    unless told (`live_course=True`, `--live-course`).
    """
    course = Path(course)
    found = [f"{part}/{d.name}" for part in ("submitted", "autograded", "feedback") if (course / part).is_dir()
             for d in sorted((course / part).iterdir()) if d.is_dir() and not _ours(d.name)]
    gradebook = course / "gradebook.db"
    if gradebook.is_file():
        from nbgrader.api import Gradebook

        with Gradebook(f"sqlite:///{gradebook}") as gb:
            students = [s.id for s in gb.students if not _ours(s.id)]
        if students:
            found.append(f"gradebook.db ({len(students)} students: {', '.join(students[:3])}{', ...' if len(students) > 3 else ''})")
    return found


def survey_submissions(submitted: Path, labs: Sequence[str]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Notebooks under `submitted` that will be graded, and those that will not, each with the reason.

    Graded: `<student>/<lab>/<lab>.ipynb` for a lab in `labs`. Anything else
    ending in .ipynb is listed as ignored, so a misnamed copy or a missing
    student folder is never skipped silently.
    """
    submitted = Path(submitted)
    found, ignored = [], []
    names = set(lab_names())
    for nb in sorted(submitted.rglob("*.ipynb")):
        parts = nb.relative_to(submitted).parts
        if ".ipynb_checkpoints" in parts:
            ignored.append((nb, "a Jupyter autosave copy (.ipynb_checkpoints)"))
        elif len(parts) != 3:
            ignored.append((nb, f"not at <student>/<lab>/<lab>.ipynb ({len(parts) - 1} folder levels instead of 2)"))
        elif parts[1] not in names:
            ignored.append((nb, f"{parts[1]!r} is not a lab"))
        elif parts[2] != f"{parts[1]}.ipynb":
            ignored.append((nb, f"named {parts[2]!r}, not {parts[1]}.ipynb"))
        elif parts[1] not in labs:
            ignored.append((nb, f"{parts[1]} was not chosen (--only)"))
        else:
            found.append(nb)
    return found, ignored


def _clear_own(course: Path, labs: Sequence[str]) -> None:
    """Remove what an earlier build made for `labs`, and nothing else: their source and release folders,
    and the reference's and samples' submissions, grades and feedback (the gradebook keeps everything)."""
    for lab in labs:
        for part in ("source", "release"):
            shutil.rmtree(course / part / lab, ignore_errors=True)
        for part in ("submitted", "autograded", "feedback"):
            folder = course / part
            for student in sorted(folder.iterdir()) if folder.is_dir() else []:
                if _ours(student.name):
                    shutil.rmtree(student / lab, ignore_errors=True)


FIELDS = ("lab", "submission", "kind", "score", "max_score", "manual_pending", "failed_tests", "seconds", "flagged", "note")


def build(out: Path = BUILD, only: Sequence[str] | None = None, samples: bool = True, release_only: bool = False,
          submitted: Path | None = None, full: bool = False, live_course: bool = False, log=print) -> list[dict]:
    """Make the nbgrader course in `out`: release, autograded reference and samples, scores.csv.

    `only` picks labs by name or number ("lab_01", "03", "project_2");
    `submitted` is a folder of real submissions in nbgrader's layout
    (`<student>/<lab>/<lab>.ipynb`), graded beside the reference; it may be
    the course's own `submitted/` (after `nbgrader collect`). Returns the
    score rows (empty with `release_only`).

    The build only adds or replaces what it makes: the chosen labs' source
    and release, the reference's and samples' submissions and grades, and
    `scores.csv`. It never removes a student's submission, grade or
    feedback, other labs' releases, or the gradebook; and it refuses
    (ValueError) to write into a folder that holds any of them
    (`course_state`) unless `live_course=True`. In a live course an
    existing `nbgrader_config.py` is kept.
    """
    from .report import atomic_write_text

    names = lab_names()
    chosen = names
    if only:
        for o in only:
            if not any(o in n for n in names):
                raise ValueError(f"only: {o!r} matches no lab; choose from {names}")
        chosen = [n for n in names if any(o in n for o in only)]
    if submitted is not None and not Path(submitted).is_dir():
        raise FileNotFoundError(f"submitted: no folder at {str(submitted)!r}")
    out = Path(out)
    state = course_state(out) if out.is_dir() else []
    if state and not live_course:
        raise ValueError(f"out: {str(out)!r} holds course state ({'; '.join(state[:4])}{'; ...' if len(state) > 4 else ''}). "
                         "The labs build never removes it, but it would write beside it: pass --live-course "
                         "(live_course=True) to build into this course, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    _clear_own(out, chosen)
    if not state:  # a gradebook of the build's own submitters only: start it afresh, as the sources may have changed
        (out / "gradebook.db").unlink(missing_ok=True)
    if not (live_course and (out / "nbgrader_config.py").is_file()):
        shutil.copy2(CONFIG, out / "nbgrader_config.py")
    for lab in chosen:
        shutil.copytree(SOURCE / lab, out / "source" / lab)
    rows: list[dict] = []
    references, made = ({}, {}) if release_only else grading_references(chosen, full)
    with _grading_environment(out, full, None if release_only else references):
        api = _api(out)
        for lab in chosen:
            _require(api.generate_assignment(lab, force=True, create=True), f"generate_assignment {lab}")
        log(f"release: {len(chosen)} labs without solutions in {out / 'release'}")
        if release_only:
            return rows
        if submitted is not None:
            found, ignored = survey_submissions(submitted, chosen)
            log(f"submitted: {len(found)} notebooks to grade in {submitted}" + (f"; {len(ignored)} ignored:" if ignored else ""))
            for nb, why in ignored:
                log(f"  ignored {nb.relative_to(submitted)}: {why}")
        for lab in chosen:
            api = _api(out, timeout=cell_timeout([lab]))
            release = _notebook(lab, out / "release")
            subs = [("reference", "reference", "reference solution", reference_answers(lab))]
            if samples:
                for path in _samples(lab):
                    note, answers = sample_answers(path)
                    subs.append((f"sample-{path.stem}", "sample", note, {**subs[0][3], **answers}))
            for student, kind, note, answers in subs:
                fill_release(release, answers, _notebook(lab, out / "submitted" / student))
            if submitted is not None:
                own_folder = Path(submitted).resolve() == (out / "submitted").resolve()  # after nbgrader collect
                for nb in sorted(Path(submitted).glob(f"*/{lab}/{lab}.ipynb")):
                    student = nb.parent.parent.name
                    if _ours(student):
                        if own_folder:
                            continue  # the build's own reference and samples, already listed
                        raise ValueError(f"submitted: the folder name {student!r} is reserved for the reference and the samples; rename it")
                    target = _notebook(lab, out / "submitted" / student)
                    if nb.resolve() != target.resolve():
                        target.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(nb, target)
                    subs.append((student, "student", "", {}))
            for student, kind, note, _ in subs:
                start = time.perf_counter()
                result = api.autograde(lab, student, force=True, create=True)
                if kind != "student":
                    _require(result, f"autograde {lab} for {student}")
                if result.get("success"):
                    scores = _scores(out, lab, student)
                else:  # a broken submission (not a notebook, cells deleted, ...) scores 0; the others still get graded
                    reference = next(r for r in rows if r["lab"] == lab and r["kind"] == "reference")
                    scores = {"score": 0.0, "max_score": reference["max_score"], "manual_pending": reference["manual_pending"],
                              "failed_tests": "autograde-failed"}
                    note = _error_line(result)
                flags = flagged_cells(_notebook(lab, out / "submitted" / student), imports=lab.startswith("lab_"))
                if flags:
                    note = "; ".join([note] * bool(note) + [f"FLAGGED: {'; '.join(flags)}"])
                row = {"lab": lab, "submission": student, "kind": kind, **scores,
                       "seconds": round(time.perf_counter() - start, 1), "note": note, "flagged": bool(flags)}
                rows.append(row)
                log(f"  {lab:24s} {student:32s} {row['score']:g}/{row['max_score']:g}"
                    + (f"  lost: {row['failed_tests']}" if row["failed_tests"] else "")
                    + ("  FLAGGED" if row["flagged"] else "")
                    + f"  ({row['seconds']:.0f} s)")
                for line in _report_lines(out, lab, student):
                    log(f"      {line}")
    _restore(made)  # the cache files a submission may have overwritten get their true values back
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(text.getvalue(), out / "scores.csv")
    log(f"scores: {out / 'scores.csv'}")
    return rows


def problems(rows: Sequence[Mapping]) -> list[str]:
    """What is wrong with a build's scores: a reference short of full marks or flagged, a sample with full marks not flagged.

    >>> problems([{"lab": "l", "submission": "reference", "kind": "reference", "score": 5.0, "max_score": 5.0},
    ...           {"lab": "l", "submission": "sample-x", "kind": "sample", "score": 5.0, "max_score": 5.0},
    ...           {"lab": "l", "submission": "sample-cheat", "kind": "sample", "score": 5.0, "max_score": 5.0, "flagged": True}])
    ['l: sample-x scored full marks (5/5) but is wrong']
    """
    out = []
    for r in rows:
        if r["kind"] == "reference" and r["score"] < r["max_score"]:
            out.append(f"{r['lab']}: the reference scored {r['score']:g}/{r['max_score']:g}")
        if r["kind"] == "reference" and r.get("flagged"):
            out.append(f"{r['lab']}: the reference is flagged ({r['note']})")
        if r["kind"] == "sample" and r["score"] >= r["max_score"] and not r.get("flagged"):
            out.append(f"{r['lab']}: {r['submission']} scored full marks ({r['score']:g}/{r['max_score']:g}) but is wrong")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m chapter11 labs`: build the student release and autograde the reference and the wrong samples."""
    parser = argparse.ArgumentParser(prog="python -m chapter11 labs", description=main.__doc__)
    parser.add_argument("--out", type=Path, default=BUILD, help="course folder to (re)build (default: build/labs)")
    parser.add_argument("--only", nargs="+", metavar="LAB", help="labs by name or part of it, e.g. lab_01 project_2")
    parser.add_argument("--release-only", action="store_true", help="only make the student release (no autograding)")
    parser.add_argument("--no-samples", action="store_true", help="autograde the reference solutions only")
    parser.add_argument("--submitted", type=Path, metavar="DIR",
                        help="also autograde real submissions laid out as DIR/<student>/<lab>/<lab>.ipynb")
    parser.add_argument("--full", action="store_true", help="project labs at full size (same as CH11_FULL=1)")
    parser.add_argument("--live-course", action="store_true",
                        help="build into a course folder that holds student submissions or grades (nothing of theirs is removed)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        rows = build(args.out, args.only, samples=not args.no_samples, release_only=args.release_only,
                     submitted=args.submitted, full=args.full or _full(), live_course=args.live_course)
    except (ValueError, FileNotFoundError) as err:
        print(f"labs: {err}", file=sys.stderr)
        return 2
    found = problems(rows)
    for p in found:
        print(f"PROBLEM: {p}", file=sys.stderr)
    samples_ran = any(r["kind"] == "sample" for r in rows)
    verdict = "; references full marks" + (", every sample lost points or was flagged" if samples_ran else " (no samples graded)")
    flagged = [r for r in rows if r.get("flagged") and r["kind"] == "student"]
    if flagged:
        print(f"flagged for reading ({len(flagged)}): " + ", ".join(f"{r['lab']}/{r['submission']}" for r in flagged))
    print(f"labs built in {time.perf_counter() - start:.0f} s" + ("" if found or not rows else verdict))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
