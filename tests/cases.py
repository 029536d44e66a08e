"""The cells every contract test runs over, at one small shape so each compiles a few times."""

import jax

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
