"""Detector kernel cost in ns per sample, next to the memory floor and other libraries.

    .venv/bin/python bench/kernels.py [--samples N] [--repeat R] [--quick]

Prints a markdown table, all measured in this run on one core (NUMBA_NUM_THREADS=1,
no parallel kernels): median and min over R repeats of

* the memory floor: ``np.sum`` over the values array;
* references on one series (window 60): bottleneck and numbagg ``move_mean`` +
  ``move_std`` (+ the z-score from them), pandas ``rolling(60)``, river (a per-sample
  Python loop, on fewer samples) and a plain one-pass Numba rolling z-score written
  here as the simple Numba baseline;
* ours on one series: :class:`DetectorBank` with each detector alone and with all of
  them; the kernel call itself (``DetectorBank.run``) (outputs preallocated and touched, state
  reset between repeats), and ``DetectorBank.update`` (which allocates its outputs);
* the same over 10,000 interleaved streams, plus pandas groupby-rolling and the plain
  Numba baseline with per-stream ring buffers;
* the state memory of 100,000 streams with default parameters.

Compile time is excluded: every function runs once before it is timed. The data is
a daily sinusoid plus normal noise, with rare spikes and a few NaN. The optional
references need the ``bench`` extra (``pip install -e '.[bench]'``); a missing one
is reported as "not installed".
"""

from __future__ import annotations

import os

# One core: set before Numba (ours, numbagg) is imported.
os.environ["NUMBA_NUM_THREADS"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse
import gc
import hashlib
import importlib
import inspect
import math
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from types import ModuleType
from typing import Any

import numba
import numpy as np
import numpy.typing as npt
from numba import njit

from ingest.processing import kernels
from ingest.processing.detectors import (
    DEFAULT_DETECTORS,
    DetectorBank,
    DetectorParams,
    DetectResult,
)

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

WINDOW = 60
STREAMS = 10_000
MEMORY_STREAMS = 100_000
DAY_MS = 86_400_000
INTERVAL_MS = 1_000


def optional(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


bn = optional("bottleneck")
nbg = optional("numbagg")
pd = optional("pandas")
river_stats = optional("river.stats")
river_utils = optional("river.utils")
river_anomaly = optional("river.anomaly")


# ---- timing ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Timing:
    median_ns: float
    min_ns: float


@dataclass(slots=True)
class Row:
    name: str
    samples: int = 0
    timing: Timing | None = None
    update: Timing | None = None
    note: str = ""
    section: bool = False


def measure_alternating(
    runs: list[Callable[[], object]],
    n: int,
    repeat: int,
    setup: Callable[[], object] | None = None,
) -> list[Timing]:
    """ns per sample of each of ``runs`` (median and min of ``repeat``).

    Every run is called once untimed first (compile or cache load, warm caches); then
    the runs alternate within each repeat, so that they see the same machine noise.
    ``setup()`` runs before every call, untimed (e.g. resetting detector state).
    """
    for run in runs:
        if setup is not None:
            setup()
        run()
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(repeat):
        for run, acc in zip(runs, times, strict=True):
            if setup is not None:
                setup()
            gc.collect()
            gc.disable()
            try:
                t0 = time.perf_counter()
                run()
                acc.append(time.perf_counter() - t0)
            finally:
                gc.enable()
    return [Timing(statistics.median(t) / n * 1e9, min(t) / n * 1e9) for t in times]


def measure(
    run: Callable[[], object],
    n: int,
    repeat: int,
    setup: Callable[[], object] | None = None,
) -> Timing:
    """ns per sample of ``run()``; see :func:`measure_alternating`."""
    return measure_alternating([run], n, repeat, setup)[0]


# ---- data -----------------------------------------------------------------------------


def one_series(n: int, seed: int = 0) -> tuple[IntArray, IntArray, FloatArray]:
    """rows (all 0), ts (1 s apart with jitter, ms) and values of one sensor."""
    rng = np.random.default_rng(seed)
    t0 = 1_700_000_000_000
    ts = t0 + np.arange(n, dtype=np.int64) * INTERVAL_MS + rng.integers(0, 50, n)
    daily = np.sin(2 * np.pi * (ts % DAY_MS) / DAY_MS)
    values = 20.0 + 2.0 * daily + rng.normal(0.0, 0.5, n)
    spoil(values, rng, scale=0.5)
    return np.zeros(n, np.int64), ts.astype(np.int64), values


def interleaved(n: int, streams: int, seed: int = 1) -> tuple[IntArray, IntArray, FloatArray]:
    """``streams`` sensors sampled round-robin (rows = i % streams), each with its own
    level, amplitude, phase and noise; timestamps increase per stream."""
    rng = np.random.default_rng(seed)
    rows = np.arange(n, dtype=np.int64) % streams
    tick = np.arange(n, dtype=np.int64) // streams
    t0 = 1_700_000_000_000
    ts = t0 + tick * INTERVAL_MS + rows % INTERVAL_MS
    level = rng.uniform(5.0, 500.0, streams)
    amp = level * rng.uniform(0.01, 0.1, streams)
    phase = rng.uniform(0.0, 2 * np.pi, streams)
    noise = level * rng.uniform(0.002, 0.02, streams)
    # Compress the day so that the 200 samples of a stream see part of a cycle.
    daily = np.sin(2 * np.pi * tick / 1_000 + phase[rows])
    values = level[rows] + amp[rows] * daily + rng.normal(0.0, 1.0, n) * noise[rows]
    spoil(values, rng, scale=noise[rows])
    return rows, ts.astype(np.int64), values


def spoil(values: FloatArray, rng: np.random.Generator, scale: float | FloatArray) -> None:
    """Rare 8-sigma spikes (1 in 10,000) and missing values (1 in 2,000), in place."""
    n = values.shape[0]
    spikes = rng.choice(n, max(1, n // 10_000), replace=False)
    sign = rng.choice(np.array([-1.0, 1.0]), spikes.shape[0])
    values[spikes] += 8.0 * sign * np.broadcast_to(scale, values.shape)[spikes]
    values[rng.choice(n, max(1, n // 2_000), replace=False)] = np.nan


# ---- plain Numba baseline -------------------------------------------------------------


@njit(cache=True, nogil=True)
def plain_zscore_streams(
    rows: IntArray,
    values: FloatArray,
    buf: FloatArray,  # float64[streams, window]
    sums: FloatArray,  # float64[streams, 2]: sum, sum of squares
    counts: IntArray,  # int64[streams, 2]: samples in the window, next slot
    out_mean: FloatArray,
    out_std: FloatArray,
    out_z: FloatArray,
) -> None:
    """:func:`plain_zscore` over interleaved streams, with per-stream ring buffers."""
    window = buf.shape[1]
    for i in range(values.shape[0]):
        r = rows[i]
        x = values[i]
        s = sums[r, 0]
        s2 = sums[r, 1]
        cnt = counts[r, 0]
        if math.isnan(x) or cnt < 2:
            out_mean[i] = math.nan
            out_std[i] = math.nan
            out_z[i] = math.nan
        else:
            mean = s / cnt
            std = math.sqrt(max(s2 / cnt - mean * mean, 0.0))
            out_mean[i] = mean
            out_std[i] = std
            out_z[i] = (x - mean) / std if std > 0.0 else math.nan
        if math.isnan(x):
            continue
        pos = counts[r, 1]
        if cnt == window:
            old = buf[r, pos]
            s -= old
            s2 -= old * old
        else:
            counts[r, 0] = cnt + 1
        buf[r, pos] = x
        sums[r, 0] = s + x
        sums[r, 1] = s2 + x * x
        counts[r, 1] = pos + 1 if pos + 1 < window else 0


# ---- benchmarks -----------------------------------------------------------------------


def touched_result(n: int) -> DetectResult:
    """Preallocated outputs with every page faulted in."""
    out = DetectResult.empty(n)
    for f in fields(out):
        getattr(out, f.name).fill(0)
    return out


def bench_ours(
    name: str,
    params: DetectorParams,
    rows: IntArray,
    ts: IntArray,
    values: FloatArray,
    streams: int,
    repeat: int,
) -> Row:
    n = values.shape[0]
    bank = DetectorBank(params, capacity=streams)
    state = bank.state_arrays(bank.capacity)  # views of the bank's arrays
    pristine = {key: arr.copy() for key, arr in state.items()}

    def reset() -> None:
        for key, arr in bank.state_arrays(bank.capacity).items():
            np.copyto(arr, pristine[key])

    out = touched_result(n)

    def detect() -> None:
        bank.run(rows, ts, values, out)

    def update() -> None:
        bank.update(rows, ts, values)

    row = Row(name, n)
    row.timing, row.update = measure_alternating([detect, update], n, repeat, reset)
    return row


def our_configs() -> list[tuple[str, DetectorParams]]:
    """Each detector alone, then all of them; z-score window 60, other params default."""
    configs = [
        (f"ours: {d}", DetectorParams(detectors=(d,), zscore_window=WINDOW))
        for d in DEFAULT_DETECTORS
    ]
    configs.append(
        (
            "ours: all (" + ",".join(DEFAULT_DETECTORS) + ")",
            DetectorParams(zscore_window=WINDOW),
        )
    )
    return configs


def bench_floor(values: FloatArray, repeat: int) -> Row:
    return Row(
        "memory floor: np.sum(values)",
        values.shape[0],
        measure(lambda: np.sum(values), values.shape[0], repeat),
    )


def bench_bottleneck(values: FloatArray, repeat: int) -> Row:
    name = f"bottleneck move_mean + move_std + z ({WINDOW})"
    if bn is None:
        return Row(name, note="not installed")

    def run() -> object:
        m = bn.move_mean(values, WINDOW, min_count=2)
        s = bn.move_std(values, WINDOW, min_count=2)
        return (values - m) / s

    return Row(name, values.shape[0], measure(run, values.shape[0], repeat))


def bench_numbagg(values: FloatArray, repeat: int) -> Row:
    name = f"numbagg move_mean + move_std + z ({WINDOW})"
    if nbg is None:
        return Row(name, note="not installed")
    if not hasattr(nbg, "move_mean") or not hasattr(nbg, "move_std"):
        return Row(name, note="numbagg without move_mean/move_std")

    def run() -> object:
        m = nbg.move_mean(values, window=WINDOW, min_count=2)
        s = nbg.move_std(values, window=WINDOW, min_count=2)
        return (values - m) / s

    return Row(name, values.shape[0], measure(run, values.shape[0], repeat))


def bench_pandas(values: FloatArray, repeat: int) -> Row:
    name = f"pandas rolling({WINDOW}).mean() + .std() + z"
    if pd is None:
        return Row(name, note="not installed")
    s = pd.Series(values)

    def run() -> Any:
        r = s.rolling(WINDOW, min_periods=2)
        return (s - r.mean()) / r.std()

    return Row(name, values.shape[0], measure(run, values.shape[0], repeat))


def rolling_var(utils_mod: ModuleType, stats_mod: ModuleType) -> Any:
    """``utils.Rolling`` of ``stats.Var``: newer river takes the class, older an instance."""
    first = next(iter(inspect.signature(utils_mod.Rolling).parameters))
    if first == "cls":
        return utils_mod.Rolling(stats_mod.Var, window_size=WINDOW)
    return utils_mod.Rolling(stats_mod.Var(), window_size=WINDOW)


def bench_river_rolling(values: FloatArray, repeat: int) -> Row:
    name = f"river utils.Rolling(stats.Var(), {WINDOW}), z per sample"
    if river_stats is None or river_utils is None:
        return Row(name, note="not installed")
    xs = values.tolist()
    stats_mod, utils_mod = river_stats, river_utils

    def run() -> None:
        var = rolling_var(utils_mod, stats_mod)
        mean = var.obj.mean
        for x in xs:
            if math.isnan(x):  # missing
                continue
            sd = var.get() ** 0.5
            _ = (x - mean.get()) / sd if sd > 0.0 else math.nan
            var.update(x)

    n = len(xs)
    return Row(name, n, measure(run, n, repeat), note=f"Python loop, {n:,} samples")


def bench_river_sad(values: FloatArray, repeat: int) -> Row:
    name = "river anomaly.StandardAbsoluteDeviation"
    if river_anomaly is None:
        return Row(name, note="not installed")
    xs = values.tolist()
    anomaly_mod = river_anomaly

    def run() -> None:
        model = anomaly_mod.StandardAbsoluteDeviation()
        for x in xs:
            if math.isnan(x):
                continue
            model.score_one(None, x)
            model.learn_one(None, x)

    n = len(xs)
    return Row(name, n, measure(run, n, repeat), note=f"Python loop, {n:,} samples; not windowed")


def bench_plain(values: FloatArray, repeat: int) -> Row:
    """The plain kernel on one series: every sample on stream 0."""
    row = bench_plain_streams(np.zeros(values.shape[0], np.int64), values, 1, repeat)
    row.name = f"plain Numba rolling z-score ({WINDOW})"
    return row


def bench_plain_streams(rows: IntArray, values: FloatArray, streams: int, repeat: int) -> Row:
    n = values.shape[0]
    buf = np.zeros((streams, WINDOW))
    sums = np.zeros((streams, 2))
    counts = np.zeros((streams, 2), np.int64)
    outs = [np.zeros(n) for _ in range(3)]

    def reset() -> None:
        buf.fill(0.0)
        sums.fill(0.0)
        counts.fill(0)

    def run() -> None:
        plain_zscore_streams(rows, values, buf, sums, counts, *outs)

    return Row(
        f"plain Numba rolling z-score ({WINDOW}), per-stream rings",
        n,
        measure(run, n, repeat, reset),
    )


def bench_pandas_groupby(rows: IntArray, values: FloatArray, n: int, repeat: int) -> Row:
    name = f"pandas groupby(stream).rolling({WINDOW}) mean + std + z"
    if pd is None:
        return Row(name, note="not installed")
    df = pd.DataFrame({"stream": rows[:n], "value": values[:n]})
    s = df["value"]

    def run() -> Any:
        r = df.groupby("stream")["value"].rolling(WINDOW, min_periods=2)
        # Back to arrival order (the result is grouped by stream).
        m = r.mean().droplevel(0).sort_index()
        sd = r.std().droplevel(0).sort_index()
        return (s - m) / sd

    note = "incl. reordering to arrival order"
    if n < values.shape[0]:
        note += f"; {n:,} samples"
    return Row(name, n, measure(run, n, repeat), note=note)


# ---- state memory ---------------------------------------------------------------------


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


@dataclass(frozen=True, slots=True)
class Memory:
    streams: int
    state_bytes: int
    rss_alloc: int
    rss_touched: int


def bench_memory(streams: int) -> Memory:
    """State of ``streams`` streams with default params: nbytes, and RSS after allocating
    it and after one sample per stream (every state page touched by the kernel)."""
    gc.collect()
    before = rss_bytes()
    bank = DetectorBank(DetectorParams(), capacity=streams)
    after_alloc = rss_bytes()
    state_bytes = sum(arr.nbytes for arr in bank.state_arrays(bank.capacity).values())
    chunk = 1_000  # small batches: the outputs stay small and are reused
    for start in range(0, streams, chunk):
        rows = np.arange(start, min(start + chunk, streams), dtype=np.int64)
        bank.update(rows, np.zeros(rows.shape[0], np.int64), np.ones(rows.shape[0]))
    after_touch = rss_bytes()
    del bank
    return Memory(streams, state_bytes, after_alloc - before, after_touch - before)


# ---- report ---------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def version(name: str) -> str:
    mod = optional(name)
    return str(getattr(mod, "__version__", "?")) if mod is not None else "not installed"


def fmt_ns(t: Timing | None, floor: float) -> tuple[str, str, str]:
    if t is None:
        return "", "", ""
    ratio = f"{t.median_ns / floor:,.0f}x" if floor > 0 else ""
    return f"{t.median_ns:,.2f}", f"{t.min_ns:,.2f}", ratio


def print_table(rows: list[Row], floor: float) -> None:
    print(
        "| benchmark | samples | ns/sample median | min | x floor "
        "| `update()` median | `update()` min | note |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        if r.section:
            print(f"| **{r.name}** | | | | | | | |")
            continue
        med, mn, ratio = fmt_ns(r.timing, floor)
        umed, umn, _ = fmt_ns(r.update, floor)
        samples = f"{r.samples:,}" if r.samples else ""
        print(f"| {r.name} | {samples} | {med} | {mn} | {ratio} | {umed} | {umn} | {r.note} |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--samples",
        type=int,
        default=None,
        help="samples per run (default 2,000,000; 500,000 with --quick)",
    )
    parser.add_argument(
        "--repeat", type=int, default=None, help="timed repeats (default 7; 3 with --quick)"
    )
    parser.add_argument("--quick", action="store_true", help="a ~20 s smoke run")
    parser.add_argument("--cpu", type=int, default=None, help="pin the process to this CPU")
    args = parser.parse_args()
    n = args.samples or (500_000 if args.quick else 2_000_000)
    repeat = args.repeat or (3 if args.quick else 7)
    n_river = min(n, 10_000 if args.quick else 50_000)
    n_groupby = min(n, 500_000 if args.quick else 1_000_000)

    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    kernel_src = Path(kernels.__file__).read_bytes()
    print("# Detector kernels: ns per sample, one core\n")
    print(f"- CPU: {cpu_model()} ({os.cpu_count()} logical CPUs on the machine)")
    print(
        f"- python {platform.python_version()}, numpy {np.__version__}, "
        f"numba {numba.__version__}, bottleneck {version('bottleneck')}, "
        f"numbagg {version('numbagg')}, pandas {version('pandas')}, river {version('river')}"
    )
    print(
        f"- numba threads: {numba.get_num_threads()}; kernels.py sha1 "
        f"{hashlib.sha1(kernel_src).hexdigest()[:12]}"
        + (f"; pinned to CPU {args.cpu}" if args.cpu is not None else "")
    )
    print(
        f"- {n:,} samples, median and min of {repeat} repeats; compile excluded (each "
        "function runs once first); detector state reset between repeats, untimed"
    )

    t0 = time.perf_counter()
    DetectorBank(DetectorParams()).warm_up_jit()
    plain_zscore_streams(
        np.zeros(4, np.int64),
        np.zeros(4),
        np.zeros((1, 2)),
        np.zeros((1, 2)),
        np.zeros((1, 2), np.int64),
        np.zeros(4),
        np.zeros(4),
        np.zeros(4),
    )
    print(f"- compile / cache load of our kernels: {time.perf_counter() - t0:.1f} s (untimed)")

    # First, while the heap is fresh, so that freed arrays do not hide the growth.
    mem = bench_memory(MEMORY_STREAMS)

    rows1, ts1, values1 = one_series(n)
    floor_row = bench_floor(values1, repeat)
    floor = floor_row.timing.median_ns if floor_row.timing else 0.0
    table: list[Row] = [floor_row, Row(f"one series, window {WINDOW}", section=True)]
    table += [
        bench_bottleneck(values1, repeat),
        bench_numbagg(values1, repeat),
        bench_pandas(values1, repeat),
        bench_river_rolling(values1[:n_river], repeat),
        bench_river_sad(values1[:n_river], repeat),
        bench_plain(values1, repeat),
    ]
    for name, params in our_configs():
        table.append(bench_ours(name, params, rows1, ts1, values1, 1, repeat))
    del rows1, ts1, values1

    rows, ts, values = interleaved(n, STREAMS)
    table.append(
        Row(f"{STREAMS:,} interleaved streams ({n // STREAMS:,} samples each)", section=True)
    )
    table.append(bench_pandas_groupby(rows, values, n_groupby, repeat))
    table.append(bench_plain_streams(rows, values, STREAMS, repeat))
    for name, params in our_configs():
        table.append(bench_ours(name, params, rows, ts, values, STREAMS, repeat))

    print()
    print_table(table, floor)
    print()
    print(
        "`x floor`: median over the np.sum median. `update()`: DetectorBank.update, which "
        "also allocates its outputs; the other ns column times the kernel call alone "
        "(DetectorBank.run) with "
        "preallocated outputs. References compute the window including the sample; ours "
        "and the plain baseline score each sample against the window before it."
    )
    print()
    mb = 1e6
    print("| state memory, default params | MB | bytes/stream |")
    print("|---|---:|---:|")
    for label, size in (
        (f"state arrays (sum of nbytes), {mem.streams:,} streams", mem.state_bytes),
        ("RSS increase after allocating", mem.rss_alloc),
        ("RSS increase after one sample per stream", mem.rss_touched),
    ):
        print(f"| {label} | {size / mb:,.1f} | {size / mem.streams:,.0f} |")


if __name__ == "__main__":
    main()
