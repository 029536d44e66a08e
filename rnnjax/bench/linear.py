"""The ``linear`` suite: every backend of :func:`rnnjax.linear_scan` against T, beside the
memory-bandwidth bound of its pass.

For each sequence length T, one worker process (:mod:`rnnjax.bench._harness`) compiles and
times, interleaved, ``linear_scan(a, b, mode=m)`` over ``(T, width)`` float32 arrays for every
mode ``m`` (``"fwd"``), and ``jax.grad`` of ``sum(h * w)`` w.r.t. ``a`` and ``b``
(``"fwd+bwd"``; ``w`` is an input, so the loss adds no pass of its own), plus a ``"stream"``
candidate: numpy's ``np.add(x, y, out=z)`` over three arrays of ``STREAM_FLOATS`` floats
(64 MiB each, beyond the last-level cache), the same pattern as the forward pass (two arrays
read, one written), timed in the same process and rounds; and ``"stream-fresh"``, the same add
into a new array each call (``np.add(x, y)``), which pays what every XLA output pays here: a
fresh mapping faulted in and zeroed by the kernel (arrays of 32 MiB or more come from ``mmap``
on every call).

The bound: the forward pass must read ``a`` and ``b`` and write ``h``, 12 bytes per element; the
backward pass reads ``a``, ``h`` and ``g`` and writes ``da`` and ``db``, 20 more. With the
bandwidth ``12 * STREAM_FLOATS / stream time`` (bytes per second), each row gets
``bytes`` (12 or 32 times T x width), ``bound_s = bytes / bandwidth`` and ``vs_bound =
time_s / bound_s``; the ratios to the reference (``vs_reference``) are to ``"sequential"``
(``lax.scan``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rnnjax.bench import _harness
from rnnjax.bench._harness import MODES, Group

SUITE = "linear"
BACKENDS = ("sequential", "associative", "chunked", "native")
LENGTHS = (256, 1024, 4096, 16384, 65536)
STREAM = "stream"
FRESH = "stream-fresh"
STREAM_FLOATS = 1 << 24
BYTES_PER_ELEMENT = {"fwd": 12, "fwd+bwd": 32}
REFERENCE = "sequential"


def programs(*, T: int, width: int, backends: list[str], stream_floats: int):
    """The worker's side: one :class:`Program` per ``(candidate, mode)`` at one T."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import rnnjax as rj
    from rnnjax._native import linear as native_linear

    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.uniform(0.5, 1.0, (T, width)).astype(np.float32))
    b = jnp.asarray(rng.standard_normal((T, width), np.float32))
    w = jnp.asarray(rng.standard_normal((T, width), np.float32))

    def functions(mode):
        def forward(a, b):
            return rj.linear_scan(a, b, mode=mode)

        def forward_backward(a, b, w):
            loss = lambda a, b: jnp.sum(rj.linear_scan(a, b, mode=mode) * w)  # noqa: E731
            return jax.grad(loss, (0, 1))(a, b)

        return {"fwd": (forward, (a, b)), "fwd+bwd": (forward_backward, (a, b, w))}

    out = []
    for backend in backends:
        for mode, (f, args) in functions(backend).items():
            if backend == "native" and not native_linear.available():
                why = native_linear.unavailable_reason()

                def unavailable(why=why):
                    raise _harness.Unavailable(f"the native kernel is unavailable: {why}")

                out.append(_harness.Program(backend, mode, unavailable))
            else:
                out.append(_harness.jax_program(backend, mode, lambda f=f, args=args: (f, args)))

    def stream(fresh):
        x, y = np.ones(stream_floats, np.float32), np.ones(stream_floats, np.float32)
        z = np.empty_like(x)
        run = (lambda: np.add(x, y)) if fresh else (lambda: np.add(x, y, out=z))
        return run, {"trace_s": None, "compile_s": None, "memory": None}

    out.append(_harness.Program(STREAM, "fwd", lambda: stream(False)))
    out.append(_harness.Program(FRESH, "fwd", lambda: stream(True)))
    return out


def linear(
    *,
    lengths: Sequence[int] = LENGTHS,
    width: int = 1024,
    backends: Sequence[str] = BACKENDS,
    repeats: int = 5,
    compile_timeout: float = 120.0,
    min_sample_s: float = _harness.MIN_SAMPLE_S,
    stream_floats: int = STREAM_FLOATS,
    progress: Callable[[str], None] | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Time each linear-scan backend forward and fwd+bwd per T, beside the bandwidth bound.

    Args:
      lengths: sequence lengths T (run in increasing order; a backend that times out at one T
        is not tried at larger T).
      width: N, the features per step (a (T, N) recurrence: one example of D = (N,), or a batch
        folded into N).
      backends: among ``"sequential"``, ``"associative"``, ``"chunked"``, ``"native"``;
        ``"sequential"``, the reference for ratios, is always measured.
      repeats, compile_timeout, min_sample_s: as for the other suites.
      stream_floats: floats per array of the ``"stream"`` bandwidth measurement.

    Returns:
      ``{"suite": "linear", "schema", "command", "config", "machine", "methodology",
      "results"}``; a row has ``T``, ``width``, ``candidate``, ``mode``, ``status`` and, when
      ok, the harness's timing fields; backend rows add ``bytes``, ``bandwidth_bytes_per_s``
      (from the same group's stream row), ``bound_s`` and ``vs_bound``.
    """
    lengths = sorted({_positive("lengths", t) for t in lengths})
    backends = _check_backends(backends)
    config = {
        "lengths": lengths, "width": _positive("width", width), "backends": backends,
        "repeats": _positive("repeats", repeats), "compile_timeout": float(compile_timeout),
        "min_sample_s": min_sample_s, "stream_floats": _positive("stream_floats", stream_floats),
        "dtype": "float32",
    }  # fmt: skip
    keys = [(b, m) for b in backends for m in MODES] + [(STREAM, "fwd"), (FRESH, "fwd")]
    kwargs = {"width": width, "backends": backends, "stream_floats": stream_floats}
    groups = [
        Group(f"T={T}", {"T": T, "width": width}, {"T": T, **kwargs}, keys, series="linear")
        for T in lengths
    ]
    rows, machine = _harness.run_groups(
        f"{__name__}:programs", groups, reference=REFERENCE, repeats=repeats,
        compile_timeout=compile_timeout, min_sample_s=min_sample_s, progress=progress,
    )  # fmt: skip
    _add_bounds(rows, stream_floats)
    method = _harness.methodology(
        reference=REFERENCE, repeats=repeats, min_sample_s=min_sample_s,
        compile_timeout=compile_timeout,
    )  # fmt: skip
    method["bound"] = (
        "bytes / bandwidth: fwd reads a, b and writes h (12 bytes per float32 element), fwd+bwd "
        "adds the backward pass's reads of a, h, g and writes of da, db (32 in all); bandwidth "
        "= 12 * stream_floats / the stream row's time_s (np.add(x, y, out=z), two arrays read "
        "and one written, beyond the last-level cache, timed in the same worker and rounds)"
    )
    method["stream-fresh"] = (
        "np.add(x, y) into a new array per call: the bandwidth bound plus the cost of a fresh "
        "output mapping (page faults, zeroing), which XLA's outputs of 32 MiB or more pay too"
    )
    method["loss"] = "fwd+bwd: jax.grad of sum(linear_scan(a, b) * w) w.r.t. (a, b)"
    return _harness.document(
        SUITE, command=command or _harness.python_call("linear", config), config=config,
        machine=machine, method=method, rows=rows,
    )  # fmt: skip


def _add_bounds(rows: list[dict[str, Any]], stream_floats: int) -> None:
    streams = {r["T"]: r for r in rows if r["candidate"] == STREAM and r["status"] == "ok"}
    for row in rows:
        if row["candidate"] in (STREAM, FRESH):
            row["bytes"] = 12 * stream_floats
            if row["status"] == "ok":
                row["bandwidth_bytes_per_s"] = row["bytes"] / row["time_s"]
            continue
        row["bytes"] = BYTES_PER_ELEMENT[row["mode"]] * row["T"] * row["width"]
        stream = streams.get(row["T"])
        if stream is None:
            continue
        bandwidth = 12 * stream_floats / stream["time_s"]
        row["bandwidth_bytes_per_s"] = bandwidth
        row["bound_s"] = row["bytes"] / bandwidth
        if row["status"] == "ok":
            row["vs_bound"] = row["time_s"] / row["bound_s"]


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"linear expects {name} to be a positive int, got {value!r}")
    return value


def _check_backends(backends: Sequence[str]) -> list[str]:
    bad = [b for b in backends if b not in BACKENDS]
    if bad:
        raise ValueError(f"linear expects backends among {', '.join(BACKENDS)}; got {bad[0]!r}")
    return [REFERENCE, *(b for b in dict.fromkeys(backends) if b != REFERENCE)]


def format_table(result: dict[str, Any]) -> str:
    """One line per T and backend: forward and fwd+bwd ms, each with its bound and ratio."""
    rows = result["results"]
    by = {(r["T"], r["candidate"], r["mode"]): r for r in rows}
    lines = []
    for T in result["config"]["lengths"]:
        for backend in result["config"]["backends"]:
            f, fb = by.get((T, backend, "fwd")), by.get((T, backend, "fwd+bwd"))
            lines.append([f"T={T} {backend}", _time(f), _time(fb)])

    def gbs(name):
        ok = [
            r["bandwidth_bytes_per_s"] / 1e9
            for r in rows
            if (r["candidate"], r["status"]) == (name, "ok")
        ]
        return f"{min(ok):.1f}-{max(ok):.1f} GB/s" if ok else "not measured"

    c = result["config"]
    head = (
        f"linear_scan, (T, {c['width']}) float32, median of {c['repeats']} interleaved rounds; "
        "ms (x the bound); bound = bytes / bandwidth, 12 B/element fwd, 32 fwd+bwd; bandwidth "
        f"from np.add over {c['stream_floats']} floats: {gbs(STREAM)} ({gbs(FRESH)} into a "
        "fresh array)"
    )
    header = ["T backend", "fwd ms (x bound)", "fwd+bwd ms (x bound)"]
    return head + "\n" + _harness.table(header, lines)


def _time(row):
    if row is None:
        return "-"
    if row["status"] != "ok":
        return row["status"]
    ratio = row.get("vs_bound")
    return f"{row['time_s'] * 1e3:.3g}" + (f" ({ratio:.2f}x)" if ratio else "")


def plot_linear(result: dict[str, Any], path: str | Path) -> None:
    """Forward and fwd+bwd time against T per backend (log-log), with the bound dashed."""
    # Figure, not pyplot: no global backend switch (inline plots in notebooks keep working)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    rows = sorted(result["results"], key=lambda r: r["T"])
    for ax, mode in zip(fig.subplots(1, 2), MODES, strict=True):
        for k, backend in enumerate(result["config"]["backends"]):
            mine = [
                r for r in rows if (r["candidate"], r["mode"], r["status"]) == (backend, mode, "ok")
            ]
            if mine:
                ax.plot([r["T"] for r in mine], [r["time_s"] * 1e3 for r in mine], "o-",
                        color=f"C{k}", label=backend)  # fmt: skip
        bound = [
            r for r in rows if (r["candidate"], r["mode"]) == (REFERENCE, mode) and "bound_s" in r
        ]
        if bound:
            ax.plot([r["T"] for r in bound], [r["bound_s"] * 1e3 for r in bound], "k--",
                    label="bandwidth bound")  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("T")
        ax.set_ylabel(f"{mode} (ms)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"linear_scan backends, (T, {result['config']['width']}) float32")
    fig.tight_layout()
    fig.savefig(Path(path), dpi=110)
