"""The graded labs: nbgrader source notebooks, sample submissions, graders and the whole build.

Quick tests check the notebooks as files and run the function labs in this
process (reference solutions pass every test cell, hidden ones included;
every wrong sample fails one). The slow test runs `chapter11.labs.main`
once, the way `make labs` does: nbgrader makes the student release and
autogrades the reference solutions and every sample in real kernels. It
then checks the three promises of issue 19: the release holds no solution
code, the references score full marks, every wrong sample loses points
(plain magnitude pruning without fine-tuning included), and the project
references pass with margin.
"""

import ast
import contextlib
import csv
import io
import json
import math
import os
import re
from importlib.metadata import version
from pathlib import Path

import nbformat
import pytest
import torch
from torch import nn

from chapter11 import labs

ROOT = Path(__file__).resolve().parents[1]
LABS = labs.lab_names()
FUNCTION_LABS = [n for n in LABS if n.startswith("lab_")]
PROJECT_LABS = [n for n in LABS if n.startswith("project_")]


def _source(lab):
    return nbformat.read(labs.SOURCE / lab / f"{lab}.ipynb", as_version=4)


def _meta(cell):
    return cell.metadata.get("nbgrader", {})


# ---------------------------------------------------------------- the notebooks as files


def test_six_function_labs_and_three_projects():
    assert len(FUNCTION_LABS) == 6 and PROJECT_LABS == ["project_1_fine_grained", "project_2_channels", "project_3_llm"]


def test_nbval_and_the_experiment_runner_never_pick_up_a_lab():
    from chapter11.__main__ import experiments

    picked = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")) + experiments()
    assert not [p for p in picked if "exercises" in p.parts]
    assert not list((ROOT / "notebooks" / "exercises").rglob("[0-9][0-9]_*.ipynb"))


@pytest.mark.parametrize("lab", LABS)
def test_source_notebook_is_a_valid_nbgrader_assignment(lab):
    nb = _source(lab)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            ast.parse(cell.source)  # every cell, hidden tests included, is valid Python
    ids = [_meta(c)["grade_id"] for c in nb.cells if _meta(c)]
    assert len(ids) == len(set(ids)), f"duplicate grade ids in {lab}"
    solutions = [c for c in nb.cells if _meta(c).get("solution") and not _meta(c).get("grade")]
    tests = [c for c in nb.cells if _meta(c).get("grade") and c.cell_type == "code"]
    assert solutions and tests
    for cell in solutions:
        assert c_count(cell.source, labs.BEGIN) == 1 and c_count(cell.source, labs.END) == 1, _meta(cell)["grade_id"]
    for cell in tests:
        assert _meta(cell)["locked"] and _meta(cell)["points"] > 0
        assert labs.BEGIN not in cell.source
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{lab} is committed executed"


def c_count(text, marker):
    return sum(line.strip() == marker for line in text.splitlines())


@pytest.mark.parametrize("lab", FUNCTION_LABS)
def test_function_lab_hides_its_hand_computed_answers(lab):
    tests = [c for c in _source(lab).cells if _meta(c).get("grade") and c.cell_type == "code"]
    assert any("check.graded(\"check_" in c.source for c in tests), "no visible checker test"
    assert any("### BEGIN HIDDEN TESTS" in c.source and "### END HIDDEN TESTS" in c.source for c in tests)


@pytest.mark.parametrize("lab", LABS)
def test_every_lab_has_a_wrong_sample(lab):
    samples = labs._samples(lab)
    assert samples, f"no sample submission for {lab}"
    ids = set(labs.reference_answers(lab))
    for path in samples:
        note, answers = labs.sample_answers(path)
        assert note and set(answers) <= ids, path.name
        for text in answers.values():
            ast.parse(text)


# ---------------------------------------------------------------- function labs, in this process


def _run_cells(lab, answers):
    """Run a lab's cells with the solution cells replaced by `answers`; {test grade_id: passed} (hidden tests included)."""
    namespace, passed = {}, {}
    with contextlib.redirect_stdout(io.StringIO()):
        for cell in _source(lab).cells:
            meta = _meta(cell)
            if cell.cell_type != "code":
                continue
            source = answers[meta["grade_id"]] if meta.get("solution") else cell.source
            try:
                exec(compile(source, f"{lab}:{meta.get('grade_id')}", "exec"), namespace)
                ok = True
            except Exception:
                ok = False
            if meta.get("grade"):
                passed[meta["grade_id"]] = ok
            elif not ok and not meta.get("solution"):
                raise AssertionError(f"{lab}: cell {meta.get('grade_id')} failed")
    return passed


@pytest.mark.parametrize("lab", FUNCTION_LABS)
def test_reference_solution_passes_every_test_cell(lab):
    passed = _run_cells(lab, labs.reference_answers(lab))
    assert passed and all(passed.values()), passed


@pytest.mark.parametrize("sample", [p for lab in FUNCTION_LABS for p in labs._samples(lab)], ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_wrong_sample_fails_a_test_cell(sample):
    """Every wrong sample loses points; a cheat (cheat_*.py) loses points or its solution cells are flagged."""
    from chapter11 import check

    lab = sample.parent.name
    cheat = labs.sample_answers(sample)[1]
    answers = {**labs.reference_answers(lab), **cheat}
    saved = dict(vars(check))  # a cheat rebinds the checkers of this process's module: put them back
    try:
        passed = _run_cells(lab, answers)
    finally:
        vars(check).update(saved)
    if sample.stem.startswith("cheat_"):
        nb = sample.parent / "x.ipynb"
        cells = [{"cell_type": "code", "source": text, "metadata": {"nbgrader": {"solution": True, "grade_id": gid}}} for gid, text in cheat.items()]
        flags = _flags_of(cells)
        assert flags or not all(passed.values()), f"{sample.name} passed every test and was not flagged"
        return
    assert not all(passed.values()), f"{sample.name} passed every test: {passed}"


def _flags_of(cells: list[dict]) -> list[str]:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        nb = Path(tmp) / "n.ipynb"
        nb.write_text(json.dumps({"cells": cells}))
        return labs.flagged_cells(nb)


def test_reference_solutions_are_not_flagged_and_the_cheats_are():
    for lab in FUNCTION_LABS:
        cells = [{"cell_type": "code", "source": t, "metadata": {"nbgrader": {"solution": True, "grade_id": g}}} for g, t in labs.reference_answers(lab).items()]
        assert _flags_of(cells) == [], lab
    cheats = {p.stem: p for lab in FUNCTION_LABS for p in labs._samples(lab) if p.stem.startswith("cheat_")}
    assert {"cheat_rebinds_the_checker", "cheat_imports_scipy"} <= set(cheats)
    for name, path in cheats.items():
        cells = [{"cell_type": "code", "source": t, "metadata": {"nbgrader": {"solution": True, "grade_id": g}}} for g, t in labs.sample_answers(path)[1].items()]
        assert _flags_of(cells), name
    plain = [{"cell_type": "code", "source": "import numpy as np  # not chapter11\nx = check_value == 3", "metadata": {"nbgrader": {"solution": True}}}]
    assert _flags_of(plain) == []


def test_unanswered_release_fails_every_test_cell():
    lab = "lab_05_rigl_update"
    stub = {gid: "raise NotImplementedError()" for gid in labs.reference_answers(lab)}
    passed = _run_cells(lab, stub)
    assert passed and not any(passed.values())


# ---------------------------------------------------------------- answers and submissions


def test_sample_file_format(tmp_path):
    path = tmp_path / "two.py"
    path.write_text("# first line\n# second line\n\n# %% a\nx = 1\n\n# %% b\ny = 2\n")
    assert labs.sample_answers(path) == ("first line second line", {"a": "x = 1", "b": "y = 2"})
    (tmp_path / "none.py").write_text("# no sections\n")
    with pytest.raises(ValueError, match="no '# %% <grade_id>' section"):
        labs.sample_answers(tmp_path / "none.py")


def test_reference_answers_drop_only_the_markers():
    answers = labs.reference_answers("lab_01_sparsity")
    assert set(answers) == {"sparsity"}
    assert labs.BEGIN not in answers["sparsity"] and "count_nonzero" in answers["sparsity"]
    assert answers["sparsity"].startswith("def sparsity(W):")


def test_fill_release_refuses_unknown_cells(tmp_path):
    source = labs.SOURCE / "lab_01_sparsity" / "lab_01_sparsity.ipynb"
    target = labs.fill_release(source, {"sparsity": "def sparsity(W):\n    return 0.0"}, tmp_path / "s" / "x.ipynb")
    cells = nbformat.read(target, as_version=4).cells
    assert any(c.source == "def sparsity(W):\n    return 0.0" for c in cells)
    with pytest.raises(ValueError, match="not solution cells"):
        labs.fill_release(source, {"nope": ""}, tmp_path / "y.ipynb")


def test_build_refuses_unknown_labs_and_missing_folders(tmp_path):
    with pytest.raises(ValueError, match="matches no lab"):
        labs.build(tmp_path, only=["lab_99"], log=lambda *_: None)
    with pytest.raises(FileNotFoundError, match="submitted"):
        labs.build(tmp_path, submitted=tmp_path / "missing", log=lambda *_: None)


def test_problems_flags_a_short_reference_and_a_perfect_sample():
    rows = [{"lab": "a", "submission": "reference", "kind": "reference", "score": 4.0, "max_score": 5.0},
            {"lab": "a", "submission": "sample-x", "kind": "sample", "score": 3.0, "max_score": 5.0},
            {"lab": "a", "submission": "bob", "kind": "student", "score": 5.0, "max_score": 5.0}]
    assert labs.problems(rows) == ["a: the reference scored 4/5"]


# ---------------------------------------------------------------- graders


def test_graders_refuse_what_is_not_a_model():
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        labs.grade_fine_grained("model")
    with pytest.raises(TypeError, match="SmallCNN"):
        labs.grade_channels(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="no decoder projections"):
        labs.grade_llm(nn.Linear(2, 2))


def test_latency_report_needs_two_measured_times():
    report = labs.ChannelReport(100, 250, 0.9, 0.9, 10, (16, 32, 32))
    for bad in (None, {"dense": 1.0}, {"dense": 1.0, "pruned": 0.0}, {"dense": 1.0, "pruned": math.nan},
                {"dense": True, "pruned": 1.0}):
        with pytest.raises(ValueError, match="latency_ms"):
            labs.check_latency(bad, report)
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert labs.check_latency({"dense": 3.0, "pruned": 2.0}, report, measured={"dense": 2.0, "pruned": 1.0})
    assert "your speedup 1.50x; the grader's on 256 signals 2.00x; 2.50x fewer MACs" in out.getvalue()


def test_latency_point_needs_agreement_with_the_graders_own_timing():
    report = labs.ChannelReport(100, 250, 0.9, 0.9, 10, (16, 32, 32))
    measured = labs.measure_latency(report, repeats=5)  # a real timing of the two shapes
    assert set(measured) == {"dense", "pruned"} and all(v > 0 for v in measured.values())
    speedup = measured["dense"] / measured["pruned"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert labs.check_latency({"dense": speedup, "pruned": 1.0}, report, measured=measured)
        assert labs.check_latency({"dense": 1.9 * speedup, "pruned": 1.0}, report, measured=measured)
        for made_up in (2.1 * speedup, speedup / 2.1):
            with pytest.raises(AssertionError, match="not within 2x of the grader's"):
                labs.check_latency({"dense": made_up, "pruned": 1.0}, report, measured=measured)


def test_cell_timeouts_follow_the_labs_named_on_the_command_line(monkeypatch):
    from traitlets.config import Config

    monkeypatch.setenv(labs.REFERENCES_ENV, "")  # so that the value set below is undone
    monkeypatch.delenv(labs.REFERENCES_ENV)
    c = Config()
    labs.configure_nbgrader(c, ["nbgrader", "generate_assignment", "lab_04_csr"])
    assert c.Execute.timeout == labs.CELL_TIMEOUT_S["lab"] == 120 and labs.REFERENCES_ENV not in os.environ
    asked = []
    monkeypatch.setattr(labs, "grading_references", lambda names, full: (asked.append(names) or {"grading_data": "d"}, {}))
    labs.configure_nbgrader(c, ["nbgrader", "autograde", "project_1_fine_grained", "lab_04_csr"])
    assert c.Execute.timeout == labs.CELL_TIMEOUT_S["project"]
    assert asked == [["lab_04_csr", "project_1_fine_grained"]] and json.loads(os.environ[labs.REFERENCES_ENV]) == {"grading_data": "d"}
    labs.configure_nbgrader(c, ["nbgrader", "formgrader"])
    assert c.Execute.timeout == labs.CELL_TIMEOUT_S["project"]
    # the shipped config file calls it
    config = (labs.CONFIG).read_text()
    assert "configure_nbgrader(c, sys.argv)" in config


@pytest.mark.slow
def test_graders_trust_the_references_not_the_cache(tmp_path, monkeypatch):
    """A submission that overwrites cache files changes nothing graded once references are handed over."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(labs, "_REFERENCES", {})
    labs._grading_tensors.cache_clear()
    labs._split.cache_clear()
    try:
        refs, made = labs.grading_references(["project_1_fine_grained", "lab_04_csr"])
        assert set(refs) == {"grading_data", "lenet"} and 0.3 < refs["lenet"]["accuracy"] < 1.0
        assert all(path.is_relative_to(tmp_path) for path in made)
        # the cheat: the dense accuracy reads 0 and every grading label is 0
        settings = {"state": labs._state_digest(labs._dense_state("lenet")), "seed": labs.GRADE_SEED, "n": labs.GRADE_SAMPLES}
        torch.save({"accuracy": 0.0}, labs._cache_path("dense-lenet-grade-accuracy", settings))
        data = labs._cache_path("mnist1d", {"num_samples": labs.GRADE_SAMPLES, "seed": labs.GRADE_SEED, "mnist1d": version("mnist1d")})
        assert data in made
        poisoned = {k: (torch.zeros_like(v) if k.startswith("y_") else v) for k, v in made[data].items()}
        torch.save(poisoned, data)
        labs._grading_tensors.cache_clear()
        assert labs._dense_grade_accuracy("lenet") == 0.0  # without references the cache is believed
        assert int(labs._grading_tensors()[1].abs().sum()) == 0
        monkeypatch.setattr(labs, "_REFERENCES", refs)
        labs._grading_tensors.cache_clear()
        assert labs._dense_grade_accuracy("lenet") == refs["lenet"]["accuracy"]
        assert labs._tensor_digest(*labs._grading_tensors()) == refs["grading_data"]  # made afresh, file repaired
        assert int(torch.load(data, weights_only=True)["y_train"].abs().sum()) > 0
        labs._restore(made)
        monkeypatch.setattr(labs, "_REFERENCES", {})
        assert labs._dense_grade_accuracy("lenet") == refs["lenet"]["accuracy"]
    finally:
        labs._grading_tensors.cache_clear()
        labs._split.cache_clear()


def test_reports_apply_the_targets_at_their_edges():
    fine = labs.FineGrainedReport(density=0.20, accuracy=0.58, dense_accuracy=0.60, examples=10)
    assert fine.density_ok and fine.accuracy_ok
    assert not labs.FineGrainedReport(0.2001, 0.579, 0.60, 10).density_ok
    assert not labs.FineGrainedReport(0.1, 0.579, 0.60, 10).accuracy_ok
    channels = labs.ChannelReport(macs=50, dense_macs=100, accuracy=0.94, dense_accuracy=0.97, examples=10, channels=(1, 1, 1))
    assert channels.macs_ok and channels.accuracy_ok
    assert not labs.ChannelReport(51, 100, 0.939, 0.97, 10, (1, 1, 1)).macs_ok
    llm = labs.LLMReport(sparsity=0.55, min_layer_sparsity=0.4995, perplexity=40.0, dense_perplexity=20.0, tokens=8)
    assert llm.sparsity_ok and llm.perplexity_ok
    assert not labs.LLMReport(0.49, 0.49, 40.1, 20.0, 8).sparsity_ok
    assert not labs.LLMReport(0.6, 0.49, 30.0, 20.0, 8).sparsity_ok  # the average is not enough: every matrix counts
    assert not labs.LLMReport(0.5, 0.5, math.nan, 20.0, 8).perplexity_ok


@pytest.mark.slow
def test_channel_grader_grades_the_weights_not_the_submitted_object():
    """Issue 26's cheats: a SmallCNN subclass that answers the all-zero MAC-counting signal itself, or convolves past the hooks."""
    import torch.nn.functional as F

    task = labs.channel_task()
    base = type(task.model)

    class SpecialCasesTheCountingSignal(base):
        def forward(self, x):
            if not bool(x.any()):
                return torch.zeros(x.shape[0], 10)  # no layer runs, so hooks count no MACs
            return super().forward(x)

    class ConvolvesPastTheHooks(base):
        def forward(self, x):
            x = x.unsqueeze(1) if x.dim() == 2 else x
            x = F.max_pool1d(F.relu(self.bn1(F.conv1d(x, self.conv1.weight, self.conv1.bias, padding="same"))), 2)
            x = F.max_pool1d(F.relu(self.bn2(F.conv1d(x, self.conv2.weight, self.conv2.bias, padding="same"))), 2)
            x = F.relu(self.bn3(F.conv1d(x, self.conv3.weight, self.conv3.bias, padding="same")))
            return self.fc(x.flatten(2).mean(-1))

    for cheat_class in (SpecialCasesTheCountingSignal, ConvolvesPastTheHooks):
        cheat = cheat_class()
        cheat.load_state_dict(task.model.state_dict())
        report = labs.grade_channels(cheat)
        assert report.macs == report.dense_macs and not report.macs_ok, (cheat_class.__name__, report)
        assert abs(report.accuracy - report.dense_accuracy) < 1e-9  # graded as the dense network its weights make


@pytest.mark.slow
def test_llm_grader_needs_half_of_every_projection_and_grades_the_weights():
    """Issue 26's cheat: attention left dense and the MLP pruned to 2/3 averages 50% but misses the per-matrix rule."""
    from chapter11.models import load_smollm
    from chapter11.oneshot import mask_from_scores

    model = load_smollm()[0]
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith(("gate_proj", "up_proj", "down_proj")):
                module.weight.mul_(mask_from_scores(module.weight.abs(), sparsity=2 / 3, scope="row"))
    report = labs.grade_llm(model)
    assert report.sparsity > 0.5 - 1e-3 and report.min_layer_sparsity < 0.1 and not report.sparsity_ok, report


@pytest.mark.slow
def test_fine_grained_grader_counts_weights_as_loaded_not_as_claimed():
    """Masks of chapter11 and of torch.nn.utils.prune both count; an unpruned copy is dense; a wrong shape is refused."""
    import torch.nn.utils.prune as torch_prune

    from chapter11.magnitude import prune_magnitude

    task = labs.fine_grained_task()
    ours = task.model
    prune_magnitude(ours, 0.85, scope="global")
    assert abs(labs.grade_fine_grained(ours).density - 0.15) < 1e-6
    theirs = labs.fine_grained_task().model
    for name in ("fc1", "fc2", "fc3"):
        torch_prune.l1_unstructured(getattr(theirs, name), "weight", amount=0.85)
    report = labs.grade_fine_grained(theirs)
    assert abs(report.density - 0.15) < 2e-4 and report.density_ok
    assert labs.grade_fine_grained(task.dense).density == 1.0
    with pytest.raises(ValueError, match="LeNet-300-100"):
        labs.grade_fine_grained(nn.Sequential(nn.Linear(40, 10)))


# ---------------------------------------------------------------- the whole build, as `make labs` runs it


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("labs")
    mine = tmp_path_factory.mktemp("mine")  # two real students: a wrong answer and a file that is not a notebook
    source = labs.SOURCE / "lab_01_sparsity" / "lab_01_sparsity.ipynb"
    labs.fill_release(source, {"sparsity": "def sparsity(W):\n    return 0.0"}, mine / "alice" / "lab_01_sparsity" / source.name)
    (mine / "bob" / "lab_01_sparsity").mkdir(parents=True)
    (mine / "bob" / "lab_01_sparsity" / source.name).write_text("not a notebook")
    lines = []
    rows = labs.build(out, submitted=mine, log=lines.append)
    code = 1 if labs.problems(rows) else 0
    return out, rows, code, lines


@pytest.mark.slow
def test_release_holds_no_solution_code(built):
    out, _, _, _ = built
    for lab in LABS:
        source = _source(lab)
        outside = {line.strip() for c in source.cells for line in _outside_solutions(c).splitlines()}
        secret = set()
        for cell in source.cells:
            secret |= {line.strip() for line in _inside_solutions(cell).splitlines()} - outside
        secret = {s for s in secret if len(s) > 3}
        release = nbformat.read(out / "release" / lab / f"{lab}.ipynb", as_version=4)
        text = "\n".join(c.source for c in release.cells)
        assert "BEGIN SOLUTION" not in text and "HIDDEN TESTS" not in text
        leaked = sorted(s for s in secret if s in {line.strip() for line in text.splitlines()})
        assert not leaked, f"{lab}: the release shows solution or hidden-test lines {leaked[:3]}"
        assert "raise NotImplementedError()" in text or "YOUR ANSWER HERE" in text


def _inside_solutions(cell):
    """Lines a student must not see: solution regions, hidden tests, and whole markdown answers."""
    meta = _meta(cell)
    if meta.get("solution") and cell.cell_type == "markdown":
        return cell.source
    keep, inside = [], False
    for line in cell.source.splitlines():
        s = line.strip()
        if s in (labs.BEGIN, "### BEGIN HIDDEN TESTS"):
            inside = True
        elif s in (labs.END, "### END HIDDEN TESTS"):
            inside = False
        elif inside:
            keep.append(line)
    return "\n".join(keep)


def _outside_solutions(cell):
    if _meta(cell).get("solution") and cell.cell_type == "markdown":
        return ""
    hidden = set(_inside_solutions(cell).splitlines())
    return "\n".join(line for line in cell.source.splitlines() if line not in hidden)


@pytest.mark.slow
def test_references_score_full_marks_and_every_sample_loses_points(built):
    out, rows, code, _ = built
    assert code == 0, labs.problems(rows)
    refs = {r["lab"]: r for r in rows if r["kind"] == "reference"}
    assert set(refs) == set(LABS)
    for lab, r in refs.items():
        assert r["score"] == r["max_score"] > 0, r
    samples = [r for r in rows if r["kind"] == "sample"]
    assert len(samples) == sum(len(labs._samples(lab)) for lab in LABS)
    for r in samples:
        if r["submission"].startswith("sample-cheat_"):  # a cheat loses points or is flagged in the table
            assert (r["score"] < r["max_score"]) or (r["flagged"] and "FLAGGED" in r["note"]), r
        else:
            assert r["score"] < r["max_score"] and r["failed_tests"] and not r["flagged"], r
    cheats = {r["submission"]: r for r in samples if r["submission"].startswith("sample-cheat_")}
    assert cheats["sample-cheat_rebinds_the_checker"]["flagged"] and "test_sparsity_checker" in cheats["sample-cheat_rebinds_the_checker"]["failed_tests"]
    assert cheats["sample-cheat_imports_scipy"]["flagged"]
    with open(out / "scores.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [(t["lab"], t["submission"]) for t in table] == [(r["lab"], r["submission"]) for r in rows]
    assert all(float(t["score"]) == r["score"] for t, r in zip(table, rows))


@pytest.mark.slow
def test_plain_magnitude_pruning_misses_the_accuracy_targets(built):
    _, rows, _, _ = built
    lost = {(r["lab"], r["submission"]): r["failed_tests"].split() for r in rows}
    assert lost["project_1_fine_grained", "sample-magnitude_no_finetune"] == ["test_accuracy"]
    assert lost["project_2_channels", "sample-no_recovery"] == ["test_accuracy"]
    assert lost["project_3_llm", "sample-magnitude"] == ["test_perplexity"]
    assert lost["project_2_channels", "sample-zeroed_not_removed"] == ["test_macs"]
    # the cheats: a poisoned cache changes no grade (this one's or the next sample's), made-up latencies lose the point
    assert lost["project_1_fine_grained", "sample-cheat_poisons_the_cache"] == ["test_accuracy"]
    assert lost["project_1_fine_grained", "sample-finetune_without_masks"] != []
    assert lost["project_2_channels", "sample-cheat_made_up_latency"] == ["test_latency"]
    flagged = {r["submission"]: r for r in rows if r["lab"] == "project_1_fine_grained"}
    assert flagged["sample-cheat_poisons_the_cache"]["flagged"] and "private state or cache" in flagged["sample-cheat_poisons_the_cache"]["note"]


def _report_text(out, lab, student="reference"):
    nb = json.loads((out / "autograded" / student / lab / f"{lab}.ipynb").read_text())
    return "".join("".join(o.get("text", "")) for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", []))


@pytest.mark.slow
def test_project_references_pass_with_margin(built):
    out, _, _, _ = built
    drop = lambda text: float(re.search(r"drop ([+-][0-9.]+) points", text).group(1))
    p1 = _report_text(out, "project_1_fine_grained")
    assert float(re.search(r"weights remaining: ([0-9.]+)%", p1).group(1)) <= 19.0, p1
    assert drop(p1) <= 100 * labs.MAX_DROP_FINE - 1.0, p1
    p2 = _report_text(out, "project_2_channels")
    assert float(re.search(r"([0-9.]+)x fewer \(target", p2).group(1)) >= 2.2, p2
    assert drop(p2) <= 100 * labs.MAX_DROP_CHANNELS - 1.0, p2
    p3 = _report_text(out, "project_3_llm")
    assert float(re.search(r"([0-9.]+)x \(target <= 2x\)", p3).group(1)) <= 0.9 * labs.MAX_PERPLEXITY_RATIO, p3


@pytest.mark.slow
def test_main_builds_only_what_is_asked(tmp_path):
    assert labs.main(["--out", str(tmp_path), "--only", "lab_01", "--release-only"]) == 0
    assert [p.name for p in (tmp_path / "release").iterdir()] == ["lab_01_sparsity"]
    assert not (tmp_path / "autograded").exists()


@pytest.mark.slow
def test_real_submissions_are_graded_and_a_broken_one_scores_zero(built):
    _, rows, _, _ = built
    students = {r["submission"]: r for r in rows if r["kind"] == "student"}
    assert set(students) == {"alice", "bob"}
    assert students["alice"]["score"] == 0 and "test_sparsity_checker" in students["alice"]["failed_tests"]
    assert students["bob"]["failed_tests"] == "autograde-failed" and "JSON" in students["bob"]["note"]
    assert students["bob"]["max_score"] == 5


def _plant(course, part, student, lab, text="{}"):
    path = course / part / student / lab / f"{lab}.ipynb"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_build_never_removes_course_state_and_refuses_it_without_the_flag(tmp_path, capsys):
    lab, other = labs.lab_names()[0], labs.lab_names()[1]
    course = tmp_path / "course"
    assert labs.main(["--out", str(course), "--only", lab, "--release-only"]) == 0
    planted = [_plant(course, part, "carol", lab) for part in ("submitted", "autograded", "feedback")]
    (course / "release" / other).mkdir(parents=True)
    (course / "release" / other / "kept.txt").write_text("another lab's release")
    assert labs.course_state(course) == ["submitted/carol", "autograded/carol", "feedback/carol"]
    assert labs.main(["--out", str(course), "--only", lab, "--release-only"]) == 2  # refused, with the reason
    err = capsys.readouterr().err
    assert "holds course state" in err and "--live-course" in err
    assert all(p.read_text() == "{}" for p in planted)
    (course / "nbgrader_config.py").write_text("# the instructor's own settings\n")
    assert labs.main(["--out", str(course), "--only", lab, "--release-only", "--live-course"]) == 0
    assert all(p.read_text() == "{}" for p in planted)  # nothing of carol's was touched
    assert (course / "release" / other / "kept.txt").is_file() and (course / "release" / lab).is_dir()
    assert (course / "nbgrader_config.py").read_text() == "# the instructor's own settings\n"


@pytest.mark.slow
def test_grading_the_courses_own_submitted_folder_after_collect(tmp_path):
    # README's flow: collect into the course's submitted/, then grade that folder; the reference must not clash
    lab = labs.lab_names()[0]
    course = tmp_path / "course"
    labs.build(course, only=[lab], samples=False)
    source = labs.SOURCE / lab / f"{lab}.ipynb"
    labs.fill_release(source, {"sparsity": "def sparsity(W):\n    return 0.0"}, course / "submitted" / "dave" / lab / source.name)
    with pytest.raises(ValueError, match="holds course state"):
        labs.build(course, only=[lab], samples=False, submitted=course / "submitted")
    rows = labs.build(course, only=[lab], samples=False, submitted=course / "submitted", live_course=True)
    assert {r["submission"] for r in rows} == {"reference", "dave"}
    assert (course / "submitted" / "dave" / lab / source.name).is_file() and (course / "gradebook.db").is_file()
    assert "gradebook.db (1 students: dave)" in labs.course_state(course)


def test_submissions_that_will_not_be_graded_are_listed_with_the_reason(tmp_path):
    lab, other = labs.lab_names()[0], labs.lab_names()[1]
    mine = tmp_path / "mine"
    for rel in (f"erin/{lab}/{lab}.ipynb", f"erin/{lab}/{lab}-Copy1.ipynb", f"{lab}/{lab}.ipynb", f"frank/{other}/{other}.ipynb",
                f"gina/{lab}/.ipynb_checkpoints/{lab}-checkpoint.ipynb", "hugo/lab_99/lab_99.ipynb"):
        (mine / rel).parent.mkdir(parents=True, exist_ok=True)
        (mine / rel).write_text("{}")
    found, ignored = labs.survey_submissions(mine, [lab])
    assert [p.relative_to(mine).as_posix() for p in found] == [f"erin/{lab}/{lab}.ipynb"]
    reasons = {p.relative_to(mine).as_posix(): why for p, why in ignored}
    assert "not " + f"{lab}.ipynb" in reasons[f"erin/{lab}/{lab}-Copy1.ipynb"]
    assert "folder levels" in reasons[f"{lab}/{lab}.ipynb"]
    assert "not chosen" in reasons[f"frank/{other}/{other}.ipynb"]
    assert "autosave" in reasons[f"gina/{lab}/.ipynb_checkpoints/{lab}-checkpoint.ipynb"]
    assert "is not a lab" in reasons["hugo/lab_99/lab_99.ipynb"]
