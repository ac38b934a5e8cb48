"""Seed statistics (chapter11.stats), the band plot, and the device choice."""

import math

import numpy as np
import pytest
import torch

from chapter11 import plots
from chapter11.stats import Summary, difference, over_seeds, separated, summarize, summarize_loop, t_critical
from chapter11.train import DEVICE_ENV, default_device, model_device


@pytest.mark.parametrize("values", [[0.5], [1.0, 2.0], [0.61, 0.58, 0.64, 0.6], list(np.linspace(-3, 7, 11))])
def test_summarize_twins_agree_and_match_numpy_scipy(values):
    a, b = summarize_loop(values), summarize(values)
    for field in ("mean", "sd", "low", "high"):
        assert math.isclose(getattr(a, field), getattr(b, field), rel_tol=1e-12, abs_tol=1e-12)
    assert math.isclose(b.mean, float(np.mean(values)))
    if len(values) > 1:
        from scipy import stats as st

        low, high = st.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=st.sem(values))
        assert math.isclose(b.sd, float(np.std(values, ddof=1)))
        assert math.isclose(b.low, low) and math.isclose(b.high, high)
    else:
        assert b.sd == 0 and b.low == b.high == b.mean


def test_hand_computed_case():
    s = summarize([1.0, 2.0, 3.0])
    # sd = 1, half width = t(0.975, 2) / sqrt(3) = 4.3027 / 1.7321 = 2.4841
    assert s.sd == 1.0 and round(s.half_width, 4) == 2.4841 and s.n == 3
    assert f"{s:.1f}" == "2.0 ± 1.0" and str(s) == "2.000 ± 1.000"
    assert round(t_critical(2), 3) == 4.303


@pytest.mark.parametrize("bad, error", [([], ValueError), ([1.0, float("nan")], ValueError), (["a"], TypeError), ([True], TypeError)])
def test_summarize_refuses_bad_values(bad, error):
    with pytest.raises(error, match="values"):
        summarize(bad)
    with pytest.raises(error, match="values"):
        summarize_loop(bad)


def test_t_critical_checks_arguments():
    with pytest.raises(ValueError, match="df"):
        t_critical(0)
    with pytest.raises(ValueError, match="confidence"):
        t_critical(3, confidence=1.5)


def test_over_seeds_numbers_and_dicts():
    s = over_seeds(lambda seed: float(seed), [1, 2, 3], progress_bar=False)
    assert isinstance(s, Summary) and s.values == (1.0, 2.0, 3.0)
    d = over_seeds(lambda seed: {"a": seed, "b": 2 * seed}, [0, 1], progress_bar=False)
    assert d["b"].values == (0.0, 2.0)
    with pytest.raises(ValueError, match="keys"):
        over_seeds(lambda seed: {"a": 1} if seed else {"b": 1}, [0, 1], progress_bar=False)
    with pytest.raises(ValueError, match="seeds"):
        over_seeds(lambda seed: 1.0, [], progress_bar=False)
    with pytest.raises(ValueError, match="distinct"):
        over_seeds(lambda seed: 1.0, [1, 1], progress_bar=False)


def test_difference_is_paired_and_separated_needs_the_interval_off_zero():
    a, b = [0.70, 0.60, 0.80], [0.68, 0.58, 0.78]  # large spread, constant paired gap
    assert separated(a, b)  # paired: the gap of 0.02 is the same on every seed
    assert not separated([0.7, 0.6, 0.8], [0.6, 0.8, 0.7])
    assert not separated([0.7], [0.6])  # one seed proves nothing
    assert round(difference(summarize(a), summarize(b)).mean, 6) == 0.02
    with pytest.raises(ValueError, match="paired"):
        difference([1.0, 2.0], [1.0])


def test_curves_with_bands_draws_mean_and_band():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s1, s2 = summarize([0.5, 0.6, 0.7]), summarize([0.4, 0.45, 0.5])
    ax = plots.curves_with_bands({"magnitude": ([10, 50], [s1, s2])}, reference=summarize([0.8, 0.82]), logx=True)
    line = ax.get_lines()[0]
    assert list(line.get_ydata()) == pytest.approx([0.6, 0.45])
    assert ax.get_xscale() == "log" and "n=3" in ax.get_legend().get_texts()[0].get_text()
    with pytest.raises(ValueError, match="summaries"):
        plots.curves_with_bands({"x": ([1, 2], [s1])})
    with pytest.raises(ValueError, match="band"):
        plots.curves_with_bands({"x": ([1], [s1])}, band="iqr")
    plt.close("all")


def test_default_device_honours_the_environment(monkeypatch):
    monkeypatch.setenv(DEVICE_ENV, "cpu")
    assert default_device() == torch.device("cpu")
    monkeypatch.setenv(DEVICE_ENV, "tpu")
    with pytest.raises(ValueError, match=DEVICE_ENV):
        default_device()
    monkeypatch.delenv(DEVICE_ENV)
    assert default_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        monkeypatch.setenv(DEVICE_ENV, "cuda")
        with pytest.raises(RuntimeError, match="no CUDA device"):
            default_device()


def test_model_device():
    assert model_device(torch.nn.Linear(2, 2)) == torch.device("cpu")
    assert model_device(torch.nn.ReLU()) == torch.device("cpu")


def test_fit_stops_early_and_restores_the_best_epoch():
    from chapter11.data import loaders, mnist1d, validation_loader, with_validation
    from chapter11.models import LeNet300100
    from chapter11.train import evaluate, fit, seed_everything

    seed_everything(0)
    split = with_validation(mnist1d(num_samples=1000), 0.2)
    train_loader, _ = loaders(split, batch_size=64)
    model = LeNet300100()
    result = fit(model, train_loader, validation_loader(split), max_epochs=40, patience=2, lr=3e-3, progress_bar=False)
    assert result.epochs_run < 40 and result.epochs_run - result.best_epoch == 2  # stopped by patience
    assert result.best_val_accuracy == max(result.val_accuracy)
    assert evaluate(model, validation_loader(split))["accuracy"] == result.best_val_accuracy  # best weights restored
    with pytest.raises(ValueError, match="patience"):
        fit(model, train_loader, validation_loader(split), patience=0)


def test_prediction_interval_twins_agree_and_widen_with_more_checks():
    from chapter11.stats import prediction_interval, prediction_interval_loop

    recorded = [0.34, 0.36, 0.40, 0.37, 0.33, 0.35, 0.34, 0.35, 0.30, 0.34, 0.36, 0.35]
    for m, checks in ((1, 1), (3, 8), (5, 24)):
        a, b = prediction_interval_loop(recorded, m, checks), prediction_interval(recorded, m, checks)
        assert a == pytest.approx(b, abs=1e-12)
    one = prediction_interval(recorded, m=3, checks=1)
    many = prediction_interval(recorded, m=3, checks=8)
    assert many[0] < one[0] < one[1] < many[1]  # a Bonferroni correction widens each interval
    assert prediction_interval(recorded, m=12)[1] - prediction_interval(recorded, m=12)[0] < one[1] - one[0] + 1e-9
    with pytest.raises(ValueError, match="at least 2 values"):
        prediction_interval([0.3])
    with pytest.raises(ValueError, match="checks must be a positive int"):
        prediction_interval(recorded, checks=0)
