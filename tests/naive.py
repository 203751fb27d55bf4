"""Slow, obvious references of the Numba kernels, for comparison tests."""

from __future__ import annotations

import math
from collections import deque

import numpy as np


def rolling_zscore_naive(
    rows: np.ndarray, ts: np.ndarray, values: np.ndarray, window: int, warmup: int, threshold: float
) -> dict[str, np.ndarray]:
    """Same outputs as ``kernels.rolling_zscore`` from fresh state, by brute force.

    For every sample: take the stream's last ``window`` learned values, compute
    mean and population std with NumPy, score, then learn unless the sample is
    NaN or not newer than the stream's newest learned timestamp.
    """
    n = len(values)
    out = {name: np.full(n, np.nan) for name in ("mean", "std", "z", "score")}
    out["anomaly"] = np.zeros(n, dtype=bool)
    windows: dict[int, deque[float]] = {}
    last_ts: dict[int, int] = {}
    for i in range(n):
        r, x, t = int(rows[i]), float(values[i]), int(ts[i])
        w = windows.setdefault(r, deque(maxlen=window))
        arr = np.array(w, dtype=np.float64)
        if len(arr):
            out["mean"][i] = arr.mean()
            out["std"][i] = arr.std()
        if math.isnan(x):
            continue
        if abs(x) > 1e150:  # kernels.HUGE: flagged, never learned
            out["score"][i] = 1.0
            out["anomaly"][i] = True
            continue
        if len(arr) >= 2:
            std = arr.std()
            floor = 1e-9 * abs(arr.mean()) + 1e-12
            z = (x - arr.mean()) / max(std, floor)
            out["z"][i] = z
            out["score"][i] = abs(z) / (abs(z) + threshold)
            out["anomaly"][i] = len(arr) >= warmup and abs(z) > threshold
        else:
            out["z"][i] = 0.0
            out["score"][i] = 0.0
        if len(w) and t <= last_ts[r]:
            continue
        last_ts[r] = t
        w.append(x)
    return out
