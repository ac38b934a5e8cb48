"""Seeds, means and spreads: how the notebooks tell a finding from noise.

- `summarize_loop` / `summarize`: mean, sample standard deviation and a 95%
  confidence interval for the mean (Student's t, n - 1 degrees of freedom).
- `over_seeds(fn, seeds)`: run `fn(seed)` once per seed and summarise what it
  returns (a number, or a dict of numbers summarised key by key).
- `difference(a, b)`: paired difference of two methods run on the same seeds,
  with its interval; `separated(a, b)` says whether that interval excludes 0,
  and `verdict(d, positive, negative)` puts the answer in words.
- `prediction_interval_loop` / `prediction_interval`: where the mean of `m`
  new seeds should land, given a recorded run of n seeds, with a Bonferroni
  correction when several such checks are made at once: how a notebook's
  few live seeds are checked against its recorded run on any CPU.

The rule the notebooks follow: a difference whose 95% interval contains zero
is reported as "no difference at this budget", never as a finding.

But: no multiple-comparison correction for the intervals (only for the
prediction checks) and no bootstrap; with 3-5 seeds the
t interval is wide on purpose, and that is the honest answer.

    >>> s = summarize([0.5, 0.6, 0.7])
    >>> round(s.mean, 3), round(s.sd, 3), s.n
    (0.6, 0.1, 3)
    >>> f"{s:.2f}"
    '0.60 ± 0.10'
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

__all__ = ["Summary", "summarize_loop", "summarize", "t_critical", "over_seeds", "difference", "separated",
           "verdict", "NO_DIFFERENCE", "prediction_interval_loop", "prediction_interval"]

NO_DIFFERENCE = "no difference at this budget"  # what a difference whose interval holds 0 is called


@dataclass(frozen=True)
class Summary:
    """Mean ± sd of `n` values, with the 95% interval `(low, high)` for the mean."""

    values: tuple[float, ...]
    mean: float
    sd: float
    low: float
    high: float

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def half_width(self) -> float:
        """Half the width of the 95% interval (0 for a single value)."""
        return (self.high - self.low) / 2

    def __format__(self, spec: str) -> str:
        spec = spec or ".3f"
        return f"{self.mean:{spec}} ± {self.sd:{spec}}"

    def __str__(self) -> str:
        return format(self)


def t_critical(df: int, confidence: float = 0.95) -> float:
    """Two-sided Student-t quantile: 4.303 for df=2, 2.776 for df=4.

    >>> round(t_critical(2), 3), round(t_critical(4), 3)
    (4.303, 2.776)
    """
    if not isinstance(df, int) or df < 1:
        raise ValueError(f"df must be an integer >= 1, got {df!r}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence!r}")
    from scipy.stats import t

    return float(t.ppf(0.5 + confidence / 2, df))


def _check_confidence(confidence) -> None:
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0 < confidence < 1:
        raise ValueError(f"confidence must be a number in (0, 1), e.g. 0.95, got {confidence!r}")


def _floats(values: Iterable, name: str = "values") -> list[float]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise TypeError(f"{name} must be a sequence of numbers, got {type(values).__name__}")
    out = []
    for v in values:
        if hasattr(v, "item") and callable(v.item):
            v = v.item()
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{name} must hold numbers, got {type(v).__name__}")
        if not math.isfinite(v):
            raise ValueError(f"{name} must be finite, got {v!r}")
        out.append(float(v))
    if not out:
        raise ValueError(f"{name} is empty: need at least one value")
    if not math.isfinite(math.fsum(x * x for x in out)):  # else the mean or the sd overflows to inf
        raise ValueError(f"{name} are too large to average and square in float64 (largest magnitude {max(map(abs, out)):.3g})")
    return out


def summarize_loop(values: Iterable[float], confidence: float = 0.95) -> Summary:
    """mean = sum(x)/n, sd = sqrt(sum((x - mean)^2) / (n - 1)), interval mean ± t * sd / sqrt(n).

    With one value the sd is 0 and the interval collapses to that value.

    >>> summarize_loop([1.0, 2.0, 3.0]).sd
    1.0
    """
    xs = _floats(values)
    _check_confidence(confidence)
    n = len(xs)
    total = 0.0
    for x in xs:
        total += x
    mean = total / n
    if n == 1:
        return Summary(tuple(xs), mean, 0.0, mean, mean)
    squares = 0.0
    for x in xs:
        squares += (x - mean) ** 2
    sd = math.sqrt(squares / (n - 1))
    half = t_critical(n - 1, confidence) * sd / math.sqrt(n)
    return Summary(tuple(xs), mean, sd, mean - half, mean + half)


def summarize(values: Iterable[float], confidence: float = 0.95) -> Summary:
    """Vectorised `summarize_loop` (numpy).

    >>> s = summarize([1.0, 2.0, 3.0])
    >>> round(s.low, 3), round(s.high, 3)
    (-0.484, 4.484)
    """
    import numpy as np

    xs = np.asarray(_floats(values), dtype=np.float64)
    _check_confidence(confidence)
    mean = float(xs.mean())
    if xs.size == 1:
        return Summary((mean,), mean, 0.0, mean, mean)
    sd = float(xs.std(ddof=1))
    half = t_critical(int(xs.size) - 1, confidence) * sd / math.sqrt(xs.size)
    return Summary(tuple(xs.tolist()), mean, sd, mean - half, mean + half)


def over_seeds(fn: Callable[[int], object], seeds: Sequence[int], progress_bar: bool | None = None, desc: str = "seeds"):
    """Run `fn(seed)` for every seed and summarise.

    `fn` returns a number (you get one `Summary`) or a mapping of numbers (you
    get {key: Summary}, every seed must return the same keys).

    >>> over_seeds(lambda seed: {"acc": 0.5 + seed / 10}, [0, 1, 2])["acc"].mean
    0.6
    """
    from .train import progress

    seeds = list(seeds)
    if not seeds:
        raise ValueError("seeds is empty: need at least one seed")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct, got {seeds}")
    results = [fn(seed) for seed in progress(seeds, desc=desc, enabled=progress_bar)]
    if all(isinstance(r, Mapping) for r in results):
        keys = list(results[0])
        for seed, r in zip(seeds, results):
            if list(r) != keys:
                raise ValueError(f"fn returned keys {list(r)} for seed {seed}, but {keys} for seed {seeds[0]}")
        return {k: summarize([r[k] for r in results]) for k in keys}
    return summarize(results)


def difference(a: Iterable[float] | Summary, b: Iterable[float] | Summary, confidence: float = 0.95) -> Summary:
    """Paired a - b over seeds (same seeds, same order): its mean, sd and interval.

    >>> d = difference([0.60, 0.62, 0.61], [0.50, 0.53, 0.50])
    >>> round(d.mean, 3), d.low > 0
    (0.1, True)
    """
    xs = a.values if isinstance(a, Summary) else _floats(a, "a")
    ys = b.values if isinstance(b, Summary) else _floats(b, "b")
    if len(xs) != len(ys):
        raise ValueError(f"a and b must be paired over the same seeds, got {len(xs)} and {len(ys)} values")
    return summarize([x - y for x, y in zip(xs, ys)], confidence)


def separated(a: Iterable[float] | Summary, b: Iterable[float] | Summary, confidence: float = 0.95) -> bool:
    """True when the paired difference's interval excludes 0 (a finding, not noise).

    >>> separated([0.60, 0.62, 0.61], [0.50, 0.53, 0.50]), separated([0.6, 0.5, 0.7], [0.55, 0.65, 0.6])
    (True, False)
    """
    d = difference(a, b, confidence)
    return d.n > 1 and (d.low > 0 or d.high < 0)


def verdict(d: Summary, positive: str, negative: str) -> str:
    """The rule in words: `positive` if the interval of `d` lies above 0, `negative` if below, else `NO_DIFFERENCE`.

    One value has no interval, so it is never a finding (as in `separated`).

    >>> d = difference([10.0, 12.0, 11.0], [8.0, 9.0, 9.5])  # perplexities, a - b
    >>> verdict(d, "b lower", "a lower"), verdict(difference([1.0, 2.0], [2.0, 1.0]), "b lower", "a lower")
    ('b lower', 'no difference at this budget')
    """
    if not isinstance(d, Summary):
        raise TypeError(f"d must be a Summary (from difference), got {type(d).__name__}")
    if d.n < 2:
        return NO_DIFFERENCE
    return positive if d.low > 0 else negative if d.high < 0 else NO_DIFFERENCE


def _check_prediction(recorded, m, checks, confidence) -> list[float]:
    xs = _floats(recorded, "recorded")
    if len(xs) < 2:
        raise ValueError(f"recorded needs at least 2 values for a spread, got {len(xs)}")
    for name, value in (("m", m), ("checks", checks)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    _check_confidence(confidence)
    return xs


def prediction_interval_loop(recorded: Iterable[float], m: int = 1, checks: int = 1, confidence: float = 0.99) -> tuple[float, float]:
    """(low, high) for the mean of `m` new draws from the distribution `recorded` came from, in loops.

    mean ± t_{n-1, 1 - alpha/(2 checks)} * sd * sqrt(1/m + 1/n), alpha = 1 -
    confidence: the Student-t prediction interval for a mean of m, with a
    Bonferroni correction so that `checks` such intervals together miss
    with probability at most alpha when nothing changed.

    >>> low, high = prediction_interval_loop([0.30, 0.35, 0.40], m=1)
    >>> round(low, 3), round(high, 3)
    (-0.223, 0.923)
    """
    xs = _check_prediction(recorded, m, checks, confidence)
    n = len(xs)
    total = 0.0
    for x in xs:
        total += x
    mean = total / n
    squares = 0.0
    for x in xs:
        squares += (x - mean) ** 2
    sd = math.sqrt(squares / (n - 1))
    half = t_critical(n - 1, 1 - (1 - confidence) / checks) * sd * math.sqrt(1 / m + 1 / n)
    return mean - half, mean + half


def prediction_interval(recorded: Iterable[float], m: int = 1, checks: int = 1, confidence: float = 0.99) -> tuple[float, float]:
    """Vectorised `prediction_interval_loop` (numpy).

    >>> low, high = prediction_interval([0.30, 0.35, 0.40] * 4, m=3, checks=8)
    >>> round(low, 3), round(high, 3)
    (0.232, 0.468)
    """
    import numpy as np

    xs = np.asarray(_check_prediction(recorded, m, checks, confidence), dtype=np.float64)
    half = t_critical(int(xs.size) - 1, 1 - (1 - confidence) / checks) * float(xs.std(ddof=1)) * math.sqrt(1 / m + 1 / xs.size)
    return float(xs.mean()) - half, float(xs.mean()) + half
