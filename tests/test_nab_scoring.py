"""NAB scorer: README rules on hand-computed cases, the sweep against brute force,
and reference detectors on the shared NAB subset."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from ingest.evaluation import nab
from ingest.evaluation.nab import NabFile, Profile

NAB_ROOT = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets" / "nab"
STD = nab.PROFILES["standard"]


def _file(n: int, windows: list[tuple[int, int]], probation: int, name: str = "f.csv") -> NabFile:
    return NabFile(
        name=name,
        ts_ms=np.arange(n, dtype=np.int64) * 300_000,
        values=np.zeros(n),
        windows=windows,
        probation=probation,
    )


def _alarms(n: int, rows: list[int]) -> np.ndarray:
    s = np.zeros(n)
    s[rows] = 1.0
    return s


def _raw(f: NabFile, rows: list[int], profile: str | Profile = "standard") -> float:
    return nab.raw_score_at([f], {f.name: _alarms(len(f), rows)}, 0.5, profile)


# --- rules, hand-computed -----------------------------------------------------------------


def test_sigma_values_from_readme() -> None:
    assert nab.sigma(-1.0) == pytest.approx(0.986614, abs=1e-6)
    assert nab.sigma(-0.5) == pytest.approx(0.848284, abs=1e-6)
    assert nab.sigma(0.0) == 0.0
    assert nab.sigma(1.0) == pytest.approx(-0.986614, abs=1e-6)
    assert nab.sigma(3.0) == pytest.approx(-0.99999939, abs=1e-8)
    assert nab.sigma(3.0001) == -1.0
    assert nab.sigma(50.0) == -1.0


def test_probation_rows() -> None:
    assert nab.probation_rows(4032) == 604
    assert nab.probation_rows(10320) == 750
    assert nab.probation_rows(99) == 14


def test_profiles_json_matches_builtin() -> None:
    if not NAB_ROOT.is_dir():
        pytest.skip(f"NAB data not found at {NAB_ROOT}")
    assert nab.load_profiles(NAB_ROOT) == nab.PROFILES


F = _file(100, [(40, 49)], probation=10)  # one window, w = 10


def test_alarm_on_first_row_of_window_scores_a_tp() -> None:
    assert _raw(F, [40]) == pytest.approx(1.0)
    assert _raw(F, [40], "reward_low_FN_rate") == pytest.approx(1.0)


def test_alarm_on_last_row_of_window() -> None:
    # x = -1/10: sigma(-0.1) = tanh(0.25) = 0.244919; / sigma(-1) = 0.248242
    assert _raw(F, [49]) == pytest.approx(0.248242, abs=1e-6)
    assert _raw(F, [49]) == pytest.approx(math.tanh(0.25) / math.tanh(2.5), abs=1e-12)


def test_only_earliest_alarm_of_window_counts() -> None:
    # x = -(49-45+1)/10 = -0.5: sigma(-0.5)/sigma(-1) = tanh(1.25)/tanh(2.5) = 0.859793
    assert _raw(F, [45, 46, 49]) == pytest.approx(0.859793, abs=1e-6)
    assert _raw(F, [40, 45]) == pytest.approx(1.0)


def test_missed_window() -> None:
    assert _raw(F, []) == -1.0
    assert _raw(F, [], "reward_low_FN_rate") == -2.0


def test_fp_right_after_window_is_scaled() -> None:
    # y = 1/9: sigma(1/9) = -tanh(2.5/9) = -0.270847; times A_fp = 0.11 -> -0.029793
    assert _raw(F, [40, 50]) == pytest.approx(1.0 - 0.029793, abs=1e-6)
    assert _raw(F, [40, 50], "reward_low_FP_rate") == pytest.approx(1.0 - 0.059586, abs=1e-6)


def test_fp_far_after_window_is_full_penalty() -> None:
    # y = 28/9 > 3 -> sigma = -1
    assert _raw(F, [40, 77]) == pytest.approx(1.0 - 0.11)
    # y = 27/9 = 3 -> sigma(3) = -0.99999939
    assert _raw(F, [40, 76]) == pytest.approx(1.0 - 0.11 * 0.99999939, abs=1e-9)


def test_fp_without_preceding_window_is_full_penalty() -> None:
    assert _raw(F, [40, 20]) == pytest.approx(1.0 - 0.11)
    assert _raw(F, [40, 20], "reward_low_FP_rate") == pytest.approx(1.0 - 0.22)


def test_every_alarm_of_a_run_is_penalised() -> None:
    assert _raw(F, [40, 20, 21, 22, 23, 24]) == pytest.approx(1.0 - 5 * 0.11)


def test_alarms_in_probation_are_ignored() -> None:
    assert _raw(F, [0, 5, 9]) == -1.0


def test_window_partly_in_probation() -> None:
    f = _file(100, [(5, 14)], probation=10)
    # only rows 10..14 are scorable; row 10 has x = -(14-10+1)/10 = -0.5
    assert _raw(f, [7]) == -1.0
    assert _raw(f, [7, 10]) == pytest.approx(0.859793, abs=1e-6)


def test_window_within_probation_does_not_count() -> None:
    f = _file(100, [(2, 8), (40, 49)], probation=15)
    assert _raw(f, [5]) == -1.0  # only the second window counts
    res = nab.score_corpus([f], {f.name: _alarms(100, [5])})["standard"]
    assert (res.null, res.perfect, res.fn) == (-1.0, 1.0, 1)
    # it still scales a later FP: R' = 8, w' = 7, y = 12/6 = 2, sigma(2) = -tanh(5)
    assert _raw(f, [20]) == pytest.approx(-1.0 - 0.11 * math.tanh(5.0), abs=1e-12)


def test_later_windows_play_no_part_in_fp_scaling() -> None:
    f = _file(200, [(40, 49), (150, 159)], probation=10)
    # row 148 is two rows before the second window, but 99 rows after the first
    assert _raw(f, [40, 150, 148]) == pytest.approx(2.0 - 0.11)


def test_score_corpus_on_hand_case() -> None:
    s = _alarms(100, [49])
    res = nab.score_corpus([F], {F.name: s})["standard"]
    assert res.threshold == 1.0
    assert res.raw == pytest.approx(0.248242, abs=1e-6)
    assert (res.null, res.perfect) == (-1.0, 1.0)
    assert res.score == pytest.approx(100 * (0.248242 + 1) / 2, abs=1e-4)
    assert (res.tp, res.fn, res.fp) == (1, 0, 0)


def test_ties_go_to_highest_threshold() -> None:
    s = np.zeros(100)
    s[40], s[45] = 0.9, 0.5  # theta 0.9 and 0.5 both detect on row 40
    cand, curve = nab.score_curve([F], {F.name: s}, "standard")
    assert cand.tolist() == [0.0, 0.5, 0.9, nab.NO_ALARM]
    assert curve[1] == curve[2] == pytest.approx(1.0)
    assert nab.score_corpus([F], {F.name: s})["standard"].threshold == 0.9


def test_nan_scores_never_alarm_and_inf_is_refused() -> None:
    s = np.full(100, np.nan)
    s[40] = 0.7
    cand, _ = nab.score_curve([F], {F.name: s}, "standard")
    assert cand.tolist() == [0.7, nab.NO_ALARM]
    assert nab.score_corpus([F], {F.name: s})["standard"].score == 100.0
    s[3] = np.inf
    with pytest.raises(ValueError, match="infinite"):
        nab.score_corpus([F], {F.name: s})


def test_wrong_length_scores_are_refused() -> None:
    with pytest.raises(ValueError, match="scores for 100 rows"):
        nab.score_corpus([F], {F.name: np.zeros(99)})
    with pytest.raises(KeyError):
        nab.score_corpus([F], {})


# --- sweep against brute force ------------------------------------------------------------


def _random_corpus(seed: int) -> tuple[list[NabFile], dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    files: list[NabFile] = []
    scores: dict[str, np.ndarray] = {}
    for k in range(int(rng.integers(1, 5))):
        n = int(rng.integers(30, 200))
        windows: list[tuple[int, int]] = []
        pos = int(rng.integers(0, 20))
        while True:
            width = int(rng.integers(1, 25))
            if pos + width > n:
                break
            windows.append((pos, pos + width - 1))
            pos += width + int(rng.integers(1, 40))
        f = _file(n, windows, probation=int(rng.integers(0, n // 3)), name=f"f{k}.csv")
        files.append(f)
        levels = int(rng.integers(2, 30))  # coarse levels give many tied scores
        s = rng.integers(0, levels, n) / (levels - 1)
        s[rng.random(n) < 0.05] = np.nan
        scores[f.name] = s
    return files, scores


@pytest.mark.parametrize("seed", range(25))
def test_sweep_matches_brute_force(seed: int) -> None:
    files, scores = _random_corpus(seed)
    results = nab.score_corpus(files, scores)
    for name, prof in nab.PROFILES.items():
        cand, curve = nab.score_curve(files, scores, prof)
        brute = np.array([nab.raw_score_at(files, scores, float(t), prof) for t in cand])
        np.testing.assert_allclose(curve, brute, rtol=0, atol=1e-9)
        best = brute.max()
        theta = float(cand[np.flatnonzero(brute >= best - 1e-9 * max(1.0, abs(best)))[-1]])
        res = results[name]
        assert res.threshold == theta
        assert res.raw == pytest.approx(best, abs=1e-9)
        assert res.raw == pytest.approx(nab.raw_score_at(files, scores, theta, prof), abs=1e-12)


# --- shared NAB subset --------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus() -> list[NabFile]:
    if not NAB_ROOT.is_dir():
        pytest.skip(f"NAB data not found at {NAB_ROOT} (expected ../shared/datasets/nab)")
    return nab.load_corpus(NAB_ROOT)


def test_corpus_layout(corpus: list[NabFile]) -> None:
    assert len(corpus) == 35
    assert sum(len(f) for f in corpus) == 181_653
    assert sum(len(f.windows) for f in corpus) == 55
    taxi = next(f for f in corpus if f.name == "realKnownCause/nyc_taxi.csv")
    assert taxi.probation == 750
    assert taxi.ts_ms[0] == 1404172800000  # 2014-07-01 00:00:00 as naive UTC
    for f in corpus:
        for left, right in f.windows:
            assert f.probation <= left < right < len(f)


def test_null_detector_scores_zero(corpus: list[NabFile]) -> None:
    res = nab.score_corpus(corpus, {f.name: np.zeros(len(f)) for f in corpus})
    for r in res.values():
        assert r.score == 0.0
        assert r.threshold == nab.NO_ALARM
        assert (r.tp, r.fn, r.fp) == (0, 55, 0)
    assert [res[p].null for p in nab.PROFILES] == [-55.0, -55.0, -110.0]
    assert [res[p].perfect for p in nab.PROFILES] == [55.0, 55.0, 55.0]


def test_perfect_detector_scores_hundred(corpus: list[NabFile]) -> None:
    scores = {}
    for f in corpus:
        s = np.zeros(len(f))
        for left, _ in f.windows:
            s[left] = 1.0
        scores[f.name] = s
    for r in nab.score_corpus(corpus, scores).values():
        assert r.score == pytest.approx(100.0, abs=1e-9)
        assert r.threshold == 1.0
        assert (r.tp, r.fn, r.fp) == (55, 0, 0)


def test_alarming_everywhere_scores_negative(corpus: list[NabFile]) -> None:
    scores = {f.name: np.ones(len(f)) for f in corpus}
    results = nab.score_corpus(corpus, scores)
    for name, prof in nab.PROFILES.items():
        cand, curve = nab.score_curve(corpus, scores, prof)
        assert cand.tolist() == [1.0, nab.NO_ALARM]
        r = results[name]
        normalised = 100 * (curve[0] - r.null) / (r.perfect - r.null)
        assert normalised < 0
        assert curve[0] == pytest.approx(nab.raw_score_at(corpus, scores, 1.0, prof), abs=1e-9)
        assert r.threshold == nab.NO_ALARM  # the optimiser prefers silence
        assert r.score == 0.0


def test_random_scores_sweep_matches_reference(corpus: list[NabFile]) -> None:
    rng = np.random.default_rng(7)
    scores = {f.name: rng.random(len(f)) for f in corpus}
    for name, r in nab.score_corpus(corpus, scores).items():
        assert r.raw == pytest.approx(nab.raw_score_at(corpus, scores, r.threshold, name), abs=1e-9)
