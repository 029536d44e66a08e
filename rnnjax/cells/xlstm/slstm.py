"""The sLSTM cell of xLSTM (Beck et al. 2024, arXiv 2405.04517): a scalar memory with
exponential gating, a normaliser and a stabiliser state, and block-diagonal (per head)
recurrent weights."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from rnnjax.cells._common import (
    Initializer,
    check_size,
    default_input_init,
    default_recurrent_init,
    gate_blocks,
)
from rnnjax.cells.xlstm._heads import (
    check_forget_gate,
    forget_bias_init,
    head_size,
    log_forget,
)
from rnnjax.core import Cell, check_step_input


class SLSTMState(NamedTuple):
    """The sLSTM carry, each ``(H,)``: hidden state ``h``, stabilised cell state ``c`` and
    normaliser ``n`` (the paper's are ``exp(m) * c`` and ``exp(m) * n``) and the stabiliser
    ``m``, ``-inf`` at the start (nothing stored yet: the first step's ``m`` is its ``i~``)."""

    h: jax.Array
    c: jax.Array
    n: jax.Array
    m: jax.Array


def _recurrence(params, carry: SLSTMState, wx, forget_gate: str, recurrent_mask=None):
    """One step from the input's share of the pre-activations ``wx = x W (4H,)``."""
    b = params["b"]
    heads, d = b.shape[0], b.shape[2]
    h = carry.h if recurrent_mask is None else carry.h * recurrent_mask
    # Per head (d,) @ (d, 4, d) -> (4, heads, d): gate-major, as the input's columns.
    w_h = params["w_h"].reshape(heads, d, 4, d)
    ry = jnp.einsum("hk,hkgj->ghj", h.reshape(heads, d), w_h)
    pre = wx.reshape(4, heads, d) + ry + jnp.swapaxes(b, 0, 1)
    i_pre, f_pre, z_pre, o_pre = (a.reshape(-1) for a in pre)
    log_f = log_forget(forget_gate, f_pre)
    m = jnp.maximum(log_f + carry.m, i_pre)
    i = jnp.exp(i_pre - m)
    f = jnp.exp(log_f + carry.m - m)
    c = f * carry.c + i * jnp.tanh(z_pre)
    n = f * carry.n + i
    h = jax.nn.sigmoid(o_pre) * c / n
    return SLSTMState(h, c, n, m), h


def slstm(
    hidden_size: int,
    num_heads: int = 1,
    *,
    forget_gate: str = "sigmoid",
    input_init: Initializer = default_input_init,
    recurrent_init: Initializer = default_recurrent_init,
    dtype: jnp.dtype = jnp.float32,
) -> Cell:
    """An sLSTM cell, the paper's equations (7)-(17) with its stabiliser, for ``x_t (I,)``:

        [i~, f~, z~, o~]_t = x_t W + R h_{t-1} + b     R block-diagonal, one block per head
        log f_t = log sigmoid(f~_t)    (forget_gate="sigmoid"; "exp": log f_t = f~_t)
        m_t = max(log f_t + m_{t-1}, i~_t)                             the stabiliser
        i'_t = exp(i~_t - m_t),   f'_t = exp(log f_t + m_{t-1} - m_t)
        c_t = f'_t c_{t-1} + i'_t tanh(z~_t),   n_t = f'_t n_{t-1} + i'_t
        h_t = sigmoid(o~_t) * c_t / n_t

    The input gate is ``exp(i~)``; the stabiliser rescales ``c`` and ``n`` alike, so
    ``h = o c / n`` is the paper's unstabilised value while every ``exp`` argument is
    ``<= 0``. Heads mix only through the input weights: head ``h``'s units
    ``h*d:(h+1)*d`` (``d = H / num_heads``) see only their own previous ``h``.

    Params, in NX-AI/xlstm's layouts (its ``sLSTMCell``'s ``recurrent_kernel (heads, d, 4, d)``
    loads as ``recurrent_kernel.reshape(H, 4, d)``, ``bias`` unchanged): ``w_i (I, 4H)``,
    columns gate-major (i, f, z, o), each gate's ``H`` columns head by head (the reference
    cell's input, ``concat([i, f, z, o])`` of its layer's projections); ``w_h (H, 4, d)``,
    ``w_h[u, g, j]`` the weight from unit ``u`` of head ``u // d`` to unit ``j`` of that head's
    gate ``g`` (so its first axis is the size of ``h``, as the other cells' ``w_h``);
    ``b (heads, 4, d)``.
    Forget-gate biases start evenly from 3 to 6 within each head (the reference code's
    ``small_init``), the rest at zero; each ``(d, d)`` recurrent block is ``recurrent_init``-ed
    on its own. Carry: :class:`SLSTMState` ``(h, c, n, m)``. Output: ``h``. ``step`` takes
    ``recurrent_mask= (H,)`` (recurrent dropout), multiplied into ``h_{t-1}`` where it meets R.

    Not parallel over time (``R h_{t-1}`` sits inside the gates): a whole sequence is the
    ``lax.scan`` of ``step``. (A ``sequence`` computing ``x_t W`` for all steps in one matmul
    before the loop measured 1.2x slower than the step scan on CPU, forward and backward, at
    B=16, T=512, I=H=256, four heads.)

    Args:
      hidden_size: H.
      num_heads: the number of diagonal blocks of R; must divide ``hidden_size``.
      forget_gate: ``"sigmoid"`` (the paper's and the reference code's default) or ``"exp"``.
      input_init, recurrent_init: ``(key, shape, dtype) -> array`` for each gate's input block
        ``(I, H)`` and each head's recurrent block ``(d, d)``.
      dtype: dtype of the params and the carry.

    >>> import jax, jax.numpy as jnp, rnnjax as rj
    >>> cell = rj.cells.slstm(8, num_heads=2)
    >>> params = cell.init(jax.random.key(0), 3)
    >>> params["w_i"].shape, params["w_h"].shape, params["b"].shape
    ((3, 32), (8, 4, 4), (2, 4, 4))
    >>> carry, y = cell.step(params, cell.initial_carry(params), jnp.ones(3))
    >>> y.shape, bool(jnp.all(carry.n == 1.0))
    ((8,), True)
    """
    d = head_size("slstm", hidden_size, num_heads)
    check_forget_gate("slstm", forget_gate)
    heads = num_heads

    def init(key: jax.Array, input_size: int) -> dict[str, jax.Array]:
        check_size("slstm.init", "input_size", input_size)
        ki, kh = jax.random.split(key)
        blocks = [
            gate_blocks(k, recurrent_init, d, d, 4, dtype) for k in jax.random.split(kh, heads)
        ]
        b = jnp.zeros((heads, 4, d), dtype).at[:, 1].set(forget_bias_init(heads, d, dtype))
        return {
            "w_i": gate_blocks(ki, input_init, input_size, hidden_size, 4, dtype),
            "w_h": jnp.concatenate(blocks).reshape(hidden_size, 4, d),
            "b": b,
        }

    def initial_carry(params) -> SLSTMState:
        zeros = jnp.zeros(params["w_h"].shape[:1], params["w_h"].dtype)
        return SLSTMState(zeros, zeros, zeros, jnp.full_like(zeros, -jnp.inf))

    def step(params, carry: SLSTMState, x, *, recurrent_mask=None):
        check_step_input("slstm", x, params["w_i"].shape[0])
        with jax.named_scope("slstm"):
            return _recurrence(params, carry, x @ params["w_i"], forget_gate, recurrent_mask)

    return Cell(init, initial_carry, step)
