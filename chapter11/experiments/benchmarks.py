"""The benchmark drivers behind `python -m chapter11 bench NAME`: each measures one claim, side by side.

Covers: the registry `BENCHMARKS` and its dispatch `bench_main`; the
masked training step against dense and `torch.nn.utils.prune`
(`bench_masks`, "masks"); dense against physically pruned models, measured
against the MAC prediction (`structured_benchmark`, "structured"); and the
command lines of the CSR kernels ("sparse", `chapter11.experiments.exp08_kernels`)
and of 2:4 semi-structured sparsity on a GPU ("semi", the same module);
`prune_llm` against a forward pass ("oneshot", `chapter11.experiments.exp09_oneshot`).
Every driver checks correctness before it times anything, and times its
candidates interleaved with `chapter11.bench.compare` (the harness).

    python -m chapter11 bench --help

But: the numbers belong to the machine they ran on (printed first); the
recorded ones are in `benchmarks/`.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from ..bench import compare, describe_machine, machine_info
from ..masks import MaskedOptimizer, _zero_pruned, apply_masks, masks_of, prunable_parameters
from ..report import atomic_write_text
from ..sparsity import check_sparsity
from ..structured.channels import channel_scores, mask_channels, plan_by_scores, predicted_speedup, remove_channels


# ---------------------------------------------------------------- masks: one training step

def _mlp(sizes: tuple[int, ...]) -> torch.nn.Sequential:
    layers: list[torch.nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(torch.nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


def bench_masks(steps: int = 20, sparsity: float = 0.9, batch: int = 64, sizes=(1024, 4096, 4096, 10), seed: int = 0) -> dict:
    """Training-step time: dense vs chapter11 masks vs torch.nn.utils.prune, same masks.

    Each variant is a copy of one model with the same random masks; steps are
    interleaved. `masked_fill` is the step `MaskedOptimizer` took first
    (a bool `mask == 0` per parameter per step, then `masked_fill_` on the
    gradients and the weights) and `checked_multiply` its second (torch
    multiplies by the masks, then a second read, the norms, checks for
    inf x 0); both are kept so that they can be compared side by side with
    today's step (multiply and check in one pass where it can: numba, on the
    CPU) on any CPU. `floor` is the least an exact masked step can do: one
    multiply of the gradients and one of the weights by masks it holds, with
    no check for inf x 0 and no wrapper (it would leave NaN at a pruned
    weight after an inf gradient, which `MaskedOptimizer` must not). Before
    timing, one step of each masked variant is checked to leave the same
    weights.
    """
    import torch.nn.utils.prune as prune

    check_sparsity(sparsity)
    torch.manual_seed(seed)
    dense = _mlp(tuple(sizes))
    g = torch.Generator().manual_seed(seed)
    masks = {n: (torch.rand(p.shape, generator=g) >= sparsity).float() for n, p in prunable_parameters(dense).items()}
    ours, theirs, filled, bare, checked = (copy.deepcopy(dense) for _ in range(5))
    for model in (ours, filled, bare, checked):
        apply_masks(model, masks)
    for name, mask in masks.items():
        prune.custom_from_mask(theirs.get_submodule(name.rsplit(".", 1)[0]), "weight", mask)
    X = torch.randn(batch, sizes[0], generator=g)
    y = torch.randint(0, sizes[-1], (batch,), generator=g)

    def make_step(model, wrap):
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
        opt = MaskedOptimizer(opt, model) if wrap else opt

        def step():
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(X), y).backward()
            opt.step()

        return step

    def masked_fill_step(model):
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
        held = masks_of(model)
        pairs = [(p, held[n]) for n, p in model.named_parameters() if n in masks]

        def step():
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(X), y).backward()
            with torch.no_grad():
                pruned = [m == 0 for _, m in pairs]
                for (p, _), z in zip(pairs, pruned):
                    p.grad.masked_fill_(z, 0)
                opt.step()
                for (p, _), z in zip(pairs, pruned):
                    p.masked_fill_(z, 0)

        return step

    def floor_step(model):
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
        held = masks_of(model)
        params = [p for n, p in model.named_parameters() if n in masks]
        kept = [held[n] for n, p in model.named_parameters() if n in masks]

        def step():
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(X), y).backward()
            with torch.no_grad():
                torch._foreach_mul_([p.grad for p in params], kept)
                opt.step()
                torch._foreach_mul_(params, kept)

        return step

    def checked_multiply_step(model):
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
        held = masks_of(model)
        params = [p for n, p in model.named_parameters() if n in masks]
        kept = [held[n] for n, p in model.named_parameters() if n in masks]

        def step():  # chapter11's own two-pass path: multiply, then read the norms
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(X), y).backward()
            with torch.no_grad():
                _zero_pruned([p.grad for p in params], kept, fused=False)
                opt.step()
                _zero_pruned(params, kept, fused=False)

        return step

    variants = {
        "dense": make_step(dense, False),
        "chapter11": make_step(ours, True),
        "masked_fill": masked_fill_step(filled),
        "checked_multiply": checked_multiply_step(checked),
        "torch_prune": make_step(theirs, False),
        "floor": floor_step(bare),
    }
    for name in ("chapter11", "masked_fill", "checked_multiply", "torch_prune", "floor"):
        variants[name]()
    for name in masks:
        a = ours.get_submodule(name.rsplit(".", 1)[0]).weight
        for label, other in (("masked_fill", filled), ("checked_multiply", checked), ("floor", bare)):
            if not torch.allclose(a, other.get_submodule(name.rsplit(".", 1)[0]).weight, atol=1e-6):
                raise AssertionError(f"chapter11 and the {label} step disagree on {name} after one step")
        module = theirs.get_submodule(name.rsplit(".", 1)[0])
        b = module.weight_orig * module.weight_mask  # .weight is only refreshed by the next forward
        if not torch.allclose(a, b, atol=1e-6):
            raise AssertionError(f"chapter11 and torch.nn.utils.prune disagree on {name} after one step")
        if (a[masks[name] == 0] != 0).any():
            raise AssertionError(f"{name}: a pruned weight came back to life")
    result = compare(variants, repeats=steps, warmup=2, reference="dense")
    med = result["median_s"]
    return {
        "dense_s": med["dense"],
        "chapter11_s": med["chapter11"],
        "torch_prune_s": med["torch_prune"],
        "masked_fill_s": med["masked_fill"],
        "checked_multiply_s": med["checked_multiply"],
        "floor_s": med["floor"],
        "chapter11_ratio": med["chapter11"] / med["dense"],
        "masked_fill_ratio": med["masked_fill"] / med["dense"],
        "checked_multiply_ratio": med["checked_multiply"] / med["dense"],
        "floor_ratio": med["floor"] / med["dense"],
        "torch_prune_ratio": med["torch_prune"] / med["dense"],
        "steps": steps,
        "sparsity": sparsity,
        "batch": batch,
        "sizes": list(sizes),
        "machine": machine_info(),
    }


def masks_main(argv: list[str] | None = None) -> int:
    """`python -m chapter11 bench masks`: a training step, dense vs chapter11 masks vs torch.nn.utils.prune."""
    parser = argparse.ArgumentParser(prog="python -m chapter11 bench masks", description="Training step: dense vs masked (chapter11) vs torch.nn.utils.prune.")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant (median reported)")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--sizes", default="1024,4096,4096,10", help="layer widths of the MLP, comma-separated (default 1024,4096,4096,10)")
    parser.add_argument("--json", metavar="PATH", help="write the numbers as JSON here")
    args = parser.parse_args(argv)
    try:
        sizes = tuple(int(v) for v in args.sizes.split(","))
    except ValueError:
        parser.error(f"--sizes must be comma-separated integers, got {args.sizes!r}")
    if len(sizes) < 2 or min(sizes) < 1:
        parser.error(f"--sizes needs at least two positive widths, got {args.sizes!r}")
    print(f"machine: {describe_machine()}", flush=True)
    r = bench_masks(steps=args.steps, sparsity=args.sparsity, sizes=sizes)
    print(f"MLP {'-'.join(map(str, r['sizes']))}, batch {r['batch']}, sparsity {r['sparsity']:.0%}, median of {r['steps']} interleaved steps")
    print(f"  dense              {r['dense_s'] * 1e3:8.1f} ms/step")
    print(f"  chapter11 masks    {r['chapter11_s'] * 1e3:8.1f} ms/step  ({r['chapter11_ratio']:.2f}x dense)")
    print(f"  masked_fill step   {r['masked_fill_s'] * 1e3:8.1f} ms/step  ({r['masked_fill_ratio']:.2f}x dense; chapter11's first step)")
    print(f"  checked multiply   {r['checked_multiply_s'] * 1e3:8.1f} ms/step  ({r['checked_multiply_ratio']:.2f}x dense; "
          "chapter11's second: multiply, then read the norms)")
    print(f"  torch.nn.utils.prune {r['torch_prune_s'] * 1e3:6.1f} ms/step  ({r['torch_prune_ratio']:.2f}x dense)")
    print(f"  floor: two multiplies {r['floor_s'] * 1e3:5.1f} ms/step  ({r['floor_ratio']:.2f}x dense; gradients and weights times cached masks, no checks)")
    if args.json:
        keys = ("dense_s", "chapter11_s", "masked_fill_s", "checked_multiply_s", "torch_prune_s", "floor_s", "chapter11_ratio",
                "masked_fill_ratio", "checked_multiply_ratio", "torch_prune_ratio", "floor_ratio", "steps", "sparsity", "batch", "sizes")
        atomic_write_text(json.dumps({k: r[k] for k in keys} | {"machine": r["machine"]}, indent=2), args.json)
    return 0


# ---------------------------------------------------------------- structured: pruned channels and heads

def _median_times(fns: Mapping[str, Callable], repeats: int, min_time: float = 0.05) -> dict[str, float]:
    """Median seconds per call of each fn, timed interleaved by `chapter11.bench.compare`.

    Each timed sample runs a fn `inner` times (chosen so one sample takes about
    `min_time`), so tiny models are not timed at the clock's resolution.
    """
    inner = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        inner[name] = max(1, min(1000, int(min_time / max(time.perf_counter() - t0, 1e-6))))

    def repeated(fn, n):
        def call():
            for _ in range(n):
                fn()
        return call

    result = compare({name: repeated(fn, inner[name]) for name, fn in fns.items()}, repeats=repeats, warmup=0)
    return {name: result["median_s"][name] / inner[name] for name in fns}


def _bench_pair(label: str, dense: nn.Module, pruned: nn.Module, make_input, batches, repeats: int) -> list[dict]:
    dense.eval(), pruned.eval()
    pred = predicted_speedup(dense, pruned, make_input(1))  # per example, so the same at every batch size
    rows = []
    for b in batches:
        x = make_input(b)
        with torch.inference_mode():
            ref, out = dense(x), pruned(x)
        if out.shape != ref.shape or not torch.isfinite(out).all():
            raise AssertionError(f"{label}: pruned output has shape {tuple(out.shape)} (dense {tuple(ref.shape)}) or is not finite")

        def run(m):
            def call():
                with torch.inference_mode():
                    m(x)
            return call

        t = _median_times({"dense": run(dense), "pruned": run(pruned)}, repeats)
        rows.append({
            "model": label, "batch": b, "dense_s": t["dense"], "pruned_s": t["pruned"],
            "measured_speedup": t["dense"] / t["pruned"], "predicted_speedup": pred,
        })
    return rows


def _masked_equals_removed(model: nn.Module, plan, x, atol: float, label: str) -> nn.Module:
    """Correctness before timing: the physically pruned model matches the soft-masked one."""
    small = remove_channels(model, plan)
    masked = mask_channels(copy.deepcopy(model), plan, persistent=False)
    with torch.inference_mode():
        diff = (masked(x) - small(x)).abs().max().item()
    if diff > atol:
        raise AssertionError(f"{label}: pruned and soft-masked outputs differ by {diff:.3g} > {atol}")
    return small


def _heads_rows(batches, repeats: int, seq_len: int) -> list[dict]:
    """Half the heads of every layer of a TransformerClassifier removed by `chapter11.structured.heads`."""
    from ..models import TransformerClassifier
    from ..structured import heads

    if not hasattr(heads, "remove_heads") or not hasattr(heads, "mask_heads"):
        raise NotImplementedError("chapter11.structured.heads has no remove_heads/mask_heads yet")
    torch.manual_seed(0)
    model = TransformerClassifier(vocab_size=256, d_model=256, n_heads=8, n_layers=4, d_ff=512, max_len=seq_len).eval()
    plan = {i: list(range(0, 8, 2)) for i in range(len(model.blocks))}  # heads 0, 2, 4, 6 of every layer
    pruned = heads.remove_heads(copy.deepcopy(model), plan).eval()
    masked = heads.mask_heads(copy.deepcopy(model), plan).eval()
    x = torch.randint(0, 256, (2, seq_len))
    with torch.inference_mode():
        diff = (pruned(x) - masked(x)).abs().max().item()
    if diff > 1e-4:
        raise AssertionError(f"transformer: head-pruned and head-masked outputs differ by {diff:.3g}")
    return _bench_pair("transformer_50pct_heads", model, pruned, lambda b: torch.randint(0, 256, (b, seq_len)), batches, repeats)


def structured_benchmark(batches=(1, 32), repeats: int = 5, image_size: int = 112, amount: float = 0.5, heads: bool = True) -> list[dict]:
    """Rows {"model", "batch", "dense_s", "pruned_s", "measured_speedup", "predicted_speedup"}.

    Models: SmallCNN (2-D, widened to 64/128/128 channels, 32x32 inputs) and
    torchvision ResNet-18 (random weights) with `amount` of the channels of
    every prunable layer removed by L1 norm, and, when
    `chapter11.structured.heads.remove_heads` exists, a TransformerClassifier
    with half its heads removed. Each pair is checked (pruned == soft-masked)
    before it is timed.
    """
    from torchvision.models import resnet18

    from ..models import SmallCNN

    amount = check_sparsity(amount, "amount")
    if not batches or any(int(b) < 1 for b in batches):
        raise ValueError(f"batches must be positive batch sizes, got {list(batches)}")
    rows: list[dict] = []
    pct = round(100 * amount)
    torch.manual_seed(0)
    cnn = SmallCNN(dims=2, channels=(64, 128, 128)).eval()
    plan = plan_by_scores(channel_scores(cnn, "l1"), amount)
    small = _masked_equals_removed(cnn, plan, torch.randn(2, 1, 32, 32), 1e-4, "smallcnn")
    rows += _bench_pair(f"smallcnn_{pct}pct_channels", cnn, small, lambda b: torch.randn(b, 1, 32, 32), batches, repeats)
    torch.manual_seed(0)
    net = resnet18(weights=None).eval()  # random weights: latency does not depend on their values
    s = image_size
    plan = plan_by_scores(channel_scores(net, "l1"), amount)
    small = _masked_equals_removed(net, plan, torch.randn(1, 3, s, s), 1e-3, "resnet18")
    rows += _bench_pair(f"resnet18_{pct}pct_inner_channels", net, small, lambda b: torch.randn(b, 3, s, s), batches, repeats)
    if heads:
        try:
            rows += _heads_rows(batches, repeats, seq_len=64)
        except Exception as e:  # the heads module is written separately; say why it was skipped
            print(f"heads rows skipped: {type(e).__name__}: {e}")
    return rows


def structured_main(argv: Sequence[str] | None = None) -> int:
    """`python -m chapter11 bench structured`: dense vs 50%-pruned latency and FLOP prediction."""
    parser = argparse.ArgumentParser(prog="python -m chapter11 bench structured", description=structured_main.__doc__)
    parser.add_argument("--json", metavar="PATH", help="write the rows as a JSON list to PATH")
    parser.add_argument("--repeats", type=int, default=5, help="timed samples per variant (median is reported)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32], help="batch sizes to time")
    parser.add_argument("--image-size", type=int, default=112, help="ResNet-18 input height and width")
    parser.add_argument("--amount", type=float, default=0.5, help="fraction of channels removed per prunable layer")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave as is)")
    parser.add_argument("--no-heads", action="store_true", help="skip the attention-head rows")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {describe_machine()}", flush=True)
    rows = structured_benchmark(args.batches, args.repeats, args.image_size, args.amount, heads=not args.no_heads)
    print(f"{'model':36s} {'batch':>5s} {'dense ms':>9s} {'pruned ms':>9s} {'measured':>8s} {'predicted':>9s} {'ratio':>6s}")
    for r in rows:
        ratio = r["measured_speedup"] / r["predicted_speedup"]
        print(f"{r['model']:36s} {r['batch']:5d} {1e3 * r['dense_s']:9.2f} {1e3 * r['pruned_s']:9.2f} "
              f"{r['measured_speedup']:7.2f}x {r['predicted_speedup']:8.2f}x {ratio:6.2f}")
    if args.json:
        atomic_write_text(json.dumps(rows, indent=2), args.json)
    return 0


# ---------------------------------------------------------------- the command line

# name -> (module, function, what it measures); a module is imported only when its benchmark is chosen
BENCHMARKS = {
    "masks": ("chapter11.experiments.benchmarks", "masks_main", "training step: dense vs chapter11 masks vs torch.nn.utils.prune"),
    "sparse": ("chapter11.experiments.exp08_kernels", "sparse_main", "CSR kernels vs dense, scipy and torch.sparse_csr (CPU)"),
    "structured": ("chapter11.experiments.benchmarks", "structured_main", "dense vs physically pruned models, measured vs predicted"),
    "oneshot": ("chapter11.experiments.exp09_oneshot", "bench_main", "prune_llm (Wanda, SparseGPT) on SmolLM2-135M against one forward pass"),
    "semi": ("chapter11.experiments.exp08_kernels", "semi_main",
             "2:4 semi-structured vs dense fp16 at LLM shapes (CUDA GPU; skips with a reason otherwise)"),
}


def bench_usage() -> str:
    lines = ["usage: python -m chapter11 bench NAME [options]   (--help after NAME for its options)", "", "benchmarks:"]
    lines += [f"  {name:11s} {what}" for name, (_, _, what) in BENCHMARKS.items()]
    return "\n".join(lines)


def bench_main(argv: Sequence[str]) -> int:
    """Run benchmark `argv[0]` with the options `argv[1:]`; 2 (and the usage) for an unknown name."""
    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(bench_usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] not in BENCHMARKS:
        print(f"bench: no benchmark named {argv[0]!r}; choose from {', '.join(BENCHMARKS)}\n{bench_usage()}", file=sys.stderr)
        return 2
    module, function, _ = BENCHMARKS[argv[0]]
    status = getattr(importlib.import_module(module), function)(argv[1:])
    return status if isinstance(status, int) else 0
