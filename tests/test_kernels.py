"""Numba kernels against their slow references (tests/naive.py)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.processing.detectors import RollingZScore, ZScoreParams
from tests.naive import rolling_zscore_naive


def _batch(rng: np.random.Generator, n: int, streams: int, nan_frac: float = 0.02):
    rows = rng.integers(0, streams, n).astype(np.int64)
    values = rng.normal(50.0, 3.0, n) * rng.choice([1.0, 1e3], streams)[rows]
    values[rng.random(n) < nan_frac] = np.nan
    ts = np.empty(n, dtype=np.int64)
    clock = np.zeros(streams, dtype=np.int64)
    for i, r in enumerate(rows):  # mostly increasing, some repeats / late samples
        clock[r] += int(rng.choice([100, 100, 100, 0, -300]))
        ts[i] = clock[r]
    return rows, ts, values


def _compare(got, want) -> None:
    for name in ("mean", "std", "z", "score"):
        np.testing.assert_allclose(
            getattr(got, name), want[name], rtol=1e-7, atol=1e-9, equal_nan=True, err_msg=name
        )
    np.testing.assert_array_equal(got.anomaly, want["anomaly"])


@pytest.mark.parametrize("window,warmup", [(2, 2), (5, 3), (60, 20)])
def test_rolling_zscore_matches_reference(window: int, warmup: int) -> None:
    rng = np.random.default_rng(window)
    rows, ts, values = _batch(rng, 3000, streams=7)
    det = RollingZScore(ZScoreParams(window=window, warmup=warmup, threshold=3.0), capacity=2)
    got = det.update(rows, ts, values)
    _compare(got, rolling_zscore_naive(rows, ts, values, window, warmup, 3.0))


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(0, 400),
    streams=st.integers(1, 6),
    window=st.integers(2, 30),
    cuts=st.lists(st.integers(0, 400), max_size=5),
)
def test_rolling_zscore_chunk_invariant_and_matches_reference(
    seed: int, n: int, streams: int, window: int, cuts: list[int]
) -> None:
    rng = np.random.default_rng(seed)
    rows, ts, values = _batch(rng, n, streams, nan_frac=0.1)
    params = ZScoreParams(window=window, warmup=2, threshold=2.5)
    whole = RollingZScore(params).update(rows, ts, values)
    _compare(whole, rolling_zscore_naive(rows, ts, values, window, 2, 2.5))
    pieces = RollingZScore(params, capacity=1)
    bounds = [0, *sorted(c for c in cuts if c <= n), n]
    parts = [pieces.update(rows[a:b], ts[a:b], values[a:b]) for a, b in itertools.pairwise(bounds)]
    for name in ("mean", "std", "z", "score", "anomaly"):
        joined = np.concatenate([getattr(p, name) for p in parts])
        np.testing.assert_array_equal(joined, getattr(whole, name), err_msg=name)


def test_rolling_zscore_is_stable_for_large_offsets() -> None:
    """Values around 1e9 with noise of 0.01 keep their standard deviation."""
    rng = np.random.default_rng(7)
    n, window = 20_000, 100
    values = 1e9 + rng.normal(0.0, 0.01, n)
    rows = np.zeros(n, dtype=np.int64)
    ts = np.arange(n, dtype=np.int64)
    out = RollingZScore(ZScoreParams(window=window)).update(rows, ts, values)
    exact = np.array([values[i - window : i].std() for i in range(n - 50, n)])
    np.testing.assert_allclose(out.std[n - 50 :], exact, rtol=1e-6)
    assert 0.005 < np.median(out.std[window:]) < 0.015


def test_spike_is_flagged_and_noise_mostly_not() -> None:
    rng = np.random.default_rng(3)
    n = 5000
    values = rng.normal(10.0, 1.0, n)
    spikes = np.arange(200, n, 250)
    values[spikes] += 15.0
    out = RollingZScore().update(np.zeros(n, np.int64), np.arange(n, dtype=np.int64), values)
    assert out.anomaly[spikes].all()
    normal = np.ones(n, dtype=bool)
    normal[spikes] = False
    assert out.anomaly[normal].mean() < 0.01


def test_warmup_suppresses_flags() -> None:
    values = np.array([1.0, 1.1, 0.9, 1.0, 100.0])
    det = RollingZScore(ZScoreParams(window=10, warmup=5, threshold=3.0))
    out = det.update(np.zeros(5, np.int64), np.arange(5, dtype=np.int64), values)
    assert not out.anomaly.any()
    assert out.z[-1] > 3.0


def test_state_grows_with_new_streams() -> None:
    det = RollingZScore(capacity=1)
    rows = np.array([0, 5, 1000], dtype=np.int64)
    det.update(rows, np.ones(3, np.int64), np.ones(3))
    assert det.capacity >= 1001
    assert det.istate[1000, 0] == 1


def test_huge_finite_values_are_flagged_and_not_learned() -> None:
    values = np.array([1e308, -1e308] + [1.0 + (i % 5) * 0.1 for i in range(60)] + [1000.0])
    n = len(values)
    det = RollingZScore(ZScoreParams(window=30, warmup=10))
    out = det.update(np.zeros(n, np.int64), np.arange(n, dtype=np.int64), values)
    assert out.anomaly[:2].all() and (out.score[:2] == 1.0).all()
    assert np.isfinite(out.mean[3:]).all() and np.isfinite(out.std[3:]).all()
    assert out.anomaly[-1] and not out.anomaly[12:-1].any()
    ref = rolling_zscore_naive(np.zeros(n, np.int64), np.arange(n), values, 30, 10, 4.0)
    np.testing.assert_array_equal(out.anomaly, ref["anomaly"])
