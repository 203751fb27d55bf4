"""Fault-free machine-tool signals for a fleet of CNC machines.

Each device has four sensors. Its parameters (idle current, base temperature, ...)
are drawn once from the seed; the signals are then produced block by block,
vectorised across devices, from a little carried state (the part-program phase,
the thermal state, scheduled coolant-pressure sags). Random numbers are drawn per
block, so the output depends only on the seed and the block size, never on how a
caller slices the stream.

Model, per device:

* load: part programs alternate cutting (15-90 s at 45-100 % load, with a slow
  periodic variation as the tool engages) and idle (4-25 s: tool change, part swap),
  smoothed by a 1 s lag (spindle run-up);
* ``motor_current`` = idle current + cutting current x load, Gaussian noise;
* ``spindle_temp`` follows ``base + gain x load`` through a 4 min thermal lag (warm-up
  under load, cool-down when idle), plus an hours-long ambient drift and sensor noise;
* ``vibration_rms`` = ``(base + gain x load) x exp(s z)``: positive, log-normal noise;
* ``coolant_pressure`` = base - occasional slow sags (1-4 min, 0.15-0.6 bar, about one
  per 12 min; filter loading, pump cycling). Sags are normal operation, not faults.
"""

from __future__ import annotations

import math
from typing import Final

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]

SENSORS: Final = ("spindle_temp", "vibration_rms", "motor_current", "coolant_pressure")
UNITS: Final = {
    "spindle_temp": "degC",
    "vibration_rms": "mm/s",
    "motor_current": "A",
    "coolant_pressure": "bar",
}
TEMP, VIB, CURRENT, PRESSURE = range(4)

_LOAD_LAG_S: Final = 1.0
_THERMAL_LAG_S: Final = 240.0
_SAG_INTERVAL_S: Final = 720.0


def lowpass(u: FloatArray, y0: FloatArray, tau_samples: float) -> FloatArray:
    """First-order lag ``y[k] = a y[k-1] + (1 - a) u[k]`` along the last axis, from ``y0``.

    Uses the closed form ``y[k] = a^(k+1) (y0 + (1 - a) sum_{j<=k} a^-(j+1) u[j])`` on
    chunks of ten time constants, so ``a^-(j+1)`` never grows past about 2e4.
    """
    a = math.exp(-1.0 / tau_samples)
    n = u.shape[-1]
    out = np.empty_like(u)
    step = max(1, int(10 * tau_samples))
    y = np.asarray(y0, dtype=np.float64)
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        powers = a ** np.arange(1, hi - lo + 1, dtype=np.float64)
        acc = y[..., None] + (1.0 - a) * np.cumsum(u[..., lo:hi] / powers, axis=-1)
        out[..., lo:hi] = powers * acc
        y = out[..., hi - 1]
    return out


class SignalBank:
    """Clean signals of ``n_devices`` machines, produced in consecutive blocks."""

    def __init__(self, n_devices: int, rate_hz: float, seed: np.random.SeedSequence) -> None:
        params_seed, load_seed, sag_seed, noise_seed = seed.spawn(4)
        p = np.random.default_rng(params_seed)
        d = n_devices
        self.n_devices = d
        self.rate_hz = rate_hz
        self.idle_current = p.uniform(3.5, 4.5, d)
        self.cut_current = p.uniform(9.0, 15.0, d)
        self.temp_base = p.uniform(58.5, 61.5, d)
        self.temp_gain = p.uniform(10.0, 14.0, d)
        self.ambient_amp = p.uniform(0.5, 1.5, d)
        self.ambient_period_s = p.uniform(3600.0, 3 * 3600.0, d)
        self.ambient_phase = p.uniform(0.0, 2 * math.pi, d)
        self.engage_period_s = p.uniform(6.0, 14.0, d)
        self.vib_base = p.uniform(0.45, 0.65, d)
        self.vib_gain = p.uniform(0.5, 0.8, d)
        self.vib_log_sigma = p.uniform(0.04, 0.07, d)
        self.pressure_base = p.uniform(4.7, 5.3, d)

        #: Noise standard deviation of every stream, shape (devices, sensors), in sensor
        #: units. For the log-normal vibration it is the value at half load.
        self.sigma = np.empty((d, len(SENSORS)))
        self.sigma[:, TEMP] = p.uniform(0.03, 0.06, d)
        self.sigma[:, VIB] = self.vib_log_sigma * (self.vib_base + 0.5 * self.vib_gain)
        self.sigma[:, CURRENT] = p.uniform(0.10, 0.20, d)
        self.sigma[:, PRESSURE] = p.uniform(0.02, 0.04, d)

        self._load_rng = np.random.default_rng(load_seed)
        self._sag_rng = np.random.default_rng(sag_seed)
        self._noise_rng = np.random.default_rng(noise_seed)
        self._k = 0  # index of the next sample
        # Start idle for a random part of an idle phase, so machines are out of step.
        self._cutting = np.zeros(d, dtype=bool)
        self._level = np.zeros(d)
        self._phase_left = np.maximum(1, np.rint(p.uniform(0.0, 20.0, d) * rate_hz)).astype(int)
        self._load = np.zeros(d)
        self._temp = self.temp_base + p.uniform(0.0, 2.0, d)
        self._sags: list[list[tuple[int, int, float]]] = [[] for _ in range(d)]
        self._next_sag = [self._sag_wait() for _ in range(d)]

    def _seconds(self, low: float, high: float, rng: np.random.Generator) -> int:
        return max(1, round(rng.uniform(low, high) * self.rate_hz))

    def _sag_wait(self) -> int:
        return round(self._sag_rng.exponential(_SAG_INTERVAL_S) * self.rate_hz)

    def _load_steps(self, n: int) -> FloatArray:
        """Part-program load (0 idle, 0.45-1 cutting) of the next ``n`` samples."""
        out = np.empty((self.n_devices, n))
        for dev in range(self.n_devices):
            pos = 0
            while pos < n:
                if self._phase_left[dev] == 0:
                    cutting = not self._cutting[dev]
                    self._cutting[dev] = cutting
                    rng = self._load_rng
                    self._level[dev] = rng.uniform(0.45, 1.0) if cutting else 0.0
                    span = (15.0, 90.0) if cutting else (4.0, 25.0)
                    self._phase_left[dev] = self._seconds(*span, rng)
                take = min(n - pos, int(self._phase_left[dev]))
                out[dev, pos : pos + take] = self._level[dev]
                pos += take
                self._phase_left[dev] -= take
        return out

    def _sag_block(self, n: int) -> FloatArray:
        """Pressure drop (bar, >= 0) from the slow sags overlapping the next ``n`` samples."""
        out = np.zeros((self.n_devices, n))
        k0, k1 = self._k, self._k + n
        for dev in range(self.n_devices):
            while self._next_sag[dev] < k1:
                start = self._next_sag[dev]
                length = self._seconds(60.0, 240.0, self._sag_rng)
                depth = float(self._sag_rng.uniform(0.15, 0.6))
                self._sags[dev].append((start, length, depth))
                self._next_sag[dev] = start + length + self._sag_wait()
            for start, length, depth in self._sags[dev]:
                lo, hi = max(start, k0), min(start + length, k1)
                if lo < hi:
                    x = (np.arange(lo, hi) - start + 0.5) / length
                    out[dev, lo - k0 : hi - k0] += depth * np.sin(np.pi * x) ** 2
            self._sags[dev] = [s for s in self._sags[dev] if s[0] + s[1] > k1]
        return out

    def next_block(self, n: int) -> tuple[FloatArray, FloatArray]:
        """The next ``n`` samples as (noise-free base, standard-normal noise), (D, S, n) each."""
        rate = self.rate_hz
        t = (self._k + np.arange(n)) / rate
        steps = self._load_steps(n)
        engage = 1.0 + 0.06 * np.sin(2 * np.pi * t / self.engage_period_s[:, None])
        load = lowpass(steps * engage, self._load, _LOAD_LAG_S * rate)
        self._load = load[:, -1].copy()
        heat = self.temp_base[:, None] + self.temp_gain[:, None] * load
        temp = lowpass(heat, self._temp, _THERMAL_LAG_S * rate)
        self._temp = temp[:, -1].copy()
        ambient = self.ambient_amp[:, None] * np.sin(
            2 * np.pi * t / self.ambient_period_s[:, None] + self.ambient_phase[:, None]
        )
        base = np.empty((self.n_devices, len(SENSORS), n))
        base[:, TEMP] = temp + ambient
        base[:, VIB] = self.vib_base[:, None] + self.vib_gain[:, None] * load
        base[:, CURRENT] = self.idle_current[:, None] + self.cut_current[:, None] * load
        base[:, PRESSURE] = self.pressure_base[:, None] - self._sag_block(n)
        noise = self._noise_rng.standard_normal(base.shape)
        self._k += n
        return base, noise

    def compose(self, base: FloatArray, noise: FloatArray) -> FloatArray:
        """Readings from base and noise: additive noise, multiplicative for vibration."""
        values = base + self.sigma[:, :, None] * noise
        values[:, VIB] = base[:, VIB] * np.exp(self.vib_log_sigma[:, None] * noise[:, VIB])
        return values
