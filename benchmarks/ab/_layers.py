"""What the A/B scripts in this folder share: rnnjax's default layer of one cell at one shape,
its inputs, and a run that sets a switch the kernels read at every call before it runs."""

import os

import jax
import jax.numpy as jnp
import numpy as np

import rnnjax as rj


def layer(cell_name, batch, steps, inputs, hidden):
    """``(params, xs, lengths, dense, padded)``: the cell's params, standard-normal ``xs``
    ``(B, T, I)``, ``lengths`` ``(B,)`` between T/2 and T, and the batched layer without and
    with padding, ``dense(params, xs)`` and ``padded(params, xs, lengths)``, each -> ys."""
    cell = getattr(rj.cells, cell_name)(hidden)
    params = cell.init(jax.random.key(0), inputs)
    rng = np.random.default_rng(0)
    xs = jnp.asarray(rng.standard_normal((batch, steps, inputs), np.float32))
    lengths = jnp.asarray(rng.integers(steps // 2, steps + 1, batch))

    def dense(p, x):
        return jax.vmap(lambda x: rj.scan(cell, p, x)[1])(x)

    def padded(p, x, n):
        return jax.vmap(lambda x, n: rj.scan(cell, p, x, length=n)[1])(x, n)

    return params, xs, lengths, dense, padded


def with_env(variable, setting, program, *args):
    """A run of ``program(*args)`` (waited for) with ``variable`` set to ``setting`` first."""

    def run():
        os.environ[variable] = setting
        jax.block_until_ready(program(*args))

    return run
