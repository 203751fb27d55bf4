"""Numba kernels: plain functions over arrays with explicit per-stream state.

Contract of every kernel here:

* inputs are flat arrays of one batch, in arrival order, possibly interleaving
  many streams (``rows[i]`` is the stream's row in the state arrays);
* state lives in arrays owned by the caller and is updated in place;
* a sample is *scored before it is learned* (an outlier does not hide itself);
* NaN is "missing": scored as NaN and not learned;
* chunk-invariant: one call on ``[a|b]`` equals a call on ``a`` then on ``b``;
* nothing is allocated per sample.

Slow, obvious references of each kernel live in ``tests/naive.py``.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

# Columns of the float state of ``rolling_zscore``.
ZS_MEAN = 0  # mean of the values in the window
ZS_M2 = 1  # sum of squared deviations from that mean
ZS_SHIFT = 2  # values are stored minus this reference, re-centred at every exact re-sum
ZS_N_FLOAT_COLS = 3
# Columns of the int state.
ZS_COUNT = 0  # values in the window (<= window)
ZS_POS = 1  # next write position in the ring buffer
ZS_SINCE_RECOMPUTE = 2  # updates since the window was last summed exactly
ZS_LAST_TS = 3  # newest timestamp learned (epoch ms); older samples are scored, not learned
ZS_N_INT_COLS = 4

#: Finite values beyond this magnitude would overflow the squared deviations: they are
#: flagged (score 1) but never learned, so they cannot poison a stream's statistics.
HUGE = 1e150
#: Values closer than this (relative to the mean's magnitude) count as no spread.
REL_STD_FLOOR = 1e-9
ABS_STD_FLOOR = 1e-12


@njit(cache=True, nogil=True)
def _recentre(buf_row: np.ndarray, count: int, shift: float) -> tuple[float, float]:
    """Re-centre the first ``count`` slots of a ring buffer on their mean.

    Returns the new shift and the exact M2 (two passes); the mean becomes 0.
    """
    total = 0.0
    for j in range(count):
        total += buf_row[j]
    mean = total / count
    m2 = 0.0
    for j in range(count):
        d = buf_row[j] - mean
        buf_row[j] = d
        m2 += d * d
    return shift + mean, m2


@njit(cache=True, nogil=True)
def rolling_zscore(
    rows: np.ndarray,  # int64[n]: state row of each sample
    ts: np.ndarray,  # int64[n]: epoch ms
    values: np.ndarray,  # float64[n]
    window: int,
    warmup: int,
    threshold: float,
    buf: np.ndarray,  # float64[streams, window]: ring buffer of the last values
    fstate: np.ndarray,  # float64[streams, ZS_N_FLOAT_COLS]
    istate: np.ndarray,  # int64[streams, ZS_N_INT_COLS]
    out_mean: np.ndarray,  # float64[n]: window mean before this sample
    out_std: np.ndarray,  # float64[n]: window standard deviation before this sample
    out_z: np.ndarray,  # float64[n]: signed z-score of the sample against them
    out_score: np.ndarray,  # float64[n]: |z| / (|z| + threshold), in [0, 1)
    out_anomaly: np.ndarray,  # bool[n]: |z| > threshold once warmed up
) -> None:
    """Sliding-window mean, standard deviation and z-score, O(1) per sample.

    The window holds the last ``window`` learned values of each stream, stored
    relative to a per-stream reference (the shift) so that values around 1e9
    with small noise keep their precision. Adding and evicting use Welford's
    update for a sliding window; every ``window`` updates the window is
    re-summed exactly and re-centred, which bounds rounding drift and keeps
    the cost O(1) amortised. A sample is flagged only once the stream has
    ``warmup`` values. The standard deviation is the population one. A value
    beyond ``HUGE`` in magnitude is flagged with score 1 and not learned.
    """
    for i in range(values.shape[0]):
        r = rows[i]
        x = values[i]
        count = istate[r, ZS_COUNT]
        shift = fstate[r, ZS_SHIFT]
        mean = fstate[r, ZS_MEAN]
        m2 = fstate[r, ZS_M2]
        if math.isnan(x):
            out_mean[i] = mean + shift if count > 0 else math.nan
            out_std[i] = math.sqrt(max(m2, 0.0) / count) if count > 0 else math.nan
            out_z[i] = math.nan
            out_score[i] = math.nan
            out_anomaly[i] = False
            continue

        if abs(x) > HUGE:
            out_mean[i] = mean + shift if count > 0 else math.nan
            out_std[i] = math.sqrt(max(m2, 0.0) / count) if count > 0 else math.nan
            out_z[i] = math.nan
            out_score[i] = 1.0
            out_anomaly[i] = True
            continue
        if count == 0:
            shift = x
        xs = x - shift
        # Score against the window as it was before this sample.
        if count >= 2:
            std = math.sqrt(max(m2, 0.0) / count)
            floor = REL_STD_FLOOR * abs(mean + shift) + ABS_STD_FLOOR
            z = (xs - mean) / max(std, floor)
            out_mean[i] = mean + shift
            out_std[i] = std
            out_z[i] = z
            az = abs(z)
            out_score[i] = az / (az + threshold)
            out_anomaly[i] = count >= warmup and az > threshold
        else:
            out_mean[i] = mean + shift if count == 1 else math.nan
            out_std[i] = 0.0 if count == 1 else math.nan
            out_z[i] = 0.0
            out_score[i] = 0.0
            out_anomaly[i] = False

        # Learn, unless the sample is older than what the stream has seen
        # (a redelivery or a late sample: it must not be counted twice).
        t = ts[i]
        if count > 0 and t <= istate[r, ZS_LAST_TS]:
            continue
        istate[r, ZS_LAST_TS] = t
        pos = istate[r, ZS_POS]
        if count < window:
            buf[r, pos] = xs
            count += 1
            delta = xs - mean
            mean += delta / count
            m2 += delta * (xs - mean)
        else:
            old = buf[r, pos]
            buf[r, pos] = xs
            delta = xs - old
            new_mean = mean + delta / count
            m2 += delta * (xs - new_mean + old - mean)
            mean = new_mean
        pos += 1
        if pos == window:
            pos = 0
        since = istate[r, ZS_SINCE_RECOMPUTE] + 1
        if since >= window:
            shift, m2 = _recentre(buf[r], count, shift)
            mean = 0.0
            since = 0
        istate[r, ZS_COUNT] = count
        istate[r, ZS_POS] = pos
        istate[r, ZS_SINCE_RECOMPUTE] = since
        fstate[r, ZS_MEAN] = mean
        fstate[r, ZS_M2] = m2
        fstate[r, ZS_SHIFT] = shift
