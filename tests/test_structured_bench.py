"""The structured benchmark runs end to end at a tiny size and writes well-formed rows."""

import json

import pytest

from chapter11.experiments.benchmarks import structured_main, structured_benchmark

KEYS = {"model", "batch", "dense_s", "pruned_s", "measured_speedup", "predicted_speedup"}


@pytest.mark.slow
def test_benchmark_main_writes_json_rows(tmp_path, capsys):
    path = tmp_path / "structured.json"
    assert structured_main(["--json", str(path), "--batches", "1", "--repeats", "1", "--image-size", "32"]) == 0
    rows = json.loads(path.read_text())
    models = {r["model"] for r in rows}
    assert {"smallcnn_50pct_channels", "resnet18_50pct_inner_channels"} <= models
    for r in rows:
        assert set(r) == KEYS and r["batch"] == 1
        assert r["dense_s"] > 0 and r["pruned_s"] > 0
        assert r["measured_speedup"] == pytest.approx(r["dense_s"] / r["pruned_s"])
        assert r["predicted_speedup"] > 1.2  # half the channels (or heads) really are gone
    assert "predicted" in capsys.readouterr().out


def test_structured_benchmark_rejects_bad_arguments():
    with pytest.raises(ValueError, match="amount must be in"):
        structured_benchmark(amount=1.0)
    with pytest.raises(ValueError, match="batches must be positive"):
        structured_benchmark(batches=[0])


@pytest.mark.parametrize("argv", [["structured", "--help"]])
def test_the_command_line_reaches_structured_main(argv, capsys):
    # `python -m chapter11 bench structured` hands over to chapter11.experiments.benchmarks.structured_main.
    from chapter11.__main__ import main as package_main

    for entry in (lambda a: package_main(["bench", *a]), structured_main):
        with pytest.raises(SystemExit) as exit_info:  # argparse's --help exits 0 after printing
            entry(argv)
        assert exit_info.value.code == 0
        assert "--amount" in capsys.readouterr().out
