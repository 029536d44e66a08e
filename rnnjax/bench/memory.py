"""The ``memory`` suite: peak memory and time of BPTT against sequence length, per remat mode.

Each (T, mode) pair runs in a fresh Python process (``python -m rnnjax.bench.memory --worker``),
so the peak resident set size it reports is that measurement's own: the process imports jax,
builds the cell, jits ``jax.grad`` of the loss over a ``vmap``-ed :func:`rnnjax.scan`, compiles
it, runs it once to warm up and ``repeats`` times more to time it, and prints one JSON line.
Modes: ``"none"`` (``remat=False``), ``"step"`` (``remat=True``), ``"sqrt"``
(``remat="sqrt"``) and an int such as ``64`` (``remat=64``).

Any built-in cell can be measured (``rglru`` and ``lru`` read ``hidden`` features, not
``input_size``). Kernels (``kernels=``): ``"native"`` (the default) measures the cell as
``rj.cells.<cell>(H)`` builds it (the linear cells: their parallel form): the LSTM and GRU run
rnnjax's compiled CPU kernels, which checkpoint the carry and recompute segments themselves
under ``remat`` (the Elman cell has no kernels and runs its step scan either way); ``"scan"``
forces the step-by-step ``lax.scan`` (``cell._replace(sequence=None)``), where ``remat`` is
``jax.checkpoint`` around scanned segments.

Losses (``loss=``):

- ``"outputs"`` (the default): ``sum(ys ** 2)`` over every output of every step and example,
  written the plain way: the scan returns the stacked outputs ``ys`` and the loss reads them.
- ``"outputs_in_scan"``: the same number, with each step's term ``sum(y_t ** 2)`` computed inside
  the scanned step (the cell's output becomes that scalar), so the ``(T, B, H)`` outputs and
  their cotangent are never stored: a readout inside the scan, the way to run BPTT over very
  long sequences when the loss is a sum over steps. (That cell is a new ``rj.Cell`` of the
  step alone, so it runs the step scan whatever ``kernels`` says.)
- ``"final"``: ``sum(h_T ** 2)``, the last hidden state only (many-to-one).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rnnjax.bench._harness import SCHEMA, memory_stats, python_call
from rnnjax.bench._machine import machine_info
from rnnjax.cells import BY_NAME

SUITE = "memory"
#: every built-in cell (rglru and lru read ``hidden`` features, not ``input_size``)
CELLS = tuple(BY_NAME)
LOSSES = ("outputs", "outputs_in_scan", "final")
KERNELS = ("native", "scan")
NAMED_MODES = {"none": False, "step": True, "sqrt": "sqrt"}
METHODOLOGY = {
    "process": "one fresh Python process per (T, mode); the persistent compilation cache is off",
    "inputs": "params from cell.init; xs (batch, T, input_size) float32 drawn with numpy",
    "kernels": "native: the cell as rj.cells builds it (LSTM/GRU: rnnjax's CPU kernels, "
    "checkpointed under remat); scan: cell._replace(sequence=None), the step's lax.scan",
    "loss": "outputs: sum(ys ** 2) over every step and example, from the stacked ys; "
    "outputs_in_scan: the same sum, each step's sum(y_t ** 2) computed inside the scanned step; "
    "final: sum(h_T ** 2); the batch is jax.vmap over rnnjax.scan(cell, params, x, remat=...)",
    "program": "jax.jit(jax.grad(loss)) w.r.t. the params, lowered and compiled ahead of time",
    "peak_rss_bytes": "the process's peak resident set size at exit (Linux: VmHWM in "
    "/proc/self/status; elsewhere getrusage ru_maxrss): everything the process held, jax "
    "itself included",
    "baseline_rss_bytes": "peak RSS after importing jax and rnnjax and running one trivial "
    "jitted op: the part of peak_rss_bytes that is not this computation",
    "ready_rss_bytes": "RSS just before the first run (params, xs and the compiled program "
    "exist); Linux only",
    "memory": "XLA's buffer-assignment sizes of the compiled gradient (memory_analysis())",
    "time_s": "median wall time of `repeats` fwd+bwd runs after one warm-up run (first_run_s); "
    "each ends in block_until_ready; the program is compiled before the warm-up",
    "finite": "every gradient entry is finite",
}


def remat_of(mode: str | int) -> bool | int | str:
    """The ``remat=`` value of a mode: ``"none"``, ``"step"``, ``"sqrt"`` or a positive int.

    >>> remat_of("none"), remat_of("step"), remat_of("sqrt"), remat_of("64"), remat_of(8)
    (False, True, 'sqrt', 64, 8)
    """
    if isinstance(mode, str) and mode in NAMED_MODES:
        return NAMED_MODES[mode]
    text = str(mode)
    if not isinstance(mode, bool) and text.isdigit() and int(text) >= 1:
        return int(text)
    raise ValueError(
        f"memory expects each mode to be 'none', 'step', 'sqrt' or a positive int such as 64 "
        f"(steps per checkpointed segment), got {mode!r}"
    )


def _peak_rss_bytes() -> int:
    """This process's peak resident set size. On Linux, VmHWM of /proc/self/status: getrusage's
    ru_maxrss survives exec, so a child would report its parent's size at fork if larger."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # Linux: KiB


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


def _worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One (T, mode) measurement in this process: its row's measured fields."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import rnnjax as rj
    from rnnjax.scan import _segment_steps

    jax.config.update("jax_enable_compilation_cache", False)
    jax.block_until_ready(jax.jit(lambda x: x + 1)(jnp.zeros(())))
    baseline = _peak_rss_bytes()

    steps, remat = spec["T"], remat_of(spec["mode"])
    cell = rj.cells.BY_NAME[spec["cell"]](spec["hidden"])
    if spec["kernels"] == "scan":
        cell = cell._replace(sequence=None)
    size = spec["hidden"] if spec["cell"] in rj.cells.SQUARE else spec["input_size"]
    params = cell.init(jax.random.key(0), size)
    # numpy draws the inputs: jax.random would hold several xs-sized temporaries at once.
    rng = np.random.default_rng(1)
    xs = jnp.asarray(rng.standard_normal((spec["batch"], steps, size), np.float32))

    if spec["loss"] == "outputs_in_scan":
        plain = cell

        def step(params, carry, x):
            carry, y = plain.step(params, carry, x)
            return carry, jnp.sum(y**2)

        cell = rj.Cell(plain.init, plain.initial_carry, step)

    def loss(params, xs):
        carry, ys = jax.vmap(lambda x: rj.scan(cell, params, x, remat=remat))(xs)
        if spec["loss"] == "final":
            # h (LSTMState's first field; the LRU's complex state: |h|^2)
            first = jax.tree.leaves(carry)[0]
            return jnp.sum(jnp.real(first * jnp.conj(first)))
        return jnp.sum(ys**2) if spec["loss"] == "outputs" else jnp.sum(ys)

    start = time.perf_counter()
    compiled = jax.jit(jax.grad(loss)).lower(params, xs).compile()
    compile_s = time.perf_counter() - start
    ready = _rss_bytes()
    times = []
    for _ in range(1 + spec["repeats"]):  # the first run is a warm-up, not timed
        start = time.perf_counter()
        grads = jax.block_until_ready(compiled(params, xs))
        times.append(time.perf_counter() - start)
    first_run_s, times = times[0], times[1:]
    return {
        "status": "ok",
        "k": _segment_steps(remat, steps),
        "peak_rss_bytes": _peak_rss_bytes(),
        "baseline_rss_bytes": baseline,
        "ready_rss_bytes": ready,
        "memory": memory_stats(compiled),
        "compile_s": compile_s,
        "first_run_s": first_run_s,
        "time_s": statistics.median(times),
        "times_s": times,
        "finite": all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads)),
    }


def _tail(text: str, lines: int = 20) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _run_one(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """One measurement in a fresh process: its fields, or why there are none."""
    command = [sys.executable, "-m", "rnnjax.bench.memory", "--worker", json.dumps(spec)]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:  # subprocess.run has killed the process
        return {"status": "timed out", "wall_s": time.perf_counter() - start}
    wall_s = time.perf_counter() - start
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        why = f"exit status {done.returncode}"
        if done.returncode < 0:
            why = f"killed by signal {-done.returncode} (out of memory?)"
        return {"status": "error", "wall_s": wall_s, "error": f"{why}\n{_tail(done.stderr)}"}
    return {**json.loads(lines[-1]), "wall_s": wall_s}


def _say(progress: Callable[[str], Any] | bool | None, message: str) -> None:
    if progress is True:
        print(message, file=sys.stderr, flush=True)
    elif callable(progress):
        progress(message)


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"memory expects {name} to be a positive int, got {value!r}")
    return value


def memory(
    *,
    cell: str = "lstm",
    lengths: tuple[int, ...] = (1024, 4096),
    hidden: int = 256,
    batch: int = 4,
    input_size: int = 32,
    modes: tuple[str | int, ...] = ("none", "step", "sqrt"),
    timeout: float = 600.0,
    progress: Callable[[str], Any] | bool | None = None,
    loss: str = "outputs",
    repeats: int = 3,
    command: str | None = None,
    kernels: str = "native",
) -> dict[str, Any]:
    """Peak memory and time of one BPTT gradient per sequence length and remat mode.

    Every (T, mode) runs in its own process, killed after ``timeout`` seconds and reported
    ``"timed out"``; a process that dies (e.g. out of memory) is reported ``"error"`` with the
    tail of its stderr. Each row holds ``T``, ``mode``, ``remat`` (the ``remat=`` value),
    ``status`` and ``wall_s``, and when ``"ok"``: ``k`` (steps per checkpointed segment; None
    for no remat), ``peak_rss_bytes``, ``baseline_rss_bytes`` (the process before any work:
    jax imported, one trivial op run), ``ready_rss_bytes``, ``memory`` (XLA's estimate:
    ``temp_bytes``, ``argument_bytes``, ``output_bytes``, ...), ``compile_s``, ``first_run_s``
    (a warm-up run), ``time_s`` (median fwd+bwd seconds over ``repeats`` more runs),
    ``times_s`` and ``finite``.

    Args:
      cell: a name from :data:`CELLS` (``"rglru"`` and ``"lru"`` read ``hidden`` features).
      lengths: sequence lengths T.
      hidden, batch, input_size: the shape; the batch is a ``jax.vmap``.
      modes: ``"none"``, ``"step"``, ``"sqrt"`` or ints (steps per checkpointed segment).
      timeout: seconds per process.
      progress: None, True (a line per measurement on stderr) or a callable taking that line.
      loss: ``"outputs"``, ``"outputs_in_scan"`` or ``"final"`` (see the module docstring).
      repeats: timed runs per process.
      command: what made this result, for the record (default: this Python call).
      kernels: ``"native"`` (the cell as built) or ``"scan"`` (the step scan; see the module
        docstring).

    Returns:
      ``{"suite": "memory", "schema", "command", "config", "machine", "methodology",
      "results"}``.
    """
    if cell not in CELLS:
        raise ValueError(f"memory expects cell to be one of {', '.join(CELLS)}; got {cell!r}")
    if loss not in LOSSES:
        raise ValueError(f"memory expects loss to be one of {', '.join(LOSSES)}; got {loss!r}")
    if kernels not in KERNELS:
        raise ValueError(
            f"memory expects kernels to be one of {', '.join(KERNELS)}; got {kernels!r}"
        )
    lengths = [_positive_int("each length", t) for t in lengths]
    if not lengths:
        raise ValueError("memory expects at least one sequence length")
    modes = [m if isinstance(m, str) else str(_positive_int("an int mode", m)) for m in modes]
    remats = [remat_of(m) for m in modes]
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
        raise ValueError(f"memory expects timeout to be positive seconds, got {timeout!r}")
    config = {
        "cell": cell, "lengths": lengths, "hidden": _positive_int("hidden", hidden),
        "batch": _positive_int("batch", batch),
        "input_size": _positive_int("input_size", input_size), "modes": modes,
        "timeout": float(timeout), "loss": loss, "repeats": _positive_int("repeats", repeats),
        "dtype": "float32", "kernels": kernels,
    }  # fmt: skip
    keys = ("cell", "hidden", "batch", "input_size", "loss", "repeats", "kernels")
    common = {k: config[k] for k in keys}
    results = []
    for steps in lengths:
        for mode, remat in zip(modes, remats, strict=True):
            spec = {**common, "T": steps, "mode": mode}
            row = {"T": steps, "mode": mode, "remat": remat, **_run_one(spec, timeout)}
            results.append(row)
            _say(progress, describe(row))
    return {
        "suite": SUITE,
        "schema": SCHEMA,
        "command": command or python_call("memory", config),
        "config": config,
        "machine": machine_info(),
        "methodology": METHODOLOGY,
        "results": results,
    }


def describe(row: dict[str, Any]) -> str:
    """One line for a result row.

    >>> describe({"T": 64, "mode": "sqrt", "status": "timed out", "wall_s": 3.0})
    'T=64 sqrt: timed out after 3 s'
    """
    head = f"T={row['T']} {row['mode']}:"
    if row["status"] != "ok":
        last = (row.get("error") or "").strip().splitlines()[-1:]
        return f"{head} {row['status']} after {row['wall_s']:.0f} s" + "".join(
            f": {e}" for e in last
        )
    gib = 2.0**30
    temp = (row.get("memory") or {}).get("temp_bytes")
    xla = "" if temp is None else f", XLA temp {temp / gib:.3f} GiB"
    return (
        f"{head} peak RSS {row['peak_rss_bytes'] / gib:.3f} GiB "
        f"(baseline {row['baseline_rss_bytes'] / gib:.3f}){xla}, fwd+bwd {row['time_s']:.3g} s, "
        f"compile {row['compile_s']:.2f} s, finite {row['finite']}"
    )


def plot_memory(result: dict[str, Any], path: str | os.PathLike) -> None:
    """Peak RSS and fwd+bwd time against T, one line per mode (log-log axes), as a PNG."""
    # Figure, not pyplot: no global backend switch (inline plots in notebooks keep working)
    from matplotlib import ticker
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2))
    ax_mem, ax_time = fig.subplots(1, 2)
    rows = [r for r in result["results"] if r["status"] == "ok"]
    for mode in result["config"]["modes"]:
        mine = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["T"])
        if mine:
            ts = [r["T"] for r in mine]
            ax_mem.plot(ts, [r["peak_rss_bytes"] / 2**30 for r in mine], "o-", label=mode)
            ax_time.plot(ts, [r["time_s"] for r in mine], "o-", label=mode)
    if rows:
        baseline = statistics.median(r["baseline_rss_bytes"] for r in rows) / 2**30
        ax_mem.axhline(baseline, color="gray", ls="--", lw=1, label="process baseline")
    for ax, label in [(ax_mem, "peak process RSS (GiB)"), (ax_time, "fwd+bwd time (s)")]:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xlabel("sequence length T")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(title="remat")
    c = result["config"]
    fig.suptitle(
        f"BPTT memory: {c['cell']} H={c['hidden']} batch={c['batch']} I={c['input_size']}, "
        f"loss={c['loss']}, kernels={c.get('kernels', 'scan')}"
    )
    fig.tight_layout()
    fig.savefig(Path(path), dpi=120)


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    print(json.dumps(_worker(json.loads(sys.argv[2]))), flush=True)
