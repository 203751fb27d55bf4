"""NAB corpus loading and scoring, following ``shared/datasets/nab/README.md``.

``score_corpus`` picks the threshold θ* per profile with an exact sweep over all
candidates; ``raw_score_at`` is the slow row-by-row reference of the same rules.

Edge cases the README leaves open, resolved here:

- A window with no scorable row (entirely inside the probation period) adds
  nothing to S and is left out of both ``null`` and ``perfect``. It still counts
  as "the most recent window" when scaling a later false positive.
- A false positive after a one-row window (``w' = 1``, no scale) gets ``-A_fp``.
- NaN scores never alarm and are no threshold candidates; infinite scores are refused.
- Ties between candidates within 1e-9 (relative) of the best S go to the highest θ.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ingest.evaluation.csvio import parse_timestamp, read_series_csv

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

NO_ALARM = 1.1  # NAB's threshold for "no alarms"
TIE_RTOL = 1e-9
PROBATION_FRACTION = 0.15
PROBATION_MAX = 750


@dataclass(frozen=True, slots=True)
class Profile:
    """Weights of a NAB scoring profile (all positive; signs are applied by the rules)."""

    name: str
    tp: float
    fp: float
    fn: float


PROFILES: dict[str, Profile] = {
    "standard": Profile("standard", 1.0, 0.11, 1.0),
    "reward_low_FP_rate": Profile("reward_low_FP_rate", 1.0, 0.22, 1.0),
    "reward_low_FN_rate": Profile("reward_low_FN_rate", 1.0, 0.11, 2.0),
}


@dataclass(frozen=True, eq=False, slots=True)
class NabFile:
    """One data file: rows, resolved windows (row L, row R, both included) and probation P."""

    name: str
    ts_ms: IntArray
    values: FloatArray
    windows: list[tuple[int, int]]
    probation: int

    def __len__(self) -> int:
        return len(self.ts_ms)


@dataclass(frozen=True, slots=True)
class NabResult:
    """Corpus score of one profile at its optimal threshold."""

    profile: str
    score: float  # normalised: null detector 0, perfect detector 100
    threshold: float
    raw: float
    null: float
    perfect: float
    tp: int  # detected windows
    fn: int  # missed windows
    fp: int  # alarming scorable rows outside all windows


def probation_rows(n: int) -> int:
    """NAB probationary period ``min(floor(0.15 N), 750)`` for a file of ``n`` rows."""
    return min(math.floor(PROBATION_FRACTION * n), PROBATION_MAX)


def sigma(x: float) -> float:
    """NAB's scaled sigmoid: ``2/(1+exp(5x)) - 1`` for ``x <= 3``, else -1."""
    return -1.0 if x > 3.0 else 2.0 / (1.0 + math.exp(5.0 * x)) - 1.0


def _sigma_array(x: FloatArray) -> FloatArray:
    out = 2.0 / (1.0 + np.exp(5.0 * np.minimum(x, 3.0))) - 1.0
    return np.where(x > 3.0, -1.0, out)


SIGMA_MINUS_1 = sigma(-1.0)


def load_profiles(root: Path) -> dict[str, Profile]:
    """Profiles from ``config/profiles.json`` (``CostMatrix`` tp/fp/fn weights)."""
    raw = json.loads((root / "config" / "profiles.json").read_text(encoding="utf-8"))
    out: dict[str, Profile] = {}
    for name, body in raw.items():
        cm = body["CostMatrix"]
        out[name] = Profile(
            name, float(cm["tpWeight"]), float(cm["fpWeight"]), float(cm["fnWeight"])
        )
    return out


def _resolve_window(name: str, ts: IntArray, start: str, end: str) -> tuple[int, int]:
    start_ms, end_ms = parse_timestamp(start), parse_timestamp(end)
    hits = np.flatnonzero(ts == start_ms)
    if hits.size == 0:
        raise ValueError(f"{name}: no row stamped {start} (window start)")
    left = int(hits[0])
    ends = np.flatnonzero(ts[left:] == end_ms)
    if ends.size == 0:
        raise ValueError(f"{name}: no row stamped {end} at or after row {left} (window end)")
    return left, left + int(ends[0])


def load_corpus(root: Path) -> list[NabFile]:
    """Every ``data/<category>/<file>.csv`` under ``root`` with its windows, sorted by name."""
    windows_raw: dict[str, list[list[str]]] = json.loads(
        (root / "labels" / "combined_windows.json").read_text(encoding="utf-8")
    )
    data_dir = root / "data"
    names = sorted(p.relative_to(data_dir).as_posix() for p in data_dir.glob("*/*.csv"))
    missing = sorted(set(windows_raw) - set(names))
    if missing:
        raise FileNotFoundError(f"{root}: labelled files without data: {missing}")
    files: list[NabFile] = []
    for name in names:
        if name not in windows_raw:
            raise ValueError(f"{root}: {name} is not a key of combined_windows.json")
        table = read_series_csv(data_dir / name)
        if "value" not in table.columns:
            raise ValueError(f"{name}: no 'value' column")
        windows = [_resolve_window(name, table.ts_ms, s, e) for s, e in windows_raw[name]]
        for (_, r0), (l1, _) in itertools.pairwise(windows):
            if l1 <= r0:
                raise ValueError(f"{name}: windows overlap or are out of order")
        files.append(
            NabFile(
                name=name,
                ts_ms=table.ts_ms,
                values=table.columns["value"],
                windows=windows,
                probation=probation_rows(len(table)),
            )
        )
    return files


# --- threshold sweep -------------------------------------------------------------------


@dataclass(frozen=True, eq=False, slots=True)
class _Prepared:
    """Profile-independent pieces of S(θ) for a corpus and its scores.

    Window records: row j of a window is its earliest alarm for θ in (lo_j, hi_j],
    where hi_j is its score and lo_j the highest score of the window's earlier
    scorable rows (-inf if none); only rows with hi_j > lo_j are kept. ``rec_val`` is
    sigma(x_j)/sigma(-1). FP rows: scorable rows outside all windows, with their
    score and unweighted sigma value.
    """

    counted_windows: int
    rec_hi: FloatArray
    rec_lo: FloatArray
    rec_val: FloatArray
    fp_score: FloatArray
    fp_val: FloatArray
    candidates: FloatArray  # ascending; the last one means "no alarms"


def _checked_scores(f: NabFile, scores: Mapping[str, npt.NDArray[Any]]) -> FloatArray:
    if f.name not in scores:
        raise KeyError(f"no scores for {f.name}")
    s = np.asarray(scores[f.name], dtype=np.float64)
    if s.shape != (len(f),):
        raise ValueError(f"{f.name}: {s.shape[0] if s.ndim else 0} scores for {len(f)} rows")
    if np.isinf(s).any():
        raise ValueError(f"{f.name}: infinite anomaly scores")
    return s


def _prepare(files: list[NabFile], scores: Mapping[str, npt.NDArray[Any]]) -> _Prepared:
    rec_hi: list[FloatArray] = []
    rec_lo: list[FloatArray] = []
    rec_val: list[FloatArray] = []
    fp_score: list[FloatArray] = []
    fp_val: list[FloatArray] = []
    cand: list[FloatArray] = []
    counted = 0
    for f in files:
        s = _checked_scores(f, scores)
        n, p = len(f), f.probation
        cand.append(s[p:][~np.isnan(s[p:])])
        in_window = np.zeros(n, dtype=bool)
        for left, right in f.windows:
            in_window[left : right + 1] = True
            first = max(left, p)
            if first > right:
                continue  # no scorable row: the window does not count
            counted += 1
            seg = np.where(np.isnan(s[first : right + 1]), -np.inf, s[first : right + 1])
            prev_max = np.concatenate(([-np.inf], np.maximum.accumulate(seg)[:-1]))
            rec = np.flatnonzero(seg > prev_max)
            rows = first + rec
            width = right - left + 1
            x = -(right - rows + 1).astype(np.float64) / width
            rec_hi.append(seg[rec])
            rec_lo.append(prev_max[rec])
            rec_val.append(_sigma_array(x) / SIGMA_MINUS_1)
        idx = np.arange(n)
        outside = (idx >= p) & ~in_window & ~np.isnan(s)
        rows = idx[outside]
        fp_score.append(s[rows])
        fp_val.append(_fp_unweighted(f.windows, rows))
    all_cand = np.unique(np.concatenate(cand)) if cand else np.empty(0)
    no_alarm = NO_ALARM if all_cand.size == 0 or all_cand[-1] < NO_ALARM else math.inf
    return _Prepared(
        counted_windows=counted,
        rec_hi=_cat(rec_hi),
        rec_lo=_cat(rec_lo),
        rec_val=_cat(rec_val),
        fp_score=_cat(fp_score),
        fp_val=_cat(fp_val),
        candidates=np.append(all_cand, no_alarm),
    )


def _cat(parts: list[FloatArray]) -> FloatArray:
    return np.concatenate(parts).astype(np.float64) if parts else np.empty(0, dtype=np.float64)


def _fp_unweighted(windows: list[tuple[int, int]], rows: IntArray) -> FloatArray:
    """sigma(y) for false-positive rows after a window, -1 where no window ended before."""
    out = np.full(len(rows), -1.0)
    if not windows or len(rows) == 0:
        return out
    rights = np.array([r for _, r in windows], dtype=np.int64)
    widths = np.array([right - left + 1 for left, right in windows], dtype=np.int64)
    k = np.searchsorted(rights, rows, side="left") - 1  # last window with R' < i
    after = (k >= 0) & (widths[np.maximum(k, 0)] > 1)
    kk = k[after]
    y = (rows[after] - rights[kk]).astype(np.float64) / (widths[kk] - 1)
    out[after] = _sigma_array(y)
    return out


def _curve(prep: _Prepared, profile: Profile) -> FloatArray:
    """S(θ) at every candidate θ: a sum of steps ``d·[θ <= t]`` evaluated by suffix sums."""
    gain = profile.tp * prep.rec_val + profile.fn
    has_lo = np.isfinite(prep.rec_lo)
    t = np.concatenate((prep.rec_hi, prep.rec_lo[has_lo], prep.fp_score))
    d = np.concatenate((gain, -gain[has_lo], profile.fp * prep.fp_val))
    order = np.argsort(t, kind="stable")
    t, d = t[order], d[order]
    suffix = np.append(np.cumsum(d[::-1])[::-1], 0.0)
    base = -profile.fn * prep.counted_windows
    return base + suffix[np.searchsorted(t, prep.candidates, side="left")]


def _best_index(curve: FloatArray) -> int:
    best = float(np.max(curve))
    near = np.flatnonzero(curve >= best - TIE_RTOL * max(1.0, abs(best)))
    return int(near[-1])


def _evaluate(prep: _Prepared, theta: float, profile: Profile) -> tuple[float, int, int, int]:
    """(S, TP windows, FN windows, FP rows) at one threshold, from the prepared arrays."""
    active = (prep.rec_lo < theta) & (theta <= prep.rec_hi)
    tp = int(active.sum())
    fn = prep.counted_windows - tp
    alarms = prep.fp_score >= theta
    terms = [profile.tp * v for v in prep.rec_val[active].tolist()]
    terms += [profile.fp * v for v in prep.fp_val[alarms].tolist()]
    terms.append(-profile.fn * fn)
    return math.fsum(terms), tp, fn, int(alarms.sum())


def _profile(profile: str | Profile) -> Profile:
    return profile if isinstance(profile, Profile) else PROFILES[profile]


def score_curve(
    files: list[NabFile], scores: Mapping[str, npt.NDArray[Any]], profile: str | Profile
) -> tuple[FloatArray, FloatArray]:
    """All threshold candidates (ascending, last = no alarms) and S(θ) at each."""
    prep = _prepare(files, scores)
    return prep.candidates, _curve(prep, _profile(profile))


def score_corpus(
    files: list[NabFile],
    scores: Mapping[str, npt.NDArray[Any]],
    profiles: Mapping[str, Profile] | None = None,
) -> dict[str, NabResult]:
    """Normalised NAB score per profile, each with its own optimal threshold.

    ``scores`` maps every file name to one anomaly score per row.
    The normalised score is NaN if the corpus has no counted window.
    """
    prep = _prepare(files, scores)
    results: dict[str, NabResult] = {}
    for name, prof in (profiles or PROFILES).items():
        curve = _curve(prep, prof)
        theta = float(prep.candidates[_best_index(curve)])
        raw, tp, fn, fp = _evaluate(prep, theta, prof)
        null = -prof.fn * prep.counted_windows
        perfect = prof.tp * prep.counted_windows
        span = perfect - null
        results[name] = NabResult(
            profile=name,
            score=100.0 * (raw - null) / span if span else math.nan,
            threshold=theta,
            raw=raw,
            null=null,
            perfect=perfect,
            tp=tp,
            fn=fn,
            fp=fp,
        )
    return results


# --- slow reference ----------------------------------------------------------------------


def raw_score_at(
    files: list[NabFile],
    scores: Mapping[str, npt.NDArray[Any]],
    theta: float,
    profile: str | Profile,
) -> float:
    """S(θ) by walking every row of every file: the README rules, written plainly."""
    prof = _profile(profile)
    total = 0.0
    for f in files:
        s = _checked_scores(f, scores)
        p = f.probation
        window_of: dict[int, tuple[int, int]] = {}
        for left, right in f.windows:
            for i in range(left, right + 1):
                window_of[i] = (left, right)
        for left, right in f.windows:
            if right < p:
                continue  # no scorable row
            width = right - left + 1
            for i in range(max(left, p), right + 1):
                if s[i] >= theta:
                    total += prof.tp * sigma(-(right - i + 1) / width) / SIGMA_MINUS_1
                    break
            else:
                total -= prof.fn
        last_window: tuple[int, int] | None = None
        for i in range(len(f)):
            if i in window_of:
                last_window = window_of[i]
                continue
            if i < p or not s[i] >= theta:
                continue
            if last_window is None:
                total -= prof.fp
            else:
                left, right = last_window
                width = right - left + 1
                total += prof.fp * (sigma((i - right) / (width - 1)) if width > 1 else -1.0)
    return total
