"""The explorers of notebooks 01-09, driven from code: knobs move, the text follows the records, bad knobs are named.

The browser test (`tests/test_browser_explorers.py`) moves the same knobs by
hand in JupyterLab; these tests run everywhere, with or without a browser.
"""

import json
import sys
import time
from pathlib import Path

import matplotlib
import pytest
import torch

matplotlib.use("Agg")

from chapter11.csr import storage_bytes, to_dense  # noqa: E402
from chapter11.experiments import explorers as E  # noqa: E402
from chapter11.models import LeNet300100  # noqa: E402
from chapter11.plots import Explorer  # noqa: E402
from chapter11.stats import summarize  # noqa: E402

FULL = Path(__file__).resolve().parent.parent / "benchmarks" / "full"


def _record(name):
    return json.loads((FULL / f"{name}.json").read_text())


def test_lottery_explorer_reads_the_recorded_seeds():
    acc = _record("02_lottery_mlp_seeds")["results"]["accuracy"]
    e = E.lottery_explorer()
    for i, density in enumerate(acc["density"]):
        text = e.set(remaining_pct=round(100 * density, 1))
        assert f"ticket {summarize(acc['ticket'][i]).mean:.3f}" in text
        assert f"random_mask {summarize(acc['random_mask'][i]).mean:.3f}" in text


def test_movement_explorer_lists_every_recorded_seed():
    runs = _record("03_movement_vs_magnitude")["results"]["runs"]
    e = E.movement_explorer()
    for method in ("magnitude", "hard", "soft", "mixed"):
        text = e.set(criterion=method, sparsity=0.5)
        seeds = {r["seed"]: r["test"] for r in runs if r["method"] == method and abs(r["target"] - 0.5) < 1e-6}
        assert len(seeds) == 3
        assert all(f"{seed}: {v:.3f}" in text for seed, v in seeds.items()), text
    assert ("soft - magnitude" in e.set(criterion="soft")) and ("- magnitude" not in e.set(criterion="magnitude"))


def test_structured_llm_explorer_gives_each_cut_its_numbers():
    from chapter11.stats import summarize

    res = _record("04_llm_structured")["results"]
    e = E.structured_llm_explorer()
    assert sorted(e.controls["cut"]) == sorted(res["cuts"])  # every recorded cut is reachable
    for cut, c in res["cuts"].items():
        text = e.set(cut=cut)
        assert text.startswith(f"{cut}: {c['removed_params'] / 1e6:.2f} M parameters removed"), text
        assert f"{summarize(c['ppl_after']):.2f} after" in text and f"{summarize(c['ppl_before']):.2f} before" in text, text
        assert f"measured {res['speed']['prefill']['speedup'][cut]['median']:.2f}x" in text, text
        assert f"predicted {c['predicted_decode']:.2f}x, measured {res['speed']['decode']['speedup'][cut]['median']:.2f}x" in text


def test_dynamic_explorer_and_a_combination_not_recorded():
    res = _record("06_dynamic_sparsity")["results"]
    e = E.dynamic_explorer()
    text = e.set(method="rigl", sparsity=0.9, budget="MLP, 10 epochs")
    assert f"accuracy {summarize(res['MLP']['10']['0.9/rigl']['accuracy']).mean:.3f}" in text and "minus dense" in text
    assert "not recorded" in e.set(budget="CNN, 6 epochs", sparsity=0.95)


def test_oneshot_explorer_and_its_paired_difference():
    res = _record("09_llm_one_shot_pruning")["results"]
    e = E.oneshot_explorer()
    text = e.set(method="sparsegpt", pattern="2:4")
    assert all(f"{v:.2f}" in text for v in res["perplexity"]["sparsegpt 2:4"]) and "sparsegpt - wanda" in text
    assert "magnitude 70%" in e.set(method="magnitude", pattern="70%")


def test_csr_explorer_arrays_rebuild_the_matrix():
    e = E.csr_explorer()
    counts = []
    for s in e.controls["sparsity"]:
        text = e.set(sparsity=s)
        lines = dict(line.split(None, 1) for line in text.splitlines()[1:4])
        data, indices, indptr = (json.loads(lines[k]) for k in ("data", "indices", "indptr"))
        assert len(data) == len(indices) == indptr[-1] == round((1 - s) * 48)
        dense = E._csr_matrix(0)
        cut = dense.clone()
        order = dense.abs().flatten().argsort(stable=True)[: round(s * 48)]
        cut.view(-1)[order] = 0
        from chapter11.csr import CSR
        import numpy as np

        rebuilt = to_dense(CSR(np.array(data, np.float32), np.array(indices), np.array(indptr), (6, 8)))
        assert torch.allclose(rebuilt, cut, atol=0.051)
        assert f"CSR with int32 indices {storage_bytes(cut, index_dtype='int32')['csr']}" in text
        counts.append(len(data))
    assert counts == sorted(counts, reverse=True)


def test_schedules_explorer_on_a_small_sweep():
    sweeps = {seed: [{"method": m, "target": t, "test": 0.5 + 0.1 * seed - t / 10 + (0.05 if m == "cubic" else 0)}
                     for m in ("one-shot", "iterative", "cubic", "random") for t in (0.5, 0.9)]
              + [{"method": "dense", "target": 0.0, "after": {"test": 0.7}}] for seed in (0, 1, 2)}
    e = E.schedules_explorer(sweeps, model=LeNet300100(in_features=40))
    text = e.set(sparsity=0.9, schedule="cubic")
    assert text.startswith("cubic at 90%: test accuracy 0.560 ± 0.100 over 3 seeds; one-shot 0.510 ± 0.100; dense 0.700")
    assert "cubic - one-shot +0.050 [+0.050, +0.050]" in text
    assert e.figure is not None and len(e.figure.axes) == 2


def test_onnx_and_channels_explorers_on_small_results():
    acc = {"dense": [0.6, 0.62], "unstructured 0.5": [0.6, 0.61], "unstructured 0.9": [0.5, 0.52]}
    e = E.onnx_explorer(acc, {0.5: 9e6, 0.9: 2e6}, 17_200_000, {("sparse op 0.5", 1): 0.1, ("sparse op 0.9", 1): 0.4,
                                                                   ("sparse op 0.9", 64): 0.05})
    assert "0.510 ± 0.014" in e.set(sparsity=0.9) and "2.00 MB as sparse initializers" in e.text and "0.40x dense" in e.text
    assert "not timed" in e.set(sparsity=0.5, batch=64)
    stages = {(st, c, a): [0.3 + 0.1 * k + a / 10, 0.31 + 0.1 * k + a / 10] for k, st in enumerate(("removed", "recalibrated", "fine-tuned"))
              for c in ("l1", "random") for a in (0.25, 0.5)}
    c = E.channels_explorer(stages, dense_val=[0.9, 0.91])
    assert c.set(criterion="random", removed=0.25) == ("random, 25% removed: removed 0.330 ± 0.007; recalibrated 0.430 ± 0.007; "
                                                       "fine-tuned 0.530 ± 0.007")


def test_a_bad_knob_is_named():
    e = E.csr_explorer()
    with pytest.raises(ValueError, match="sparsity: 0.3 is not one of"):
        e.set(sparsity=0.3)
    with pytest.raises(ValueError, match="density: unknown control"):
        e.set(density=0.5)
    with pytest.raises(ValueError, match="controls"):
        Explorer(lambda: (None, ""), {})


def test_widget_knobs_and_set_move_together():
    pytest.importorskip("ipywidgets")
    e = E.oneshot_explorer()
    box = e.widget()
    knobs = {k.description: k for k in box.children if hasattr(k, "description") and k.description}
    assert set(knobs) == {"method", "pattern"}
    knobs["pattern"].value = "2:4"  # what a click does
    assert e.values["pattern"] == "2:4" and e.text.startswith("wanda 2:4")
    e.set(method="sparsegpt")
    assert knobs["method"].value == "sparsegpt" and e.text.startswith("sparsegpt 2:4")
    area = box.children[-1].outputs  # what the page shows under the knobs: the figure, then the text
    assert [o["output_type"] for o in area] == ["display_data", "stream"] and area[1]["text"] == e.text + "\n"
    assert area[0]["data"]["image/png"].startswith("iVBOR")  # a PNG, base64


def test_without_ipywidgets_or_a_front_end_it_is_static(monkeypatch, capsys):
    e = E.csr_explorer()
    e._ipython_display_()  # pytest is no Jupyter kernel
    out = capsys.readouterr().out
    assert out.startswith("no Jupyter front end: the figure for sparsity=0.5") and "nnz 24" in out
    monkeypatch.setitem(sys.modules, "ipywidgets", None)
    assert e.widget() is None
    monkeypatch.setattr("chapter11.plots._in_kernel", lambda: True)
    e._ipython_display_()
    assert capsys.readouterr().out.startswith("ipywidgets is not installed: the figure for sparsity=0.5")


@pytest.mark.parametrize("make", [E.lottery_explorer, E.movement_explorer, E.structured_llm_explorer, E.dynamic_explorer,
                                  E.csr_explorer, E.oneshot_explorer])
def test_every_answer_comes_within_a_second(make):
    e = make()
    name, options = max(e.controls.items(), key=lambda kv: len(kv[1]))
    cpu = []
    for value in options[:4]:
        start = time.process_time()
        e.set(**{name: value})
        cpu.append(time.process_time() - start)
    assert sorted(cpu)[len(cpu) // 2] < 1.0, cpu  # median CPU seconds per redraw, figure included


EXPLORER_OF = {"01": "schedules_explorer", "02": "lottery_explorer", "03": "movement_explorer", "04": "structured_llm_explorer",
               "05": "onnx_explorer", "06": "dynamic_explorer", "07": "channels_explorer", "08": "csr_explorer", "09": "oneshot_explorer"}


@pytest.mark.parametrize("number", sorted(EXPLORER_OF))
def test_every_experiment_notebook_shows_its_explorer_and_drives_it(number):
    """Issue 29's rule: each of 01-09 shows its explorer after its main result, and the next cell moves its knobs from code.

    nbval runs that driving cell in the kernel; its text is compared (recorded explorers) or asserted against the
    notebook's own numbers (live ones), so a broken explorer fails the notebook.
    """
    (path,) = (Path(__file__).resolve().parent.parent / "notebooks").glob(f"{number}_*.ipynb")
    cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    sources = ["".join(c["source"]) for c in cells]
    shown = [i for i, s in enumerate(sources) if f"import {EXPLORER_OF[number]}" in s]
    assert len(shown) == 1, f"{path.name}: expected one cell that imports {EXPLORER_OF[number]}, found {len(shown)}"
    view = sources[shown[0]].strip().splitlines()[-1].strip()  # the cell ends by displaying the explorer
    assert view.isidentifier(), f"{path.name}: the explorer cell should end with the explorer's name, got {view!r}"
    driving = sources[shown[0] + 1]
    assert f"{view}.set(" in driving and "print(" in driving, f"{path.name}: the cell after the explorer should move it with {view}.set(...)"
    assert shown[0] > 0, f"{path.name}: the explorer should follow a result, not open the notebook"
