"""Time series: a generated default series, a CSV column reader, and the two baselines every
forecaster has to beat (naive and seasonal naive).

A forecast starts at an *origin* ``o``: the values before ``o`` are known, ``o .. o + H - 1``
are predicted, and ``h = 1 .. H`` counts the steps ahead.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np

from rnnjax.data.text import DataError, read_text


def seasonal_series(
    length: int = 3000,
    *,
    period: int = 24,
    trend: float = 3.0,
    amplitude: float = 2.0,
    noise: float = 0.3,
    phi: float = 0.6,
    seed: int = 0,
) -> np.ndarray:
    """A synthetic ``(length,)`` float32 series, deterministic in ``seed``: a level of 10 rising
    by ``trend`` over the series, a seasonal cycle of ``period`` steps (two harmonics, the first
    of ``amplitude``: like hourly data over a day) and AR(1) noise ``e_t = phi e_(t-1) +
    N(0, noise^2)``, persistent as real residuals are, so the recent past says something beyond
    the season.

    >>> y = seasonal_series(480, seed=1)
    >>> y.shape, y.dtype.name, bool((y == seasonal_series(480, seed=1)).all())
    ((480,), 'float32', True)
    """
    rng = np.random.default_rng(seed)
    t = np.arange(length)
    phase = 2 * np.pi * t / period
    level = 10.0 + trend * t / max(length, 1)
    season = amplitude * (np.sin(phase) + 0.35 * np.sin(2 * phase + 1.0))
    shocks = rng.normal(0.0, noise, length)
    ar = np.empty(length)
    ar[:1] = shocks[:1] / math.sqrt(1 - phi**2)  # start in the stationary distribution
    for i in range(1, length):
        ar[i] = phi * ar[i - 1] + shocks[i]
    return (level + season + ar).astype(np.float32)


def _number(text: str) -> float | None:
    """``text`` as a finite float, or None."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def read_series(path: str | Path, column: str | None = None) -> tuple[np.ndarray, str]:
    """One numeric column of a CSV file as a ``(N,)`` float64 array, and the column's name.

    The first row is the header (if every field of it is a number, there is none and columns
    are named ``1, 2, ...``); the delimiter is sniffed among ``, ; tab``; blank lines are
    skipped. Without ``column`` the file must have exactly one numeric column. Anything else is
    a :class:`DataError` naming the problem: a missing, empty or non-UTF-8 file, an unknown
    column (with the columns there are), a field that is not a finite number (with its line and
    value), a ragged row, or a choice of several numeric columns.

    >>> import tempfile, os
    >>> with tempfile.TemporaryDirectory() as d:
    ...     p = os.path.join(d, "x.csv")
    ...     _ = open(p, "w").write("time,load\\n00:00,1.5\\n01:00,2\\n")
    ...     read_series(p)
    (array([1.5, 2. ]), 'load')
    """
    text = read_text(path)
    try:
        dialect: type[csv.Dialect] | csv.Dialect = csv.Sniffer().sniff(
            text[:8192], delimiters=",;\t"
        )
    except csv.Error:  # one column, or nothing to tell from
        dialect = csv.excel
    reader = csv.reader(io.StringIO(text), dialect)
    rows = [(reader.line_num, row) for row in reader if any(f.strip() for f in row)]
    if not rows:
        raise DataError(f"{path} holds no CSV rows")
    first = [f.strip() for f in rows[0][1]]
    if all(_number(f) is not None for f in first):
        names = [str(i + 1) for i in range(len(first))]
    else:
        names, rows = first, rows[1:]
    if not rows:
        raise DataError(f"{path} has a header ({', '.join(names)}) but no rows of data")
    for line, row in rows:
        if len(row) != len(names):
            raise DataError(
                f"{path} line {line} has {len(row)} fields, but the header has {len(names)}"
            )

    def first_bad(i: int) -> tuple[int, str] | None:
        for line, row in rows:
            if _number(row[i].strip()) is None:
                return line, row[i]
        return None

    if column is not None:
        if column not in names:
            raise DataError(f"{path} has no column {column!r}; its columns are: {', '.join(names)}")
        index = names.index(column)
    else:
        bad = [first_bad(i) for i in range(len(names))]
        numeric = [i for i, b in enumerate(bad) if b is None]
        if len(numeric) > 1:
            raise DataError(
                f"{path} has several numeric columns ({', '.join(names[i] for i in numeric)}); "
                "choose one with --column NAME"
            )
        if not numeric:
            why = "; ".join(
                f"{n!r} line {b[0]}: {b[1]!r}" for n, b in zip(names, bad, strict=True) if b
            )
            raise DataError(f"{path} has no numeric column (first non-numbers: {why})")
        index = numeric[0]
    bad_field = first_bad(index)
    if bad_field is not None:
        line, value = bad_field
        raise DataError(
            f"{path} line {line}, column {names[index]!r}: {value!r} is not a finite number"
        )
    return np.array([float(row[index]) for _, row in rows]), names[index]


def estimate_period(values: np.ndarray, *, max_lag: int, threshold: float = 0.2) -> int:
    """The seasonal period of a ``(N,)`` series: the lag in ``2 .. max_lag`` with the highest
    autocorrelation peak of the first differences (differencing removes a trend), if that peak
    reaches ``threshold``; 1 (no season: seasonal naive is then naive) otherwise.

    >>> t = np.arange(600)
    >>> estimate_period(np.sin(2 * np.pi * t / 12) + 0.01 * t, max_lag=100)
    12
    >>> estimate_period(np.random.default_rng(0).normal(size=600).cumsum(), max_lag=100)
    1
    """
    d = np.diff(np.asarray(values, np.float64))
    d = d - d.mean() if len(d) else d
    energy = float(d @ d)
    max_lag = min(max_lag, len(d) - 2)
    if max_lag < 2 or energy == 0.0:
        return 1
    acf = np.array([1.0] + [float(d[:-k] @ d[k:]) / energy for k in range(1, max_lag + 2)])
    peaks = [k for k in range(2, max_lag + 1) if acf[k] > acf[k - 1] and acf[k] >= acf[k + 1]]
    best = max(peaks, key=lambda k: acf[k], default=None)
    return best if best is not None and acf[best] >= threshold else 1


def naive_forecast(values: np.ndarray, origins: np.ndarray, horizon: int) -> np.ndarray:
    """The last known value, repeated: ``(len(origins), horizon)`` forecasts of ``values[o + h -
    1]`` made at each origin ``o`` (``values[o - 1]`` is the last value known).

    >>> naive_forecast(np.arange(10.0), np.array([3, 5]), 2).tolist()
    [[2.0, 2.0], [4.0, 4.0]]
    """
    values, origins = np.asarray(values), np.asarray(origins)
    return np.repeat(values[origins - 1][:, None], horizon, axis=1)


def seasonal_naive_forecast(
    values: np.ndarray, origins: np.ndarray, horizon: int, period: int
) -> np.ndarray:
    """The value one season earlier (from the last known season for ``h > period``):
    ``values[o + h - 1 - period * ceil(h / period)]``, shape ``(len(origins), horizon)``.
    Needs ``origins >= period``. With ``period=1`` this is :func:`naive_forecast`.

    >>> y = np.array([0.0, 1, 2, 0, 1, 2, 0, 1, 2])
    >>> seasonal_naive_forecast(y, np.array([6]), 4, 3).tolist()
    [[0.0, 1.0, 2.0, 0.0]]
    """
    values, origins = np.asarray(values), np.asarray(origins)
    if len(origins) and origins.min() < period:
        raise ValueError(
            f"seasonal_naive_forecast needs origins >= period {period}, got {origins.min()}"
        )
    h = np.arange(1, horizon + 1)
    back = period * np.ceil(h / period).astype(int)
    return values[origins[:, None] + h - 1 - back]
