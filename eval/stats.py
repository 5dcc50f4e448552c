"""Statistics for comparing models on the same prompts: paired bootstrap CIs, win rates, latency percentiles.

The bootstrap is written with numpy rather than taken from scipy.stats.bootstrap: scipy is not a dependency of
the light client install, and a percentile bootstrap of a mean is a few vectorised lines. Resampling the paired
differences d_i = b_i - a_i by sample index is exactly the paired bootstrap (both sides of a sample move together).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

DEFAULT_RESAMPLES = 10_000
CONFIDENCE = 0.95
PERCENTILES = (50, 90, 99)
# Per-sample metrics are compared as floats; differences this small are float noise, i.e. ties.
TIE_TOLERANCE = 1e-9
# Below this many paired samples a bootstrap CI says nothing (with n=1 it collapses onto the one difference).
MIN_PAIRED_SAMPLES = 2
# Bound on resample-index memory per chunk (elements), so 10,000 resamples of a large set stay small.
_CHUNK_ELEMENTS = 4_000_000


def bootstrap_mean_ci(
    values: Sequence[float] | np.ndarray,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    confidence: float = CONFIDENCE,
) -> tuple[float, float, float]:
    """(mean, low, high): percentile-bootstrap CI of the mean of ``values``, resampling indices with replacement.

    Given paired differences this is the paired bootstrap of the mean difference. NaNs when ``values`` is empty."""
    values = np.asarray(values, dtype=float)
    n = values.size
    if n == 0:
        return math.nan, math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    chunk = max(1, _CHUNK_ELEMENTS // n)
    for start in range(0, resamples, chunk):
        stop = min(start + chunk, resamples)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = values[idx].mean(axis=1)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return float(values.mean()), float(low), float(high)


def win_counts(a: Sequence[float], b: Sequence[float], tolerance: float = TIE_TOLERANCE) -> dict[str, float | int]:
    """How often B beats A on the same sample: wins, ties (|b-a| <= tolerance) and losses, and win_rate = wins/n."""
    diff = np.asarray(b, dtype=float) - np.asarray(a, dtype=float)
    wins = int((diff > tolerance).sum())
    losses = int((diff < -tolerance).sum())
    ties = int(diff.size - wins - losses)
    return {"wins": wins, "ties": ties, "losses": losses, "win_rate": wins / diff.size if diff.size else math.nan}


def verdict(ci_low: float, ci_high: float, n: int, a: str = "A", b: str = "B") -> str:
    """'<b> better' if the CI of (B - A) lies above 0, '<a> better' if below, else 'no significant difference'."""
    if n < MIN_PAIRED_SAMPLES or math.isnan(ci_low):
        return f"too few paired samples (n={n})"
    if ci_low > 0:
        return f"{b} better"
    if ci_high < 0:
        return f"{a} better"
    return "no significant difference"


def paired_comparison(
    a: Sequence[float],
    b: Sequence[float],
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    names: tuple[str, str] = ("A", "B"),
) -> dict:
    """Paired difference (B - A) of one metric over the same samples: means, CI, win counts and verdict."""
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired samples must have the same length, got {a.size} and {b.size}")
    diff, low, high = bootstrap_mean_ci(b - a, resamples=resamples, seed=seed)
    return {
        "n": int(a.size),
        "mean_a": float(a.mean()) if a.size else math.nan,
        "mean_b": float(b.mean()) if b.size else math.nan,
        "diff": diff,
        "ci_low": low,
        "ci_high": high,
        **win_counts(a, b),
        "verdict": verdict(low, high, int(a.size), *names),
    }


def percentile_summary(values: Sequence[float], percentiles: Sequence[int] = PERCENTILES) -> dict[str, float]:
    """mean and pXX (numpy's linear interpolation, as vLLM's serving benchmark) of ``values``, with their count."""
    values = np.asarray([v for v in values if v is not None], dtype=float)
    if values.size == 0:
        return {"n": 0, "mean": math.nan, **{f"p{p}": math.nan for p in percentiles}}
    return {
        "n": int(values.size),
        "mean": float(values.mean()),
        **{f"p{p}": float(np.percentile(values, p)) for p in percentiles},
    }
