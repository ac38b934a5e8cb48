"""Saving and loading structurally pruned models: the pruning plan travels with the weights.

Covers: `save_pruned` writes a model whose heads (`chapter11.structured.heads`),
MLP widths or blocks (`chapter11.structured.llm`) were removed into a folder
(`config.json`, `model.safetensors` and `pruning_plan.json`, which names the
kept heads per layer and checksums the weight files); `load_pruned` builds
the dense shape from the config, removes the same heads and neurons, and
loads the weights, so uneven heads per layer and uneven widths round-trip.
A save is atomic: killed at any point it leaves the old folder or the new
one, never a mix.

The plan is checksummed too (`plan_sha256`), and the model class comes from
an allow-list (our `TransformerClassifier`, and the `PreTrainedModel`
classes that `transformers` exports): a checkpoint is data, so nothing it
names is imported or called, and no code is loaded from the folder.

But: only the format this version writes is read back (an older plan is
refused with a message), and the checksums catch damage and mismatched
files, not a forger who rewrites weights, plan and checksums together.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import torch
from torch import nn

from ..report import atomic_write_bytes, atomic_write_text
from .heads import HeadLayer, _original_heads, attention_layers, remove_heads
from .llm import mlp_widths, set_mlp_widths

__all__ = ["save_pruned", "load_pruned", "PLAN_FILE"]

PLAN_FILE = "pruning_plan.json"
PLAN_FORMAT = "chapter11.heads/3"  # 3: the plan carries its own SHA-256; classes come from an allow-list


def _our_config(model: nn.Module) -> dict:
    """Constructor arguments of a TransformerClassifier, read off its layers."""
    block = model.blocks[0]
    return {
        "vocab_size": model.embed.num_embeddings if isinstance(model.embed, nn.Embedding) else None,
        "patch_size": model.patch_size,
        "num_classes": model.head.out_features,
        "d_model": model.head.in_features,
        "n_heads": _original_heads(attention_layers(model)[0]),
        "n_layers": len(model.blocks),
        "d_ff": block.fc1.out_features,
        "max_len": model.pos.shape[1],
    }


def _class_path(model: nn.Module | type) -> str:
    cls = model if isinstance(model, type) else type(model)
    return f"{cls.__module__}.{cls.__qualname__}"


def _allowed_class(path: str) -> type:
    """The model class a plan names, if it is one `load_pruned` rebuilds; ValueError otherwise.

    A checkpoint is data: the class must be chapter11's `TransformerClassifier`
    or a `PreTrainedModel` subclass that the `transformers` package itself
    exports (e.g. `LlamaForCausalLM`, `BertForSequenceClassification`).
    Nothing named by the folder is imported or called, and no code is loaded
    from it.
    """
    from ..models import TransformerClassifier

    if path == _class_path(TransformerClassifier):
        return TransformerClassifier
    module_name, _, name = path.rpartition(".")
    if module_name.startswith("transformers.models.") and name.isidentifier() and not name.startswith("_"):
        import transformers

        cls = getattr(transformers, name, None)  # the package's own exports only
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel) and _class_path(cls) == path:
            return cls
    raise ValueError(f"pruning plan: class {path!r} is not a model load_pruned rebuilds; it rebuilds "
                     "chapter11.models.TransformerClassifier and the PreTrainedModel classes the transformers package exports, "
                     "and never imports or calls anything else a checkpoint names")


def _plan_digest(plan: dict) -> str:
    """SHA-256 of the plan without its own digest (keys sorted), so an edited plan is caught."""
    body = {k: v for k, v in plan.items() if k != "plan_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    """Flush a file or folder to disk, so a rename never exposes half-written content after a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a folder
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def _quiet_hf():
    """No transformers notices or progress bars (save_pretrained draws one per shard) inside the block."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _uniform_head_config(model: nn.Module, layers: list[HeadLayer]) -> dict:
    """Config values with which plain `from_pretrained` rebuilds a LLaMA whose layers all kept
    the same numbers of query and key/value heads; {} when that is not the case or nothing changed."""
    config = getattr(model, "config", None)
    if config is None or any(layer.kind != "llama" for layer in layers):
        return {}
    n_q = {layer.n_heads for layer in layers}
    n_kv = {layer.proj(1).out_features // layer.head_dim for layer in layers}
    head_dim = {layer.head_dim for layer in layers}
    if len(n_q) != 1 or len(n_kv) != 1 or len(head_dim) != 1:
        return {}
    n_q, n_kv, head_dim = n_q.pop(), n_kv.pop(), head_dim.pop()
    hidden = getattr(config, "hidden_size", None)
    if not isinstance(hidden, int) or hidden % n_q or n_q % n_kv:  # LlamaConfig refuses such counts
        return {}
    if (n_q, n_kv) == (config.num_attention_heads, config.num_key_value_heads):
        return {}
    return {"num_attention_heads": n_q, "num_key_value_heads": n_kv, "head_dim": head_dim}


def _write_checkpoint(model: nn.Module, folder: Path, layers: list[HeadLayer]) -> dict:
    """Weights and config into `folder`; returns the plan entries the rebuild needs."""
    extra: dict = {"config_heads": {}, "mlp_widths": None, "attn_implementation": None}
    if hasattr(model, "save_pretrained"):
        config = model.config
        edits = _uniform_head_config(model, layers)
        before = {k: getattr(config, k) for k in edits}
        try:
            for k, v in edits.items():
                setattr(config, k, v)
            with _quiet_hf():
                model.save_pretrained(folder)
        finally:
            for k, v in before.items():
                setattr(config, k, v)
        extra["config_heads"] = before  # load_pruned builds the dense shape from these, then removes heads
        extra["attn_implementation"] = getattr(config, "_attn_implementation", None)
        widths = mlp_widths(model)
        if widths and any(w != getattr(config, "intermediate_size", w) for w in widths):
            extra["mlp_widths"] = widths
        return extra
    from ..models import TransformerClassifier
    from safetensors.torch import save

    if not isinstance(model, TransformerClassifier):
        raise TypeError(f"model: save_pruned supports transformers models and TransformerClassifier, got {type(model).__name__}")
    atomic_write_text(json.dumps(_our_config(model), indent=2), folder / "config.json")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write_bytes(save(state), folder / "model.safetensors")
    return extra


def _leftovers(folder: Path, kind: str) -> list[Path]:
    """Sibling folders an interrupted save left behind: `.NAME.saving-*` or `.NAME.old-*`."""
    if not folder.parent.is_dir():
        return []
    return sorted(p for p in folder.parent.glob(f".{folder.name}.{kind}-*") if p.is_dir())


def save_pruned(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write `model` to the folder `path`: standard checkpoint files plus `pruning_plan.json`.

    `transformers` models go through `save_pretrained` (config.json,
    model.safetensors); a `TransformerClassifier` gets config.json with its
    constructor arguments and model.safetensors. The plan records the class,
    per layer the original ids of the heads kept (and LLaMA MLP widths when
    they differ), and the SHA-256 of every file.

    The save is atomic per folder: everything is written to a hidden sibling
    `.NAME.saving-*`, flushed, and renamed into place; an earlier save in
    `path` is moved aside first and deleted after. A crash leaves either the
    old folder, or no folder and the old one beside it (`load_pruned` names
    it), never a mix. `path` must be new, empty, or an earlier save_pruned
    folder: its whole content is replaced.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a folder path, got {type(path).__name__}")
    folder = Path(path)
    if folder.exists():
        if not folder.is_dir():
            raise ValueError(f"path: {str(folder)!r} is a file, not a folder")
        if any(folder.iterdir()) and not (folder / PLAN_FILE).is_file():
            raise ValueError(f"path: {str(folder)!r} is a non-empty folder that save_pruned did not write; "
                             "its content would be replaced, so choose a new or empty folder")
    layers = attention_layers(model)
    folder.parent.mkdir(parents=True, exist_ok=True)
    for stale in _leftovers(folder, "saving"):  # an earlier save that never finished
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.saving-", dir=folder.parent))
    try:
        plan = {
            "format": PLAN_FORMAT,
            "class": _class_path(model),
            "original_heads": [_original_heads(layer) for layer in layers],
            "original_groups": [layer.original_group for layer in layers],
            "kept_heads": {str(i): layer.kept for i, layer in enumerate(layers)},
        }
        plan.update(_write_checkpoint(model, tmp, layers))
        plan["files"] = {f.name: _sha256(f) for f in sorted(tmp.iterdir()) if f.is_file()}
        plan["plan_sha256"] = _plan_digest(plan)
        atomic_write_text(json.dumps(plan, indent=2), tmp / PLAN_FILE)
        for f in tmp.iterdir():
            _fsync(f)
        _fsync(tmp)
        old = None
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(folder, old)
        os.rename(tmp, folder)
        _fsync(folder.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for stale in _leftovers(folder, "old"):
        shutil.rmtree(stale, ignore_errors=True)
    return folder


def _read_state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    single = folder / "model.safetensors"
    if single.is_file():
        return load_file(single)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        state = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            state.update(load_file(folder / shard))
        return state
    raise FileNotFoundError(f"path: no model.safetensors (or index) in {str(folder)!r}")


def _read_plan(folder: Path) -> dict:
    """The plan file, with its structure checked (ValueError naming what is wrong)."""
    plan_file = folder / PLAN_FILE
    if not plan_file.is_file():
        raise FileNotFoundError(f"path: {str(folder)!r} holds no {PLAN_FILE}; was it written by save_pruned?")
    try:
        plan = json.loads(plan_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"pruning plan: {plan_file} is not valid JSON ({err})") from None
    where = f"pruning plan {plan_file}"
    if not isinstance(plan, dict) or not isinstance(plan.get("class"), str):
        raise ValueError(f"{where}: expected an object with a 'class' entry")
    if plan.get("format") != PLAN_FORMAT:
        raise ValueError(f"{where}: format {plan.get('format')!r}, this version reads {PLAN_FORMAT!r}; "
                         "load the model with the chapter11 that saved it and save it again")
    if plan.get("plan_sha256") != _plan_digest(plan):
        raise ValueError(f"{where}: its content does not match its own checksum (plan_sha256): the plan was edited "
                         "after save_pruned wrote it, so its head ids cannot be trusted")
    original, kept = plan.get("original_heads"), plan.get("kept_heads")
    if not isinstance(original, list) or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in original):
        raise ValueError(f"{where}: 'original_heads' must be a list of positive integers, got {original!r}")
    if not isinstance(kept, dict) or sorted(kept, key=str) != sorted((str(i) for i in range(len(original))), key=str):
        raise ValueError(f"{where}: 'kept_heads' must have one entry per layer '0'..'{len(original) - 1}', got keys {sorted(kept) if isinstance(kept, dict) else kept!r}")
    for l, n in enumerate(original):
        heads = kept[str(l)]
        if (not isinstance(heads, list) or not heads or not all(isinstance(h, int) and not isinstance(h, bool) and 0 <= h < n for h in heads)
                or heads != sorted(set(heads))):
            raise ValueError(f"{where}: layer {l} must keep a sorted, non-empty list of distinct heads in 0..{n - 1}, got {heads!r}")
    files = plan.get("files")
    if not isinstance(files, dict) or "config.json" not in files or not all(isinstance(k, str) and isinstance(v, str) and Path(k).name == k and k not in ("", ".", "..") for k, v in files.items()):
        raise ValueError(f"{where}: 'files' must map plain file names (config.json among them) to SHA-256 digests")
    return plan


def _verify_files(folder: Path, plan: dict) -> None:
    for name, digest in plan.get("files", {}).items():
        file = folder / name
        if not file.is_file():
            raise ValueError(f"path: {name} is listed in {PLAN_FILE} but missing from {str(folder)!r}; the folder is incomplete")
        if _sha256(file) != digest:
            raise ValueError(f"path: {name} in {str(folder)!r} does not match the checksum in {PLAN_FILE}; "
                             "the plan and the weights come from different saves, so the heads would be wrong")


def _load_weights(model: nn.Module, state: dict[str, torch.Tensor], folder: Path) -> None:
    """load_state_dict, with mask buffers created first and clear errors for shape or key mismatches."""
    from ..masks import SUFFIX, _mark

    own = model.state_dict()
    for key, value in state.items():
        if key.endswith(SUFFIX) and key not in own:
            module_name, _, buffer_name = key.rpartition(".")
            try:
                module = model.get_submodule(module_name)
            except AttributeError:
                continue
            param = getattr(module, buffer_name[: -len(SUFFIX)], None)
            if isinstance(param, nn.Parameter) and param.shape == value.shape:
                module.register_buffer(buffer_name, torch.ones_like(param))
                _mark(module, buffer_name[: -len(SUFFIX)])  # a mask we installed, as apply_masks would mark it
    own = model.state_dict()
    bad = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
    if bad:
        key, saved, planned = bad[0]
        more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
        raise ValueError(f"path: the weights in {str(folder)!r} do not match its {PLAN_FILE}: {key} is {saved} in the checkpoint "
                         f"but {planned} under the plan{more}; the plan and the weights come from different models or saves")
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    missing = [k for k in missing if k not in tied and not any(k.endswith(t) for t in tied)]
    if missing or unexpected:
        raise ValueError(f"path: checkpoint does not match the rebuilt model (missing {missing[:5]}, unexpected {unexpected[:5]})")


def load_pruned(path: str | os.PathLike) -> nn.Module:
    """Rebuild a model written by `save_pruned`: original class, same heads removed, weights loaded.

    Plain `from_pretrained` cannot do this when layers kept different numbers
    of heads, since a config holds one head count for all layers. Every file
    is checked against the checksums in the plan first, and a plan that does
    not fit the weights raises a ValueError that says so (never a silently
    wrong model).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a folder path, got {type(path).__name__}")
    folder = Path(path)
    if not folder.is_dir():
        left = [p.name for p in _leftovers(folder, "old") + _leftovers(folder, "saving")]
        hint = f"; an interrupted save_pruned left {left} beside it (the .old-* folder is the previous save)" if left else ""
        raise FileNotFoundError(f"path: no folder {str(folder)!r}{hint}")
    plan = _read_plan(folder)
    _verify_files(folder, plan)
    cls = _allowed_class(plan["class"])
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"path: no config.json in {str(folder)!r}")
    config_dict = json.loads(config_file.read_text())
    if hasattr(cls, "config_class") and hasattr(cls, "from_pretrained"):
        with _quiet_hf():
            config = cls.config_class.from_pretrained(folder, local_files_only=True)
        for k, v in (plan.get("config_heads") or {}).items():  # the dense head counts; the plan removes heads below
            setattr(config, k, v)
        config._attn_implementation = plan.get("attn_implementation") or config_dict.get("_attn_implementation") or "eager"
        model = cls(config)
    else:
        model = cls(**config_dict)
    layers = attention_layers(model)
    if len(layers) != len(plan["kept_heads"]):
        raise ValueError(f"path: {PLAN_FILE} has {len(plan['kept_heads'])} layers, the model rebuilt from config.json has {len(layers)}")
    for l, (layer, n) in enumerate(zip(layers, plan["original_heads"])):
        if layer.n_heads != n:
            raise ValueError(f"path: {PLAN_FILE} says layer {l} had {n} heads, the model rebuilt from config.json has {layer.n_heads}")
    if plan.get("mlp_widths"):
        set_mlp_widths(model, plan["mlp_widths"])
    removed = {l: [h for h in range(n) if h not in set(plan["kept_heads"][str(l)])] for l, n in enumerate(plan["original_heads"])}
    try:
        remove_heads(model, {l: ids for l, ids in removed.items() if ids})
    except (TypeError, ValueError) as err:
        raise ValueError(f"path: the plan in {str(folder)!r} cannot be applied: {err}") from None
    _load_weights(model, _read_state(folder), folder)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model.eval()
