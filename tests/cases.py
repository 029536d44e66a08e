"""The cells every contract test runs over, at one small shape so each compiles a few times."""

import jax
import jax.numpy as jnp

import rnnjax as rj

T, I, H = 6, 3, 4


CELLS = {
    "elman_tanh": lambda **kw: rj.cells.elman(H, activation="tanh", **kw),
    "elman_relu": lambda **kw: rj.cells.elman(H, activation="relu", **kw),
    "lstm": lambda **kw: rj.cells.lstm(H, **kw),
    "gru": lambda **kw: rj.cells.gru(H, **kw),
    "gru_reset_before": lambda **kw: rj.cells.gru(H, reset_after=False, **kw),
}


def pair_input_cell(hidden: int):
    """An Elman cell whose input is a pair ``(a, b)`` it multiplies: a cell over pytree inputs.
    Returns ``(plain, paired)``; ``paired`` on ``(a, b)`` equals ``plain`` on ``a * b``."""
    plain = rj.cells.elman(hidden)

    def step(params, h, x):
        return plain.step(params, h, x[0] * x[1])

    return plain, rj.Cell(plain.init, plain.initial_carry, step)


def derivatives(run, loss):
    """A jitted ``(args, tangent) ->`` outputs of ``run(*args)``, the gradient of
    ``loss(*args)``, forward-mode tangents of ``run`` and Hessian-vector products of ``loss``,
    all w.r.t. ``args = (params, inputs, starting carry)``: every derivative a fast path must
    reproduce, in one compile."""
    argnums = (0, 1, 2)

    @jax.jit
    def all_of_them(args, tangent):
        grad = jax.grad(loss, argnums)
        return (
            run(*args),
            grad(*args),
            jax.jvp(run, args, tangent)[1],
            jax.jvp(grad, args, tangent)[1],
        )

    return all_of_them


def batched_scan(cell, lengths, *, use_length=False, **scan_kw):
    """``(params, xs, carry) -> (final, ys)``: ``rj.scan`` of each example of a batch under
    ``vmap`` from one starting carry, with ``length=lengths[b]`` when ``use_length``."""

    def run(params, xs, carry):
        def one(x, n):
            return rj.scan(cell, params, x, carry, length=n if use_length else None, **scan_kw)

        return jax.vmap(one)(xs, jnp.asarray(lengths))

    return run


def perturbed(cell, batch, steps, input_size, *, seed=0, dtype=None):
    """``(params, xs, carry)`` for contract tests: params moved off their init (so biases and
    every weight matter), inputs ``(batch, steps, input_size)`` and a nonzero starting carry."""
    params = cell.init(jax.random.key(seed), input_size)
    keys = iter(jax.random.split(jax.random.key(seed + 1), 16))
    params = jax.tree.map(lambda a: a + 0.2 * jax.random.normal(next(keys), a.shape), params)
    xs = jax.random.normal(next(keys), (batch, steps, input_size), dtype=dtype)
    carry = jax.tree.map(lambda a: 0.3 + 0.1 * a, cell.initial_carry(params))
    return params, xs, carry
