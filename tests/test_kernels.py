"""The detector kernel (``kernels.detect`` via ``DetectorBank``) against tests/naive.py,
and the behaviour each detector promises."""

from __future__ import annotations

import dataclasses
import itertools
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest.processing import kernels as k
from ingest.processing.detectors import (
    DEFAULT_DETECTORS,
    DetectorBank,
    DetectorParams,
    DetectorRule,
    Detectors,
    DetectResult,
    StreamRegistry,
)
from tests.naive import NaiveBank, detect_naive

SINGLE = [(name,) for name in DEFAULT_DETECTORS]
DETECTOR_SETS = [*SINGLE, DEFAULT_DETECTORS]
SET_IDS = [*DEFAULT_DETECTORS, "all"]
T0 = 1_700_000_000_000  # epoch ms
BIT = {name: bit for bit, name in k.DETECTOR_NAMES.items()}
STATE = ("zbuf", "msorted", "mindex", "fstate", "istate")


# ---------------------------------------------------------------------------- helpers
def compare(got: DetectResult, want: dict[str, np.ndarray], sig: np.ndarray | float = 1.0) -> None:
    """Every output of the kernel equals the reference's.

    Floats to 1e-7 relative. ``sig`` is each sample's stream noise level: the kernel's
    sliding window sums leave a rounding residue of order sqrt(window * eps) * sigma
    (cleared at each re-centring), so where the window holds a single value the
    reference's std is 0 and the kernel's may be that residue; there z is compared by
    its score only (both saturate), hits exactly as everywhere.
    """
    sig = np.broadcast_to(np.asarray(sig, np.float64), want["std"].shape)
    _close(got.mean, want["mean"], 1e-7, 1e-9 * sig, "mean")
    _close(got.std, want["std"], 1e-7, 1e-5 * sig, "std")
    spread = ~(want["std"] < 1e-3 * sig)  # NaN (no z) included
    _close(got.z[spread], want["z"][spread], 1e-7, 1e-9, "z")
    _close(got.score[spread], want["score"][spread], 1e-7, 1e-12, "score")
    _close(got.score[~spread], want["score"][~spread], 0, 1e-6, "score (no spread)")
    for name in ("hits", "anomaly", "gap", "event"):
        np.testing.assert_array_equal(getattr(got, name), want[name], err_msg=name)
    ev = want["event"] != k.EVENT_NONE
    closed = want["event"] == k.EVENT_CLOSED
    np.testing.assert_array_equal(got.ev_start[ev], want["ev_start"][ev], err_msg="ev_start")
    np.testing.assert_array_equal(got.ev_dets[ev], want["ev_dets"][ev], err_msg="ev_dets")
    _close(got.ev_peak[ev], want["ev_peak"][ev], 1e-7, 1e-12, "ev_peak")
    np.testing.assert_array_equal(got.ev_end[closed], want["ev_end"][closed], err_msg="ev_end")


def _close(
    got: np.ndarray, want: np.ndarray, rtol: float, atol: float | np.ndarray, name: str
) -> None:
    """|got - want| <= atol + rtol * |want| elementwise (``atol`` may be an array); NaN == NaN."""
    got, want = np.asarray(got), np.asarray(want)
    same_nan = np.isnan(got) == np.isnan(want)
    bad = ~same_nan
    both = ~np.isnan(got) & ~np.isnan(want)
    tol = np.broadcast_to(atol, want.shape) + rtol * np.abs(want)
    with np.errstate(invalid="ignore"):
        bad |= both & ~(np.abs(got - want) <= tol)
    if bad.any():
        idx = np.flatnonzero(bad)[:8]
        rows = "\n".join(f"  [{i}] got {got[i]!r} want {want[i]!r}" for i in idx)
        raise AssertionError(f"{name}: {bad.sum()} of {bad.size} differ\n{rows}")


def assert_same(a: DetectResult, b: DetectResult) -> None:
    """Bit-identical outputs (``ev_*`` where defined)."""
    for name in ("mean", "std", "z", "score", "hits", "anomaly", "gap", "event"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    ev = a.event != k.EVENT_NONE
    for name in ("ev_start", "ev_peak", "ev_dets"):
        np.testing.assert_array_equal(getattr(a, name)[ev], getattr(b, name)[ev], err_msg=name)
    closed = a.event == k.EVENT_CLOSED
    np.testing.assert_array_equal(a.ev_end[closed], b.ev_end[closed], err_msg="ev_end")


def concat(parts: list[DetectResult]) -> DetectResult:
    names = [f.name for f in dataclasses.fields(DetectResult)]
    return DetectResult(
        **{name: np.concatenate([getattr(p, name) for p in parts]) for name in names}
    )


def one_stream(values: np.ndarray, interval: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    n = len(values)
    return np.zeros(n, np.int64), T0 + interval * np.arange(n, dtype=np.int64)


Batch = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def random_batch(rng: np.random.Generator, n: int, streams: int) -> Batch:
    """Interleaved streams with everything the detectors must survive.

    Each stream has its own level (0 to 1e9), noise, usual interval and, sometimes, a
    quantisation step (so values repeat). Along the way: spikes, level shifts, stuck
    runs (the same value repeated exactly), NaN, values beyond HUGE, redeliveries
    (same timestamp), late samples, and silences of 10-20 usual intervals.
    Returns rows, ts, values and each sample's stream noise level.
    """
    level = rng.choice([0.0, 50.0, -7e3, 1e6, 1e9], streams)
    sigma = rng.choice([1.0, 0.05, 300.0], streams)
    sigma = np.maximum(sigma, 1e-6 * np.abs(level))  # spread well above the 1e-9 floor
    interval = rng.choice([10, 100, 1000, 60_000], streams)
    quantum = np.where(rng.random(streams) < 0.3, 0.5 * sigma, 0.0)
    owner = rng.integers(0, streams, n)  # arrival order: streams interleaved at random
    rows = owner.astype(np.int64)
    ts = np.empty(n, np.int64)
    values = np.empty(n)
    clock = T0 + rng.integers(0, 10_000, streams)
    last = level.copy()
    stuck = np.zeros(streams, np.int64)
    for i, r in enumerate(owner):
        u = rng.random()
        step = interval[r] + rng.integers(-interval[r] // 10, interval[r] // 10 + 1)
        if u < 0.02:  # redelivery: same timestamp, maybe another value
            ts[i] = clock[r]
        elif u < 0.04:  # late
            ts[i] = clock[r] - rng.integers(1, 4) * interval[r]
        else:
            clock[r] += step * (rng.integers(10, 21) if u > 0.99 else 1)
            ts[i] = clock[r]
        kind = rng.random()
        if stuck[r] > 0:
            stuck[r] -= 1
            x = last[r]
        elif kind < 0.03:
            x = math.nan
        elif kind < 0.035:
            x = rng.choice([1e200, -1e300, math.inf, -math.inf])
        elif kind < 0.045:  # spike
            x = level[r] + rng.choice([-1, 1]) * rng.uniform(15, 40) * sigma[r]
        elif kind < 0.05:  # level shift
            level[r] += rng.choice([-1, 1]) * rng.uniform(2, 8) * sigma[r]
            x = level[r] + sigma[r] * rng.normal()
        elif kind < 0.056:  # stuck for a while
            stuck[r] = rng.integers(3, 70)
            x = last[r]
        else:
            x = level[r] + sigma[r] * rng.normal()
            if quantum[r]:
                x = level[r] + quantum[r] * round((x - level[r]) / quantum[r])
        values[i] = x
        if math.isfinite(x) and abs(x) < 1e150:
            last[r] = x
    return rows, ts, values, sigma[rows]


# ---------------------------------------------------------------- seeded comparisons
@pytest.mark.parametrize("detectors", DETECTOR_SETS, ids=SET_IDS)
@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {
            "warmup": 5,
            "zscore_window": 12,
            "mad_window": 8,
            "onset": 2,
            "clear": 3,
            "hold": 8,
            "flatline_samples": 6,
            "ewma_halflife": 3.0,
            "cusum_halflife": 15.0,
            "gap_factor": 3.0,
        },
        {"warmup": 10, "learn_limit": 25, "zscore_window": 40, "mad_window": 31},
        {"learn_limit": 400},
    ],
    ids=["defaults", "small", "learn_limit<window", "learn_limit"],
)
def test_matches_reference_on_random_batches(
    detectors: tuple[str, ...], overrides: dict[str, float]
) -> None:
    params = DetectorParams(detectors=detectors, **overrides)  # type: ignore[arg-type]
    rng = np.random.default_rng(sum(map(ord, "".join(detectors))) + len(overrides))
    rows, ts, values, sig = random_batch(rng, 6000, streams=9)
    got = DetectorBank(params, capacity=2).update(rows, ts, values)
    want = detect_naive(rows, ts, values, params)
    compare(got, want, sig)
    # the batch exercised what it is meant to
    assert want["hits"].any() and (want["event"] == k.EVENT_CLOSED).any() and want["gap"].any()
    assert np.isnan(values).any() and (np.abs(values) > k.HUGE).any()
    bits = np.bitwise_or.reduce(want["hits"])
    for name in detectors:
        assert bits & BIT[name], f"{name} never fired"


# ------------------------------------------------------------------- hypothesis
KINDS = ("normal",) * 6 + ("repeat",) * 3 + ("nan", "huge", "spike", "gap", "dup", "late", "shift")


@st.composite
def batches(draw: st.DrawFn, max_n: int = 120) -> Batch:
    """Streams of hypothesis-chosen samples: see KINDS; values often repeat exactly."""
    n_streams = draw(st.integers(1, 3))
    cfg = draw(
        st.lists(
            st.tuples(
                st.sampled_from([0.0, 50.0, -7e3, 1e9]),
                st.sampled_from([1.0, 0.01, 300.0]),
                st.sampled_from([1, 100, 60_000]),
            ),
            min_size=n_streams,
            max_size=n_streams,
        )
    )
    u_values = st.one_of(st.integers(-30, 30).map(lambda v: v / 10), st.floats(-3, 3))
    n = draw(st.integers(0, max_n))  # long batches as often as short ones
    steps = draw(
        st.lists(
            st.tuples(st.integers(0, n_streams - 1), st.sampled_from(KINDS), u_values),
            min_size=n,
            max_size=n,
        )
    )
    level = [c[0] for c in cfg]
    sigma = [max(c[1], 1e-6 * abs(c[0])) for c in cfg]
    interval = [c[2] for c in cfg]
    clock = [T0 + 7 * r for r in range(n_streams)]
    last = list(level)
    rows, ts, values, sig = [], [], [], []
    for r, kind, u in steps:
        sign = 1.0 if u >= 0 else -1.0
        t = clock[r] + interval[r]
        x = level[r] + sigma[r] * u
        if kind == "repeat":
            x = last[r]
        elif kind == "nan":
            x = math.nan
        elif kind == "huge":
            x = sign * (math.inf if abs(u) > 2.5 else 1e200)
        elif kind == "spike":
            x = level[r] + sign * (25 + abs(u)) * sigma[r]
        elif kind == "gap":
            t = clock[r] + interval[r] * int(10 + 3 * abs(u))
        elif kind == "dup":
            t = clock[r]
        elif kind == "late":
            t = clock[r] - interval[r] * (1 + int(abs(u)) % 3)
        elif kind == "shift":
            level[r] += 6 * sign * sigma[r]
            x = level[r] + sigma[r] * u
        clock[r] = max(clock[r], t)
        if math.isfinite(x) and abs(x) < 1e150:
            last[r] = x
        rows.append(r)
        ts.append(t)
        values.append(x)
        sig.append(sigma[r])
    return (
        np.array(rows, np.int64),
        np.array(ts, np.int64),
        np.array(values, np.float64),
        np.array(sig, np.float64),
    )


@st.composite
def param_sets(draw: st.DrawFn, detectors: tuple[str, ...]) -> DetectorParams:
    """Small windows and warm-ups, so short batches reach every state."""
    warmup = draw(st.integers(2, 8))
    thresholds = st.floats(1.0, 6.0)
    return DetectorParams(
        detectors=detectors,
        warmup=warmup,
        zscore_window=draw(st.integers(warmup, 12)),
        zscore_threshold=draw(thresholds),
        ewma_halflife=draw(st.floats(0.5, 30.0)),
        ewma_threshold=draw(thresholds),
        mad_window=draw(st.integers(3, 9)),
        mad_threshold=draw(thresholds),
        cusum_halflife=draw(st.floats(1.0, 60.0)),
        cusum_k=draw(st.floats(0.0, 1.5)),
        cusum_h=draw(st.floats(0.5, 10.0)),
        flatline_samples=draw(st.integers(1, 8)),
        roc_threshold=draw(thresholds),
        gap_factor=draw(st.floats(1.5, 12.0)),
        onset=draw(st.integers(1, 3)),
        clear=(clear := draw(st.integers(1, 4))),
        hold=draw(st.integers(clear, clear + 8)),
        learn_limit=draw(st.sampled_from([0, 0, warmup, warmup + 7])),
    )


@pytest.mark.parametrize("detectors", DETECTOR_SETS, ids=SET_IDS)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_params_match_reference(detectors: tuple[str, ...], data: st.DataObject) -> None:
    params = data.draw(param_sets(detectors), label="params")
    rows, ts, values, sig = data.draw(batches(), label="batch")
    bank = DetectorBank(params, capacity=1)
    ref = NaiveBank(params)
    compare(bank.update(rows, ts, values), ref.update(rows, ts, values), sig)
    if len(ts):  # and the same streams are silent afterwards
        m = int(rows.max()) + 1
        for wait in (0, 300, 3_000, 30_000, 10**6, 10**9):
            now = int(ts.max()) + wait
            assert bank.silent(now, m).tolist() == sorted(ref.silent(now)), wait


@pytest.mark.parametrize("detectors", DETECTOR_SETS, ids=SET_IDS)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_chunk_invariant(detectors: tuple[str, ...], data: st.DataObject) -> None:
    """One update on the whole batch equals updates on any pieces: outputs and state."""
    params = data.draw(param_sets(detectors), label="params")
    rows, ts, values, _ = data.draw(batches(max_n=200), label="batch")
    n = len(values)
    cuts = data.draw(st.lists(st.integers(0, n), max_size=6), label="cuts")
    whole_bank = DetectorBank(params, capacity=1)
    whole = whole_bank.update(rows, ts, values)
    pieces_bank = DetectorBank(params, capacity=1)
    bounds = [0, *sorted(cuts), n]
    parts = [
        pieces_bank.update(rows[a:b], ts[a:b], values[a:b]) for a, b in itertools.pairwise(bounds)
    ]
    assert_same(concat(parts), whole)
    m = int(rows.max()) + 1 if n else 0
    for name in STATE:
        np.testing.assert_array_equal(
            pieces_bank.state_arrays(m)[name], whole_bank.state_arrays(m)[name], err_msg=name
        )


# -------------------------------------------------------------------- precision
def _exact_zscore(off: np.ndarray, level: float, window: int) -> dict[str, np.ndarray]:
    """Window mean / std / z of ``level + off`` computed on the exact offsets."""
    n = len(off)
    out = {name: np.full(n, np.nan) for name in ("mean", "std", "z")}
    for i in range(1, n):
        w = off[max(0, i - window) : i]
        m, sd = w.mean(), w.std()
        out["mean"][i] = level + m
        out["std"][i] = sd
        out["z"][i] = (off[i] - m) / max(sd, 1e-9 * abs(level + m) + 1e-12)
    return out


def _exact_ewma(off: np.ndarray, level: float, params: DetectorParams) -> dict[str, np.ndarray]:
    """EW mean / std / z of ``level + off`` (one sample per usual interval) on the offsets."""
    n = len(off)
    out = {name: np.full(n, np.nan) for name in ("mean", "std", "z")}
    mean, var = off[0], 0.0
    for i in range(1, n):
        sd = math.sqrt(var)
        out["mean"][i] = level + mean
        out["std"][i] = sd
        out["z"][i] = (off[i] - mean) / max(sd, 1e-9 * abs(level + mean) + 1e-12)
        alpha = max(1 - 0.5 ** (1 / params.ewma_halflife), 1 / (i + 1))
        d = off[i] - mean
        if i >= params.warmup:
            d = float(np.clip(d, -params.ewma_threshold * sd, params.ewma_threshold * sd))
        mean += alpha * d
        var = (1 - alpha) * (var + alpha * d * d)
    return out


def _exact_robust_z(
    off: np.ndarray, level: float, params: DetectorParams
) -> tuple[np.ndarray, np.ndarray]:
    """|x - median| / scale of the MAD detector for ``level + off`` on the offsets; and scale."""
    n = len(off)
    rz = np.full(n, np.nan)
    scales = np.full(n, np.nan)
    adiff = 0.0
    for i in range(1, n):
        if i >= params.warmup:
            w = off[max(0, i - params.mad_window) : i]
            med = np.median(w)
            mad = np.median(np.abs(w - med))
            scales[i] = max(1.4826 * mad, 0.5 * adiff, 1e-9 * abs(level + med) + 1e-12)
            rz[i] = abs(off[i] - med) / scales[i]
        step = abs(off[i] - off[i - 1])
        adiff = step if i == 1 else adiff + 0.05 * (step - adiff)
    return rz, scales


EWMA_BELOW_FLOOR = pytest.mark.xfail(
    strict=True,
    reason="the EWMA keeps its mean unshifted, so at 1e9 it carries rounding of "
    "~ulp(1e9) = 1.2e-7 per step: 1e-4 of a noise of 1e-3 (below the 1e-9 relative "
    "floor, where z is floored and detection unaffected)",
)


@pytest.mark.parametrize(
    ("detector", "noise"),
    [
        ("zscore", 1e-3),
        ("zscore", 10.0),
        pytest.param("ewma", 1e-3, marks=EWMA_BELOW_FLOOR),
        ("ewma", 10.0),
        ("mad", 1e-3),
        ("mad", 10.0),
    ],
)
def test_precision_near_1e9(detector: str, noise: float) -> None:
    """Level 1e9: std and z as if computed exactly (to 1e-6 relative).

    With noise 1e-3 the spread is below the 1e-9 relative floor (1.0 here), so z is
    (x - mean) / 1.0: the difference x - mean must still be right. With noise 10 the
    spread is above the floor and z is a real z.
    """
    level = 1e9
    rng = np.random.default_rng(42)
    values = level + rng.normal(0.0, noise, 4000)
    off = values - level  # exact
    rows, ts = one_stream(values)
    params = DetectorParams(detectors=(detector,))
    got = DetectorBank(params).update(rows, ts, values)
    warm = slice(params.warmup, None)
    if detector == "mad":
        rz, scale = _exact_robust_z(off, level, params)
        got_rz = params.mad_threshold * got.score / (1 - got.score)
        # The median of an even count of values near 1e9 is not representable: until the
        # window is full (odd, 41 values) allow its rounding, ulp(1e9) / 2, in x - median.
        slack = np.where(np.arange(len(off)) < params.mad_window, np.spacing(level) / scale, 0)
        _close(got_rz[warm], rz[warm], 1e-6, slack[warm], "robust z")
        return
    want = (
        _exact_zscore(off, level, params.zscore_window)
        if detector == "zscore"
        else _exact_ewma(off, level, params)
    )
    np.testing.assert_allclose(got.mean[1:], want["mean"][1:], rtol=1e-15, atol=0)
    np.testing.assert_allclose(got.std[warm], want["std"][warm], rtol=1e-6)
    typical = np.median(np.abs(want["z"][warm]))
    np.testing.assert_allclose(got.z[warm], want["z"][warm], rtol=1e-6, atol=1e-6 * typical)


# -------------------------------------------------------------------- behaviour
def noise(n: int, seed: int, level: float = 20.0) -> np.ndarray:
    return level + np.random.default_rng(seed).normal(0.0, 1.0, n)


@pytest.mark.parametrize("detectors", [("zscore",), ("ewma",), ("mad",)])
def test_spike_opens_an_episode_and_quiet_closes_it(detectors: tuple[str, ...]) -> None:
    params = DetectorParams(detectors=detectors, clear=5, hold=5)
    values = noise(400, seed=11)
    s = 300
    values[s] += 20.0
    rows, ts = one_stream(values)
    out = DetectorBank(params).update(rows, ts, values)
    assert np.flatnonzero(out.hits).tolist() == [s]
    assert np.flatnonzero(out.event).tolist() == [s, s + 5]
    assert out.event[s] == k.EVENT_OPENED and out.event[s + 5] == k.EVENT_CLOSED
    assert np.flatnonzero(out.anomaly).tolist() == list(range(s, s + 5))
    for i in (s, s + 5):
        assert out.ev_start[i] == ts[s]
        assert out.ev_peak[i] == out.score[s]
        assert out.ev_dets[i] == BIT[detectors[0]]
    assert out.ev_end[s + 5] == ts[s]
    assert out.score[s] > 0.6 and out.score[:s].max() < 0.5


def test_flag_clears_after_clear_and_episode_ends_after_hold() -> None:
    """A recurrence while the episode is held continues it; quiet for ``hold`` ends it."""
    params = DetectorParams(detectors=("zscore", "mad"), clear=5, hold=60)
    values = noise(600, seed=12)
    a, b = 200, 240  # b: 40 samples later, within hold
    values[[a, b]] += 25.0
    rows, ts = one_stream(values)
    out = DetectorBank(params).update(rows, ts, values)
    assert np.flatnonzero(out.hits).tolist() == [a, b]
    flagged = np.flatnonzero(out.anomaly).tolist()
    assert flagged == [*range(a, a + 5), *range(b, b + 5)]
    assert np.flatnonzero(out.event).tolist() == [a, b + 60]
    end = b + 60
    assert out.event[end] == k.EVENT_CLOSED
    assert (out.ev_start[end], out.ev_end[end]) == (ts[a], ts[b])
    assert out.ev_peak[end] == max(out.score[a], out.score[b])


def test_spike_with_all_detectors() -> None:
    params = DetectorParams()
    values = noise(600, seed=13)
    s = 400
    values[s] += 20.0
    rows, ts = one_stream(values)
    out = DetectorBank(params).update(rows, ts, values)
    hit = np.flatnonzero(out.hits)
    assert hit[0] == s and hit[-1] <= s + 1  # the spike, maybe the step back from it
    assert np.flatnonzero(out.event).tolist() == [s, hit[-1] + params.hold]
    end = hit[-1] + params.hold
    assert (out.ev_start[end], out.ev_end[end]) == (ts[s], ts[hit[-1]])
    assert out.ev_dets[end] == np.bitwise_or.reduce(out.hits[hit])
    assert out.ev_dets[end] & (k.ZSCORE | k.MAD) == k.ZSCORE | k.MAD
    assert out.ev_peak[end] == out.score[hit].max()
    assert out.anomaly[s] and not out.anomaly[hit[-1] + params.clear]


def test_onset_needs_consecutive_hits() -> None:
    params = DetectorParams(detectors=("zscore", "mad"), onset=3, clear=2, hold=150)
    values = noise(800, seed=14)
    single, double, triple, again = [200], [300, 301], [400, 401, 402], [500, 501, 502]
    lone = 470  # one hit after the flag cleared, within hold: does not raise it
    for i in single + double + triple + again + [lone]:
        values[i] += 30.0
    rows, ts = one_stream(values)
    out = DetectorBank(params).update(rows, ts, values)
    assert np.flatnonzero(out.hits).tolist() == single + double + triple + [lone] + again
    assert np.flatnonzero(out.event == k.EVENT_OPENED).tolist() == [402]
    assert out.ev_start[402] == ts[400]
    assert np.flatnonzero(out.anomaly).tolist() == [402, 403, 502, 503]
    end = np.flatnonzero(out.event == k.EVENT_CLOSED).tolist()
    assert end == [502 + 150]
    assert (out.ev_start[652], out.ev_end[652]) == (ts[400], ts[502])


@pytest.mark.parametrize("detectors", [("flatline",), DEFAULT_DETECTORS], ids=["flatline", "all"])
def test_stuck_value_raises_flatline(detectors: tuple[str, ...]) -> None:
    params = DetectorParams(detectors=detectors)
    values = noise(700, seed=15)
    stuck = 400
    values[stuck:] = values[stuck - 1]  # repeats 1, 2, ... from index stuck on
    rows, ts = one_stream(values)
    out = DetectorBank(params).update(rows, ts, values)
    flat = np.flatnonzero(out.hits & k.FLATLINE)
    assert flat.size and flat[0] >= stuck
    repeats = flat[0] - stuck + 1
    assert params.flatline_samples - 2 <= repeats <= params.flatline_samples + 2
    assert (out.hits[flat[0] :] & k.FLATLINE).all()  # stays stuck
    assert out.event[flat[0]] == k.EVENT_OPENED and out.anomaly[flat[0] :].all()


@pytest.mark.parametrize("level", [0.0, 7.25, -3e5, 1e9])
def test_constant_from_the_start_is_not_stuck(level: float) -> None:
    values = np.full(2000, level)
    rows, ts = one_stream(values)
    out = DetectorBank(DetectorParams()).update(rows, ts, values)
    assert not out.hits.any() and not out.anomaly.any() and not out.event.any()
    assert (out.score == 0).all()


def test_often_repeating_signal_needs_a_longer_stuck_run() -> None:
    """A run as unlikely as 0.5 ** flatline_samples is one of prep ** run: a signal that
    repeats its value 60 % of the time is stuck after about 41 repeats, not 30."""
    params = DetectorParams(detectors=("flatline",))
    rng = np.random.default_rng(16)
    n, stuck = 3000, 2500
    change = rng.random(n) < 0.4
    values = np.cumsum(np.where(change, rng.choice([-1.0, 1.0], n), 0.0))
    values[stuck:] = values[stuck - 1]
    rows, ts = one_stream(values)
    out = DetectorBank(params).update(rows, ts, values)
    flat = np.flatnonzero(out.hits & k.FLATLINE)
    assert flat.size, "a stuck run of 500 repeats never raised FLATLINE"
    assert flat[0] >= stuck + params.flatline_samples  # natural runs of this signal are fine
    assert flat[0] - stuck + 1 <= 4 * params.flatline_samples


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_level_shift_raises_cusum(sign: float) -> None:
    """A 2-sigma step: below every pointwise threshold, CUSUM accumulates it."""
    params = DetectorParams(detectors=("cusum",))
    values = noise(900, seed=17)
    step = 600
    values[step:] += sign * 2.0
    rows, ts = one_stream(values)
    out = DetectorBank(params).update(rows, ts, values)
    hit = np.flatnonzero(out.hits & k.CUSUM)
    assert hit.size and step <= hit[0] <= step + 30
    assert not out.hits[:step].any()
    pointwise = DetectorBank(DetectorParams(detectors=("zscore", "mad"))).update(rows, ts, values)
    assert not pointwise.hits.any()


def test_large_level_shift_raises_zscore_at_once() -> None:
    params = DetectorParams(detectors=("zscore", "cusum"))
    values = noise(700, seed=18)
    step = 500
    values[step:] += 8.0
    rows, ts = one_stream(values)
    out = DetectorBank(params).update(rows, ts, values)
    assert np.flatnonzero(out.hits)[0] == step and out.hits[step] & k.ZSCORE
    assert np.bitwise_or.reduce(out.hits[step : step + 5]) & k.CUSUM
    assert out.event[step] == k.EVENT_OPENED


def test_gap_and_silent_streams() -> None:
    params = DetectorParams()
    interval = 1000
    n = 100
    t_a = T0 + interval * np.arange(n, dtype=np.int64)
    # stream 0: regular, then silent for 10 intervals, then regular again
    t0 = np.concatenate([t_a, t_a[-1] + interval * (10 + np.arange(20, dtype=np.int64))])
    v0 = noise(len(t0), seed=19)
    # stream 1: regular, ends 3 intervals after stream 0's first run; stream 2: too new
    t1 = t_a + 3 * interval
    v1 = noise(n, seed=20)
    t2 = T0 + interval * np.arange(5, dtype=np.int64)
    rows = np.concatenate([np.zeros(n, np.int64), np.ones(n, np.int64), np.full(5, 2)])
    ts = np.concatenate([t0[:n], t1, t2])
    values = np.concatenate([v0[:n], v1, noise(5, seed=21)])
    bank = DetectorBank(params)
    ref = NaiveBank(params)
    out = bank.update(rows, ts, values)
    ref.update(rows, ts, values)
    assert not out.gap.any()
    last0 = t_a[-1]
    cases = {
        last0 + 4 * interval: [],  # 4 usual intervals: nobody
        last0 + 6 * interval: [0],  # 6 for stream 0, 3 for stream 1; stream 2 is not warm
        last0 + 9 * interval: [0, 1],
        last0 + 10**9: [0, 1],
    }
    for now, want in cases.items():
        assert bank.silent(int(now), 3).tolist() == want
        assert sorted(ref.silent(int(now))) == want
    # Measured from when each stream was last received instead (a lagging device clock):
    # stream 0 arrived just now, stream 1 long ago.
    received = np.array([last0 + 10**9, 0.0, 0.0])
    assert bank.silent(int(last0 + 10**9), 3, received).tolist() == [1]
    later = bank.update(np.zeros(20, np.int64), t0[n:], v0[n:])
    assert np.flatnonzero(later.gap).tolist() == [0]
    assert later.gap[0] == last0  # the silence started at the last sample before it


def test_redelivered_and_late_samples_change_nothing() -> None:
    params = DetectorParams()
    values = noise(300, seed=22)
    rows, ts = one_stream(values)
    h = 200
    bank = DetectorBank(params)
    bank.update(rows[:h], ts[:h], values[:h])
    before = {name: arr.copy() for name, arr in bank.state_arrays(1).items()}
    replay_ts = np.array([ts[h - 1], ts[h - 1], ts[h - 5], ts[0]], np.int64)
    replay_x = np.array([values[h - 1], values[h - 1] + 50.0, values[h - 5], 1e200])
    out = bank.update(np.zeros(4, np.int64), replay_ts, replay_x)
    assert out.hits[1] and out.hits[3] == k.RANGE  # scored...
    assert not out.anomaly.any() and not out.event.any() and not out.gap.any()
    for name, arr in bank.state_arrays(1).items():  # ...but not learned
        np.testing.assert_array_equal(arr, before[name], err_msg=name)
    fresh = DetectorBank(params)
    fresh.update(rows[:h], ts[:h], values[:h])
    assert_same(
        bank.update(rows[h:], ts[h:], values[h:]), fresh.update(rows[h:], ts[h:], values[h:])
    )


def test_huge_values_are_flagged_and_never_learned() -> None:
    params = DetectorParams()
    values = noise(300, seed=23)
    rows, ts = one_stream(values)
    with_huge = values.copy()
    with_huge[[100, 150, 151]] = [1e200, -math.inf, math.inf]
    out = DetectorBank(params).update(rows, ts, with_huge)
    assert (out.hits[[100, 150, 151]] == k.RANGE).all() and (out.score[[100, 150]] == 1).all()
    assert out.event[100] == k.EVENT_OPENED
    # the baselines are those of the stream without those three samples
    keep = np.ones(len(values), bool)
    keep[[100, 150, 151]] = False
    clean = DetectorBank(params).update(rows[keep], ts[keep], values[keep])
    np.testing.assert_array_equal(out.mean[keep], clean.mean)
    np.testing.assert_array_equal(out.std[keep], clean.std)


def _keys(n_devices: int) -> list[tuple[str, str, str, str]]:
    return [("s1", "l1", f"d{d}", sensor) for d in range(n_devices) for sensor in ("temp", "vib_x")]


def test_snapshot_round_trip_continues_exactly(tmp_path: Path) -> None:
    rules = [DetectorRule("vib*", DetectorParams(zscore_window=20, warmup=10, mad_window=11))]
    keys = _keys(4)
    rng = np.random.default_rng(24)
    stream, ts, values, _ = random_batch(rng, 4000, streams=len(keys))
    h = 2500

    def run(registry: StreamRegistry, det: Detectors, sl: slice) -> DetectResult:
        rows = np.array([registry.row(keys[j]) for j in stream[sl]], np.int64)
        return det.update(rows, ts[sl], values[sl])

    reg_a = StreamRegistry()
    det_a = Detectors(reg_a, rules=rules)
    run(reg_a, det_a, slice(0, h))
    path = tmp_path / "state" / "detectors.npz"
    assert det_a.save(path) == len(keys)

    reg_b = StreamRegistry()
    for key in [("s0", "l0", "other", "temp"), *reversed(keys)]:  # other rows for each key
        reg_b.row(key)
    det_b = Detectors(reg_b, rules=rules)
    assert det_b.load(path) == len(keys)
    assert [reg_a.row(key) for key in keys] != [reg_b.row(key) for key in keys]

    reg_c = StreamRegistry()  # the same, without the snapshot
    det_c = Detectors(reg_c, rules=rules)

    want = run(reg_a, det_a, slice(h, None))
    assert_same(run(reg_b, det_b, slice(h, None)), want)
    cold = run(reg_c, det_c, slice(h, None))
    assert not np.array_equal(cold.score, want.score, equal_nan=True)


def test_snapshot_is_not_restored_into_other_parameters(tmp_path: Path) -> None:
    keys = _keys(1)
    reg = StreamRegistry()
    det = Detectors(reg)
    values = noise(100, seed=25)
    _, ts = one_stream(values)
    det.update(np.array([reg.row(keys[0])] * 100, np.int64), ts, values)
    det.save(tmp_path / "s.npz")
    other = Detectors(StreamRegistry(), default=DetectorParams(zscore_threshold=3.0))
    assert other.load(tmp_path / "s.npz") == 0


def test_state_of_100k_streams_fits_in_200_mb() -> None:
    """As the service holds it: a registry capped at 100,000 streams, default parameters."""
    reg = StreamRegistry(max_streams=100_000)
    det = Detectors(reg)
    rows = np.array([reg.row(("s", "l", f"d{i}", "x")) for i in range(100_000)], np.int64)
    det.update(rows, np.full(len(rows), T0, np.int64), np.ones(len(rows)))
    bank = det.groups[0].bank
    assert bank.capacity >= 100_000
    total = sum(
        arr.nbytes for arr in (bank.zbuf, bank.msorted, bank.mindex, bank.fstate, bank.istate)
    )
    assert total < 200 * 2**20, f"{total / 2**20:.0f} MiB"
