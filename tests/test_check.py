"""The lab checkers: library fill-ins pass every lab, wrong ones fail with a useful message."""

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

from chapter11 import check

LABS = Path(__file__).resolve().parents[1] / "notebooks" / "exercises"


CORRECT = {
    "sparsity": "from chapter11.sparsity import sparsity",
    "magnitude_mask": "from chapter11.magnitude import magnitude_mask",
    "threshold_for_sparsity": "from chapter11.magnitude import threshold_for_sparsity",
    "movement_scores": "from chapter11.movement import movement_scores",
    "to_csr": "def to_csr(A):\n    from chapter11.csr import to_csr as lib\n    c = lib(A)\n    return c.data, c.indices, c.indptr",
    "rigl_update": ("def rigl_update(weight, grad, mask, n):\n    from chapter11.dynamic import drop, grow\n"
                    "    s = torch.where(mask == 0, grad.abs(), torch.full_like(grad, -1.0))\n"
                    "    return grow(s, drop(weight, mask, n), n) if n else mask.clone()"),
    "head_importance": "def head_importance(gate_grads):\n    return gate_grads.abs().mean(0)",
}

# (blank name, wrong code, a phrase the failure message must contain)
WRONG = {
    "sparsity": ("def sparsity(W):\n    return float((W != 0).sum()) / W.numel()", "not the sparsity"),
    "magnitude_mask": ("def magnitude_mask(W, threshold):\n    return (W.abs() > threshold).float()", "ties exactly at the threshold"),
    "threshold_for_sparsity": ("def threshold_for_sparsity(W, sparsity):  # off by one: the largest pruned magnitude\n"
                               "    return float(W.abs().flatten().sort().values[max(round(sparsity * W.numel()) - 1, 0)])",
                               "prunes"),
    "movement_scores": ("def movement_scores(weights, grads):\n    return sum(g * w for w, g in zip(weights, grads))", "wrong sign"),
    "to_csr": ("def to_csr(A):\n    r, c = np.nonzero(A)\n    return A[r, c], c, np.bincount(r, minlength=A.shape[0])", "indptr"),
    "rigl_update": ("def rigl_update(weight, grad, mask, n):\n    return mask.clone()", "dropped 0"),
    "head_importance": ("def head_importance(gate_grads):\n    return gate_grads.mean(0).abs()", "differs from the reference"),
}


def lab_notebooks():
    return sorted(LABS.glob("lab_*.ipynb"))


def run_lab(path, fill):
    """Execute a lab notebook's code cells with each blank replaced by fill[name]; return (results, output)."""
    nb = json.loads(path.read_text())
    namespace, results, out = {}, [], io.StringIO()
    with contextlib.redirect_stdout(out):
        for cell in nb["cells"]:
            if cell["cell_type"] != "code":
                continue
            source = "".join(cell["source"])
            blank = cell.get("metadata", {}).get("lab", {}).get("blank")
            if blank:
                source = fill[blank]
            if source.startswith("check."):
                results.append(eval(compile(source, str(path), "eval"), namespace))
            else:
                exec(compile(source, str(path), "exec"), namespace)
    return results, out.getvalue()


def test_labs_exist_with_blanks_unexecuted():
    paths = lab_notebooks()
    assert len(paths) == 6
    blanks = set()
    for path in paths:
        nb = json.loads(path.read_text())
        for cell in nb["cells"]:
            if cell["cell_type"] == "code":
                assert cell["outputs"] == [] and cell["execution_count"] is None, f"{path.name} is executed"
                name = cell["metadata"].get("lab", {}).get("blank")
                if name:
                    blanks.add(name)
                    assert "NotImplementedError" in "".join(cell["source"])
    assert blanks == set(CORRECT)


@pytest.mark.parametrize("path", lab_notebooks(), ids=lambda p: p.stem)
def test_library_fill_ins_pass(path):
    results, out = run_lab(path, CORRECT)
    assert results and all(r is True for r in results), out
    assert "failed" not in out


@pytest.mark.parametrize("name", sorted(WRONG))
def test_wrong_fill_in_fails_with_useful_message(name):
    path = next(p for p in lab_notebooks() if f'"blank": "{name}"' in p.read_text())
    fill = dict(CORRECT, **{name: WRONG[name][0]})
    results, out = run_lab(path, fill)
    assert False in results, out
    line = next(l for l in out.splitlines() if "failed" in l)
    assert line.startswith(f"check_{name}: case "), line
    assert WRONG[name][1] in line, line


def test_unfilled_blank_is_reported_not_crashing():
    out = io.StringIO()
    def blank(W):
        raise NotImplementedError("fill in sparsity")
    with contextlib.redirect_stdout(out):
        assert check.check_sparsity(blank) is False
    assert "raised NotImplementedError" in out.getvalue()


def test_failure_message_does_not_leak_expected_values():
    from chapter11.sparsity import sparsity
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        check.check_sparsity(lambda W: 0.123456)
    first = sparsity(check._sparse_randn(4, 5, 0.4, 1))
    assert f"{first}" not in out.getvalue() and f"{first:.3f}" not in out.getvalue()


def test_checker_does_not_let_student_mutate_reference():
    def mutating(W, threshold):
        mask = (W.abs() >= threshold).float()
        W.zero_()
        return mask
    with contextlib.redirect_stdout(io.StringIO()):
        assert check.check_magnitude_mask(mutating) is True


def test_rigl_checker_accepts_other_tie_breaks():
    def reversed_ties(weight, grad, mask, n):
        # same rule, ties broken toward the higher index
        flat_w, flat_g, m = weight.flatten().tolist(), grad.flatten().tolist(), mask.flatten().tolist()
        active = sorted((i for i in range(len(m)) if m[i]), key=lambda i: (abs(flat_w[i]), -i))[:n]
        grow = sorted((i for i in range(len(m)) if not m[i]), key=lambda i: (-abs(flat_g[i]), -i))[:n]
        new = list(m)
        for i in active:
            new[i] = 0.0
        for i in grow:
            new[i] = 1.0
        return torch.tensor(new).view(mask.shape)
    with contextlib.redirect_stdout(io.StringIO()):
        assert check.check_rigl_update(reversed_ties) is True
