"""``lax.scan`` against unrolled loops: should a recurrence be scanned or unrolled?

For each cell and sequence length T, the candidates are :func:`rnnjax.scan` with
``unroll=1, 2, 4, 8, 16`` and ``unroll=True`` (fully unrolled inside one scan step), and
:func:`rnnjax.loop` (a Python loop: T copies of the step in the program). Each is measured
forward (``ys`` of a batch, batched with ``jax.vmap``) and forward+backward (``jax.value_and_grad``
of ``sum(ys ** 2)`` with respect to the cell's params): trace and compile time, median step time
and XLA's peak-memory estimate (see :mod:`rnnjax.bench._harness` for the methodology). The
reference for ratios is ``scan(unroll=1)``. This is the question of jax-ml/jax#1897 and
dm-haiku#351.

Any cell can be measured: the built-in ones by name (:data:`BUILTIN_CELLS`) and a user's own as
``"package.module:function"``, a function of the hidden size that returns an
:class:`rnnjax.Cell` (imported in each worker, so the module must be importable there too).
Whatever whole-sequence fast path a cell has is dropped: the scan of its ``step`` is the subject.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rnnjax.bench import _harness
from rnnjax.bench._harness import MODES, Group
from rnnjax.cells import BY_NAME, SQUARE

SUITE = "scan-vs-unroll"
CELLS = ("lstm", "gru", "elman")  # the default
#: The cells ``cells`` may name; any other is ``"package.module:function"``.
BUILTIN_CELLS = tuple(BY_NAME)
#: Built-in cells whose input size must equal their hidden size: their inputs have H features.
SQUARE_CELLS = SQUARE
LENGTHS = (16, 64, 256, 1024)
UNROLLS = (1, 2, 4, 8, 16, "full", "loop")
REFERENCE = "scan(unroll=1)"


def candidate_name(unroll: int | str) -> str:
    """``1 -> "scan(unroll=1)"``, ``"full" -> "scan(unroll=True)"``, ``"loop" -> "loop"``.

    >>> [candidate_name(u) for u in (4, "full", "loop")]
    ['scan(unroll=4)', 'scan(unroll=True)', 'loop']
    """
    if unroll == "loop":
        return "loop"
    return f"scan(unroll={'True' if unroll == 'full' else int(unroll)})"


def programs(*, cell: str, T: int, batch: int, input_size: int, hidden: int, unrolls: list):
    """The worker's side: one :class:`Program` per ``(candidate, mode)`` for one cell and T."""
    import jax
    import jax.numpy as jnp

    import rnnjax as rj

    # The step's lax.scan is the subject: no whole-sequence path (the LSTM's and GRU's native
    # CPU kernels, the linear cells' parallel forms would run instead of the scan and ignore
    # unroll).
    rnn_cell = make_cell(cell, hidden)._replace(sequence=None)
    size = hidden if cell in SQUARE_CELLS else input_size
    params = rnn_cell.init(jax.random.key(0), size)
    xs = jax.random.normal(jax.random.key(1), (batch, T, size))

    def functions(unroll):
        if unroll == "loop":
            run = rj.loop
        else:
            steps = True if unroll == "full" else int(unroll)

            def run(c, p, x):
                return rj.scan(c, p, x, unroll=steps)

        def forward(params, xs):
            return jax.vmap(lambda x: run(rnn_cell, params, x)[1])(xs)

        def forward_backward(params, xs):
            return jax.value_and_grad(lambda p: jnp.sum(forward(p, xs) ** 2))(params)

        return {"fwd": forward, "fwd+bwd": forward_backward}

    out = []
    for unroll in unrolls:
        fs = functions(unroll)
        for mode in MODES:
            out.append(
                _harness.jax_program(
                    candidate_name(unroll), mode, lambda f=fs[mode]: (f, (params, xs))
                )
            )
    return out


def scan_vs_unroll(
    *,
    cells: Sequence[str] = CELLS,
    lengths: Sequence[int] = LENGTHS,
    batch: int = 16,
    input_size: int = 32,
    hidden: int = 128,
    unrolls: Sequence[int | str] = UNROLLS,
    repeats: int = 10,
    compile_timeout: float = 60.0,
    compile_timeouts: dict[str, float] | None = None,
    min_sample_s: float = _harness.MIN_SAMPLE_S,
    settle_s: float = _harness.SETTLE_S,
    progress: Callable[[str], None] | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Measure scan with each unroll and the Python loop, per cell and T (in increasing T).

    Args:
      cells: names from :data:`BUILTIN_CELLS` (``"rglru"`` and ``"lru"`` read ``hidden``
        features, not ``input_size``), or ``"package.module:function"`` for a function of the
        hidden size that returns an :class:`rnnjax.Cell`.
      lengths: sequence lengths T; a candidate that times out at one T is not tried at larger T.
      batch, input_size, hidden: B, I, H; inputs are ``(B, T, I)`` standard normals, batched
        with ``jax.vmap`` over a per-example :func:`rnnjax.scan` / :func:`rnnjax.loop`.
      unrolls: ints (``scan(unroll=k)``), ``"full"`` (``unroll=True``) and ``"loop"``;
        ``scan(unroll=1)``, the reference for ratios, is always measured.
      repeats: timing rounds; compile_timeout: seconds allowed for one program's trace + compile
        (``compile_timeouts`` overrides it per candidate name, e.g. ``{"loop": 5.0}``).
      min_sample_s: the shortest timed sample (back-to-back calls are counted to reach it).
      settle_s: seconds of untimed calls of a program before each of its samples (see
        :mod:`rnnjax.bench._harness`; the default outlasts the thread pools' spinning, a
        shorter one only serves quick runs such as the tests').
      progress: called with a line of text as the work goes on.

    Returns:
      ``{"suite": "scan-vs-unroll", "schema", "command", "config", "machine", "methodology",
      "results"}``; each result row has ``cell``, ``T``, ``candidate``, ``mode`` and ``status``,
      and when ok ``trace_s``, ``compile_s``, ``memory``, ``time_s`` (median seconds per call),
      ``min_s``, ``q1_s``, ``q3_s``, ``iqr_s``, ``samples_s``, ``calls_per_sample`` and
      ``vs_reference`` (time over ``scan(unroll=1)``'s).
    """
    cells = check_cells(cells)
    lengths = sorted({_positive("lengths", t) for t in lengths})
    unrolls = _check_unrolls(unrolls)
    if not compile_timeout >= 0:
        raise ValueError(f"compile_timeout must be >= 0 seconds, got {compile_timeout!r}")
    config = {
        "cells": cells, "lengths": lengths, "batch": _positive("batch", batch),
        "input_size": _positive("input_size", input_size), "hidden": _positive("hidden", hidden),
        "unrolls": unrolls, "repeats": _positive("repeats", repeats),
        "compile_timeout": float(compile_timeout), "compile_timeouts": compile_timeouts,
        "min_sample_s": min_sample_s, "settle_s": settle_s, "dtype": "float32",
    }  # fmt: skip
    groups = [
        Group(
            label=f"{cell} T={T}",
            fields={"cell": cell, "T": T},
            kwargs={
                "cell": cell,
                "T": T,
                "batch": batch,
                "input_size": input_size,
                "hidden": hidden,
                "unrolls": unrolls,
            },  # fmt: skip
            keys=[(candidate_name(u), mode) for u in unrolls for mode in MODES],
            series=cell,
        )
        for cell in cells
        for T in lengths
    ]
    rows, machine = _harness.run_groups(
        f"{__name__}:programs", groups, reference=REFERENCE, repeats=repeats,
        compile_timeout=compile_timeout, compile_timeouts=compile_timeouts,
        min_sample_s=min_sample_s, settle_s=settle_s, progress=progress,
    )  # fmt: skip
    method = _harness.methodology(
        reference=REFERENCE, repeats=repeats, min_sample_s=min_sample_s,
        compile_timeout=compile_timeout, settle_s=settle_s,
    )  # fmt: skip
    return _harness.document(
        SUITE, command=command or _harness.python_call("scan_vs_unroll", config),
        config=config, machine=machine, method=method, rows=rows,
    )  # fmt: skip


def make_cell(cell: str, hidden: int):
    """The cell ``cell`` names (a built-in name or ``"package.module:function"``) with ``hidden``
    units."""
    import rnnjax as rj

    if cell in BY_NAME:
        return BY_NAME[cell](hidden)
    made = _factory(cell)(hidden)
    if not isinstance(made, rj.Cell):
        raise ValueError(
            f"cells: {cell}({hidden}) returned a {type(made).__name__}, expected an rnnjax.Cell"
        )
    return made


def _factory(cell: str) -> Callable:
    module, _, name = cell.partition(":")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` would: the user's modules beside them
    try:
        found = getattr(importlib.import_module(module), name, None)
    except ImportError as e:
        raise ValueError(f"cells: cannot import {module!r} for {cell!r}: {e}") from None
    if not callable(found):
        raise ValueError(f"cells: {module!r} has no function {name!r} (for {cell!r})")
    return found


def check_cells(cells: Sequence[str]) -> list[str]:
    """``cells`` as a list, each a built-in name or an importable ``"package.module:function"``;
    a :class:`ValueError` naming the first that is neither."""
    return [_check_cell(c) for c in cells]


def _check_cell(cell: str) -> str:
    if not isinstance(cell, str) or (cell not in BUILTIN_CELLS and ":" not in cell):
        raise ValueError(
            f"cells must be among {', '.join(BUILTIN_CELLS)} or 'package.module:function' "
            f"(a function of the hidden size returning an rnnjax.Cell); got {cell!r}"
        )
    if cell not in BUILTIN_CELLS:
        _factory(cell)  # a bad module or name is refused here, before any worker starts
    return cell


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _check_unrolls(unrolls: Sequence[int | str]) -> list[int | str]:
    out: list[int | str] = [1]  # the reference is always measured
    for u in unrolls:
        if u is True:
            u = "full"
        if u not in ("full", "loop"):
            u = _positive("each of unrolls (an int, 'full' or 'loop')", u)
        if u not in out:
            out.append(u)
    # Compile order: the cheap scans first, so that a timeout late in the group costs least.
    return sorted(u for u in out if isinstance(u, int)) + [u for u in ("full", "loop") if u in out]


# ------------------------------------------------------------------------- report


def format_table(result: dict[str, Any]) -> str:
    """One block per cell and T: compile times, forward and fwd+bwd step times (with ratios to
    ``scan(unroll=1)``) and the peak-memory estimate of fwd+bwd."""
    rows = result["results"]
    blocks = []
    keys = list(dict.fromkeys((r["cell"], r["T"]) for r in rows))
    for cell, T in keys:
        here = [r for r in rows if r["cell"] == cell and r["T"] == T]
        by = {(r["candidate"], r["mode"]): r for r in here}
        lines = []
        for candidate in dict.fromkeys(r["candidate"] for r in here):
            f, fb = by.get((candidate, "fwd")), by.get((candidate, "fwd+bwd"))
            lines.append([candidate, _compile(f), _compile(fb), _time(f), _time(fb), _memory(fb)])
        header = ["candidate", "compile fwd s", "compile fwd+bwd s", "fwd ms (x ref)",
                  "fwd+bwd ms (x ref)", "peak fwd+bwd"]  # fmt: skip
        blocks.append(f"{cell}  T={T}\n" + _harness.table(header, lines))
    config = result["config"]
    head = (
        f"scan vs unroll: B={config['batch']} I={config['input_size']} H={config['hidden']}, "
        f"median of {config['repeats']} interleaved rounds; ref {REFERENCE}; compile is trace + "
        "XLA compile; peak is XLA's buffer estimate"
    )
    return "\n\n".join([head, *blocks])


def _compile(row):
    if row is None:
        return "-"
    if row["status"] == "timed out":
        return f"> {row['compile_timeout_s']:g}"
    if row["status"] != "ok":
        return row["status"]
    return f"{row['trace_s'] + row['compile_s']:.3g}"


def _time(row):
    if row is None:
        return "-"
    if row["status"] != "ok":
        return row["status"]
    ratio = row.get("vs_reference")
    return f"{row['time_s'] * 1e3:.3g}" + (f" ({ratio:.2f}x)" if ratio else "")


def _memory(row):
    if row is None or row["status"] != "ok" or not row.get("memory"):
        return "-"
    return _harness.size(row["memory"]["peak_bytes"])


def plot_scan_vs_unroll(result: dict[str, Any], path: str | Path) -> None:
    """One row of panels per cell: trace + compile time of fwd+bwd, forward and fwd+bwd median
    step time, and XLA's peak-memory estimate of fwd+bwd, each against T (log-log). A candidate
    is drawn where it has a number; each panel's title names those with none (timed out or
    failed) from the smallest such T."""
    # Figure, not pyplot: no global backend switch (inline plots in notebooks keep working)
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    rows = result["results"]
    cells = list(dict.fromkeys(r["cell"] for r in rows))
    candidates = list(dict.fromkeys(r["candidate"] for r in rows))
    colors = {c: f"C{k % 10}" for k, c in enumerate(candidates)}
    panels = [
        ("trace + compile, fwd+bwd (s)", "fwd+bwd", lambda r: r["trace_s"] + r["compile_s"]),
        ("forward (ms)", "fwd", lambda r: r["time_s"] * 1e3),
        ("forward + backward (ms)", "fwd+bwd", lambda r: r["time_s"] * 1e3),
        ("peak memory, fwd+bwd (MiB)", "fwd+bwd",
         lambda r: r["memory"]["peak_bytes"] / 2**20 if r.get("memory") else None),
    ]  # fmt: skip
    fig = Figure(figsize=(4 * len(panels), 3.4 * len(cells) + 0.6))
    axes = fig.subplots(len(cells), len(panels), squeeze=False)
    for i, cell in enumerate(cells):
        for j, (title, mode, value) in enumerate(panels):
            ax = axes[i][j]
            here = [r for r in rows if r["cell"] == cell and r["mode"] == mode]
            for candidate in candidates:
                points = [
                    (r["T"], value(r))
                    for r in here
                    if r["candidate"] == candidate and r["status"] == "ok"
                ]
                points = [(t, v) for t, v in points if v is not None and v > 0]
                if points:
                    ax.plot(*zip(*points, strict=True), marker="o", color=colors[candidate])
            first: dict[str, int] = {}
            for r in sorted(here, key=lambda r: r["T"]):
                if r["status"] != "ok":
                    first.setdefault(r["candidate"], r["T"])
            note = ", ".join(f"{c} from T={t}" for c, t in first.items())
            ax.set_title(f"{cell}: {title}" + (f"\nno result: {note}" if note else ""), fontsize=8)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("T")
            ax.grid(True, which="both", alpha=0.3)
    handles = [Line2D([], [], color=colors[c], marker="o", label=c) for c in candidates]
    fig.legend(handles=handles, loc="lower center", ncol=len(candidates), fontsize=8)
    config = result["config"]
    fig.suptitle(
        f"scan vs unroll, B={config['batch']} I={config['input_size']} H={config['hidden']} "
        f"({result['machine'].get('backend', '?')}, {result['machine'].get('cpu_model', '?')})",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.6 / fig.get_figheight(), 1, 1))
    fig.savefig(path, dpi=100)
