"""The mLSTM cell of xLSTM (Beck et al. 2024, arXiv 2405.04517): a matrix memory per head with
exponential gating, stepped one token at a time or run chunkwise-parallel over a sequence."""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from rnnjax.cells._common import Initializer, check_size, default_input_init
from rnnjax.cells.xlstm import _chunkwise
from rnnjax.cells.xlstm._heads import (
    check_forget_gate,
    forget_bias_init,
    head_size,
    log_forget,
)
from rnnjax.core import Cell, check_step_input


class MLSTMState(NamedTuple):
    """The mLSTM carry, stabilised: per head the matrix memory ``c (heads, d, d)`` (indexed
    ``[key, value]``), the normaliser ``n (heads, d)`` and the stabiliser ``m (heads,)``. The
    paper's unstabilised memory is ``exp(m) * c`` (transposed: the paper writes
    ``C_t = f C_{t-1} + i v k^T``) and its normaliser ``exp(m) * n``."""

    c: jax.Array
    n: jax.Array
    m: jax.Array


_PROJECTIONS = ("q", "k", "v", "o")


def project(params, x: jax.Array, heads: int, forget_gate: str):
    """The step's inputs from ``x (..., I)``: ``q, k, v (..., heads, d)`` with ``k`` scaled by
    ``1/sqrt(d)``, the input gate's pre-activation ``log i (..., heads)``, ``log f (...,
    heads)`` and the output gate ``o (..., H)``."""
    q, k, v, o = (x @ params[f"w_{g}"] + params[f"b_{g}"] for g in _PROJECTIONS)
    split = lambda a: a.reshape(*a.shape[:-1], heads, -1)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    k = k / math.sqrt(k.shape[-1])
    log_i = x @ params["w_i"] + params["b_i"]
    log_f = log_forget(forget_gate, x @ params["w_f"] + params["b_f"])
    return q, k, v, log_i, log_f, jax.nn.sigmoid(o)


def mlstm(
    hidden_size: int,
    num_heads: int = 1,
    *,
    forget_gate: str = "sigmoid",
    eps: float = 1e-6,
    chunk_size: int = 64,
    input_init: Initializer = default_input_init,
    dtype: jnp.dtype = jnp.float32,
) -> Cell:
    """An mLSTM cell: per head ``h`` of size ``d = H / num_heads``, with ``x_t (I,)``

        q_t = W_q x_t + b_q,   k_t = (W_k x_t + b_k) / sqrt(d),   v_t = W_v x_t + b_v
        i~_t = w_i x_t + b_i,  f~_t = w_f x_t + b_f   (one scalar per head)
        o_t = sigmoid(W_o x_t + b_o)
        log f_t = log sigmoid(f~_t)   (forget_gate="sigmoid"; "exp": log f_t = f~_t)
        m_t = max(log f_t + m_{t-1}, i~_t)                              the stabiliser
        i'_t = exp(i~_t - m_t),   f'_t = exp(log f_t + m_{t-1} - m_t)
        C_t = f'_t C_{t-1} + i'_t k_t v_t^T,   n_t = f'_t n_{t-1} + i'_t k_t
        h~_t = C_t^T q_t / (max(|n_t . q_t|, exp(-m_t)) + eps),   h_t = o_t * h~_t

    which, in the paper's unstabilised units (``C = exp(m) C'``), is its
    ``h~ = C q / max(|n^T q|, 1)``: the stabiliser changes no value (with ``eps=0``), it only
    keeps every ``exp`` argument ``<= 0``. ``eps`` is the reference code's (NX-AI/xlstm, all
    backends) guard against a zero denominator; ``eps=0`` is the paper's equation exactly.

    Params (input size ``I`` is free: the paper's block feeds the cell ``I = H``):
    ``w_q, w_k, w_v, w_o (I, H)``, ``b_q, b_k, b_v, b_o (H,)``, ``w_i, w_f (I, heads)``,
    ``b_i, b_f (heads,)``; head ``h`` owns columns ``h*d:(h+1)*d``. Initialised as the
    reference code's ``mLSTMCell``: gate weights zero, ``b_i ~ N(0, 0.1)``, ``b_f`` evenly
    from 3 to 6 over the heads; projections ``input_init``, their biases zero. (The reference
    cell computes its gates from ``concat(q, k, v)`` and has no output gate, its block gating
    the output instead; here the paper's cell, gates from ``x_t``.)

    Carry: :class:`MLSTMState` ``(c (heads, d, d), n (heads, d), m (heads,))``, zero at the
    start as in the reference code. Output: ``h_t (H,)``, heads concatenated.

    Whole sequences (``rnnjax.scan``) run the chunkwise-parallel form
    (``rnnjax.cells.xlstm._chunkwise``): chunks of ``chunk_size`` steps in parallel (an
    ``L x L`` decay-weighted attention each), the memory carried between chunks; equal to
    stepping, with masks, ``reverse``, ``reset`` and a given carry. Under ``remat`` BPTT keeps
    the carry once per group of chunks (one chunk for ``True``, ``k // chunk_size`` for an int
    ``k``, ``round(sqrt(T)) // chunk_size`` for ``"sqrt"``, at least one) and recomputes the
    group in the backward pass; ``unroll`` has no effect there.

    Args:
      hidden_size: H, the size of the output and of all heads together.
      num_heads: the number of heads; must divide ``hidden_size``.
      forget_gate: ``"sigmoid"`` (the paper's and the reference code's default) or ``"exp"``.
      eps: added to the normaliser's denominator (see above).
      chunk_size: steps per chunk of the parallel form (memory ~ ``T * chunk_size`` per head).
      input_init: ``(key, shape, dtype) -> array`` for the ``(I, H)`` projections.
      dtype: dtype of the params and the carry.

    >>> import jax, jax.numpy as jnp, rnnjax as rj
    >>> cell = rj.cells.mlstm(8, num_heads=2)
    >>> params = cell.init(jax.random.key(0), 3)
    >>> carry, y = cell.step(params, cell.initial_carry(params), jnp.ones(3))
    >>> carry.c.shape, carry.n.shape, carry.m.shape, y.shape
    ((2, 4, 4), (2, 4), (2,), (8,))
    >>> final, ys = rj.scan(cell, params, jnp.ones((5, 3)))
    >>> bool(jnp.allclose(ys[0], y, atol=1e-6))
    True
    """
    d = head_size("mlstm", hidden_size, num_heads)
    check_forget_gate("mlstm", forget_gate)
    check_size("mlstm", "chunk_size", chunk_size)
    heads = num_heads

    def init(key: jax.Array, input_size: int) -> dict[str, jax.Array]:
        check_size("mlstm.init", "input_size", input_size)
        keys = dict(zip((*_PROJECTIONS, "i"), jax.random.split(key, 5), strict=True))
        params = {}
        for g in _PROJECTIONS:
            params[f"w_{g}"] = input_init(keys[g], (input_size, hidden_size), dtype)
            params[f"b_{g}"] = jnp.zeros((hidden_size,), dtype)
        params["w_i"] = jnp.zeros((input_size, heads), dtype)
        params["b_i"] = 0.1 * jax.random.normal(keys["i"], (heads,), dtype)
        params["w_f"] = jnp.zeros((input_size, heads), dtype)
        params["b_f"] = forget_bias_init(1, heads, dtype)[0]
        return params

    def initial_carry(params) -> MLSTMState:
        dt = params["w_q"].dtype
        return MLSTMState(
            jnp.zeros((heads, d, d), dt), jnp.zeros((heads, d), dt), jnp.zeros((heads,), dt)
        )

    def step(params, carry: MLSTMState, x):
        check_step_input("mlstm", x, params["w_q"].shape[0])
        with jax.named_scope("mlstm"):
            q, k, v, log_i, log_f, o = project(params, x, heads, forget_gate)
            m = jnp.maximum(log_f + carry.m, log_i)
            f = jnp.exp(log_f + carry.m - m)
            i = jnp.exp(log_i - m)
            c = f[:, None, None] * carry.c + i[:, None, None] * k[:, :, None] * v[:, None, :]
            n = f[:, None] * carry.n + i[:, None] * k
            num = jnp.einsum("hd,hde->he", q, c)
            den = jnp.maximum(jnp.abs(jnp.sum(q * n, -1)), jnp.exp(-m)) + eps
            y = o * (num / den[:, None]).reshape(-1)
        return MLSTMState(c, n, m), y

    def sequence(params, xs, carry, real, *, reverse, unroll, remat=False, reset=None):
        del unroll  # the chunk loop has T / chunk_size iterations; nothing to unroll
        size = params["w_q"].shape[0]
        if xs.ndim != 2 or xs.shape[1] != size:
            raise ValueError(
                f"mlstm.sequence expects xs of shape (T, {size}), got {tuple(xs.shape)}: one "
                "example per call (vmap over the batch axis), input_size as at init"
            )
        with jax.named_scope("mlstm"):
            return _chunkwise.run(
                params,
                xs,
                carry,
                real,
                reset,
                project=lambda p, x: project(p, x, heads, forget_gate),
                state=MLSTMState,
                eps=eps,
                chunk_size=chunk_size,
                reverse=reverse,
                remat=remat,
            )

    return Cell(init, initial_carry, step, sequence)
