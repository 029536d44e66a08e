"""The LSTM cell (Hochreiter & Schmidhuber 1997, with forget gate), PyTorch's layout."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from rnnjax.cells._common import (
    Initializer,
    check_fused,
    check_size,
    default_bias_init,
    default_input_init,
    default_recurrent_init,
    gate_blocks,
)
from rnnjax.cells._fused import lstm_sequence
from rnnjax.core import Cell, check_step_input


class LSTMState(NamedTuple):
    """The LSTM carry: hidden state ``h (H,)`` and cell state ``c (H,)``."""

    h: jax.Array
    c: jax.Array


def lstm(
    hidden_size: int,
    *,
    forget_bias: float = 1.0,
    input_init: Initializer = default_input_init,
    recurrent_init: Initializer = default_recurrent_init,
    bias_init: Initializer = default_bias_init,
    dtype: jnp.dtype = jnp.float32,
    fused: bool = False,
) -> Cell:
    """An LSTM cell, PyTorch's ``nn.LSTM`` step.

    Params: ``w_i (I, 4H)``, ``w_h (H, 4H)``, ``b (4H,)`` with gates fused in the order
    i, f, g, o. Carry: ``LSTMState(h, c)``. Output: ``h``. PyTorch's ``weight_ih_l0`` is
    ``w_i.T``, ``weight_hh_l0`` is ``w_h.T`` and ``b = bias_ih_l0 + bias_hh_l0``.

    Args:
      hidden_size: H.
      forget_bias: added to the forget gate's bias at init (Jozefowicz et al. 2015), on top of
        ``bias_init``.
      input_init, recurrent_init, bias_init: ``(key, shape, dtype) -> array`` initializers; the
        weight initializers are called once per gate block of shape ``(I, H)`` / ``(H, H)``.
      dtype: dtype of the params and the initial carry.
      fused: attach the whole-sequence fast path (``rnnjax.cells._fused``): same values and
        derivatives, with the weight-gradient matmuls moved out of the BPTT loop. Off by
        default because on CPU it measured slower than the step scan (BENCHMARKS.md).

    >>> import jax, jax.numpy as jnp, rnnjax as rj
    >>> cell = rj.cells.lstm(4)
    >>> params = cell.init(jax.random.key(0), 3)
    >>> carry, y = cell.step(params, cell.initial_carry(params), jnp.ones(3))
    >>> carry.c.shape, y.shape, params["b"][4:8]
    ((4,), (4,), Array([1., 1., 1., 1.], dtype=float32))
    """
    check_size("lstm", "hidden_size", hidden_size)
    hs = hidden_size

    def init(key: jax.Array, input_size: int) -> dict[str, jax.Array]:
        check_size("lstm.init", "input_size", input_size)
        ki, kh, kb = jax.random.split(key, 3)
        b = bias_init(kb, (4 * hs,), dtype)
        return {
            "w_i": gate_blocks(ki, input_init, input_size, hs, 4, dtype),
            "w_h": gate_blocks(kh, recurrent_init, hs, hs, 4, dtype),
            "b": b.at[hs : 2 * hs].add(jnp.asarray(forget_bias, dtype)),
        }

    def initial_carry(params: dict[str, jax.Array]) -> LSTMState:
        z = jnp.zeros(params["w_h"].shape[:1], params["w_h"].dtype)
        return LSTMState(z, z)

    def step(params, carry: LSTMState, x, *, recurrent_mask=None):
        check_step_input("lstm", x, params["w_i"].shape[0])
        with jax.named_scope("lstm"):
            h_in = carry.h if recurrent_mask is None else carry.h * recurrent_mask
            z = x @ params["w_i"] + h_in @ params["w_h"] + params["b"]
            i, f, g, o = jnp.split(z, 4, axis=-1)
            c = jax.nn.sigmoid(f) * carry.c + jax.nn.sigmoid(i) * jnp.tanh(g)
            h = jax.nn.sigmoid(o) * jnp.tanh(c)
        return LSTMState(h, c), h

    return Cell(init, initial_carry, step, lstm_sequence if check_fused(fused) else None)
