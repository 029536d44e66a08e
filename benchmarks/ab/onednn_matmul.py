"""A/B in one process: who does the matmuls of rnnjax's loops, and which loop trains.

For rnnjax's default LSTM/GRU layers at the peers benchmark's shapes, forward+backward of
sum(ys ** 2) w.r.t. the params, three ways:

- ``loops+onednn``: rnnjax's loops with oneDNN's matmul (weights packed once per pass, the gates
  on all cores; steps of 4096 units or more), the default;
- ``loops+openblas``: the same compiled program with ``RNNJAX_ONEDNN_MATMUL=0`` (read by the
  kernels at every call): OpenBLAS's sgemm, gates on one core, as before;
- ``rnn-primitive``: oneDNN's RNN primitives for training (``ONEDNN_MIN_UNITS`` lowered to 0
  while tracing), the default before the loops used oneDNN's matmul;

and the same for padded sequences (a ``length`` per example, which oneDNN's RNN primitive does
not run): forward alone and forward+backward, and XLA's loop for the forward (what a padded
forward pass of 16,384 units or more ran before, and runs in builds without oneDNN:
``INFERENCE_MAX_UNITS``). The timing is ``rnnjax.bench``'s (interleaved rounds, each sample
after an untimed settle of the same program, median).

    python benchmarks/ab/onednn_matmul.py [ROUNDS]    # prints one line per shape and mode
"""

import os
import sys

import jax
import jax.numpy as jnp
from _layers import layer, with_env

from rnnjax.bench._harness import measure
from rnnjax.bench.peers import SHAPES as PEER_SHAPES
from rnnjax.cells._native import thresholds

# The peers benchmark's shapes (rnnjax bench peers), each cell.
SHAPES = [(cell, shape) for cell in ("lstm", "gru") for shape in PEER_SHAPES]


def compiled(fn, *args, units=None, xla_inference=False):
    """jit(fn) compiled now, with the dispatch changed while it is traced: ``units`` for
    ``ONEDNN_MIN_UNITS``; ``xla_inference``: large padded forward passes lowered to XLA's loop
    (``INFERENCE_MAX_UNITS`` 0 and ``RNNJAX_ONEDNN=0`` while tracing, as in a build without
    oneDNN)."""
    saved = dict(thresholds.ONEDNN_MIN_UNITS), thresholds.INFERENCE_MAX_UNITS
    if units is not None:
        thresholds.ONEDNN_MIN_UNITS.update(units)
    if xla_inference:
        thresholds.INFERENCE_MAX_UNITS = 0
        os.environ["RNNJAX_ONEDNN"] = "0"
    jax.clear_caches()  # nothing traced under other settings is reused
    try:
        program = jax.jit(fn).lower(*args).compile()
    finally:
        thresholds.ONEDNN_MIN_UNITS.update(saved[0])
        thresholds.INFERENCE_MAX_UNITS = saved[1]
        os.environ.pop("RNNJAX_ONEDNN", None)
        jax.clear_caches()
    return program


def with_matmul(setting, program, *args):
    return with_env("RNNJAX_ONEDNN_MATMUL", setting, program, *args)


def programs(cell_name, batch, steps, inputs, hidden):
    """The runs to time at one shape, by group (mode) and way."""
    params, xs, lengths, dense, padded = layer(cell_name, batch, steps, inputs, hidden)

    def grad(run):
        return jax.grad(lambda p, *a: jnp.sum(run(p, *a) ** 2))

    every = {key: 0 for key in thresholds.ONEDNN_MIN_UNITS}
    train = compiled(grad(dense), params, xs)
    primitive = compiled(grad(dense), params, xs, units=every)
    padded_fwd = compiled(padded, params, xs, lengths)
    padded_xla = compiled(padded, params, xs, lengths, xla_inference=True)
    padded_train = compiled(grad(padded), params, xs, lengths)
    return {
        "fwd+bwd": {
            "loops+onednn": with_matmul("1", train, params, xs),
            "loops+openblas": with_matmul("0", train, params, xs),
            "rnn-primitive": with_matmul("1", primitive, params, xs),
        },
        "padded fwd": {
            "loops+onednn": with_matmul("1", padded_fwd, params, xs, lengths),
            "loops+openblas": with_matmul("0", padded_fwd, params, xs, lengths),
            "xla-loop": with_matmul("1", padded_xla, params, xs, lengths),
        },
        "padded fwd+bwd": {
            "loops+onednn": with_matmul("1", padded_train, params, xs, lengths),
            "loops+openblas": with_matmul("0", padded_train, params, xs, lengths),
        },
    }


def main(rounds):
    for cell_name, shape in SHAPES:
        groups = programs(cell_name, *shape)
        runs = {(g, name): run for g, named in groups.items() for name, run in named.items()}
        stats = measure(runs, repeats=rounds)
        for group, named in groups.items():
            cells = ", ".join(f"{name} {stats[group, name]['time_s'] * 1e3:.3g}" for name in named)
            print(f"{cell_name} {'x'.join(map(str, shape))} {group} ms: {cells}", flush=True)
    os.environ.pop("RNNJAX_ONEDNN_MATMUL", None)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 9)
