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


class Kernel(NamedTuple):
    """The pointwise part of a cell step, for :func:`sequence`.

    Attributes:
      forward: ``(a, r, state) -> (new_state, coef)``; ``a`` and ``r`` are the input and
        recurrent projections of one step, ``state`` a tuple whose first entry is ``h``, and
        ``coef`` one array of the coefficients of the step's linearization.
      tangent: ``(row, da, dr, dstate) -> dnew_state`` with ``row = [h, coef]`` (concatenated
        on the last axis), linear in ``(da, dr, dstate)``. It may only multiply ``row`` as a
        whole with tangents (slice the products, not ``row``): any other operation on ``row``
        would be split off by JAX's linearization into a second forward loop that stacks its
        results.
      additive: ``a`` and ``r`` only enter as ``a + r`` (LSTM, Elman), so their tangents can
        be summed before the loop: one stacked array instead of two.
    """

    forward: Callable[[jax.Array, jax.Array, State], tuple[State, jax.Array]]
    tangent: Callable[[jax.Array, jax.Array, jax.Array, State], State]
    additive: bool


@functools.cache
def _sequence_fn(kernel: Kernel, reverse: bool, unroll: int | bool) -> Callable:
    """The custom_jvp sequence function for one kernel and scan configuration.

    Every stacked output of a loop costs a dynamic-update-slice per step, so the linearizing
    forward stacks two arrays: ``packed = [y, coefficients]`` and, for the weight tangents,
    ``xh = [x, h entering the step]`` (one matmul with ``[dW_i; dW_h]`` after the loop, and in
    reverse mode one ``xh^T @ dz`` for both weight gradients).
    """

    def run(w_i, b_i, w_h, b_h, xs, state0, real, *, linearize=True):
        """Primal: ``(ys, final_state, None, None, False)`` without ``linearize``, else
        ``(packed, final_state, xh, real-step masks, whether xh holds x)``.

        The masks are stored broadcast to the state's shapes so that the tangent loop only
        selects with them (a broadcast there would be split off into an extra loop)."""
        pack_x = linearize and xs.dtype == state0[0].dtype

        def body(state, inputs):
            x_t, m = inputs
            given = state
            if m is not None:  # a padded step's result is dropped: as in rnnjax.scan, what it
                # reads (a NaN carry) must not reach a derivative through its linearization
                given = tuple(jnp.where(m, s, jnp.zeros_like(s)) for s in state)
            # The forward's input projection stays in the loop: hoisted as one (T*B, I) @ (I, G)
            # matmul before it, it measured no faster on CPU (PERF-NOTES.md); the tangent's is.
            a_t = x_t @ w_i + b_i
            r_t = given[0] @ w_h
            if b_h is not None:
                r_t = r_t + b_h
            new, coef = kernel.forward(a_t, r_t, given)
            keep = None
            if m is not None:
                keep = tuple(jnp.broadcast_to(m, s.shape) for s in state)
                new = tuple(jnp.where(k, n, s) for k, n, s in zip(keep, new, state, strict=True))
            y = new[0] if m is None else jnp.where(keep[0], new[0], 0)
            if not linearize:
                return new, (y, None, None)
            packed = jnp.concatenate([y, coef], axis=-1)
            xh = jnp.concatenate([x_t, given[0]], axis=-1) if pack_x else given[0]
            return new, (packed, xh, keep)

        final, (out, xh, keep) = lax.scan(body, state0, (xs, real), reverse=reverse, unroll=unroll)
        return out, final, xh, keep, pack_x

    @jax.custom_jvp
    def seq(w_i, b_i, w_h, b_h, xs, state0, real):
        ys, final, *_ = run(w_i, b_i, w_h, b_h, xs, state0, real, linearize=False)
        return ys, final

    @seq.defjvp
    def seq_jvp(primals, tangents):
        w_i, b_i, w_h, b_h, xs, state0, real = primals
        dw_i, db_i, dw_h, db_h, dxs, dstate0, _ = tangents
        packed, final, xh, keep, pack_x = run(w_i, b_i, w_h, b_h, xs, state0, real)
        hidden = state0[0].shape[-1]
        ys = packed[..., :hidden]
        # Everything linear in a weight (or input) tangent, for all steps at once.
        if kernel.additive and pack_x:
            da = xh @ jnp.concatenate([dw_i, dw_h], axis=0) + dxs @ w_i + db_i
            dr_w = None
        else:
            h_in = xh[..., -hidden:]
            da = dxs @ w_i + xs @ dw_i + db_i
            dr_w = h_in @ dw_h
        if db_h is not None:
            dr_w = db_h if dr_w is None else dr_w + db_h
        if kernel.additive and dr_w is not None:
            da, dr_w = da + dr_w, None

        def body(dstate, inputs):
            packed_t, da_t, dr_w_t, keep_t = inputs
            given = dstate  # as in the primal: a padded step reads zeros
            if keep_t is not None:
                given = tuple(jnp.where(k, s, 0) for k, s in zip(keep_t, dstate, strict=True))
            dr_t = given[0] @ w_h
            if dr_w_t is not None:
                dr_t = dr_t + dr_w_t
            dnew = kernel.tangent(packed_t, da_t, dr_t, given)
            if keep_t is None:
                return dnew, dnew[0]
            dnew = tuple(jnp.where(k, n, s) for k, n, s in zip(keep_t, dnew, dstate, strict=True))
            return dnew, jnp.where(keep_t[0], dnew[0], 0)

        dfinal, dys = lax.scan(
            body, tuple(dstate0), (packed, da, dr_w, keep), reverse=reverse, unroll=unroll
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
    if real is not None:  # padding never reaches a value or a derivative (as in rnnjax.scan)
        xs = jnp.where(real[:, None], xs, jnp.zeros_like(xs))
    return fn(w_i, b_i, w_h, b_h, xs, tuple(state0), real)


# ----------------------------------------------------------------------------- kernels


def _blocks(v, n):
    return jnp.split(v, n, axis=-1)


def _zeros(like, n):
    return jnp.zeros((*like.shape[:-1], n), like.dtype)


def _lstm_forward(a, r, state):
    _, c = state
    zi, zf, zg, zo = _blocks(a + r, 4)
    i, f, g, o = jax.nn.sigmoid(zi), jax.nn.sigmoid(zf), jnp.tanh(zg), jax.nn.sigmoid(zo)
    c2 = f * c + i * g
    tc = jnp.tanh(c2)
    # d c2 = (i' g) dzi + (f' c) dzf + (i g') dzg + f dc;  d h2 = (o' tanh c2) dzo + o tanh'(c2) dc2
    coef = [i * (1 - i) * g, f * (1 - f) * c, i * (1 - g * g), o * (1 - o) * tc]
    return (o * tc, c2), jnp.concatenate([*coef, f, o * (1 - tc * tc)], axis=-1)


def _lstm_tangent(row, da, dr, dstate):
    # row = [h, i'g, f'c, ig', o'tc, f, o tanh'(c2)], each H wide.
    _, dc = dstate
    hidden = dc.shape[-1]
    t1 = row * jnp.concatenate([_zeros(dc, hidden), da + dr, dc, _zeros(dc, hidden)], axis=-1)
    _, di, df, dg, do, f_dc, _ = _blocks(t1, 7)
    dc2 = di + df + dg + f_dc
    t2 = row * jnp.concatenate([_zeros(dc, 6 * hidden), dc2], axis=-1)
    return (do + t2[..., 6 * hidden :], dc2)


LSTM = Kernel(_lstm_forward, _lstm_tangent, additive=True)


def _gru_forward(a, r, state):
    (h,) = state
    ar, az, an = _blocks(a, 3)
    rr, rz, rn = _blocks(r, 3)
    reset = jax.nn.sigmoid(ar + rr)
    update = jax.nn.sigmoid(az + rz)
    n = jnp.tanh(an + reset * rn)
    # h' = (1 - z) n + z h:  dh' = kn (dan + dreset rn + reset drn) + z' (h - n) (daz + drz) + z dh
    kn = (1 - update) * (1 - n * n)
    kr = kn * rn * reset * (1 - reset)
    kz = update * (1 - update) * (h - n)
    coef = [kr, kz, kn, kr, kz, kn * reset, update]
    return ((1.0 - update) * n + update * h,), jnp.concatenate(coef, axis=-1)


def _gru_tangent(row, da, dr, dstate):
    # row = [h, into_a (3H), into_r (3H), z]
    (dh,) = dstate
    t = row * jnp.concatenate([jnp.zeros_like(dh), da, dr, dh], axis=-1)
    parts = _blocks(t, 8)
    return (sum(parts[1:]),)


GRU = Kernel(_gru_forward, _gru_tangent, additive=False)


@functools.cache
def elman_kernel(activation: Callable[[jax.Array], jax.Array]) -> Kernel:
    """The Elman kernel for an elementwise activation; its slope comes from ``jax.jvp``."""

    def forward(a, r, state):
        pre = a + r
        h, slope = jax.jvp(activation, (pre,), (jnp.ones_like(pre),))
        return (h,), slope

    def tangent(row, da, dr, dstate):
        # row = [h, slope]
        (dh,) = dstate
        t = row * jnp.concatenate([jnp.zeros_like(dh), da + dr], axis=-1)
        return (t[..., dh.shape[-1] :],)

    return Kernel(forward, tangent, additive=True)


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
    w_h = _inputs("lstm", params, xs, recurrent_mask)
    ys, (h, c) = sequence(
        LSTM, params["w_i"], params["b"], w_h, None, xs, (carry.h, carry.c), real,
        reverse=reverse, unroll=unroll,
    )  # fmt: skip
    return carry._replace(h=h, c=c), ys


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
