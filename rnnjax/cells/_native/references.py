"""Pure-JAX references of the native kernels: the masked LSTM's and reset-after GRU's forward
pass, tangent and backward pass (BPTT) as ``lax.scan`` loops over batch-first arrays.

Each primitive of :mod:`rnnjax.cells._native.primitives` computes one of these: they are its
lowering off the CPU (and where :data:`~rnnjax.cells._native.thresholds.INFERENCE_MAX_UNITS`
sends inference to XLA's loop), its abstract evaluation (the shapes of the residuals it
returns, which depend on the dispatch: see :func:`_kept`), its batching fallback for batched
weights and per-example gradients, its forward-mode rule, and the tests' oracle. The native
kernels (``rnnjax/_native/*.cc``) compute the same values within float32 rounding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from rnnjax import _native
from rnnjax.cells._native.thresholds import is_workspace, uses_onednn

# Shapes: x (B, T, I); dz (B, T, 4H); h0, c0 (B, H); mask (B, T) bool; ys, h_prev (B, T, H);
# res (B, T, 6H) = [i, f, g, o, c entering, tanh(c leaving)] for each step.


def _time_major(*arrays):
    return tuple(jnp.swapaxes(x, 0, 1) for x in arrays)


def checkpoints(entering, k: int, *, reverse: bool):
    """The carry entering every ``k``-th step of a pass, ``(B, ceil(T / k), W)``, from the carry
    entering each step, ``entering (B, T, W)`` (steps count in the pass's order)."""
    t = np.arange(0, entering.shape[1], k)
    return entering[:, entering.shape[1] - 1 - t if reverse else t]


def _kept(cell, x, w_h, h_prev, res, entering, *, reverse, save, dense, checkpoint):
    """The residuals a forward reference returns: ``(h_prev, res)`` as computed when they are
    saved for rnnjax's own kernels; both empty, ``(B, 0)``, for inference; with ``checkpoint``
    k > 0 an empty ``h_prev`` and in ``res`` the :func:`checkpoints` of the carry ``entering``
    each step; and when oneDNN runs the pass an empty ``h_prev`` and ``res`` of oneDNN's
    workspace shape, ``(B, W)``, left zero (the references recompute what they need from the
    inputs instead)."""
    empty = jnp.zeros((x.shape[0], 0), x.dtype)
    if save and checkpoint:
        return empty, checkpoints(entering, checkpoint, reverse=reverse)
    onednn = save and uses_onednn(cell, x.shape[0], w_h.shape[0], save=save, dense=dense)
    if save and not onednn:
        return h_prev, res
    if not onednn:
        return empty, empty
    nbytes = _native.workspace_bytes(cell, x.shape[1], x.shape[2], w_h.shape[0], bool(reverse))
    return empty, jnp.zeros((x.shape[0], -(-nbytes // 4)), x.dtype)


def _saved(forward, inputs, h_prev, res, *, reverse, checkpoint):
    """``(h_prev, res)`` as a tangent or backward reference uses them: recomputed with the
    cell's ``forward`` reference over its ``inputs`` when ``res`` holds checkpoints or oneDNN's
    workspace."""
    if checkpoint or is_workspace(res):
        return tuple(forward(*inputs, reverse=reverse)[-2:])
    return h_prev, res


def forward_reference(x, w_i, b, w_h, h0, c0, mask, *, reverse, save=True, dense=False,
                      checkpoint=0):  # fmt: skip
    """``(ys, h_last, c_last, h_prev, res)`` of the masked LSTM over ``x (B, T, I)``; without
    ``save`` (inference) ``h_prev`` and ``res`` are empty, ``(B, 0)``; with ``checkpoint`` k > 0
    ``h_prev`` is empty and ``res`` holds ``[h, c]`` entering every k-th step; when oneDNN runs
    the pass (``dense``: no mask; :func:`uses_onednn`) ``h_prev`` is empty and ``res`` holds its
    workspace."""

    def body(carry, inputs):
        h, c = carry
        x_t, m = inputs
        z = x_t @ w_i + b + h @ w_h
        zi, zf, zg, zo = jnp.split(z, 4, axis=-1)
        i, f, g, o = jax.nn.sigmoid(zi), jax.nn.sigmoid(zf), jnp.tanh(zg), jax.nn.sigmoid(zo)
        c_new = f * c + i * g
        tc = jnp.tanh(c_new)
        h_new = o * tc
        m = m[:, None]
        res = jnp.concatenate([i, f, g, o, c, tc], axis=-1)
        carry = (jnp.where(m, h_new, h), jnp.where(m, c_new, c))
        return carry, (jnp.where(m, h_new, 0), h, res)

    (h, c), (ys, h_prev, res) = lax.scan(body, (h0, c0), _time_major(x, mask), reverse=reverse)
    ys, h_prev, res = _time_major(ys, h_prev, res)
    entering = jnp.concatenate([h_prev, _gates(res)[4]], axis=-1)
    h_prev = jnp.where(mask[..., None], h_prev, 0)  # as the kernels save it (zeros if padded)
    h_prev, res = _kept("lstm", x, w_h, h_prev, res, entering, reverse=reverse, save=save,
                        dense=dense, checkpoint=checkpoint)  # fmt: skip
    return ys, h, c, h_prev, res


def _weight_cotangents(inputs, w, gz, need_dx):
    """After a backward loop: from the gate cotangents ``gz (B, T, G)`` of all steps and the
    ``inputs (B, T, K)`` that met ``w (K, G)``, the cotangents ``(inputs, w, bias)`` (the
    first zero unless ``need_dx``), as the kernels' WeightGradients computes them."""
    gin = gz @ w.T if need_dx else jnp.zeros_like(inputs)
    return gin, jnp.einsum("btk,btg->kg", inputs, gz), gz.sum((0, 1))


def _gates(res):
    return jnp.split(res, 6, axis=-1)  # i, f, g, o, c entering, tanh(c leaving)


def _gate_tangents(dx, dw_i, db, dw_h, x, w_i, h_prev):
    """``dz``: the part of the gates' tangent that is linear in input and weight tangents."""
    return dx @ w_i + x @ dw_i + db + h_prev @ dw_h


def tangent_reference(dx, dw_i, db, dw_h, dh0, dc0, x, w_i, b, w_h, h0, c0, mask, ys, h, c,
                      h_prev, res, *, reverse, checkpoint=0):  # fmt: skip
    """The recurrence's tangent, linear in ``(dx, dW_i, db, dW_h, dh0, dc0)``, at the forward
    pass whose inputs and outputs follow: ``(dys, dh_last, dc_last)``."""
    inputs = (x, w_i, b, w_h, h0, c0, mask)
    h_prev, res = _saved(
        forward_reference, inputs, h_prev, res, reverse=reverse, checkpoint=checkpoint
    )
    dz = _gate_tangents(dx, dw_i, db, dw_h, x, w_i, h_prev)

    def body(carry, inputs):
        dh, dc = carry
        dz_t, r, m = inputs
        i, f, g, o, c, tc = _gates(r)
        di, df, dg, do = jnp.split(dz_t + dh @ w_h, 4, axis=-1)
        dc_new = i * (1 - i) * g * di + f * (1 - f) * c * df + i * (1 - g * g) * dg + f * dc
        dh_new = o * (1 - o) * tc * do + o * (1 - tc * tc) * dc_new
        m = m[:, None]
        carry = (jnp.where(m, dh_new, dh), jnp.where(m, dc_new, dc))
        return carry, jnp.where(m, dh_new, 0)

    (dh, dc), dys = lax.scan(body, (dh0, dc0), _time_major(dz, res, mask), reverse=reverse)
    return jnp.swapaxes(dys, 0, 1), dh, dc


def backward_reference(gys, gh_last, gc_last, x, w_i, b, w_h, h0, c0, mask, ys, h, c, h_prev, res,
                       *, reverse, need_dx, checkpoint=0):  # fmt: skip
    """The transpose of :func:`tangent_reference` (backpropagation through time): the
    cotangents ``(gx, gW_i, gb, gW_h, gh0, gc0)`` from those of ``(ys, h_last, c_last)``.
    ``need_dx=False`` may leave ``gx`` unset (zero here)."""
    inputs = (x, w_i, b, w_h, h0, c0, mask)
    h_prev, res = _saved(
        forward_reference, inputs, h_prev, res, reverse=reverse, checkpoint=checkpoint
    )

    def body(carry, inputs):
        gh, gc = carry
        gy, r, m = inputs
        i, f, g, o, c, tc = _gates(r)
        dh = gh + gy
        dc = gc + dh * o * (1 - tc * tc)
        dz = jnp.concatenate(
            [
                dc * g * i * (1 - i),
                dc * c * f * (1 - f),
                dc * i * (1 - g * g),
                dh * tc * o * (1 - o),
            ],
            axis=-1,
        )
        m = m[:, None]
        dz = jnp.where(m, dz, 0)
        carry = (jnp.where(m, dz @ w_h.T, gh), jnp.where(m, dc * f, gc))
        return carry, dz

    (gh, gc), gz = lax.scan(
        body, (gh_last, gc_last), _time_major(gys, res, mask), reverse=not reverse
    )
    gz = jnp.swapaxes(gz, 0, 1)
    gx, gw_i, gb = _weight_cotangents(x, w_i, gz, need_dx)
    gw_h, _ = _weight_cotangents(h_prev, None, gz, False)[1:]
    return gx, gw_i, gb, gw_h, gh, gc


def gru_forward_reference(x, w_i, b_i, w_h, b_h, h0, mask, *, reverse, save=True, dense=False,
                          checkpoint=0):  # fmt: skip
    """``(ys, h_last, h_prev, res)`` of the masked reset-after GRU, ``res = [r, z, n, gh_n]``
    with ``gh_n = h W_hn + b_hn``; without ``save`` ``h_prev`` and ``res`` are ``(B, 0)``; with
    ``checkpoint`` as :func:`forward_reference` (``res`` holds ``h``)."""

    def body(h, inputs):
        x_t, m = inputs
        gi_r, gi_z, gi_n = jnp.split(x_t @ w_i + b_i, 3, axis=-1)
        gh_r, gh_z, gh_n = jnp.split(h @ w_h + b_h, 3, axis=-1)
        r, z = jax.nn.sigmoid(gi_r + gh_r), jax.nn.sigmoid(gi_z + gh_z)
        n = jnp.tanh(gi_n + r * gh_n)
        h_new = (1 - z) * n + z * h
        m = m[:, None]
        res = jnp.concatenate([r, z, n, gh_n], axis=-1)
        return jnp.where(m, h_new, h), (jnp.where(m, h_new, 0), h, res)

    h, (ys, h_prev, res) = lax.scan(body, h0, _time_major(x, mask), reverse=reverse)
    ys, h_prev, res = _time_major(ys, h_prev, res)
    saved = jnp.where(mask[..., None], h_prev, 0)  # as the kernels save it (zeros if padded)
    h_prev, res = _kept("gru", x, w_h, saved, res, h_prev, reverse=reverse, save=save,
                        dense=dense, checkpoint=checkpoint)  # fmt: skip
    return ys, h, h_prev, res


def gru_tangent_reference(dx, dw_i, db_i, dw_h, db_h, dh0, x, w_i, b_i, w_h, b_h, h0, mask, ys, h,
                          h_prev, res, *, reverse, checkpoint=0):  # fmt: skip
    """The GRU's tangent, linear in ``(dx, dW_i, db_i, dW_h, db_h, dh0)``: ``(dys, dh_last)``."""
    inputs = (x, w_i, b_i, w_h, b_h, h0, mask)
    h_prev, res = _saved(
        gru_forward_reference, inputs, h_prev, res, reverse=reverse, checkpoint=checkpoint
    )
    dgi = dx @ w_i + x @ dw_i + db_i
    dgh_w = h_prev @ dw_h + db_h

    def body(dh, inputs):
        dgi_t, dgh_t, hp, r_t, m = inputs
        r, z, n, gh_n = jnp.split(r_t, 4, axis=-1)
        dgi_r, dgi_z, dgi_n = jnp.split(dgi_t, 3, axis=-1)
        dgh_r, dgh_z, dgh_n = jnp.split(dgh_t + dh @ w_h, 3, axis=-1)
        dr = r * (1 - r) * (dgi_r + dgh_r)
        dz = z * (1 - z) * (dgi_z + dgh_z)
        dn = (1 - n * n) * (dgi_n + dr * gh_n + r * dgh_n)
        dh_new = (1 - z) * dn + (hp - n) * dz + z * dh
        m = m[:, None]
        return jnp.where(m, dh_new, dh), jnp.where(m, dh_new, 0)

    dh, dys = lax.scan(
        body, dh0, _time_major(dgi, dgh_w, h_prev, res, mask), reverse=reverse
    )  # fmt: skip
    return jnp.swapaxes(dys, 0, 1), dh


def gru_backward_reference(gys, gh_last, x, w_i, b_i, w_h, b_h, h0, mask, ys, h, h_prev, res, *,
                           reverse, need_dx, checkpoint=0):  # fmt: skip
    """The transpose of :func:`gru_tangent_reference`: ``(gx, gW_i, gb_i, gW_h, gb_h, gh0)``."""
    inputs = (x, w_i, b_i, w_h, b_h, h0, mask)
    h_prev, res = _saved(
        gru_forward_reference, inputs, h_prev, res, reverse=reverse, checkpoint=checkpoint
    )

    def body(gh, inputs):
        gy, hp, r_t, m = inputs
        r, z, n, gh_n = jnp.split(r_t, 4, axis=-1)
        dh = gh + gy
        dan = dh * (1 - z) * (1 - n * n)
        dar = dan * gh_n * r * (1 - r)
        daz = dh * (hp - n) * z * (1 - z)
        m = m[:, None]
        gzi = jnp.where(m, jnp.concatenate([dar, daz, dan], axis=-1), 0)
        gzh = jnp.where(m, jnp.concatenate([dar, daz, dan * r], axis=-1), 0)
        return jnp.where(m, dh * z + gzh @ w_h.T, gh), (gzi, gzh)

    gh, (gzi, gzh) = lax.scan(
        body, gh_last, _time_major(gys, h_prev, res, mask), reverse=not reverse
    )  # fmt: skip
    gzi, gzh = _time_major(gzi, gzh)
    gx, gw_i, gb_i = _weight_cotangents(x, w_i, gzi, need_dx)
    gw_h, gb_h = _weight_cotangents(h_prev, None, gzh, False)[1:]
    return gx, gw_i, gb_i, gw_h, gb_h, gh
