"""Whole-sequence fast paths for the built-in cells: one recurrence, a rearranged derivative.

``jax.grad`` of a plain ``lax.scan`` over a cell step accumulates the weight gradients inside
the reverse loop: every step adds a small ``(H, B) @ (B, G)`` product into ``dW_h`` and
``dW_i``. The fast path defines the sequence as a :func:`jax.custom_jvp` function whose tangent
rule moves every term that is linear in a weight tangent out of the loop::

    dr_t = dh_{t-1} @ W_h  +  h_{t-1} @ dW_h + db_h      # second part: one (T, H) @ (H, G) matmul
    da_t = x_t @ dW_i + dx_t @ W_i + db_i                # all of it: big matmuls before the loop

The tangent loop then only carries ``dh`` (and ``dc``) through ``W_h``, and when JAX transposes
it for reverse mode the weight gradients become single ``(H, T) @ (T, G)`` products after the
loop (what PyTorch and cuDNN do by hand), with no per-example weight gradient under ``vmap``.
Because it is a ``custom_jvp`` (not a ``custom_vjp``), ``jax.jvp``, ``jax.grad``, ``vmap`` of
either and higher derivatives all still work; the rule is ordinary differentiable JAX.

Each cell family supplies a :class:`Kernel`: the pointwise part of its step given the input
projection ``a_t = x_t W_i + b_i`` and the recurrent projection ``r_t = h_{t-1} W_h (+ b_h)``,
and that part's tangent. Masking (padded steps keep the carry and output zero) and ``reverse``
follow :func:`rnnjax.scan` exactly; tests compare every fast path with the step-by-step scan.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from rnnjax.core import check_step_input

State = tuple  # (h,) or (h, c): h first, the output
Res = tuple  # per-step values the tangent needs


class Kernel(NamedTuple):
    """The pointwise part of a cell step, for :func:`sequence`.

    Attributes:
      forward: ``(a, r, state) -> (new_state, res)``; ``a`` and ``r`` are the input and
        recurrent projections of one step, ``state`` a tuple whose first entry is ``h``.
      tangent: ``(res, state, da, dr, dstate) -> dnew_state``, linear in ``(da, dr, dstate)``.
    """

    forward: Callable[[jax.Array, jax.Array, State], tuple[State, Res]]
    tangent: Callable[[Res, State, jax.Array, jax.Array, State], State]


# The forward's input projection x_t @ W_i + b_i: inside the loop, one (B, I) @ (I, G) matmul per
# step, or hoisted before it as one (T*B, I) @ (I, G) matmul. The tangent's is always hoisted.
PER_STEP_INPUT = True


def _where(real, new, old):
    return jax.tree.map(lambda n, o: jnp.where(real, n, o), new, old)


@functools.cache
def _sequence_fn(kernel: Kernel, reverse: bool, unroll: int | bool) -> Callable:
    """The custom_jvp sequence function for one kernel and scan configuration."""

    def run(w_i, b_i, w_h, b_h, xs, state0, real):
        """Primal: ``(ys, final_state, per-step residuals, per-step entering states)``."""

        def body(state, inputs):
            x_t, m = inputs
            a_t = x_t @ w_i + b_i if PER_STEP_INPUT else x_t
            r_t = state[0] @ w_h
            if b_h is not None:
                r_t = r_t + b_h
            new, res = kernel.forward(a_t, r_t, state)
            if m is None:
                return new, (new[0], res, state)
            new = _where(m, new, state)
            return new, (jnp.where(m, new[0], jnp.zeros_like(new[0])), res, state)

        a = xs if PER_STEP_INPUT else xs @ w_i + b_i
        final, (ys, res, entering) = lax.scan(
            body, state0, (a, real), reverse=reverse, unroll=unroll
        )
        return ys, final, res, entering

    @jax.custom_jvp
    def seq(w_i, b_i, w_h, b_h, xs, state0, real):
        ys, final, _, _ = run(w_i, b_i, w_h, b_h, xs, state0, real)
        return ys, final

    @seq.defjvp
    def seq_jvp(primals, tangents):
        w_i, b_i, w_h, b_h, xs, state0, real = primals
        dw_i, db_i, dw_h, db_h, dxs, dstate0, _ = tangents
        ys, final, res, entering = run(w_i, b_i, w_h, b_h, xs, state0, real)
        # Everything linear in a weight (or input) tangent, for all steps at once.
        da = dxs @ w_i + xs @ dw_i + db_i
        dr_w = entering[0] @ dw_h
        if db_h is not None:
            dr_w = dr_w + db_h

        def body(dstate, inputs):
            res_t, state_t, da_t, dr_w_t, m = inputs
            dr_t = dstate[0] @ w_h + dr_w_t
            dnew = kernel.tangent(res_t, state_t, da_t, dr_t, dstate)
            if m is None:
                return dnew, dnew[0]
            dnew = _where(m, dnew, dstate)
            return dnew, jnp.where(m, dnew[0], jnp.zeros_like(dnew[0]))

        dfinal, dys = lax.scan(
            body, dstate0, (res, entering, da, dr_w, real), reverse=reverse, unroll=unroll
        )
        return (ys, final), (dys, dfinal)

    return seq


def sequence(
    kernel: Kernel,
    w_i: jax.Array,
    b_i: jax.Array,
    w_h: jax.Array,
    b_h: jax.Array | None,
    xs: jax.Array,
    state0: State,
    real: jax.Array | None,
    *,
    reverse: bool = False,
    unroll: int | bool = 1,
) -> tuple[jax.Array, State]:
    """Run ``kernel`` over ``xs (T, I)`` from ``state0``; returns ``(ys (T, H), final_state)``.

    ``real`` is the ``(T,)`` bool mask of real steps (None: all real).
    """
    fn = _sequence_fn(kernel, bool(reverse), unroll)
    return fn(w_i, b_i, w_h, b_h, xs, tuple(state0), real)


# ----------------------------------------------------------------------------- kernels


def _lstm_forward(a, r, state):
    h, c = state
    zi, zf, zg, zo = jnp.split(a + r, 4, axis=-1)
    i, f, g, o = jax.nn.sigmoid(zi), jax.nn.sigmoid(zf), jnp.tanh(zg), jax.nn.sigmoid(zo)
    c2 = f * c + i * g
    tc = jnp.tanh(c2)
    return (o * tc, c2), (i, f, g, o, tc)


def _lstm_tangent(res, state, da, dr, dstate):
    i, f, g, o, tc = res
    _, c = state
    _, dc = dstate
    dzi, dzf, dzg, dzo = jnp.split(da + dr, 4, axis=-1)
    dc2 = (f * (1 - f) * dzf) * c + f * dc + (i * (1 - i) * dzi) * g + i * ((1 - g * g) * dzg)
    dh2 = (o * (1 - o) * dzo) * tc + o * (1 - tc * tc) * dc2
    return (dh2, dc2)


LSTM = Kernel(_lstm_forward, _lstm_tangent)


def _gru_forward(a, r, state):
    (h,) = state
    ar, az, an = jnp.split(a, 3, axis=-1)
    rr, rz, rn = jnp.split(r, 3, axis=-1)
    reset = jax.nn.sigmoid(ar + rr)
    update = jax.nn.sigmoid(az + rz)
    n = jnp.tanh(an + reset * rn)
    return ((1.0 - update) * n + update * h,), (reset, update, n, rn)


def _gru_tangent(res, state, da, dr, dstate):
    reset, update, n, rn = res
    (h,) = state
    (dh,) = dstate
    dar, daz, dan = jnp.split(da, 3, axis=-1)
    drr, drz, drn = jnp.split(dr, 3, axis=-1)
    dreset = reset * (1 - reset) * (dar + drr)
    dupdate = update * (1 - update) * (daz + drz)
    dn = (1 - n * n) * (dan + dreset * rn + reset * drn)
    return ((1.0 - update) * dn + (h - n) * dupdate + update * dh,)


GRU = Kernel(_gru_forward, _gru_tangent)


def _tanh_forward(a, r, state):
    h = jnp.tanh(a + r)
    return (h,), (h,)


def _tanh_tangent(res, state, da, dr, dstate):
    (h,) = res
    return ((1 - h * h) * (da + dr),)


def _relu_forward(a, r, state):
    pre = a + r
    return (jax.nn.relu(pre),), (pre > 0,)


def _relu_tangent(res, state, da, dr, dstate):
    (positive,) = res
    return (jnp.where(positive, da + dr, 0.0),)


ELMAN_TANH = Kernel(_tanh_forward, _tanh_tangent)
ELMAN_RELU = Kernel(_relu_forward, _relu_tangent)


@functools.cache
def elman_kernel(activation: Callable[[jax.Array], jax.Array]) -> Kernel:
    """A kernel for any elementwise activation: its tangent is ``jax.jvp`` of the activation."""

    def forward(a, r, state):
        pre = a + r
        return (activation(pre),), (pre,)

    def tangent(res, state, da, dr, dstate):
        (pre,) = res
        return (jax.jvp(activation, (pre,), (da + dr,))[1],)

    return Kernel(forward, tangent)


def _inputs(name: str, params: dict, xs, recurrent_mask):
    """Check ``xs (T, I)`` against the params and apply a recurrent dropout mask to ``w_h``."""
    check_step_input(name, jax.ShapeDtypeStruct(np.shape(xs)[1:], xs.dtype), params["w_i"].shape[0])
    w_h = params["w_h"]
    if recurrent_mask is not None:
        # h * mask meets W_h: the same as scaling W_h's rows (tests check the step agrees).
        w_h = recurrent_mask[:, None] * w_h
    return w_h


def lstm_sequence(params: dict, xs, carry, real, *, reverse=False, unroll=1, recurrent_mask=None):
    """The LSTM over a sequence: ``(carry, ys)`` like :func:`rnnjax.scan`."""
    from rnnjax.cells.lstm import LSTMState

    w_h = _inputs("lstm", params, xs, recurrent_mask)
    ys, (h, c) = sequence(
        LSTM, params["w_i"], params["b"], w_h, None, xs, (carry.h, carry.c), real,
        reverse=reverse, unroll=unroll,
    )  # fmt: skip
    return LSTMState(h, c), ys


def gru_sequence(params: dict, xs, carry, real, *, reverse=False, unroll=1, recurrent_mask=None):
    """The reset-after GRU over a sequence: ``(carry, ys)`` like :func:`rnnjax.scan`."""
    w_h = _inputs("gru", params, xs, recurrent_mask)
    ys, (h,) = sequence(
        GRU, params["w_i"], params["b_i"], w_h, params["b_h"], xs, (carry,), real,
        reverse=reverse, unroll=unroll,
    )  # fmt: skip
    return h, ys


def elman_sequence(kernel: Kernel) -> Callable:
    """The Elman cell over a sequence with ``kernel``'s activation."""

    def run(params: dict, xs, carry, real, *, reverse=False, unroll=1, recurrent_mask=None):
        w_h = _inputs("elman", params, xs, recurrent_mask)
        ys, (h,) = sequence(
            kernel, params["w_i"], params["b"], w_h, None, xs, (carry,), real,
            reverse=reverse, unroll=unroll,
        )  # fmt: skip
        return h, ys

    return run
