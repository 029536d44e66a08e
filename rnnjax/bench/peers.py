"""rnnjax against the other recurrent implementations, on the same machine and the same inputs.

For each shape ``(B, T, I, H)`` and cell (LSTM, GRU), every candidate runs one layer over the
same ``(B, T, I)`` float32 standard-normal inputs, forward (all outputs ``(B, T, H)``) and
forward+backward (``sum(h ** 2)`` over all outputs, gradients with respect to all params):

- ``rnnjax``: ``rj.layers.rnn(cell).apply`` under ``jax.vmap`` (the reference for ratios);
- ``flax-linen``: ``nn.RNN`` with ``LSTMCell``, ``OptimizedLSTMCell``, ``GRUCell``;
- ``flax-nnx``: ``nnx.RNN`` with the same three cells, split into params and the rest with
  ``nnx.split`` and merged inside ``jax.jit`` (the XLA program, not ``nnx.jit``'s Python graph
  traversal), with a zero initial carry passed in;
- ``equinox``: ``eqx.nn.LSTMCell`` / ``GRUCell`` under ``lax.scan`` and ``jax.vmap``;
- ``torch``: ``nn.LSTM`` / ``nn.GRU`` in their native time-major layout ``(T, B, I)`` (the same
  numbers, transposed once before timing), forward under ``torch.no_grad()``, fwd+bwd as
  ``loss.backward()`` into the params' ``.grad``; on CUDA only when JAX is on a GPU too;
- ``jax-cudnn``: ``jax.experimental.rnn.lstm`` (cuDNN; GPU only, "unavailable" elsewhere);
- ``rnnjax-fused``: rnnjax with ``fused=True`` cells (the whole-sequence fast path);
- ``rnnjax-scan``: rnnjax with ``native=False`` cells, the ``lax.scan`` of the step that
  ``rnnjax`` runs where the native CPU kernels are unavailable (off the CPU, without a
  compiler at install time);
- ``rnnjax-bf16``: rnnjax cells with ``compute_dtype=jnp.bfloat16`` (bfloat16 matmuls, float32
  params and state): not the same arithmetic as the float32 candidates, so compare it with
  ``torch-bf16``;
- ``torch-bf16``: PyTorch under ``torch.autocast(dtype=torch.bfloat16)`` (its mixed precision);
- the zoo (any cell of :data:`rnnjax.cells.BY_NAME`, ``--cells mingru,lru,...``): ``memax``'s
  ``LRU`` (its ``semigroup_scan``, an associative scan, under ``jax.vmap``; state size H) for
  ``lru``, ``recurrentgemma``'s ``RGLRU`` (Flax linen, its default scan, positions from 0) for
  ``rglru``; ``rnnjax-step``: the ``lax.scan`` of the cell's ``step`` (``sequence=None``)
  against the cell's parallel form; ``rnnjax-lstm``: rnnjax's LSTM at the same shape, timed in
  the same worker, so that every other cell's ratio to the classic LSTM is taken in one process
  (not for the default cells, LSTM and GRU, which the other peers are about).
  ``rglru`` and ``lru`` read H features: they need a shape with ``I == H`` (other shapes are
  reported "unavailable").

Every candidate initializes its own params with its own defaults; the timed work is the same.
A peer whose package is not installed is reported as ``"not installed"``. All candidates of one
shape and cell but PyTorch's are timed interleaved in one worker process (see
:mod:`rnnjax.bench._harness`); PyTorch's in a worker of its own right after it, its ratios taken
against that rnnjax time (:data:`OWN_PROCESS` says why),
each sample right after an untimed settle of the same candidate: without it, PyTorch's forward
was timed inside the ~0.1 s in which OpenBLAS's threads (rnnjax's kernels' matmuls) still spin
after an rnnjax call, and measured 2.5-9x its own time on 2 cores.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rnnjax.bench import _harness
from rnnjax.bench._harness import MODES, Group, Program, Unavailable
from rnnjax.cells import BY_NAME, SQUARE

SUITE = "peers"
CELLS = ("lstm", "gru")
#: every cell ``cells=`` may name: the built-in cells
ALL_CELLS = tuple(BY_NAME)
SHAPES = ((16, 256, 32, 64), (32, 128, 64, 256), (64, 64, 128, 512))
REFERENCE = "rnnjax"


@dataclass(frozen=True)
class Peer:
    """A peer implementation: the module that must be importable, and its candidates per cell."""

    module: str
    cells: dict[str, tuple[str, ...]]


# Peers whose module is here time in a worker process of their own, right after the worker that
# times rnnjax and the JAX peers for the same shape and cell. PyTorch bundles its own
# libgomp.so.1, and a process loads only one library of that name: in one process PyTorch and
# oneDNN (rnnjax's native kernels) share one OpenMP runtime, whose two thread teams then
# outnumber the cores, and libgomp stops spinning at barriers: both ran 2-2.5x slower (LSTM
# 32x128x64x256: PyTorch forward 28 ms in rnnjax's process, 11-12 ms alone; rnnjax
# forward+backward 120 ms beside PyTorch, 55 ms without it). Apart, each runs as it would for a
# user of one library; the rounds of one worker are still interleaved.
OWN_PROCESS = ("torch",)

PEERS: dict[str, Peer] = {
    "flax-linen": Peer(
        "flax",
        {
            "lstm": ("flax.linen LSTMCell", "flax.linen OptimizedLSTMCell"),
            "gru": ("flax.linen GRUCell",),
        },
    ),  # fmt: skip
    "flax-nnx": Peer(
        "flax",
        {"lstm": ("flax.nnx LSTMCell", "flax.nnx OptimizedLSTMCell"), "gru": ("flax.nnx GRUCell",)},
    ),
    "equinox": Peer("equinox", {"lstm": ("equinox LSTMCell",), "gru": ("equinox GRUCell",)}),
    "torch": Peer("torch", {"lstm": ("torch nn.LSTM",), "gru": ("torch nn.GRU",)}),
    # rnnjax's opt-in whole-sequence fast path (cells made with fused=True), against the default.
    "rnnjax-fused": Peer("rnnjax", {"lstm": ("rnnjax fused",), "gru": ("rnnjax fused",)}),
    # The lax.scan step loop (native=False), against the default native CPU kernels.
    "rnnjax-scan": Peer("rnnjax", {"lstm": ("rnnjax scan",), "gru": ("rnnjax scan",)}),
    "jax-cudnn": Peer("jax", {"lstm": ("jax.experimental.rnn.lstm",)}),
    # Mixed precision: bfloat16 matmuls with float32 params and state, rnnjax's and PyTorch's.
    "rnnjax-bf16": Peer("rnnjax", {"lstm": ("rnnjax bf16",), "gru": ("rnnjax bf16",)}),
    "torch-bf16": Peer("torch", {"lstm": ("torch nn.LSTM bf16",), "gru": ("torch nn.GRU bf16",)}),
    # The zoo's peers: the reference modules of the cells they have.
    "memax": Peer("memax", {"lru": ("memax LRU",)}),
    "recurrentgemma": Peer("recurrentgemma", {"rglru": ("recurrentgemma RGLRU",)}),
    # A zoo cell's step scan against its parallel form, and the classic LSTM at the same shape.
    "rnnjax-step": Peer(
        "rnnjax", {c: ("rnnjax step",) for c in ("mingru", "minlstm", "rglru", "lru", "mlstm")}
    ),
    "rnnjax-lstm": Peer("rnnjax", {c: ("rnnjax lstm",) for c in ALL_CELLS if c not in CELLS}),
}


# ------------------------------------------------------------------------- in the worker


def _square(cell, shape, who):
    if cell in SQUARE and shape[2] != shape[3]:
        raise Unavailable(f"{who} reads H features: the shape needs I == H, got I={shape[2]}, "
                          f"H={shape[3]}")  # fmt: skip


def _rnnjax(cell, shape, xs, step=False, **options):
    """rnnjax's ``cell`` (with ``options``, e.g. ``fused=True``) as one layer; ``step``: the
    ``lax.scan`` of its ``step`` instead of its parallel form."""
    import jax

    import rnnjax as rj

    _square(cell, shape, cell)
    made = BY_NAME[cell](shape[3], **options)
    layer = rj.layers.rnn(made._replace(sequence=None) if step else made)
    params = layer.init(jax.random.key(0), shape[2])
    return lambda p, x: jax.vmap(lambda one: layer.apply(p, one)[1])(x), params


def _memax_lru(cell, shape, xs):
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    from memax.equinox.semigroups.lru import LRU

    _square(cell, shape, "memax's LRU")
    _, steps, _, hidden = shape
    params, static = eqx.partition(LRU(hidden, hidden, jax.random.key(0)), eqx.is_array)

    def forward(p, x):
        model = eqx.combine(p, static)
        # memax's carry: (product of the decays so far, state), and a reset flag
        start = ((jnp.ones(hidden, jnp.complex64), jnp.zeros(hidden, jnp.complex64)),
                 jnp.zeros((), bool))  # fmt: skip
        starts = jnp.zeros(steps, bool)
        return jax.vmap(lambda seq: model(start, (seq, starts))[1])(x)

    return forward, params


def _recurrentgemma_rglru(cell, shape, xs):
    import jax
    import jax.numpy as jnp
    from recurrentgemma.jax import layers as rg

    _square(cell, shape, "recurrentgemma's RGLRU")
    batch, steps, _, hidden = shape
    module = rg.RGLRU(width=hidden, num_heads=1)
    positions = jnp.broadcast_to(jnp.arange(steps), (batch, steps))
    params = module.init(jax.random.key(0), xs, positions)["params"]
    return lambda p, x: module.apply({"params": p}, x, positions)[0], params


def _linen(name):
    def make(cell, shape, xs):
        import flax.linen as nn
        import jax

        model = nn.RNN(getattr(nn, name)(features=shape[3]))
        params = model.init(jax.random.key(0), xs)["params"]
        return lambda p, x: model.apply({"params": p}, x), params

    return make


def _nnx(name):
    def make(cell, shape, xs):
        from flax import nnx

        batch, _, input_size, hidden = shape
        model = nnx.RNN(getattr(nnx, name)(input_size, hidden, rngs=nnx.Rngs(0)))
        carry = model.cell.initialize_carry((batch, input_size), nnx.Rngs(1))
        graph, params, rest = nnx.split(model, nnx.Param, ...)
        return lambda p, x: nnx.merge(graph, p, rest)(x, initial_carry=carry), params

    return make


def _equinox(name):
    def make(cell, shape, xs):
        import equinox as eqx
        import jax
        import jax.numpy as jnp

        hidden = shape[3]
        module = getattr(eqx.nn, name)(shape[2], hidden, key=jax.random.key(0))
        params, static = eqx.partition(module, eqx.is_array)
        lstm = name == "LSTMCell"

        def forward(p, x):
            step_fn = eqx.combine(p, static)

            def one(seq):
                h = jnp.zeros(hidden, seq.dtype)

                def step(carry, xt):
                    new = step_fn(xt, carry)
                    return new, new[0] if lstm else new

                return jax.lax.scan(step, (h, h) if lstm else h, seq)[1]

            return jax.vmap(one)(x)

        return forward, params

    return make


def _cudnn(cell, shape, xs):
    import jax
    import jax.numpy as jnp

    if jax.default_backend() != "gpu":
        raise Unavailable(f"runs only on a GPU (cuDNN); the backend is {jax.default_backend()}")
    from jax.experimental import rnn

    batch, steps, input_size, hidden = shape
    weights = rnn.init_lstm_weight(jax.random.key(0), input_size, hidden, 1, False)
    h0 = jnp.zeros((1, batch, hidden), xs.dtype)
    lengths = jnp.full((batch,), steps, jnp.int32)

    def forward(w, x):
        return rnn.lstm(x, h0, h0, w, lengths, input_size, hidden, 1, 0.0, False)[0]

    return forward, weights


JAX_CANDIDATES: dict[str, Callable] = {
    "rnnjax": _rnnjax,
    "rnnjax fused": functools.partial(_rnnjax, fused=True),
    "rnnjax bf16": functools.partial(_rnnjax, compute_dtype="bfloat16"),
    "rnnjax scan": functools.partial(_rnnjax, native=False),
    "flax.linen LSTMCell": _linen("LSTMCell"),
    "flax.linen OptimizedLSTMCell": _linen("OptimizedLSTMCell"),
    "flax.linen GRUCell": _linen("GRUCell"),
    "flax.nnx LSTMCell": _nnx("LSTMCell"),
    "flax.nnx OptimizedLSTMCell": _nnx("OptimizedLSTMCell"),
    "flax.nnx GRUCell": _nnx("GRUCell"),
    "equinox LSTMCell": _equinox("LSTMCell"),
    "equinox GRUCell": _equinox("GRUCell"),
    "jax.experimental.rnn.lstm": _cudnn,
    "memax LRU": _memax_lru,
    "recurrentgemma RGLRU": _recurrentgemma_rglru,
    "rnnjax step": functools.partial(_rnnjax, step=True),
    "rnnjax lstm": lambda cell, shape, xs: _rnnjax("lstm", shape, xs),
}
TORCH_CANDIDATES = {
    "torch nn.LSTM": "LSTM",
    "torch nn.GRU": "GRU",
    "torch nn.LSTM bf16": "LSTM",
    "torch nn.GRU bf16": "GRU",
}


def _jax_programs(candidate, cell, shape, xs):
    import jax
    import jax.numpy as jnp

    def make(mode):
        forward, params = JAX_CANDIDATES[candidate](cell, shape, xs)
        out = jax.eval_shape(forward, params, xs)
        batch, steps, _, hidden = shape
        if out.shape != (batch, steps, hidden):
            raise ValueError(f"{candidate} gave outputs {out.shape}, not {(batch, steps, hidden)}")
        if mode == "fwd":
            return forward, (params, xs)

        def forward_backward(p, x):
            return jax.value_and_grad(lambda q: jnp.sum(forward(q, x) ** 2))(p)

        return forward_backward, (params, xs)

    return [_harness.jax_program(candidate, m, lambda m=m: make(m)) for m in MODES]


def _torch_programs(candidate, cell, shape, xs):
    def build(mode):
        import jax
        import numpy as np
        import torch

        cuda = jax.default_backend() == "gpu" and torch.cuda.is_available()
        device = "cuda" if cuda else "cpu"
        torch.manual_seed(0)
        batch, steps, input_size, hidden = shape
        module = getattr(torch.nn, TORCH_CANDIDATES[candidate])(input_size, hidden).to(device)
        params = list(module.parameters())
        x = torch.from_numpy(np.ascontiguousarray(np.asarray(xs).transpose(1, 0, 2))).to(device)
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        bf16 = candidate.endswith(" bf16")

        def precision():
            if bf16:
                return torch.autocast(device, dtype=torch.bfloat16)
            return contextlib.nullcontext()

        with precision():
            if tuple(module(x)[0].shape) != (steps, batch, hidden):
                raise ValueError(f"{candidate} gave outputs of an unexpected shape")

        if mode == "fwd":

            def run():
                with torch.no_grad(), precision():
                    module(x)
                sync()
        else:

            def run():
                for p in params:
                    p.grad = None
                with precision():
                    out, _ = module(x)
                    loss = (out.float() ** 2).sum()
                loss.backward()
                sync()

        notes = {
            "device": device,
            "torch_threads": torch.get_num_threads(),
            "layout": "time-major (T, B, I), the module's native layout",
            "forward": "under torch.no_grad()" if mode == "fwd" else "autograd",
            "precision": "torch.autocast bfloat16" if bf16 else "float32",
        }
        return run, {"trace_s": None, "compile_s": None, "memory": None, "notes": notes}

    return [Program(candidate, m, lambda m=m: build(m)) for m in MODES]


def programs(*, cell: str, batch: int, T: int, input_size: int, hidden: int, candidates: list):
    """The worker's side: one :class:`Program` per ``(candidate, mode)`` for one shape and cell."""
    import jax

    shape = (batch, T, input_size, hidden)
    xs = jax.random.normal(jax.random.key(1), (batch, T, input_size))
    out = []
    for candidate in candidates:
        make = _torch_programs if candidate in TORCH_CANDIDATES else _jax_programs
        out.extend(make(candidate, cell, shape, xs))
    return out


# ------------------------------------------------------------------------- in the parent


def installed(peer: str) -> bool:
    """Whether ``peer``'s package can be imported here (checked without importing it)."""
    return importlib.util.find_spec(PEERS[peer].module) is not None


def peers(
    *,
    shapes: Sequence[Sequence[int]] = SHAPES,
    cells: Sequence[str] = CELLS,
    peers: Sequence[str] | None = None,
    repeats: int = 10,
    compile_timeout: float = 60.0,
    min_sample_s: float = _harness.MIN_SAMPLE_S,
    settle_s: float = _harness.SETTLE_S,
    progress: Callable[[str], None] | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Measure rnnjax and its peers, per shape and cell, forward and forward+backward.

    Args:
      shapes: ``(B, T, I, H)`` tuples.
      cells: names from :data:`ALL_CELLS` (default: the classic LSTM and GRU).
      peers: names from :data:`PEERS` (default: all of them); rnnjax is always measured.
      repeats, compile_timeout, min_sample_s, settle_s, progress: as in
        :func:`rnnjax.bench.scan_vs_unroll`.

    Returns:
      ``{"suite": "peers", ..., "results": [...], "summary": [...]}``. Each result row has
      ``batch``, ``T``, ``input_size``, ``hidden``, ``shape`` (``"BxTxIxH"``), ``cell``,
      ``peer``, ``candidate``, ``mode``, ``status`` (``"ok"``, ``"not installed"``,
      ``"unavailable"``, ``"timed out"``, ``"error"``) and, when ok, the timing fields,
      ``vs_reference`` and, for peers, ``rnnjax_over_peer`` (rnnjax's time over the peer's:
      below 1 means rnnjax is faster) and ``speedup`` (its inverse). ``summary`` has one entry
      per shape, cell, mode and peer: that peer's fastest candidate and its ratios.
    """
    names = list(PEERS) if peers is None else list(dict.fromkeys(peers))
    for name in names:
        if name not in PEERS:
            raise ValueError(f"peers must be among {', '.join(PEERS)}; got {name!r}")
    cells = list(dict.fromkeys(cells))
    for cell in cells:
        if cell not in ALL_CELLS:
            raise ValueError(f"cells must be among {', '.join(ALL_CELLS)}; got {cell!r}")
    shapes = [_check_shape(s) for s in shapes]
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    if not compile_timeout >= 0:
        raise ValueError(f"compile_timeout must be >= 0 seconds, got {compile_timeout!r}")
    config = {
        "shapes": [list(s) for s in shapes], "cells": cells, "peers": names, "repeats": repeats,
        "compile_timeout": float(compile_timeout), "min_sample_s": min_sample_s,
        "settle_s": settle_s,
        "dtype": "float32",
    }  # fmt: skip
    available = {name: installed(name) for name in names}
    owner = {REFERENCE: REFERENCE}
    groups = []
    for shape in shapes:
        batch, steps, input_size, hidden = shape
        fields = {"shape": "x".join(map(str, shape)), "batch": batch, "T": steps,
                  "input_size": input_size, "hidden": hidden, "cell": None}  # fmt: skip
        kwargs = {"batch": batch, "T": steps, "input_size": input_size, "hidden": hidden}
        for cell in cells:
            here = {**fields, "cell": cell}
            # PyTorch in a worker of its own, right after rnnjax's (see OWN_PROCESS).
            together, alone, missing = [REFERENCE], [], []
            for name in names:
                for candidate in PEERS[name].cells.get(cell, ()):
                    owner[candidate] = name
                    if not available[name]:
                        missing.append(candidate)
                    else:
                        (alone if PEERS[name].module in OWN_PROCESS else together).append(candidate)
            for candidates, label in ((together, ""), (alone, " (PyTorch's own worker)")):
                if not candidates:
                    continue
                groups.append(
                    Group(
                        label=f"{cell} {here['shape']}{label}",
                        fields=here,
                        kwargs={**kwargs, "cell": cell, "candidates": candidates},
                        keys=[(c, m) for c in candidates for m in MODES],
                        extra_rows=[
                            {
                                **here,
                                "candidate": c,
                                "mode": m,
                                "status": "not installed",
                                "error": f"{PEERS[owner[c]].module} is not installed",
                            }  # fmt: skip
                            for c in (missing if not label else ())
                            for m in MODES
                        ],
                    )
                )
    rows, machine = _harness.run_groups(
        f"{__name__}:programs", groups, reference=REFERENCE, repeats=repeats,
        compile_timeout=compile_timeout, min_sample_s=min_sample_s, settle_s=settle_s,
        progress=progress,
        # On a GPU, JAX would take 75% of its memory up front and leave PyTorch too little.
        env={"XLA_PYTHON_CLIENT_PREALLOCATE": "false"},
    )  # fmt: skip
    _ratios_across_workers(rows)
    for row in rows:
        row["peer"] = owner[row["candidate"]]
        if row["peer"] != REFERENCE and row.get("vs_reference"):
            row["speedup"] = row["vs_reference"]
            row["rnnjax_over_peer"] = 1.0 / row["vs_reference"]
        threads = (row.get("notes") or {}).get("torch_threads")
        if threads is not None:
            machine.setdefault("torch_threads", threads)
    method = _harness.methodology(
        reference=REFERENCE, repeats=repeats, min_sample_s=min_sample_s,
        compile_timeout=compile_timeout, settle_s=settle_s,
    )  # fmt: skip
    method["own_process"] = (
        f"candidates of {', '.join(OWN_PROCESS)} run in a worker of their own right after the "
        "one timing rnnjax at the same shape and cell, their ratios against that rnnjax time: "
        "PyTorch's bundled libgomp.so.1 and oneDNN's would be one OpenMP runtime in one process, "
        "where both libraries ran 2-2.5x slower"
    )
    result = _harness.document(
        SUITE, command=command or _harness.python_call("peers", config), config=config,
        machine=machine, method=method, rows=rows,
    )  # fmt: skip
    result["summary"] = summary(rows)
    return result


def _ratios_across_workers(rows: list[dict[str, Any]]) -> None:
    """``vs_reference`` for the rows measured in PyTorch's own worker: over rnnjax's time at the
    same shape, cell and mode, measured in the worker just before."""
    ref = {
        (r["shape"], r["cell"], r["mode"]): r.get("time_s")
        for r in rows
        if r["candidate"] == REFERENCE and r["status"] == "ok"
    }
    for row in rows:
        if row["status"] == "ok" and row.get("vs_reference") is None:
            base = ref.get((row["shape"], row["cell"], row["mode"]))
            row["vs_reference"] = row["time_s"] / base if base else None


def _check_shape(shape: Sequence[int]) -> tuple[int, int, int, int]:
    shape = tuple(shape)
    if len(shape) != 4 or not all(isinstance(n, int) and n >= 1 for n in shape):
        raise ValueError(f"each shape must be 4 positive ints (B, T, I, H); got {shape!r}")
    return shape


def summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per shape, cell, mode and peer: the peer's fastest candidate against rnnjax."""
    best: dict[tuple, dict[str, Any]] = {}
    for row in rows:
        if row["peer"] == REFERENCE or row["status"] != "ok" or not row.get("vs_reference"):
            continue
        key = (row["shape"], row["cell"], row["mode"], row["peer"])
        if key not in best or row["time_s"] < best[key]["time_s"]:
            best[key] = row
    return [
        {
            "shape": r["shape"],
            "cell": r["cell"],
            "mode": r["mode"],
            "peer": r["peer"],
            "fastest": r["candidate"],
            "time_s": r["time_s"],
            "rnnjax_time_s": r["time_s"] / r["vs_reference"],
            "rnnjax_over_peer": r["rnnjax_over_peer"],
            "speedup": r["speedup"],
        }  # fmt: skip
        for r in best.values()
    ]


# ------------------------------------------------------------------------- report


def format_table(result: dict[str, Any]) -> str:
    """One block per shape and cell: each candidate's forward and fwd+bwd median time and
    ``rnnjax/peer`` (rnnjax's time over the candidate's: below 1 means rnnjax is faster)."""
    rows = result["results"]
    blocks = []
    for shape, cell in dict.fromkeys((r["shape"], r["cell"]) for r in rows):
        here = [r for r in rows if r["shape"] == shape and r["cell"] == cell]
        by = {(r["candidate"], r["mode"]): r for r in here}
        lines = []
        for candidate in dict.fromkeys(r["candidate"] for r in here):
            line = [candidate]
            for mode in MODES:
                row = by.get((candidate, mode))
                line += [_ms(row), _ratio(row)]
            lines.append(line)
        header = ["candidate", "fwd ms", "rnnjax/peer", "fwd+bwd ms", "rnnjax/peer"]
        blocks.append(f"{cell}  B x T x I x H = {shape}\n" + _harness.table(header, lines))
    config = result["config"]
    threads = result["machine"].get("torch_threads")
    head = f"rnnjax vs peers: median of {config['repeats']} interleaved rounds" + (
        f"; torch threads {threads}" if threads else ""
    )
    return "\n\n".join([head, *blocks])


def _ms(row):
    if row is None:
        return "-"
    if row["status"] != "ok":
        return row["status"]
    return f"{row['time_s'] * 1e3:.3g}"


def _ratio(row):
    if row is None or row["status"] != "ok" or row["candidate"] == REFERENCE:
        return ""
    value = row.get("rnnjax_over_peer")
    return "-" if value is None else f"{value:.2f}"


def plot_peers(result: dict[str, Any], path: str | Path) -> None:
    """Bars of each peer's median time over rnnjax's (above 1: rnnjax is faster), one panel per
    cell and mode, grouped by shape; rnnjax's own time is in the shape's label."""
    # Figure, not pyplot: no global backend switch (inline plots in notebooks keep working)
    import numpy as np
    from matplotlib.figure import Figure

    rows = result["results"]
    cells = list(dict.fromkeys(r["cell"] for r in rows))
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    fig = Figure(figsize=(6.5 * len(MODES), 3.6 * len(cells)))
    axes = fig.subplots(len(cells), len(MODES), squeeze=False)
    for i, cell in enumerate(cells):
        names = list(
            dict.fromkeys(
                r["candidate"] for r in rows if r["cell"] == cell and r.get("speedup") is not None
            )
        )
        for j, mode in enumerate(MODES):
            ax = axes[i][j]
            by = {
                (r["shape"], r["candidate"]): r
                for r in rows
                if r["cell"] == cell and r["mode"] == mode
            }
            width = 0.8 / max(1, len(names))
            for k, name in enumerate(names):
                values = [
                    (by.get((s, name)) or {}).get("speedup") or np.nan for s in shapes
                ]  # fmt: skip
                ax.bar(np.arange(len(shapes)) + k * width, values, width, label=name)
            labels = []
            for s in shapes:
                ref = by.get((s, REFERENCE))
                ms = f"{ref['time_s'] * 1e3:.3g} ms" if ref and ref["status"] == "ok" else "-"
                labels.append(f"{s}\nrnnjax {ms}")
            ax.set_xticks(np.arange(len(shapes)) + 0.4 - width / 2, labels, fontsize=7)
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_ylabel("peer time / rnnjax time")
            ax.set_title(f"{cell}, {mode}", fontsize=9)
            ax.grid(True, axis="y", alpha=0.3)
        axes[i][0].legend(fontsize=7)
    fig.suptitle(
        f"rnnjax vs peers ({result['machine'].get('backend', '?')}, "
        f"{result['machine'].get('cpu_model', '?')})",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
