"""Processing-path throughput without broker or database.

Decode + validate + detectors + line protocol:

    .venv/bin/python bench/pipeline.py [--messages N] [--profile]

Prints messages/s and readings/s for single-sample and batch messages with the
default detector set, measured in this run. Numba compile time is excluded (one
warm-up call first). Readings are random doubles with 17 significant digits,
the worst case for writing them exactly. ``--profile`` prints where the time
goes instead (cProfile, top functions by own time). The detector kernels
alone: ``bench/kernels.py``; the whole path with broker and database:
``bench/e2e.py``.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from collections.abc import Callable

import numpy as np
import orjson

from devices.contract import DEFAULT_LIMITS
from ingest.pipeline import Processor
from ingest.processing.detectors import DetectorParams


def best_of(fn: Callable[[], object], repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench_processor(
    n_messages: int, per_message: int, devices: int = 100, profile: bool = False
) -> tuple[float, float]:
    now = int(time.time() * 1000) - 10 * n_messages * per_message
    sensors = ("spindle_temp", "vibration_rms", "motor_current")
    rng = np.random.default_rng(0)
    messages = []
    for i in range(n_messages):
        samples = [
            {
                "ts": now + (i * per_message + k) * 10,
                "values": {s: float(rng.normal()) for s in sensors},
            }
            for k in range(per_message)
        ]
        body = samples[0] if per_message == 1 else {"samples": samples}
        messages.append(
            (f"factory/s1/l1/d{i % devices}/telemetry", orjson.dumps(body), time.time())
        )
    chunk = 1000 if per_message == 1 else 50

    def run() -> None:
        proc = Processor("factory", DEFAULT_LIMITS, DetectorParams(), 100_000)
        for k in range(0, len(messages), chunk):
            proc.process(messages[k : k + chunk])

    Processor("factory", DEFAULT_LIMITS, DetectorParams(), 10).warm_up()
    if profile:
        profiler = cProfile.Profile()
        profiler.runcall(run)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(12)
    dt = best_of(run, 3)
    return n_messages / dt, n_messages * per_message * len(sensors) / dt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--profile", action="store_true", help="print a cProfile of each case")
    args = parser.parse_args()
    print("processing path (decode, validate, detectors, line protocol), one core:")
    for per_message in (1, 100):
        n = args.messages if per_message == 1 else max(1, args.messages // 50)
        mps, rps = bench_processor(n, per_message, profile=args.profile)
        print(
            f"  {per_message:3d} samples x 3 sensors per message: {mps:10,.0f} messages/s "
            f"{rps:12,.0f} readings/s"
        )


if __name__ == "__main__":
    main()
