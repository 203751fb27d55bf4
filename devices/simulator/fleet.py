"""A simulated fleet of CNC machines with labelled faults, emitting contract-v1 samples.

Samples are scheduled at ``start_ms + round(k * 1000 / rate_hz)`` for k = 0, 1, ...
(``seq`` = k). :meth:`Fleet.tick` hands out whatever is due, so the same fleet drives
a real-time publisher or an offline run (:meth:`Fleet.generate`); internally the data
is produced in fixed blocks of about a minute, so the output for a seed does not
depend on how the calls are sliced.

Faults are scheduled per stream (device x sensor) as a Poisson process of about
``fault_rate`` faults per minute, never overlapping, at least ``warmup`` samples into
the stream and a couple of seconds apart. Magnitudes are in units of the stream's
noise standard deviation (``Fleet.sigma``):

==============  ====================================================  =============
kind            effect                                                magnitude
==============  ====================================================  =============
spike           1-2 samples at the neighbours' mean +/- 8-20 sigma    signed sigma
level_shift     step of +/- 4-8 sigma for 5-30 s                      signed sigma
drift           linear ramp reaching +/- 6-10 sigma over 20-90 s      signed sigma
stuck           the last reading repeated for 5-30 s                  0
noise_burst     noise multiplied by 5-10 for 3-15 s                   the factor
dropout         the sensor is missing from the samples for 2-20 s     0
==============  ====================================================  =============

Vibration faults only go upwards (an RMS value cannot go negative). A sample whose
four sensors are all in dropout is not emitted at all (its ``seq`` is skipped).
"""

from __future__ import annotations

import csv
import time
from collections.abc import Iterable, Sequence
from dataclasses import astuple, dataclass, fields
from os import PathLike
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from devices.contract import IDENTIFIER_RE
from devices.simulator.signals import SENSORS, VIB, FloatArray, SignalBank

BoolArray = npt.NDArray[np.bool_]

FAULT_KINDS: Final = ("spike", "level_shift", "drift", "stuck", "noise_burst", "dropout")
ALL_KINDS: Final = FAULT_KINDS

_MAGNITUDE: Final = {"spike": (8.0, 20.0), "level_shift": (4.0, 8.0), "drift": (6.0, 10.0)}
_BURST_FACTOR: Final = (5.0, 10.0)
_DURATION_S: Final = {
    "level_shift": (5.0, 30.0),
    "drift": (20.0, 90.0),
    "stuck": (5.0, 30.0),
    "noise_burst": (3.0, 15.0),
    "dropout": (2.0, 20.0),
}
_DECIMALS: Final = 4


@dataclass(frozen=True, slots=True)
class FaultLabel:
    """Ground truth for one injected fault; ``end_ms`` is inclusive (a spike's last sample)."""

    site: str
    line: str
    device: str
    sensor: str
    kind: str
    start_ms: int
    end_ms: int
    magnitude: float


LABEL_FIELDS: Final = tuple(f.name for f in fields(FaultLabel))


def write_labels(path: str | PathLike[str], labels: Iterable[FaultLabel]) -> None:
    """Write labels as CSV, header ``site,line,device,sensor,kind,start_ms,end_ms,magnitude``."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(LABEL_FIELDS)
        writer.writerows(astuple(label) for label in labels)


def read_labels(path: str | PathLike[str]) -> list[FaultLabel]:
    """Read a label CSV written by :func:`write_labels`."""
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if tuple(reader.fieldnames or ()) != LABEL_FIELDS:
            raise ValueError(f"{path}: expected header {','.join(LABEL_FIELDS)}")
        return [
            FaultLabel(
                site=row["site"],
                line=row["line"],
                device=row["device"],
                sensor=row["sensor"],
                kind=row["kind"],
                start_ms=int(row["start_ms"]),
                end_ms=int(row["end_ms"]),
                magnitude=float(row["magnitude"]),
            )
            for row in reader
        ]


@dataclass(frozen=True, slots=True)
class DeviceRef:
    site: str
    line: str
    device: str


@dataclass(frozen=True, slots=True)
class DeviceBatch:
    """Samples of one device in contract form: ``{"ts": ms, "seq": n, "values": {...}}``."""

    site: str
    line: str
    device: str
    samples: list[dict[str, Any]]


@dataclass(slots=True)
class _Fault:
    device: int
    sensor: int
    kind: str
    start: int  # sample index
    end: int  # inclusive
    magnitude: float
    held: float | None = None  # the frozen reading of a stuck fault


class Fleet:
    """N simulated machines on ``site``, ``devices_per_line`` per line, 4 sensors each."""

    def __init__(
        self,
        devices: int = 12,
        *,
        rate_hz: float = 10.0,
        seed: int = 0,
        fault_rate: float = 0.5,
        faults: Sequence[str] = ALL_KINDS,
        site: str = "plant1",
        devices_per_line: int = 4,
        start_ms: int | None = None,
        warmup: int = 60,
    ) -> None:
        unknown = set(faults) - set(FAULT_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {FAULT_KINDS}")
        if devices < 1 or devices_per_line < 1:
            raise ValueError("devices and devices_per_line must be at least 1")
        if not rate_hz > 0 or fault_rate < 0 or warmup < 1:
            raise ValueError("need rate_hz > 0, fault_rate >= 0 and warmup >= 1")
        if not IDENTIFIER_RE.match(site):
            raise ValueError(f"invalid site identifier {site!r}")
        self.rate_hz = float(rate_hz)
        self.seed = seed
        self.fault_rate = fault_rate
        self.fault_kinds = tuple(k for k in FAULT_KINDS if k in faults)
        self.warmup = warmup
        self.start_ms = int(time.time() * 1000) if start_ms is None else int(start_ms)
        self.devices = [
            DeviceRef(site, f"line{i // devices_per_line + 1}", f"cnc-{i + 1:03d}")
            for i in range(devices)
        ]
        #: Faults whose first sample has been emitted, in order of start.
        self.labels: list[FaultLabel] = []
        self.samples_emitted = 0
        self.readings_emitted = 0

        signal_seed, fault_seed = np.random.SeedSequence(seed).spawn(2)
        self._bank = SignalBank(devices, self.rate_hz, signal_seed)
        self._fault_rng = np.random.default_rng(fault_seed)
        self._block = max(64, round(60 * self.rate_hz))
        self._gap = max(5, round(2 * self.rate_hz))
        self._emitted = 0  # next sample index to hand out
        self._k0 = -self._block  # first sample index of the buffered block
        self._values: FloatArray = np.empty((devices, len(SENSORS), 0))
        self._present: BoolArray = np.empty((devices, len(SENSORS), 0), dtype=bool)
        self._last: FloatArray = np.zeros((devices, len(SENSORS)))
        self._streams: list[list[_Fault]] = [[] for _ in range(devices * len(SENSORS))]
        self._unannounced: list[_Fault] = []
        self._mean_wait = self._wait_samples()
        self._next_fault = [self.warmup + self._draw_wait() for _ in range(devices * len(SENSORS))]

    # ----------------------------------------------------------------- public API

    @property
    def sigma(self) -> FloatArray:
        """Noise standard deviation per stream, shape (devices, sensors), sensor units."""
        return self._bank.sigma

    def stream_sigma(self, device: str, sensor: str) -> float:
        """Noise standard deviation of one stream (the unit of label magnitudes)."""
        index = next(i for i, ref in enumerate(self.devices) if ref.device == device)
        return float(self._bank.sigma[index, SENSORS.index(sensor)])

    def ts_of(self, k: int) -> int:
        """Timestamp (epoch ms) of sample ``k``."""
        return self.start_ms + round(k * 1000 / self.rate_hz)

    @property
    def next_index(self) -> int:
        """Index (``seq``) of the next sample to be emitted."""
        return self._emitted

    def tick(self, now_ms: int) -> list[DeviceBatch]:
        """Every device's samples with timestamp <= ``now_ms`` not yet emitted."""
        due = self._due(now_ms)
        collected: list[list[dict[str, Any]]] = [[] for _ in self.devices]
        while self._emitted < due:
            if self._emitted >= self._k0 + self._block:
                self._next_block()
            hi = min(due, self._k0 + self._block)
            for samples, new in zip(collected, self._emit(self._emitted, hi), strict=True):
                samples.extend(new)
            self._emitted = hi
        return [
            DeviceBatch(ref.site, ref.line, ref.device, samples)
            for ref, samples in zip(self.devices, collected, strict=True)
            if samples
        ]

    def generate(self, duration_s: float) -> list[DeviceBatch]:
        """Everything not yet emitted from the first ``duration_s`` seconds of the fleet."""
        return self.tick(self.start_ms + round(duration_s * 1000) - 1)

    # ------------------------------------------------------------------ internals

    def _due(self, now_ms: int) -> int:
        """Number of samples whose timestamp is <= now_ms."""
        if now_ms < self.start_ms:
            return 0
        n = int((now_ms - self.start_ms) * self.rate_hz / 1000) + 1
        while self.ts_of(n) <= now_ms:
            n += 1
        while n > 0 and self.ts_of(n - 1) > now_ms:
            n -= 1
        return n

    def _wait_samples(self) -> float:
        """Mean gap between faults so that starts come at about ``fault_rate`` per minute."""
        if not self.fault_kinds or self.fault_rate <= 0:
            return float("inf")
        lengths = [
            1.5 if k == "spike" else self.rate_hz * sum(_DURATION_S[k]) / 2
            for k in self.fault_kinds
        ]
        period = 60 * self.rate_hz / self.fault_rate
        return max(period - float(np.mean(lengths)) - self._gap, 0.25 * period)

    def _draw_wait(self) -> int:
        if self._mean_wait == float("inf"):
            return 2**62
        return round(self._fault_rng.exponential(self._mean_wait))

    def _schedule(self, until: int) -> None:
        """Draw the faults of every stream that start before sample ``until``."""
        rng, rate = self._fault_rng, self.rate_hz
        for stream, faults in enumerate(self._streams):
            device, sensor = divmod(stream, len(SENSORS))
            while self._next_fault[stream] < until:
                kind = self.fault_kinds[int(rng.integers(len(self.fault_kinds)))]
                start = self._next_fault[stream]
                if kind == "spike":
                    length = int(rng.integers(1, 3))
                    # Keep the spike and both neighbours inside one block.
                    if (start - 1) // self._block != (start + length) // self._block:
                        start = (start + length) // self._block * self._block + 1
                else:
                    length = max(3, round(rng.uniform(*_DURATION_S[kind]) * rate))
                if kind in _MAGNITUDE:
                    upward = sensor == VIB or rng.random() < 0.5
                    size = rng.uniform(*_MAGNITUDE[kind])
                    magnitude = round(float(size if upward else -size), 2)
                elif kind == "noise_burst":
                    magnitude = round(float(rng.uniform(*_BURST_FACTOR)), 2)
                else:
                    magnitude = 0.0
                fault = _Fault(device, sensor, kind, start, start + length - 1, magnitude)
                faults.append(fault)
                self._unannounced.append(fault)
                self._next_fault[stream] = fault.end + 1 + self._gap + self._draw_wait()

    def _next_block(self) -> None:
        """Generate the next block of samples, faults applied, into the buffer."""
        k0, n = self._k0 + self._block, self._block
        self._schedule(k0 + n)
        active = [f for faults in self._streams for f in faults if f.start < k0 + n]
        base, noise = self._bank.next_block(n)

        def span(f: _Fault) -> tuple[int, int]:
            return max(f.start, k0) - k0, min(f.end + 1, k0 + n) - k0

        for f in active:
            if f.kind == "noise_burst":
                lo, hi = span(f)
                noise[f.device, f.sensor, lo:hi] *= f.magnitude
        values = self._bank.compose(base, noise)
        for f in active:
            lo, hi = span(f)
            step = f.magnitude * float(self._bank.sigma[f.device, f.sensor])
            row = values[f.device, f.sensor]
            if f.kind == "level_shift":
                row[lo:hi] += step
            elif f.kind == "drift":
                progress = (np.arange(lo, hi) + k0 - f.start + 1) / (f.end - f.start + 1)
                row[lo:hi] += step * progress
            elif f.kind == "spike":
                row[lo:hi] = (row[lo - 1] + row[hi]) / 2 + step
        np.round(values, _DECIMALS, out=values)
        present = np.ones(values.shape, dtype=bool)
        for f in active:
            lo, hi = span(f)
            if f.kind == "stuck":
                if f.held is None:
                    f.held = float(
                        values[f.device, f.sensor, lo - 1] if lo else self._last[f.device, f.sensor]
                    )
                values[f.device, f.sensor, lo:hi] = f.held
            elif f.kind == "dropout":
                present[f.device, f.sensor, lo:hi] = False
        self._streams = [[f for f in faults if f.end >= k0 + n] for faults in self._streams]
        self._last = values[:, :, -1].copy()
        self._k0, self._values, self._present = k0, values, present

    def _emit(self, lo: int, hi: int) -> list[list[dict[str, Any]]]:
        """Per device, contract dicts of samples lo..hi-1 (all in the buffered block); labels."""
        a, b = lo - self._k0, hi - self._k0
        ts = (self.start_ms + np.rint(np.arange(lo, hi) * 1000 / self.rate_hz)).astype(np.int64)
        stamps = list(zip(ts.tolist(), range(lo, hi), strict=True))
        values, present = self._values[:, :, a:b], self._present[:, :, a:b]
        complete = np.asarray(present.reshape(len(self.devices), -1).all(axis=1))
        out = []
        for d in range(len(self.devices)):
            rows = values[d].T.tolist()
            if complete[d]:
                samples = [
                    {"ts": t, "seq": q, "values": dict(zip(SENSORS, row, strict=True))}
                    for (t, q), row in zip(stamps, rows, strict=True)
                ]
            else:
                samples = []
                for (t, q), row, mask in zip(stamps, rows, present[d].T.tolist(), strict=True):
                    kept = {s: v for s, v, m in zip(SENSORS, row, mask, strict=True) if m}
                    if kept:
                        samples.append({"ts": t, "seq": q, "values": kept})
            self.samples_emitted += len(samples)
            out.append(samples)
        self.readings_emitted += int(present.sum())

        started = sorted(
            (f for f in self._unannounced if f.start < hi),
            key=lambda f: (f.start, f.device, f.sensor),
        )
        self._unannounced = [f for f in self._unannounced if f.start >= hi]
        for f in started:
            ref = self.devices[f.device]
            self.labels.append(
                FaultLabel(
                    ref.site,
                    ref.line,
                    ref.device,
                    SENSORS[f.sensor],
                    f.kind,
                    self.ts_of(f.start),
                    self.ts_of(f.end),
                    f.magnitude,
                )
            )
        return out
