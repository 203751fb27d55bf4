"""Numba kernels: plain functions over arrays with explicit per-stream state.

Contract of every kernel here:

* inputs are flat arrays of one batch, in arrival order, possibly interleaving
  many streams (``rows[i]`` is the stream's row in the state arrays);
* state lives in arrays owned by the caller and is updated in place;
* a sample is *scored before it is learned* (an outlier does not hide itself);
* NaN is "missing": scored as NaN, changes nothing;
* a sample not newer than the stream's newest one (a redelivery, a late
  sample) is scored but changes nothing either, so nothing is counted twice;
* chunk-invariant: one call on ``[a|b]`` equals a call on ``a`` then on ``b``;
* nothing is allocated per sample.

The detector engine is one kernel, :func:`detect`, that runs every enabled
detector on a sample in one pass (one visit to the stream's state). Which
detectors run is a bit mask, so each detector can be run and tested alone.
The exact rules are written out in ``docs/detectors.md``; slow, obvious
references of each detector live in ``tests/naive.py``.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

# Detector bits (also the values of the ``hits`` and ``dets`` outputs).
ZSCORE = 1  # rolling-window z-score
EWMA = 2  # exponentially weighted mean / variance control chart
MAD = 4  # rolling median / MAD robust z-score
CUSUM = 8  # two-sided CUSUM against a slow baseline
FLATLINE = 16  # stuck sensor: the same value repeated
ROC = 32  # rate-of-change spike
RANGE = 64  # |value| > HUGE: always on, cannot be learned
ALL_DETECTORS = ZSCORE | EWMA | MAD | CUSUM | FLATLINE | ROC
DETECTOR_NAMES = {
    ZSCORE: "zscore",
    EWMA: "ewma",
    MAD: "mad",
    CUSUM: "cusum",
    FLATLINE: "flatline",
    ROC: "roc",
    RANGE: "range",
}

# Parameter vector (float64) indices.
P_WARMUP = 0  # learned samples before any detector may score
P_ZS_THRESHOLD = 1
P_EW_HALFLIFE = 2  # in samples of the stream's usual interval
P_EW_THRESHOLD = 3
P_MAD_THRESHOLD = 4
P_CU_HALFLIFE = 5  # CUSUM baseline half-life, in samples of the usual interval
P_CU_K = 6  # CUSUM allowance, in standard deviations
P_CU_H = 7  # CUSUM decision interval
P_FLAT_LEN = 8  # repeats of one value that make a stuck sensor (for a continuous signal)
P_ROC_THRESHOLD = 9
P_GAP_FACTOR = 10  # silent for more than this many usual intervals: a gap
P_ONSET = 11  # consecutive hits that open an episode
P_CLEAR = 12  # consecutive quiet samples that clear the anomaly flag
P_LEARN_LIMIT = 13  # learn from this many samples, then keep the baselines fixed (0: always)
P_HOLD = 14  # consecutive quiet samples that end an episode (>= P_CLEAR)
N_PARAMS = 15

# Float state columns.
F_MEAN_DT = 0  # usual interval between samples (EW mean, ms)
F_LAST_X = 1  # newest learned value
F_ADIFF = 2  # EW mean of |x - previous x|
F_ZS_MEAN = 3  # window mean, relative to F_ZS_SHIFT
F_ZS_M2 = 4  # window sum of squared deviations
F_ZS_SHIFT = 5  # window values are stored minus this reference
F_EW_MEAN = 6
F_EW_VAR = 7
F_CU_MEAN = 8
F_CU_VAR = 9
F_CU_POS = 10
F_CU_NEG = 11
F_FL_PREP = 12  # EW fraction of samples that repeat the previous value
F_RC_VAR = 13  # EW mean square of the normalised rate of change
F_RUN_PEAK = 14  # peak score of the current run of hits
F_EV_PEAK = 15  # peak score of the open episode
N_FLOAT_COLS = 16

# Int state columns.
I_N = 0  # learned samples
I_LAST_TS = 1  # newest timestamp seen (ms); starts at NO_TS
I_FL_RUN = 2  # consecutive learned repeats of the previous value
I_HITS = 3  # consecutive hits
I_QUIET = 4  # consecutive quiet samples
I_ACTIVE = 5  # 1 while an episode is open (the flag may have cleared)
I_RUN_START = 6  # timestamp of the first hit of the current run
I_RUN_DETS = 7  # detectors hit during the current run
I_EV_START = 8
I_EV_DETS = 9
I_EV_LAST_HIT = 10  # timestamp of the open episode's latest hit
I_ZS_POS = 11  # next slot of the z-score ring (no integer division in the hot loop)
I_ZS_SINCE = 12  # updates since the z-score window was last summed exactly
I_MAD_POS = 13  # next slot of the MAD ring
N_INT_COLS = 14

NO_TS = np.iinfo(np.int64).min

# Episode outputs.
EVENT_NONE = 0
EVENT_OPENED = 1
EVENT_CLOSED = 2

#: Finite values beyond this magnitude would overflow the squared deviations: they are
#: flagged (score 1, detector RANGE) but never learned.
HUGE = 1e150
#: Spread smaller than this (relative to the level's magnitude) counts as no spread.
REL_STD_FLOOR = 1e-9
ABS_STD_FLOOR = 1e-12
#: Smoothing of the usual interval and of the mean absolute step (per sample).
DT_ALPHA = 0.05
DIFF_ALPHA = 0.05
#: A robust z uses max(MAD / 0.6745, MAD_DIFF_FLOOR * mean |step|) as its scale, so a
#: quantised signal whose window holds one value does not divide by zero.
MAD_DIFF_FLOOR = 0.5
MAD_TO_SIGMA = 1.4826
#: Smoothing of the fraction of repeated values (per sample), and its cap.
FLAT_ALPHA = 0.01
FLAT_MAX_PREP = 0.999
LN2 = math.log(2.0)
LOG1M_FLAT_ALPHA = math.log1p(-FLAT_ALPHA)


def new_state(streams: int, zs_window: int, mad_window: int) -> tuple[np.ndarray, ...]:
    """Zeroed state for ``streams`` streams: (zbuf, msorted, mindex, fstate, istate)."""
    zbuf = np.zeros((streams, zs_window), dtype=np.float64)
    msorted = np.zeros((streams, mad_window), dtype=np.float64)
    mindex = np.zeros((streams, 2 * mad_window), dtype=np.int32)
    fstate = np.zeros((streams, N_FLOAT_COLS), dtype=np.float64)
    istate = np.zeros((streams, N_INT_COLS), dtype=np.int64)
    istate[:, I_LAST_TS] = NO_TS
    return zbuf, msorted, mindex, fstate, istate


@njit(cache=True, nogil=True, inline="always")
def _ratio(a: float, thr: float) -> float:
    return a / (a + thr)


@njit(cache=True, nogil=True)
def _recentre(buf_row: np.ndarray, count: int, shift: float) -> tuple[float, float, float]:
    """Re-centre the first ``count`` slots of a ring buffer on their mean.

    Returns the new shift, the mean relative to it (about 0) and the exact M2. The
    slots move by what the shift actually moved (the new shift is rounded), so the
    values already stored and those to come stay relative to the same reference.
    """
    total = 0.0
    for j in range(count):
        total += buf_row[j]
    new_shift = shift + total / count
    moved = new_shift - shift
    total = 0.0
    for j in range(count):
        buf_row[j] -= moved
        total += buf_row[j]
    mean = total / count
    m2 = 0.0
    for j in range(count):
        d = buf_row[j] - mean
        m2 += d * d
    return new_shift, mean, m2


@njit(cache=True, nogil=True, inline="always")
def _flat_strength(run: int, prep: float, flat_len: float) -> float:
    """A run of ``run`` repeats against a repeat fraction ``prep``: 1.0 when ``prep ** run``
    is as unlikely as ``0.5 ** flat_len`` (so a continuous signal needs ``flat_len``)."""
    p = min(max(prep, 0.5), FLAT_MAX_PREP)
    return run * -math.log(p) / (flat_len * LN2)


@njit(cache=True, nogil=True, inline="always")
def _flat_flagged(run: int, n: int, prep: float, flat_len: float) -> bool:
    """Whether a run that ended with ``n`` samples learned was flagged as stuck (a run
    that started at the stream's first sample never is)."""
    return run < n - 1 and _flat_strength(run, prep, flat_len) >= 1.0


@njit(cache=True, nogil=True)
def _sorted_insert(s: np.ndarray, idx: np.ndarray, n: int, slot: int, new: float) -> None:
    """Put ``new``, arriving in ring slot ``slot``, into the sorted window ``s[:w]``.

    ``idx[:w]`` holds the ring slot of each sorted position and ``idx[w:]`` the sorted
    position of each ring slot (w = ``s.shape[0]``). While the window fills (``n`` < w
    values so far) ``new`` goes in at the end; once full it takes the place of the value
    it evicts from ``slot``. Either way it then walks to its rank, moving the values it
    passes by one: no search, and the cost is how far its rank is from the old one's.
    """
    w = s.shape[0]
    j = n if n < w else idx[w + slot]
    while j > 0 and s[j - 1] > new:
        s[j] = s[j - 1]
        idx[j] = idx[j - 1]
        idx[w + idx[j]] = j
        j -= 1
    if n >= w:
        while j + 1 < w and s[j + 1] < new:
            s[j] = s[j + 1]
            idx[j] = idx[j + 1]
            idx[w + idx[j]] = j
            j += 1
    s[j] = new
    idx[j] = slot
    idx[w + slot] = j


@njit(cache=True, nogil=True)
def _kth_deviation(s: np.ndarray, n: int, med: float, k: int) -> float:
    """k-th smallest (0-based) of |s[i] - med| over the sorted prefix ``s[:n]``, O(log n).

    The k + 1 values nearest to ``med`` are a contiguous block of the sorted
    values; bisect for where it starts, and the k-th deviation is the larger of
    its two ends' distances.
    """
    width = k + 1
    lo = 0
    length = n - width + 1  # candidate starts 0 .. n - width
    while length > 1:
        half = length >> 1
        mid = lo + half
        # Start at ``mid`` or later when s[mid - 1] is farther than s[mid - 1 + width].
        lo += half * (med - s[mid - 1] > s[mid - 1 + width] - med)
        length -= half
    return float(max(med - s[lo], s[lo + width - 1] - med))


@njit(cache=True, nogil=True)
def detect(
    rows: np.ndarray,  # int64[n]: state row of each sample
    ts: np.ndarray,  # int64[n]: epoch ms
    values: np.ndarray,  # float64[n]
    enabled: int,  # bit mask of detectors
    p: np.ndarray,  # float64[N_PARAMS]
    zbuf: np.ndarray,  # float64[streams, zs_window]: ring of the last values (shifted)
    msorted: np.ndarray,  # float64[streams, mad_window]: the last values, sorted
    mindex: np.ndarray,  # int32[streams, 2 * mad_window]: ring slot <-> sorted position
    fs: np.ndarray,  # float64[streams, N_FLOAT_COLS]
    ist: np.ndarray,  # int64[streams, N_INT_COLS]
    out_mean: np.ndarray,  # float64[n]: baseline level before the sample
    out_std: np.ndarray,  # float64[n]: baseline spread before the sample
    out_z: np.ndarray,  # float64[n]: signed z of the sample against them
    out_score: np.ndarray,  # float64[n]: fused score in [0, 1]
    out_hits: np.ndarray,  # int64[n]: detectors over their threshold
    out_anomaly: np.ndarray,  # bool[n]: the anomaly flag after this sample
    out_gap: np.ndarray,  # int64[n]: start (ms) of the silence this sample ends, else 0
    out_event: np.ndarray,  # int8[n]: EVENT_OPENED / EVENT_CLOSED at this sample
    out_ev_start: np.ndarray,  # int64[n]: episode start (ms)
    out_ev_end: np.ndarray,  # int64[n]: episode's last hit (ms), when closed here
    out_ev_peak: np.ndarray,  # float64[n]: episode's peak score so far
    out_ev_dets: np.ndarray,  # int64[n]: detectors hit during the episode so far
) -> None:
    """Score then learn every sample with the enabled detectors; see ``docs/detectors.md``.

    The ``out_ev_*`` outputs are written only where ``out_event`` is not EVENT_NONE
    (``out_ev_end`` only where it is EVENT_CLOSED); elsewhere they are left as they were.
    """
    zw = zbuf.shape[1]
    mw = msorted.shape[1]
    warmup = int(p[P_WARMUP])
    zs_thr = p[P_ZS_THRESHOLD]
    ew_hl = p[P_EW_HALFLIFE]
    ew_thr = p[P_EW_THRESHOLD]
    mad_thr = p[P_MAD_THRESHOLD]
    cu_hl = p[P_CU_HALFLIFE]
    cu_k = p[P_CU_K]
    cu_h = p[P_CU_H]
    flat_len = p[P_FLAT_LEN]
    roc_thr = p[P_ROC_THRESHOLD]
    gap_factor = p[P_GAP_FACTOR]
    onset = int(p[P_ONSET])
    clear = int(p[P_CLEAR])
    hold = int(p[P_HOLD])
    learn_limit = int(p[P_LEARN_LIMIT])
    use_zs = (enabled & ZSCORE) != 0
    use_ew = (enabled & EWMA) != 0
    use_mad = (enabled & MAD) != 0
    use_cu = (enabled & CUSUM) != 0
    use_fl = (enabled & FLATLINE) != 0
    use_rc = (enabled & ROC) != 0
    timed = use_ew or use_cu or use_rc  # the detectors that need the interval
    inv_zw = 1.0 / zw

    for i in range(values.shape[0]):
        r = rows[i]
        x = values[i]
        t = ts[i]
        out_event[i] = EVENT_NONE
        out_gap[i] = 0
        out_hits[i] = 0
        n = ist[r, I_N]
        last_ts = ist[r, I_LAST_TS]
        fresh = t > last_ts
        if math.isnan(x):
            out_mean[i] = math.nan
            out_std[i] = math.nan
            out_z[i] = math.nan
            out_score[i] = math.nan
            out_anomaly[i] = ist[r, I_ACTIVE] != 0 and ist[r, I_QUIET] < clear
            continue

        score = 0.0
        hits = 0
        mean_dt = fs[r, F_MEAN_DT]
        dt = float(t - last_ts) if n > 0 and fresh else 0.0
        # Interval in units of the usual one (1.0 until there is a usual one).
        dtn = 1.0
        if timed and mean_dt > 0.0 and dt > 0.0:
            dtn = dt / mean_dt
        huge = abs(x) > HUGE
        warm = n >= warmup
        # Samples in the baselines' windows (learning stops at learn_limit, if set).
        n_base = n if learn_limit == 0 else min(n, learn_limit)
        out_mean[i] = math.nan
        out_std[i] = math.nan
        out_z[i] = math.nan
        last_x = fs[r, F_LAST_X]
        adiff = fs[r, F_ADIFF]
        if huge:
            score = 1.0
            hits = RANGE
        else:
            # ---- rolling-window z-score (scored against the window before x)
            if use_zs and n >= 1:
                cnt = min(n_base, zw)
                shift = fs[r, F_ZS_SHIFT]
                zm = fs[r, F_ZS_MEAN]
                std = math.sqrt(max(fs[r, F_ZS_M2], 0.0) / cnt)
                floor = REL_STD_FLOOR * abs(zm + shift) + ABS_STD_FLOOR
                z = (x - shift - zm) / max(std, floor)
                out_mean[i] = zm + shift
                out_std[i] = std
                out_z[i] = z
                if warm:
                    az = abs(z)
                    s = _ratio(az, zs_thr)
                    score = max(score, s)
                    if az > zs_thr:
                        hits |= ZSCORE
            # ---- EWMA control chart
            if use_ew and n >= 1:
                em = fs[r, F_EW_MEAN]
                esd = math.sqrt(max(fs[r, F_EW_VAR], 0.0))
                floor = REL_STD_FLOOR * abs(em) + ABS_STD_FLOOR
                z = (x - em) / max(esd, floor)
                if not use_zs:
                    out_mean[i] = em
                    out_std[i] = esd
                    out_z[i] = z
                if warm:
                    az = abs(z)
                    score = max(score, _ratio(az, ew_thr))
                    if az > ew_thr:
                        hits |= EWMA
            # ---- rolling median / MAD
            if use_mad and warm:
                cnt = min(n_base, mw)
                srow = msorted[r]
                half = cnt // 2
                if cnt % 2 == 1:
                    med = srow[half]
                    mad = _kth_deviation(srow, cnt, med, half)
                else:
                    med = 0.5 * (srow[half - 1] + srow[half])
                    mad = 0.5 * (
                        _kth_deviation(srow, cnt, med, half - 1)
                        + _kth_deviation(srow, cnt, med, half)
                    )
                scale = max(
                    MAD_TO_SIGMA * mad,
                    MAD_DIFF_FLOOR * adiff,
                    REL_STD_FLOOR * abs(med) + ABS_STD_FLOOR,
                )
                az = abs(x - med) / scale
                score = max(score, _ratio(az, mad_thr))
                if az > mad_thr:
                    hits |= MAD
            # ---- CUSUM against a slow baseline
            cu_pos = fs[r, F_CU_POS]
            cu_neg = fs[r, F_CU_NEG]
            cu_reset = False
            if use_cu and warm:
                cm = fs[r, F_CU_MEAN]
                csd = max(
                    math.sqrt(max(fs[r, F_CU_VAR], 0.0)),
                    REL_STD_FLOOR * abs(cm) + ABS_STD_FLOOR,
                )
                zc = (x - cm) / csd
                cu_pos = max(0.0, cu_pos + zc - cu_k)
                cu_neg = max(0.0, cu_neg - zc - cu_k)
                a = max(cu_pos, cu_neg)
                score = max(score, _ratio(a, cu_h))
                if a > cu_h:
                    hits |= CUSUM
                    cu_reset = True
            # ---- flatline: the same value again and again
            repeat = n >= 1 and abs(x - last_x) <= REL_STD_FLOOR * abs(last_x) + ABS_STD_FLOOR
            run = ist[r, I_FL_RUN] + 1 if repeat else 0
            # A run of ``run`` repeats is as unlikely as 0.5 ** flat_len when
            # prep ** run is; a stream that has never changed is not stuck.
            flat_a = 0.0
            if use_fl and 0 < run < n:
                flat_a = _flat_strength(run, fs[r, F_FL_PREP], flat_len)
            if use_fl and warm:
                score = max(score, _ratio(flat_a, 1.0))
                if flat_a >= 1.0:
                    hits |= FLATLINE
            # ---- rate of change
            if use_rc and warm and dt > 0.0:
                rate = (x - last_x) / max(dtn, 1.0)
                rsd = max(
                    math.sqrt(max(fs[r, F_RC_VAR], 0.0)),
                    REL_STD_FLOOR * abs(last_x) + ABS_STD_FLOOR,
                )
                a = abs(rate) / rsd
                score = max(score, _ratio(a, roc_thr))
                if a > roc_thr:
                    hits |= ROC

        out_score[i] = score
        out_hits[i] = hits
        if not fresh:
            out_anomaly[i] = ist[r, I_ACTIVE] != 0 and ist[r, I_QUIET] < clear
            continue

        # ---- gap: silent for longer than gap_factor usual intervals
        if warm and mean_dt > 0.0 and dt > gap_factor * mean_dt:
            out_gap[i] = last_ts

        # ---- hysteresis: episodes. One opens after ``onset`` consecutive hits; the
        # anomaly flag clears after ``clear`` quiet samples, the episode ends after
        # ``hold`` of them (a recurrence before that continues the same episode).
        active = ist[r, I_ACTIVE] != 0
        if hits != 0:
            if ist[r, I_HITS] == 0:
                ist[r, I_RUN_START] = t
                ist[r, I_RUN_DETS] = 0
                fs[r, F_RUN_PEAK] = 0.0
            ist[r, I_HITS] += 1
            ist[r, I_RUN_DETS] |= hits
            fs[r, F_RUN_PEAK] = max(fs[r, F_RUN_PEAK], score)
            if active:
                if ist[r, I_QUIET] < clear or ist[r, I_HITS] >= onset:
                    ist[r, I_QUIET] = 0
                    ist[r, I_EV_DETS] |= ist[r, I_RUN_DETS]
                    fs[r, F_EV_PEAK] = max(fs[r, F_EV_PEAK], fs[r, F_RUN_PEAK])
                    ist[r, I_EV_LAST_HIT] = t
            elif ist[r, I_HITS] >= onset:
                active = True
                ist[r, I_ACTIVE] = 1
                ist[r, I_QUIET] = 0
                ist[r, I_EV_START] = ist[r, I_RUN_START]
                ist[r, I_EV_DETS] = ist[r, I_RUN_DETS]
                fs[r, F_EV_PEAK] = fs[r, F_RUN_PEAK]
                ist[r, I_EV_LAST_HIT] = t
                out_event[i] = EVENT_OPENED
        else:
            ist[r, I_HITS] = 0
            ist[r, I_QUIET] += 1
            if active and ist[r, I_QUIET] >= hold:
                active = False
                ist[r, I_ACTIVE] = 0
                out_event[i] = EVENT_CLOSED
                out_ev_end[i] = ist[r, I_EV_LAST_HIT]
        if out_event[i] != EVENT_NONE:
            out_ev_start[i] = ist[r, I_EV_START]
            out_ev_peak[i] = fs[r, F_EV_PEAK]
            out_ev_dets[i] = ist[r, I_EV_DETS]
        out_anomaly[i] = active and ist[r, I_QUIET] < clear
        ist[r, I_LAST_TS] = t
        if huge:
            continue

        # ---- learn (the usual interval and the last value always; the baselines only
        # up to learn_limit samples, if set: fixed control limits after commissioning)
        learn = learn_limit == 0 or n < learn_limit
        if n >= 1:
            step = abs(x - last_x) if use_mad or n == 1 else 0.0
            if n == 1:
                fs[r, F_MEAN_DT] = dt
                fs[r, F_ADIFF] = step
            else:
                fs[r, F_MEAN_DT] = mean_dt + DT_ALPHA * (min(dt, gap_factor * mean_dt) - mean_dt)
                if use_mad and learn:  # only the MAD detector's scale floor needs it
                    fs[r, F_ADIFF] = adiff + DIFF_ALPHA * (step - adiff)
        if use_zs and learn:
            pos = ist[r, I_ZS_POS]
            if n == 0:
                fs[r, F_ZS_SHIFT] = x
            xs = x - fs[r, F_ZS_SHIFT]
            zm = fs[r, F_ZS_MEAN]
            m2 = fs[r, F_ZS_M2]
            if n < zw:
                zbuf[r, pos] = xs
                delta = xs - zm
                zm += delta / (n + 1)
                m2 += delta * (xs - zm)
            else:
                old = zbuf[r, pos]
                zbuf[r, pos] = xs
                delta = xs - old
                new_mean = zm + delta * inv_zw
                m2 += delta * (xs - new_mean + old - zm)
                zm = new_mean
            ist[r, I_ZS_POS] = pos + 1 if pos + 1 < zw else 0
            since = ist[r, I_ZS_SINCE] + 1
            if since >= zw:
                shift, zm, m2 = _recentre(zbuf[r], min(n + 1, zw), fs[r, F_ZS_SHIFT])
                fs[r, F_ZS_SHIFT] = shift
                since = 0
            ist[r, I_ZS_SINCE] = since
            fs[r, F_ZS_MEAN] = zm
            fs[r, F_ZS_M2] = m2
        # Time-aware smoothing; a long silence counts as at most gap_factor intervals, and
        # the first samples are averaged evenly (no bias towards the first value).
        dtc = min(dtn, gap_factor)
        alpha = 0.0
        if use_ew or use_rc:
            alpha = 1.0 - math.exp2(-dtc / ew_hl)
            if alpha * (n + 1) < 1.0:
                alpha = 1.0 / (n + 1)
        if use_ew and learn:
            if n == 0:
                fs[r, F_EW_MEAN] = x
            else:
                em = fs[r, F_EW_MEAN]
                ev = fs[r, F_EW_VAR]
                d = x - em
                if warm:  # winsorised: one outlier cannot blow up the variance
                    lim = ew_thr * math.sqrt(max(ev, 0.0))
                    d = min(max(d, -lim), lim)
                fs[r, F_EW_MEAN] = em + alpha * d
                fs[r, F_EW_VAR] = (1.0 - alpha) * (ev + alpha * d * d)
        if use_mad and learn:
            pos = ist[r, I_MAD_POS]
            _sorted_insert(msorted[r], mindex[r], n, pos, x)
            ist[r, I_MAD_POS] = pos + 1 if pos + 1 < mw else 0
        if use_cu:
            if cu_reset:
                cu_pos = 0.0
                cu_neg = 0.0
            if n == 0 or (cu_reset and learn):
                fs[r, F_CU_MEAN] = x
            elif learn:
                calpha = 1.0 - math.exp2(-dtc / cu_hl)
                if calpha * (n + 1) < 1.0:
                    calpha = 1.0 / (n + 1)
                cm = fs[r, F_CU_MEAN]
                cv = fs[r, F_CU_VAR]
                d = x - cm
                if warm:
                    lim = ew_thr * math.sqrt(max(cv, 0.0))
                    d = min(max(d, -lim), lim)
                fs[r, F_CU_MEAN] = cm + calpha * d
                fs[r, F_CU_VAR] = (1.0 - calpha) * (cv + calpha * d * d)
            fs[r, F_CU_POS] = cu_pos
            fs[r, F_CU_NEG] = cu_neg
        if use_fl:
            ended = ist[r, I_FL_RUN]  # length of the run this sample ends (0 if none)
            ist[r, I_FL_RUN] = run
            # The repeat fraction learns a run when it ends, and only if it was not
            # flagged: a stuck sensor does not teach that being stuck is normal.
            if n >= 1 and not repeat and learn:
                prep = fs[r, F_FL_PREP]
                if ended > 0 and not _flat_flagged(ended, n, prep, flat_len):
                    prep = 1.0 - (1.0 - prep) * math.exp(ended * LOG1M_FLAT_ALPHA)
                fs[r, F_FL_PREP] = prep * (1.0 - FLAT_ALPHA)
        if use_rc and n >= 1 and learn:
            rate = (x - last_x) / max(dtn, 1.0)
            rv = fs[r, F_RC_VAR]
            if n == 1:
                rv = rate * rate
            else:
                if warm:
                    lim = roc_thr * roc_thr * max(rv, 0.0)
                    rate = math.copysign(math.sqrt(min(rate * rate, lim)), rate)
                rv += (alpha if alpha * n >= 1.0 else 1.0 / n) * (rate * rate - rv)
            fs[r, F_RC_VAR] = rv
        fs[r, F_LAST_X] = x
        ist[r, I_N] = n + 1
