"""Data, models, training loops, metrics, records and the command line."""

import json
import os
import re
import subprocess
import sys

from pathlib import Path

import pytest
import torch
import yaml

from chapter11 import report
from chapter11.bench import compare, machine_info, time_callable
from chapter11.data import ByteTokenizer, digits, lm_batches, loaders, mnist1d, python_text, stdlib_docstrings
from chapter11.masks import apply_masks
from chapter11.models import LeNet300100, SmallCNN, TransformerClassifier, load_llama, load_minilm, tiny_llama
from chapter11.train import (
    accuracy, accuracy_loop, evaluate, expected_calibration_error, expected_calibration_error_loop,
    perplexity, reliability_data, seed_everything, train, train_lm,
)

ROOT = Path(__file__).resolve().parent.parent


def test_mnist1d_is_local_deterministic_and_sized():
    a, b = mnist1d(), mnist1d()
    assert a.X_train.shape == (4000, 40) and a.X_test.shape == (1000, 40) and a.num_classes == 10
    assert torch.equal(a.X_train, b.X_train)
    assert set(a.y_train.tolist()) == set(range(10))


def test_digits_shapes():
    split = digits()
    assert split.X_train.shape[1:] == (1, 8, 8) and len(split.y_train) + len(split.y_test) == 1797
    assert digits(flatten=True).X_train.shape[1] == 64


def test_stdlib_docstrings_real_labelled_text():
    texts, labels, names = stdlib_docstrings(max_per_class=50)
    assert len(names) == 9 and len(texts) == len(labels) <= 9 * 50
    assert all(len(t) >= 40 for t in texts)
    with pytest.raises(ValueError, match="packages"):
        stdlib_docstrings(packages=("no_such_package",))


def test_python_text_and_byte_tokenizer():
    text = python_text(max_chars=5000)
    assert len(text) == 5000
    tok = ByteTokenizer()
    assert tok.decode(tok.encode(text)) == text
    x, y = next(lm_batches(torch.tensor(tok.encode(text)), block_size=16, batch_size=4, num_batches=1))
    assert x.shape == y.shape == (4, 16) and torch.equal(x[:, 1:], y[:, :-1])


def test_loaders_give_torchs_shuffled_batches_bit_for_bit():
    """data.loaders indexes whole batches; the batches and their order must be the ones torch's DataLoader(shuffle=True) gives."""
    from torch.utils.data import DataLoader, TensorDataset

    split = mnist1d(num_samples=600, seed=1)
    for batch_size, seed in ((1, 0), (7, 3), (128, 101), (10_000, 5)):
        ours, test = loaders(split, batch_size=batch_size, seed=seed)
        torchs = DataLoader(TensorDataset(split.X_train, split.y_train), batch_size=batch_size, shuffle=True,
                            generator=torch.Generator().manual_seed(seed))
        assert len(ours) == len(torchs)
        for _ in range(3):  # a new order each epoch, drawn from the same generator in the same way
            got, want = list(ours), list(torchs)
            assert len(got) == len(want) and isinstance(got[0], list)
            for (x, y), (xt, yt) in zip(got, want):
                assert torch.equal(x, xt) and torch.equal(y, yt) and x.dtype == xt.dtype and y.dtype == yt.dtype
        in_order = DataLoader(TensorDataset(split.X_test, split.y_test), batch_size=512)
        assert all(torch.equal(x, xt) and torch.equal(y, yt) for (x, y), (xt, yt) in zip(test, in_order, strict=True))


@pytest.mark.parametrize(
    "model, x",
    [
        (LeNet300100(), torch.randn(3, 40)),
        (SmallCNN(dims=1), torch.randn(3, 40)),
        (SmallCNN(dims=2), torch.randn(3, 1, 8, 8)),
        (TransformerClassifier(patch_size=4, max_len=10), torch.randn(3, 40)),
    ],
)
def test_models_give_logits(model, x):
    assert model(x).shape == (3, 10)


def test_tiny_llama_and_local_checkpoint_round_trip(tmp_path):
    model = tiny_llama(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    ids = torch.randint(0, 256, (1, 6))
    model.save_pretrained(tmp_path / "llama")
    loaded, tokenizer = load_llama(tmp_path / "llama")
    assert tokenizer is None and torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-6)


def test_missing_checkpoints_raise_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="path"):
        load_llama(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="path"):
        load_minilm(tmp_path)


def test_minilm_loads_offline_as_pretrained_bert():
    model, tokenizer = load_minilm()
    assert model.config.num_hidden_layers == 6 and model.config.num_attention_heads == 12
    batch = tokenizer(["a pruned network"], return_tensors="pt")
    with torch.no_grad():
        out = model(**batch).last_hidden_state
    assert out.shape[-1] == 384 and torch.isfinite(out).all()


def test_train_learns_and_keeps_masks():
    seed_everything(0)
    split = mnist1d()
    train_loader, test_loader = loaders(split, batch_size=128)
    model = LeNet300100()
    mask = (torch.rand(300, 40) < 0.5).float()
    apply_masks(model, {"fc1.weight": mask})
    before = evaluate(model, test_loader)["accuracy"]
    history = train(model, train_loader, epochs=3, lr=2e-3, eval_loader=test_loader, progress_bar=False)
    assert history.test_accuracy[-1] > before + 0.1
    assert history.losses[-1] < history.losses[0]
    assert (model.fc1.weight[mask == 0] == 0).all()
    h = train(model, train_loader, max_steps=5, progress_bar=False, callback=lambda step, *a: None)
    assert len(h.losses) == 5


def test_accuracy_and_ece_loops_agree_with_vectorised():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 5, generator=g)
    labels = torch.randint(0, 5, (200,), generator=g)
    assert accuracy_loop(logits, labels) == pytest.approx(accuracy(logits, labels))
    probs = logits.softmax(-1)
    for bins in (1, 5, 15):
        assert expected_calibration_error_loop(probs, labels, bins) == pytest.approx(expected_calibration_error(probs, labels, bins), abs=1e-6)
    data = reliability_data(probs, labels, 10)
    assert int(data["count"].sum()) == 200


def test_ece_is_zero_for_perfect_calibration():
    probs = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert expected_calibration_error(probs, torch.tensor([0, 1])) == 0.0


def test_train_lm_lowers_perplexity():
    seed_everything(0)
    tokens = torch.tensor(ByteTokenizer().encode(python_text(max_chars=20000)))
    model = tiny_llama(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    before = perplexity(model, tokens[:4000], block_size=32)
    train_lm(model, tokens, steps=30, block_size=32, batch_size=8, lr=1e-2, progress_bar=False)
    after = perplexity(model, tokens[:4000], block_size=32)
    assert after < before * 0.7 and 1 < after < 256


def test_record_writes_json_atomically(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    monkeypatch.setenv(report.RECORD_ENV, str(path))
    report.record("acc", torch.tensor(0.5))
    assert json.loads(path.read_text())["acc"]["value"] == 0.5
    with pytest.raises(ValueError, match="finite"):
        report.record("bad", float("nan"))
    assert not list(tmp_path.glob(".*.tmp"))


def test_bench_harness_medians_and_ratios():
    info = machine_info()
    assert info["cores"] >= 1 and "torch" in info
    assert info["cpu_kernels"] in {"DEFAULT", "NO AVX", "VSX", "Z VECTOR", "SVE256", "AVX2", "AVX512"}, info["cpu_kernels"]
    assert time_callable(lambda: None, repeats=3, warmup=0)["median_s"] >= 0
    result = compare({"a": lambda: sum(range(1000)), "b": lambda: sum(range(100))}, repeats=5, warmup=1)
    assert result["ratio"]["a"] == 1.0 and set(result["median_s"]) == {"a", "b"}
    calls = []
    blocked = compare({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=5, warmup=0, block=3)
    assert all(len(t) == 6 for t in blocked["times"].values())  # ceil(5 / 3) = 2 rounds of 3 timed calls
    assert calls == ["a"] * 4 + ["b"] * 4 + ["b"] * 4 + ["a"] * 4  # one untimed call per block, order rotates
    with pytest.raises(ValueError, match="block"):
        compare({"a": lambda: None}, block=0)
    # CPU clock: a sleeping candidate costs (almost) no CPU time, a busy one does
    import time

    def busy():
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 0.005:
            pass

    cpu = compare({"busy": busy, "sleep": lambda: time.sleep(0.005)}, repeats=3, warmup=0, clock="cpu")
    assert cpu["ratio"]["sleep"] < 0.5 and cpu["median_s"]["sleep"] < 0.004  # the wall clock would give both >= 5 ms
    with pytest.raises(ValueError, match="clock must be"):
        compare({"a": lambda: None}, clock="gpu")


def test_recorded_runs_say_where_each_file_came_from(tmp_path):
    from chapter11.bench import recorded_runs

    cpu, gpu = recorded_runs("cpu"), recorded_runs("gpu")
    assert cpu and gpu and not {r["file"] for r in cpu} & {r["file"] for r in gpu}
    for r in cpu + gpu:
        assert r["date"] and r["by"] and r["device"] and r["what"] and r["data"]
    assert len(recorded_runs()) == len(cpu) + len(gpu)
    with pytest.raises(ValueError, match="kind must be"):
        recorded_runs("tpu")
    (tmp_path / "provenance.json").write_text(json.dumps({"gone.json": {"kind": "cpu", "date": "d", "by": "b", "device": "x", "what": "w"}}))
    with pytest.raises(FileNotFoundError, match="gone.json"):
        recorded_runs(folder=tmp_path)


def test_bench_harness_imports_only_the_core():
    # the drivers import the harness; importing it loads no method, driver or command-line module
    code = "import sys, chapter11.bench; print(sorted(m for m in sys.modules if m.startswith('chapter11.')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert set(eval(out)) <= {"chapter11", "chapter11.bench", "chapter11.report"}, out


def test_old_bench_entry_point_says_where_the_drivers_are():
    done = subprocess.run([sys.executable, "-m", "chapter11.bench", "sparse"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "python -m chapter11 bench sparse" in done.stderr


def test_bench_command_line_dispatch(capsys):
    from chapter11.experiments.benchmarks import BENCHMARKS, bench_main

    assert set(BENCHMARKS) == {"masks", "sparse", "structured", "semi", "oneshot"}
    assert bench_main([]) == 2 and "usage: python -m chapter11 bench NAME" in capsys.readouterr().err
    assert bench_main(["--help"]) == 0 and "semi" in capsys.readouterr().out
    assert bench_main(["nope"]) == 2 and "no benchmark named 'nope'" in capsys.readouterr().err
    for module, function, _ in BENCHMARKS.values():  # every entry points at a real function
        assert callable(getattr(__import__(module, fromlist=[function]), function))


def test_bench_command_line_restarts_with_quiet_pools(tmp_path):
    # (tests/test_csr.py checks the same for the sparse benchmark)
    entry = ["-m", "chapter11", "bench"]
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_THREAD_TIMEOUT", "CUDA_VISIBLE_DEVICES")}
    env["CUDA_VISIBLE_DEVICES"] = ""  # the semi benchmark then only says why it skipped: a fast, GPU-free run
    out = tmp_path / "semi.json"
    done = subprocess.run([sys.executable, *entry, "semi", "--json", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "skipped the 2:4 GPU benchmark" in done.stdout
    assert "OPENBLAS_THREAD_TIMEOUT=4" in json.loads(out.read_text())["machine"]["thread_env"]  # restarted with the setting
    env["OPENBLAS_THREAD_TIMEOUT"] = "7"  # a user's own choice is kept
    subprocess.run([sys.executable, *entry, "semi", "--json", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=True)
    assert "OPENBLAS_THREAD_TIMEOUT=7" in json.loads(out.read_text())["machine"]["thread_env"]


def test_bench_masks_command_writes_json(tmp_path):
    from chapter11.experiments.benchmarks import masks_main

    out = tmp_path / "masks.json"
    assert masks_main(["--steps", "1", "--sizes", "32,64,10", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert {"dense_s", "chapter11_ratio", "checked_multiply_ratio", "torch_prune_ratio", "floor_ratio", "machine"} <= set(data) and data["chapter11_ratio"] > 0 < data["floor_ratio"]


def test_cli_lists_experiments():
    out = subprocess.run([sys.executable, "-m", "chapter11", "list"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "00_sparsity_and_masks" in out and "Sparsity and masks" in out


def test_cli_rejects_unknown_experiment():
    proc = subprocess.run([sys.executable, "-m", "chapter11", "run", "--only", "no_such"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0 and "--only" in proc.stderr


def _names(requirements):
    return {re.split(r"[<>=!~\[ ]", r.strip(), maxsplit=1)[0].lower().replace("_", "-") for r in requirements}


def test_environment_yml_lists_the_same_packages_as_pyproject():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = _names(project["dependencies"] + project["optional-dependencies"]["dev"])
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    listed = _names(p for p in pip if not p.startswith("-e"))
    assert listed == wanted, (listed ^ wanted)


def test_cli_labs_reaches_the_lab_builder():
    proc = subprocess.run([sys.executable, "-m", "chapter11", "labs", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0 and "--release-only" in proc.stdout, proc.stderr


def test_first_sentence_joins_wrapped_lines_and_skips_headings():
    from chapter11.__main__ import first_sentence

    text = "# Title\n\n$$s = 1$$\n\nMovement asks how a weight\nmoves (Sanh et al., 2020). More here."
    assert first_sentence(text) == "Movement asks how a weight moves (Sanh et al., 2020)."
    assert first_sentence("# Only a title") == ""


def test_seed_offset_shifts_every_seed_and_refuses_bad_values(monkeypatch):
    from chapter11.train import offset_seeds, seed_offset, seeds_line

    monkeypatch.delenv("CH11_SEED_OFFSET", raising=False)
    assert seed_offset() == 0 and offset_seeds([0, 1, 2]) == [0, 1, 2]
    monkeypatch.setenv("CH11_SEED_OFFSET", "1000")
    assert seed_offset() == 1000 and offset_seeds([0, 1, 2]) == [1000, 1001, 1002]
    assert seeds_line(offset_seeds([0, 1])) == "seeds [1000, 1001] (CH11_SEED_OFFSET=1000)"
    for bad in ("-1", "1.5", "abc"):
        monkeypatch.setenv("CH11_SEED_OFFSET", bad)
        with pytest.raises(ValueError, match="CH11_SEED_OFFSET"):
            seed_offset()
    with pytest.raises(TypeError, match="seeds"):
        offset_seeds([0, 1.5], offset=0)


def test_seeds_line_is_sanitised_for_nbval():
    import configparser
    import re
    from pathlib import Path

    from chapter11.train import seeds_line

    cfg = configparser.ConfigParser()
    cfg.read(Path(__file__).with_name("nbval_sanitize.cfg"))
    pattern = cfg["seed-offset"]["regex"]
    assert re.sub(pattern, "SEEDS", seeds_line([0, 1, 2], offset=0)) == re.sub(pattern, "SEEDS", seeds_line([1000, 1001, 1002], offset=1000)) == "SEEDS"


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() not in {"AVX2", "AVX512"}, reason="needs an x86-64 CPU with AVX2")
def test_machine_info_names_the_kernels_torch_dispatches_to():
    """The re-draw pass lowers the kernels with ATEN_CPU_CAPABILITY=avx2; a record made that way must say so."""
    code = "from chapter11.report import machine_info; m = machine_info(); print(m['cpu_kernels']); print(m['thread_env'])"
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    kernels, thread_env = out.strip().splitlines()
    assert kernels == "AVX2"
    assert "MKL_ENABLE_INSTRUCTIONS=AVX2" in thread_env and "ONEDNN_MAX_CPU_ISA=AVX2" in thread_env
