"""How every benchmark is measured: worker processes, compile limits, interleaved timing.

A suite is a list of *groups* (e.g. one cell at one sequence length); a group is a list of
*programs*, one per ``(candidate, mode)`` with mode ``"fwd"`` or ``"fwd+bwd"``. Each group runs in
a fresh worker process (``python -m rnnjax.bench._worker``) that

1. builds and compiles its programs one at a time: for JAX, ``jax.jit(f).lower(*args)`` is timed
   as ``trace_s`` (Python tracing and lowering to StableHLO) and ``.compile()`` as ``compile_s``,
   with JAX's persistent compilation cache turned off so that every compile is a real one; the
   memory figure is XLA's buffer-assignment estimate from ``compiled.memory_analysis()``
   (``peak_bytes = temp + argument + output`` bytes, an upper bound on what the program holds at
   once; not process RSS);
2. runs every compiled program once as a warm-up (excluded), calibrates how many back-to-back
   calls make a sample of at least ``min_sample_s``, and then times ``repeats`` rounds, each
   round timing every program once in the same order (A, B, C, A, B, C, ...), so that ratios are
   measured under the same load. Every call ends in ``jax.block_until_ready`` (PyTorch: results
   are synchronous on CPU; ``torch.cuda.synchronize()`` on CUDA). The statistic is the median per
   call over the rounds, with the min and the interquartile range.
3. settles before each timed sample (and before each calibration call): the program about to be
   timed runs untimed, at least once and until ``SETTLE_S`` seconds have passed. Thread pools
   wait for work by spinning before they sleep: OpenBLAS's (the matmuls of rnnjax's native
   kernels, and NumPy's) for 2**28 TSC cycles, 0.1 s at 2.6 GHz; PyTorch's OpenMP (libgomp)
   threads for less. Timed right after another library's program, a program shared the cores
   with that program's spinning threads: on 2 cores, PyTorch's 2 OpenMP threads, which meet at
   a barrier every time step, ran up to 10x slower (``nn.LSTM`` forward at 32x128x64x256: 12 ms
   alone in the worker, 107-115 ms right after an rnnjax call, 12 ms after the settle), and
   rnnjax 10-50% slower right after PyTorch. One settle call is not enough for a program shorter
   than the spin (the same forward at 16x256x32x64: 2.3 ms alone, 5-7 ms after one call, 2.3 ms
   after 0.1 s), hence the time. The sample then sees what a loop calling only that program
   sees, as the 2nd to ``calls_per_sample``-th calls of a sample always did: what is left out is
   the cost of switching from another library, which a program running on its own does not
   pay; every cost of the program's own calls stays in the sample. Changing the libraries'
   threads instead would change the candidates (``OPENBLAS_THREAD_TIMEOUT=4`` or one OpenBLAS
   thread: rnnjax 1.3-1.6x slower; ``OMP_WAIT_POLICY=passive`` or ``GOMP_SPINCOUNT=0``: PyTorch
   2.8x slower).

An XLA compile cannot be interrupted inside a process, so the parent reads the worker's JSON
lines with deadlines: when a program's trace + compile runs past its limit, the parent kills the
worker, reports that program as ``"timed out"`` and starts a new worker for the rest of the group
(which compiles them again, so every timing still comes from one process). A program that timed
out is not tried at the group's later, larger sizes (the same ``series``), and a candidate whose
forward compile timed out is not compiled for ``fwd+bwd``.
"""

from __future__ import annotations

import gc
import json
import math
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

MODES = ("fwd", "fwd+bwd")
SCHEMA = 1
# Seconds the parent waits for a worker to import its libraries, and for each line while timing
# (a warm-up or a round); a compile's limit is the suite's compile_timeout.
STARTUP_TIMEOUT = 300.0
RUN_TIMEOUT = 600.0
MIN_SAMPLE_S = 0.02
MAX_CALLS_PER_SAMPLE = 10_000
# Seconds of untimed calls of the same program before each timed sample (at least one call):
# longer than OpenBLAS's idle threads spin (2**28 TSC cycles: 0.1 s at 2.6 GHz, 0.13 s at 2 GHz).
SETTLE_S = 0.15


class Unavailable(Exception):
    """Raised by a program's build when it cannot run here (e.g. a GPU-only peer on a CPU)."""


@dataclass(frozen=True)
class Program:
    """One thing to time: ``build()`` (run under the compile limit, in the worker) returns
    ``(run, info)``: ``run()`` makes one call and waits for its result; ``info`` holds
    ``trace_s``, ``compile_s``, ``memory`` (None where they do not apply) and optional notes."""

    candidate: str
    mode: str
    build: Callable[[], tuple[Callable[[], None], dict[str, Any]]]


@dataclass
class Group:
    """One worker's worth of programs: ``fields`` go into every row, ``kwargs`` to the builder,
    ``keys`` are the ``(candidate, mode)`` pairs to measure, in compile order. Groups sharing a
    ``series`` come in increasing size: a program that timed out is not tried again later in
    its series."""

    label: str
    fields: dict[str, Any]
    kwargs: dict[str, Any]
    keys: list[tuple[str, str]]
    series: str | None = None
    extra_rows: list[dict[str, Any]] = field(default_factory=list)  # decided in the parent


# ------------------------------------------------------------------------- inside the worker


def memory_stats(compiled: Any) -> dict[str, int] | None:
    """XLA's buffer-assignment sizes for a compiled program, with ``peak_bytes`` = temp +
    argument + output bytes (None where the backend does not report them)."""
    try:
        stats = compiled.memory_analysis()
    except Exception:  # some backends do not implement it
        return None
    if stats is None:
        return None
    names = ("temp", "argument", "output", "alias", "generated_code")
    out = {f"{n}_bytes": int(getattr(stats, f"{n}_size_in_bytes", 0)) for n in names}
    out["peak_bytes"] = out["temp_bytes"] + out["argument_bytes"] + out["output_bytes"]
    if getattr(stats, "peak_memory_in_bytes", None) is not None:
        out["xla_peak_memory_bytes"] = int(stats.peak_memory_in_bytes)
    return out


def jax_program(candidate: str, mode: str, make: Callable[[], tuple[Callable, tuple]]) -> Program:
    """A :class:`Program` for a JAX function: ``make()`` returns ``(f, args)``; the build
    times ``jax.jit(f).lower(*args)`` and ``.compile()`` and the run is
    ``jax.block_until_ready(compiled(*args))``."""

    def build():
        import jax

        f, args = make()
        start = time.perf_counter()
        lowered = jax.jit(f).lower(*args)
        traced = time.perf_counter()
        compiled = lowered.compile()
        done = time.perf_counter()

        def run():
            jax.block_until_ready(compiled(*args))

        info = {"trace_s": traced - start, "compile_s": done - traced}
        return run, {**info, "memory": memory_stats(compiled)}

    return Program(candidate, mode, build)


def summarize(samples: Sequence[float]) -> dict[str, float]:
    """Median, min and quartiles of per-call times (seconds).

    >>> s = summarize([3.0, 1.0, 2.0, 4.0])
    >>> s["time_s"], s["min_s"], s["iqr_s"]
    (2.5, 1.0, 1.5)
    """
    a = np.asarray(samples, dtype=float)
    q1, median, q3 = np.percentile(a, [25, 50, 75])
    return {
        "time_s": float(median),
        "min_s": float(a.min()),
        "q1_s": float(q1),
        "q3_s": float(q3),
        "iqr_s": float(q3 - q1),
    }


def _sample(run: Callable[[], None], calls: int) -> float:
    gc_was_on = gc.isenabled()
    gc.disable()  # as timeit does: a collection in the middle is noise, not the program's cost
    try:
        start = time.perf_counter()
        for _ in range(calls):
            run()
        return (time.perf_counter() - start) / calls
    finally:
        if gc_was_on:
            gc.enable()


def settle(run: Callable[[], None], seconds: float) -> int:
    """Call ``run`` untimed, at least once and until ``seconds`` have passed; returns the
    number of calls. Before a timed sample, this lets the threads of the program timed before
    (another library's, spinning while they wait for work) go to sleep and wakes this
    program's own, as in a loop that calls only this program.

    >>> settle(lambda: None, 0.0), settle(lambda: time.sleep(0.01), 0.025) >= 2
    (1, True)
    """
    end = time.perf_counter() + seconds
    calls = 0
    while calls == 0 or time.perf_counter() < end:
        run()
        calls += 1
    return calls


def measure(
    runs: Mapping[Any, Callable[[], None]],
    *,
    repeats: int,
    min_sample_s: float = MIN_SAMPLE_S,
    settle_s: float = SETTLE_S,
    warmup: bool = True,
    on_round: Callable[[int], None] | None = None,
) -> dict[Any, dict[str, Any]]:
    """Time every run interleaved: one warm-up call each (excluded; ``warmup=False`` when the
    caller has made it), a calibration call that sets how many calls make a sample of at least
    ``min_sample_s``, then ``repeats`` rounds that each take one sample of every run in turn.
    Each calibration call and each sample comes right after :func:`settle` of the same run for
    ``settle_s`` (untimed; see the module's docstring for why).
    Returns per run :func:`summarize` of the per-call times plus ``samples_s`` and
    ``calls_per_sample``.

    >>> stats = measure(
    ...     {"a": lambda: None, "b": lambda: None}, repeats=3, min_sample_s=1e-4, settle_s=1e-3
    ... )
    >>> sorted(stats), len(stats["a"]["samples_s"]), stats["a"]["time_s"] > 0
    (['a', 'b'], 3, True)
    """
    for run in runs.values() if warmup else ():
        run()  # first-call allocations and caches
    calls = {}
    for key, run in runs.items():
        settle(run, settle_s)
        once = _sample(run, 1)
        calls[key] = max(1, min(MAX_CALLS_PER_SAMPLE, math.ceil(min_sample_s / max(once, 1e-9))))
    samples: dict[Any, list[float]] = {key: [] for key in runs}
    for index in range(repeats):
        for key, run in runs.items():
            settle(run, settle_s)
            samples[key].append(_sample(run, calls[key]))
        if on_round is not None:
            on_round(index)
    return {
        key: {**summarize(s), "samples_s": s, "calls_per_sample": calls[key]}
        for key, s in samples.items()
    }


# ------------------------------------------------------------------------- in the parent


class _Worker:
    """A worker process and a thread that queues its protocol lines (None at end of file)."""

    def __init__(self, spec: dict[str, Any], env: Mapping[str, str]):
        self.stderr = tempfile.TemporaryFile(mode="w+b")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "rnnjax.bench._worker"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
            env={**env, **os.environ},
        )  # fmt: skip
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        try:
            self.process.stdin.write(json.dumps(spec).encode())
            self.process.stdin.close()
        except BrokenPipeError:  # it died at once; the reader reports the end of its output
            pass

    def _read(self):
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def next(self, deadline: float) -> dict[str, Any] | None:
        """The next event; None if the worker ended; raises TimeoutError past ``deadline``
        (checked first, so a limit of 0 always expires)."""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                raise TimeoutError from None
            if line is None:
                return None
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue  # not a protocol line

    def error_tail(self) -> str:
        self.stderr.seek(0)
        text = self.stderr.read().decode(errors="replace").strip().splitlines()
        return " | ".join(text[-3:]) if text else "no output"

    def close(self):
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.process.stdout.close()
        self.stderr.close()


def _timed_out(limit: float, reason: str) -> dict[str, Any]:
    return {"status": "timed out", "compile_timeout_s": limit, "reason": reason}


def _run_group(
    builder: str,
    group: Group,
    keys: list[tuple[str, str]],
    *,
    limit: Callable[[str], float],
    repeats: int,
    min_sample_s: float,
    settle_s: float,
    want_machine: bool,
    env: Mapping[str, str],
    say: Callable[[str], None],
) -> tuple[dict[tuple[str, str], dict[str, Any]], dict[str, Any] | None]:
    """Measure ``keys`` of one group; restart the worker without any program that timed out."""
    outcome: dict[tuple[str, str], dict[str, Any]] = {}
    machine = None
    pending = list(keys)
    while pending:
        spec = {
            "builder": builder, "group": group.kwargs, "keys": pending, "repeats": repeats,
            "min_sample_s": min_sample_s, "settle_s": settle_s,
            "machine": want_machine and machine is None,
        }  # fmt: skip
        worker = _Worker(spec, env)
        try:
            machine, pending = _drive(worker, group, pending, outcome, machine, limit, say)
        finally:
            worker.close()
    return outcome, machine


def _drive(worker, group, pending, outcome, machine, limit, say):
    """Follow one worker to its end. Returns ``(machine, still pending)``: empty when the
    group is finished, else the programs to give a fresh worker."""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    current = None  # the (candidate, mode) being compiled
    info: dict[tuple[str, str], dict[str, Any]] = {}
    while True:
        try:
            event = worker.next(deadline)
        except TimeoutError:
            if current is None:  # starting up, or timing: nothing to restart without
                stalled = "no word from the worker before its deadline (starting up or timing)"
                for key in pending:
                    outcome.setdefault(key, {"status": "error", "error": stalled})
                return machine, []
            candidate, mode = current
            seconds = limit(candidate)
            outcome[current] = _timed_out(seconds, f"trace + compile ran past {seconds:g} s")
            say(f"{group.label}: {candidate} {mode} timed out after {seconds:g} s")
            dropped = {current}
            if mode == MODES[0]:  # the forward pass alone did not compile: fwd+bwd won't either
                for other in pending:
                    if other[0] == candidate and other != current:
                        dropped.add(other)
                        outcome[other] = _timed_out(seconds, f"not tried: {mode} timed out")
            return machine, [k for k in pending if k not in dropped]
        if event is None:
            error = f"the worker died ({worker.error_tail()})"
            if current is not None:  # a crash while compiling: drop that program, go on
                outcome[current] = {"status": "error", "error": error}
                return machine, [k for k in pending if k != current]
            for key in pending:
                outcome.setdefault(key, {"status": "error", "error": error})
            return machine, []
        kind = event["event"]
        key = (event.get("candidate"), event.get("mode"))
        if kind == "ready":
            machine = event.get("machine") or machine
            deadline = time.monotonic() + RUN_TIMEOUT
        elif kind == "start":
            current = key
            deadline = time.monotonic() + limit(key[0])
        elif kind == "prepared":
            seconds = (event.get("trace_s") or 0) + (event.get("compile_s") or 0)
            if seconds > 5:
                say(f"{group.label}: {key[0]} {key[1]} compiled in {seconds:.1f} s")
            info[key] = {k: event.get(k) for k in ("trace_s", "compile_s", "memory")}
            if event.get("notes"):
                info[key]["notes"] = event["notes"]
            current, deadline = None, time.monotonic() + RUN_TIMEOUT
        elif kind == "failed":
            outcome[key] = {"status": event["status"], "error": event["error"]}
            current, deadline = None, time.monotonic() + RUN_TIMEOUT
        elif kind == "timing":
            say(f"{group.label}: timing {event['programs']} programs, {event['repeats']} rounds")
            deadline = time.monotonic() + RUN_TIMEOUT
        elif kind == "round":
            deadline = time.monotonic() + RUN_TIMEOUT
        elif kind == "timings":
            for row in event["results"]:
                k = (row.pop("candidate"), row.pop("mode"))
                outcome[k] = {"status": "ok", **info[k], **row}
            return machine, []


def run_groups(
    builder: str,
    groups: Iterable[Group],
    *,
    reference: str,
    repeats: int,
    compile_timeout: float,
    compile_timeouts: Mapping[str, float] | None = None,
    min_sample_s: float = MIN_SAMPLE_S,
    settle_s: float = SETTLE_S,
    env: Mapping[str, str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Measure every group, each in its own worker; returns ``(rows, machine)``.

    ``builder`` is ``"module:function"``, called in the worker with a group's ``kwargs`` and
    returning its :class:`Program` list. Each row is the group's ``fields`` plus ``candidate``,
    ``mode``, ``status`` (``"ok"``, ``"timed out"``, ``"error"``, ``"unavailable"``, or a status
    the suite set, like ``"not installed"``) and, when ok, ``trace_s``, ``compile_s``,
    ``memory``, the timing statistics and ``vs_reference``: this row's ``time_s`` over the
    ``reference`` candidate's in the same group and mode (None when that one has no time).
    ``compile_timeouts`` maps a candidate to its own limit in place of ``compile_timeout``;
    ``env`` holds defaults for the workers' environment variables (the caller's win);
    ``settle_s`` is :func:`measure`'s, in every worker.
    """
    say = progress or (lambda message: None)
    overrides = dict(compile_timeouts or {})

    def limit(candidate: str) -> float:
        return float(overrides.get(candidate, compile_timeout))

    rows: list[dict[str, Any]] = []
    machine = None
    timed_out_at: dict[tuple[Any, str, str], str] = {}
    for group in groups:
        say(f"{group.label}: {len(group.keys)} programs")
        keys, outcome = [], {}
        for candidate, mode in group.keys:
            where = timed_out_at.get((group.series, candidate, mode))
            if group.series is not None and where is not None:
                reason = f"not tried: timed out at a smaller size ({where})"
                outcome[(candidate, mode)] = _timed_out(limit(candidate), reason)
            else:
                keys.append((candidate, mode))
        if keys:
            measured, seen = _run_group(
                builder, group, keys, limit=limit, repeats=repeats, min_sample_s=min_sample_s,
                settle_s=settle_s, want_machine=machine is None, env=env or {}, say=say,
            )  # fmt: skip
            outcome.update(measured)
            machine = machine or seen
        group_rows = []
        for candidate, mode in group.keys:
            result = outcome.get((candidate, mode), {"status": "error", "error": "no result"})
            if result["status"] == "timed out":
                timed_out_at.setdefault((group.series, candidate, mode), group.label)
            group_rows.append({**group.fields, "candidate": candidate, "mode": mode, **result})
        _add_ratios(group_rows, reference)
        rows.extend(group_rows + group.extra_rows)
    if machine is None:  # no worker started: describe the machine from here
        from rnnjax.bench._machine import machine_info

        machine = machine_info()
    return rows, machine


def _add_ratios(rows: list[dict[str, Any]], reference: str) -> None:
    ref = {r["mode"]: r.get("time_s") for r in rows if r["candidate"] == reference}
    for row in rows:
        if row["status"] == "ok":
            base = ref.get(row["mode"])
            row["vs_reference"] = row["time_s"] / base if base else None


# ------------------------------------------------------------------------- results


def methodology(
    *,
    reference: str,
    repeats: int,
    min_sample_s: float,
    compile_timeout: float,
    settle_s: float = SETTLE_S,
):
    """The description of how the numbers were made, stored in every result."""
    return {
        "timer": "time.perf_counter around calls_per_sample back-to-back calls; each call ends "
        "in jax.block_until_ready (torch: synchronous on CPU, torch.cuda.synchronize on CUDA)",
        "warmup": "one call per program before calibration and timing, excluded",
        "order": "interleaved in one worker process: each round times every program once, in "
        "the listed order",
        "settle": "before each timed sample (and each calibration call) the same program runs "
        "untimed, at least once and for settle_s: the previous program's thread pools stop "
        "spinning (OpenBLAS's idle threads spin about 2**28 TSC cycles, ~0.1 s; on 2 cores "
        "they slowed the next program's OpenMP threads up to 10x) and this program's own are "
        "awake, as in a loop of this program alone; the cost of switching libraries is "
        "excluded, every per-call cost of the program is in its sample",
        "settle_s": settle_s,
        "repeats": repeats,
        "min_sample_s": min_sample_s,
        "statistic": "time_s is the median per-call time over the rounds; min_s, q1_s, q3_s, "
        "iqr_s describe the spread",
        "compile": "trace_s: jax.jit(f).lower(*args) (tracing and lowering to StableHLO); "
        "compile_s: lowered.compile(); persistent compilation cache off",
        "compile_timeout_s": compile_timeout,
        "memory": "XLA buffer-assignment estimate from compiled.memory_analysis(): peak_bytes = "
        "temp_bytes + argument_bytes + output_bytes (an upper bound on buffers live at once; "
        "xla_peak_memory_bytes is XLA's own peak figure); not process RSS",
        "reference": reference,
        "vs_reference": "time_s / the reference candidate's time_s, same group and mode",
    }


def document(suite: str, *, command: str, config: dict, machine: dict, method: dict, rows: list):
    """The JSON object every suite returns and writes."""
    return {
        "suite": suite,
        "schema": SCHEMA,
        "command": command,
        "config": config,
        "machine": machine,
        "methodology": method,
        "results": rows,
    }


def python_call(name: str, config: Mapping[str, Any]) -> str:
    """The Python call that reproduces a result, for the ``command`` field.

    >>> python_call("peers", {"repeats": 3, "cells": ["lstm"]})
    "rnnjax.bench.peers(repeats=3, cells=['lstm'])"
    """
    arguments = ", ".join(f"{k}={v!r}" for k, v in config.items())
    return f"rnnjax.bench.{name}({arguments})"


def output_paths(out: str | os.PathLike, suite: str) -> tuple[Path, Path]:
    """``(out/SUITE.json, out/SUITE.png)``; raises FileExistsError unless each is absent or a
    previous result of the same suite (which is replaced)."""
    out = Path(out)
    paths = out / f"{suite}.json", out / f"{suite}.png"
    previous = False
    if paths[0].exists():
        try:
            previous = json.loads(paths[0].read_text()).get("suite") == suite
        except (OSError, ValueError, AttributeError):
            previous = False
        if not previous:
            raise FileExistsError(
                f"{paths[0]} exists and is not a previous {suite} result; choose another --out"
            )
    if paths[1].exists() and not previous:
        raise FileExistsError(
            f"{paths[1]} exists without its {suite}.json; choose another --out or remove it"
        )
    return paths


def write(result: dict, out: str | os.PathLike, plot: Callable[[dict, Path], None]):
    """Write ``out/SUITE.json`` and ``out/SUITE.png`` (see :func:`output_paths`)."""
    json_path, png_path = output_paths(out, result["suite"])
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, png_path)
    return json_path, png_path


def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Columns padded to their widest cell; the first column left-aligned, the rest right.

    >>> print(table(["name", "ms"], [["a", "1.5"], ["bbb", "10.0"]]))
    name    ms
    a      1.5
    bbb   10.0
    """
    cells = [list(map(str, header)), *([str(c) for c in row] for row in rows)]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for r in cells:
        parts = [r[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)
        ]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def size(n: float) -> str:
    """Bytes in binary units.

    >>> size(512), size(2788), size(3 * 2**20)
    ('512 B', '2.72 KiB', '3 MiB')
    """
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.3g} {unit}"
        n /= 1024
    raise AssertionError
