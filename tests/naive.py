"""Slow, obvious reference of the detector kernel, for comparison tests.

:func:`detect_naive` recomputes what ``DetectorBank(params).update(rows, ts, values)``
returns from fresh state, deliberately structured differently from the kernel:

* one Python object per stream instead of state arrays;
* ``collections.deque`` windows of the raw values (no shifted ring buffer);
* ``np.mean`` / ``np.std`` over the whole z-score window at every sample (no Welford
  update, no periodic re-centring);
* ``np.median`` of the window and ``np.median(np.abs(window - median))`` for the MAD
  (no sorted array, no k-th deviation search).

The rules (score before learn, freshness ``t > last_ts``, NaN and ``|x| > HUGE``,
winsorising, the even averaging of the first samples, ``learn_limit``, the flag and
episode hysteresis with ``onset`` / ``clear`` / ``hold``) are those written in
``docs/detectors.md`` and in the comments of ``ingest/processing/kernels.py``.
:class:`NaiveBank` keeps its streams between calls and answers ``silent`` too.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from ingest.processing.detectors import DetectorParams

# The kernel's constants; everything computed from them is written out again below.
from ingest.processing.kernels import (
    ABS_STD_FLOOR,
    CUSUM,
    DIFF_ALPHA,
    DT_ALPHA,
    EWMA,
    FLAT_ALPHA,
    FLAT_MAX_PREP,
    FLATLINE,
    HUGE,
    MAD,
    MAD_DIFF_FLOOR,
    MAD_TO_SIGMA,
    RANGE,
    REL_STD_FLOOR,
    ROC,
    ZSCORE,
)

_BITS = {
    "zscore": ZSCORE,
    "ewma": EWMA,
    "mad": MAD,
    "cusum": CUSUM,
    "flatline": FLATLINE,
    "roc": ROC,
}

FLOAT_OUTPUTS = ("mean", "std", "z", "score")


def _floor(level: float) -> float:
    """Smallest spread that counts as a spread around ``level``."""
    return REL_STD_FLOOR * abs(level) + ABS_STD_FLOOR


def _ratio(a: float, threshold: float) -> float:
    """Map a statistic in [0, inf) to a score in [0, 1); ``threshold`` maps to 0.5."""
    return a / (a + threshold)


def _clip(d: float, lim: float) -> float:
    return min(max(d, -lim), lim)


def _smoothing(intervals: float, halflife: float, n: int) -> float:
    """EW weight of a sample ``intervals`` usual intervals after the previous one.

    Never less than ``1 / (n + 1)``: the first samples are averaged evenly.
    """
    alpha = 1.0 - 2.0 ** (-intervals / halflife)
    return max(alpha, 1.0 / (n + 1))


@dataclass
class Stream:
    """Everything the detectors remember about one stream."""

    zs_window: int
    mad_window: int
    n: int = 0  # learned samples
    last_ts: int | None = None  # newest timestamp seen (learned or RANGE-flagged)
    last_x: float = 0.0  # newest learned value
    mean_dt: float = 0.0  # usual interval
    adiff: float = 0.0  # EW mean |step|
    zs: deque[float] = field(init=False)
    mad: deque[float] = field(init=False)
    ew_mean: float = 0.0
    ew_var: float = 0.0
    cu_mean: float = 0.0
    cu_var: float = 0.0
    cu_pos: float = 0.0
    cu_neg: float = 0.0
    flat_run: int = 0
    flat_prep: float = 0.0
    run_flagged: bool = False  # the current run of repeats has been flagged as stuck
    roc_var: float = 0.0
    # hysteresis
    hit_run: int = 0
    quiet: int = 0
    active: bool = False
    run_start: int = 0
    run_dets: int = 0
    run_peak: float = 0.0
    ev_start: int = 0
    ev_dets: int = 0
    ev_peak: float = 0.0
    ev_last_hit: int = 0

    def __post_init__(self) -> None:
        self.zs = deque(maxlen=self.zs_window)
        self.mad = deque(maxlen=self.mad_window)

    def flag(self, clear: int) -> bool:
        """The anomaly flag: an episode is open and has not been quiet for ``clear``."""
        return self.active and self.quiet < clear


class NaiveBank:
    """The reference counterpart of ``DetectorBank``: streams as Python objects."""

    def __init__(self, params: DetectorParams | None = None) -> None:
        self.params = params or DetectorParams()
        self.on = {name: name in self.params.detectors for name in _BITS}
        self.streams: dict[int, Stream] = {}

    def update(self, rows: np.ndarray, ts: np.ndarray, values: np.ndarray) -> dict[str, np.ndarray]:
        """Score then learn each sample, in order; the outputs of ``DetectorBank.update``.

        Keys: the field names of ``DetectResult``. ``ev_*`` are 0 where ``event == 0``
        (the kernel leaves them undefined there), ``ev_end`` likewise where ``event != 2``.
        """
        n_samples = len(values)
        out = {name: np.full(n_samples, np.nan) for name in FLOAT_OUTPUTS}
        out["hits"] = np.zeros(n_samples, np.int64)
        out["anomaly"] = np.zeros(n_samples, np.bool_)
        out["gap"] = np.zeros(n_samples, np.int64)
        out["event"] = np.zeros(n_samples, np.int8)
        out["ev_start"] = np.zeros(n_samples, np.int64)
        out["ev_end"] = np.zeros(n_samples, np.int64)
        out["ev_peak"] = np.zeros(n_samples, np.float64)
        out["ev_dets"] = np.zeros(n_samples, np.int64)
        for i in range(n_samples):
            r = int(rows[i])
            s = self.streams.get(r)
            if s is None:
                s = self.streams[r] = Stream(self.params.zscore_window, self.params.mad_window)
            self._one(s, i, int(ts[i]), float(values[i]), out)
        return out

    def silent(self, now_ms: int) -> set[int]:
        """Streams that are warm and silent for more than ``gap_factor`` usual intervals."""
        p = self.params
        return {
            r
            for r, s in self.streams.items()
            if s.n >= p.warmup
            and s.mean_dt > 0
            and s.last_ts is not None
            and now_ms - s.last_ts > p.gap_factor * s.mean_dt
        }

    def _one(self, s: Stream, i: int, t: int, x: float, out: dict[str, np.ndarray]) -> None:
        p = self.params
        on = self.on
        fresh = s.last_ts is None or t > s.last_ts
        if math.isnan(x):  # missing: scored as NaN, nothing else happens
            out["anomaly"][i] = s.flag(p.clear)
            return

        n = s.n
        warm = n >= p.warmup
        # Elapsed time since the newest timestamp, for a learnable sample of a stream
        # that has learned something; in usual intervals once there is a usual one.
        dt = float(t - s.last_ts) if (fresh and n > 0 and s.last_ts is not None) else 0.0
        intervals = dt / s.mean_dt if (dt > 0 and s.mean_dt > 0) else 1.0

        # ------------------------------------------------------------ score
        scores = [0.0]
        hits = 0
        repeat = False
        run = 0
        flat_a = 0.0
        cu_pos, cu_neg, cu_reset = s.cu_pos, s.cu_neg, False
        huge = abs(x) > HUGE
        if huge:
            scores.append(1.0)
            hits = RANGE
        else:
            if on["zscore"] and n >= 1:
                # Relative to the window's first value: exact differences for a window
                # far from 0, and exactly 0 spread for a window of one value.
                w = np.array(s.zs, dtype=np.float64)
                ref = w[0]
                dmean, std = float(np.mean(w - ref)), float(np.std(w - ref))
                mean = ref + dmean
                z = ((x - ref) - dmean) / max(std, _floor(mean))
                out["mean"][i], out["std"][i], out["z"][i] = mean, std, z
                if warm:
                    scores.append(_ratio(abs(z), p.zscore_threshold))
                    hits |= ZSCORE if abs(z) > p.zscore_threshold else 0
            if on["ewma"] and n >= 1:
                sd = math.sqrt(max(s.ew_var, 0.0))
                z = (x - s.ew_mean) / max(sd, _floor(s.ew_mean))
                if not on["zscore"]:
                    out["mean"][i], out["std"][i], out["z"][i] = s.ew_mean, sd, z
                if warm:
                    scores.append(_ratio(abs(z), p.ewma_threshold))
                    hits |= EWMA if abs(z) > p.ewma_threshold else 0
            if on["mad"] and warm:
                w = np.array(s.mad, dtype=np.float64)
                med = float(np.median(w))
                mad = float(np.median(np.abs(w - med)))
                scale = max(MAD_TO_SIGMA * mad, MAD_DIFF_FLOOR * s.adiff, _floor(med))
                rz = abs(x - med) / scale
                scores.append(_ratio(rz, p.mad_threshold))
                hits |= MAD if rz > p.mad_threshold else 0
            if on["cusum"] and warm:
                sd = max(math.sqrt(max(s.cu_var, 0.0)), _floor(s.cu_mean))
                zc = (x - s.cu_mean) / sd
                cu_pos = max(0.0, cu_pos + zc - p.cusum_k)
                cu_neg = max(0.0, cu_neg - zc - p.cusum_k)
                scores.append(_ratio(max(cu_pos, cu_neg), p.cusum_h))
                if max(cu_pos, cu_neg) > p.cusum_h:
                    hits |= CUSUM
                    cu_reset = True
            # Stuck: a run of repeats as unlikely as 0.5 ** flatline_samples would be for a
            # signal that repeats half of the time (or less); never for a stream that has
            # held one value since its first sample.
            repeat = n >= 1 and abs(x - s.last_x) <= _floor(s.last_x)
            run = s.flat_run + 1 if repeat else 0
            prep = min(max(s.flat_prep, 0.5), FLAT_MAX_PREP)
            if run < n:
                flat_a = (run / p.flatline_samples) * (math.log(prep) / math.log(0.5))
            if flat_a >= 1.0:
                s.run_flagged = True
            if on["flatline"] and warm:
                scores.append(_ratio(flat_a, 1.0))
                hits |= FLATLINE if flat_a >= 1.0 else 0
            if on["roc"] and warm and dt > 0:
                rate = (x - s.last_x) / max(intervals, 1.0)
                sd = max(math.sqrt(max(s.roc_var, 0.0)), _floor(s.last_x))
                scores.append(_ratio(abs(rate) / sd, p.roc_threshold))
                hits |= ROC if abs(rate) / sd > p.roc_threshold else 0
        score = max(scores)
        out["score"][i] = score
        out["hits"][i] = hits
        if not fresh:  # redelivered or late: scored, changes nothing
            out["anomaly"][i] = s.flag(p.clear)
            return

        # ------------------------------------------------------------ gap
        if warm and s.mean_dt > 0 and dt > p.gap_factor * s.mean_dt:
            out["gap"][i] = s.last_ts  # the silence this sample ends started then

        # ------------------------------------------------------------ episodes
        # An episode opens after `onset` consecutive hits. The anomaly flag is up while
        # it is open and fewer than `clear` quiet samples have passed; `hold` quiet
        # samples end it. While the flag is up any hit continues the episode; once it
        # is down it takes `onset` consecutive hits again (the same episode goes on).
        if hits:
            if s.hit_run == 0:
                s.run_start, s.run_dets, s.run_peak = t, 0, 0.0
            s.hit_run += 1
            s.run_dets |= hits
            s.run_peak = max(s.run_peak, score)
            if s.active:
                if s.quiet < p.clear or s.hit_run >= p.onset:
                    s.quiet = 0
                    s.ev_dets |= s.run_dets
                    s.ev_peak = max(s.ev_peak, s.run_peak)
                    s.ev_last_hit = t
            elif s.hit_run >= p.onset:
                s.active = True
                s.quiet = 0
                s.ev_start, s.ev_dets, s.ev_peak = s.run_start, s.run_dets, s.run_peak
                s.ev_last_hit = t
                out["event"][i] = 1
        else:
            s.hit_run = 0
            s.quiet += 1
            if s.active and s.quiet >= p.hold:
                s.active = False
                out["event"][i] = 2
                out["ev_end"][i] = s.ev_last_hit
        if out["event"][i]:
            out["ev_start"][i] = s.ev_start
            out["ev_peak"][i] = s.ev_peak
            out["ev_dets"][i] = s.ev_dets
        out["anomaly"][i] = s.flag(p.clear)
        s.last_ts = t
        if huge:  # flagged, never learned
            return

        # ------------------------------------------------------------ learn
        # The usual interval, the newest value and the count always; the baselines only
        # from the first learn_limit samples when it is set.
        learn = p.learn_limit == 0 or n < p.learn_limit
        if n == 1:
            s.mean_dt = dt
            s.adiff = abs(x - s.last_x)
        elif n >= 2:
            s.mean_dt += DT_ALPHA * (min(dt, p.gap_factor * s.mean_dt) - s.mean_dt)
            if on["mad"] and learn:
                s.adiff += DIFF_ALPHA * (abs(x - s.last_x) - s.adiff)
        if on["zscore"] and learn:
            s.zs.append(x)
        if on["mad"] and learn:
            s.mad.append(x)
        # A long silence weighs as at most gap_factor usual intervals.
        capped = min(intervals, p.gap_factor)
        alpha = _smoothing(capped, p.ewma_halflife, n)
        if on["ewma"] and learn:
            if n == 0:
                s.ew_mean = x
            else:
                d = x - s.ew_mean
                if warm:  # winsorised
                    d = _clip(d, p.ewma_threshold * math.sqrt(max(s.ew_var, 0.0)))
                s.ew_mean += alpha * d
                s.ew_var = (1.0 - alpha) * (s.ew_var + alpha * d * d)
        if on["cusum"]:
            if cu_reset:  # an alarm restarts the sums ...
                cu_pos = cu_neg = 0.0
            if n == 0 or (cu_reset and learn):  # ... and the baseline at the current level
                s.cu_mean = x
            elif learn:
                calpha = _smoothing(capped, p.cusum_halflife, n)
                d = x - s.cu_mean
                if warm:  # winsorised at the EWMA threshold
                    d = _clip(d, p.ewma_threshold * math.sqrt(max(s.cu_var, 0.0)))
                s.cu_mean += calpha * d
                s.cu_var = (1.0 - calpha) * (s.cu_var + calpha * d * d)
            s.cu_pos, s.cu_neg = cu_pos, cu_neg
        if on["flatline"]:
            ended = s.flat_run
            s.flat_run = run
            if n >= 1 and not repeat and learn:
                # A run is learned when it ends, one repeat at a time, unless it was
                # flagged as stuck; then this change of value.
                if not s.run_flagged:
                    for _ in range(ended):
                        s.flat_prep += FLAT_ALPHA * (1.0 - s.flat_prep)
                s.flat_prep += FLAT_ALPHA * (0.0 - s.flat_prep)
            if not repeat:
                s.run_flagged = False
        if on["roc"] and n >= 1 and learn:
            rate = (x - s.last_x) / max(intervals, 1.0)
            if n == 1:
                s.roc_var = rate * rate
            else:
                if warm:
                    rate = _clip(rate, p.roc_threshold * math.sqrt(max(s.roc_var, 0.0)))
                # the rates of n learned samples number n - 1: evenly averaged at first
                s.roc_var += max(alpha, 1.0 / n) * (rate * rate - s.roc_var)
        s.last_x = x
        s.n = n + 1


def detect_naive(
    rows: np.ndarray, ts: np.ndarray, values: np.ndarray, params: DetectorParams
) -> dict[str, np.ndarray]:
    """The outputs of ``DetectorBank(params).update(rows, ts, values)`` from fresh state."""
    return NaiveBank(params).update(rows, ts, values)
