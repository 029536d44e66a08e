"""The Elman (simple, vanilla) RNN: ``h_t = f(x_t W_i + h_{t-1} W_h + b)``."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from rnnjax.cells import _fused
from rnnjax.cells._common import (
    Initializer,
    check_compute_dtype,
    check_fused,
    check_size,
    default_bias_init,
    default_input_init,
    default_recurrent_init,
    gate_blocks,
    matmul,
)
from rnnjax.core import Cell, check_option, check_step_input

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "tanh": jnp.tanh,
    "relu": jax.nn.relu,
}


def elman(
    hidden_size: int,
    *,
    activation: str | Callable[[jax.Array], jax.Array] = "tanh",
    input_init: Initializer = default_input_init,
    recurrent_init: Initializer = default_recurrent_init,
    bias_init: Initializer = default_bias_init,
    dtype: jnp.dtype = jnp.float32,
    compute_dtype: jnp.dtype | None = None,
    fused: bool = False,
) -> Cell:
    """An Elman RNN cell, PyTorch's ``nn.RNN`` step.

    Params: ``w_i (I, H)``, ``w_h (H, H)``, ``b (H,)``. Carry: ``h (H,)``. Output: ``h``.
    PyTorch's ``weight_ih_l0`` is ``w_i.T``, ``weight_hh_l0`` is ``w_h.T`` and
    ``b = bias_ih_l0 + bias_hh_l0``.

    Args:
      hidden_size: H.
      activation: ``"tanh"``, ``"relu"`` or any elementwise function.
      input_init, recurrent_init, bias_init: ``(key, shape, dtype) -> array`` initializers.
      dtype: dtype of the params and the initial carry.
      compute_dtype: run the matmuls in this dtype (e.g. ``jnp.bfloat16``), accumulating in
        ``dtype``; see :func:`rnnjax.cells.lstm`.
      fused: attach the whole-sequence fast path (``rnnjax.cells._fused``): same values and
        derivatives, with the weight-gradient matmuls moved out of the BPTT loop. Off by
        default because on CPU it measured slower than the step scan (BENCHMARKS.md).

    >>> import jax, jax.numpy as jnp, rnnjax as rj
    >>> cell = rj.cells.elman(4)
    >>> params = cell.init(jax.random.key(0), 3)
    >>> h, y = cell.step(params, cell.initial_carry(params), jnp.ones(3))
    >>> h.shape, y.shape
    ((4,), (4,))
    """
    check_size("elman", "hidden_size", hidden_size)
    if isinstance(activation, str):
        check_option("elman activation", activation, ACTIVATIONS)
        act = ACTIVATIONS[activation]
    elif callable(activation):
        act = activation
    else:
        raise TypeError(
            f"elman activation must be 'tanh', 'relu' or a function, got {activation!r}"
        )

    def init(key: jax.Array, input_size: int) -> dict[str, jax.Array]:
        check_size("elman.init", "input_size", input_size)
        ki, kh, kb = jax.random.split(key, 3)
        return {
            "w_i": gate_blocks(ki, input_init, input_size, hidden_size, 1, dtype),
            "w_h": gate_blocks(kh, recurrent_init, hidden_size, hidden_size, 1, dtype),
            "b": bias_init(kb, (hidden_size,), dtype),
        }

    def initial_carry(params: dict[str, jax.Array]) -> jax.Array:
        return jnp.zeros(params["w_h"].shape[:1], params["w_h"].dtype)

    def step(params, h, x, *, recurrent_mask=None):
        check_step_input("elman", x, params["w_i"].shape[0])
        with jax.named_scope("elman"):
            h_in = h if recurrent_mask is None else h * recurrent_mask
            z = matmul(x, params["w_i"], compute_dtype) + matmul(h_in, params["w_h"], compute_dtype)
            h = act(z + params["b"])
        return h, h

    compute_dtype = check_compute_dtype("elman", compute_dtype, check_fused(fused))
    sequence = _fused.elman_sequence(_fused.elman_kernel(act)) if fused else None
    return Cell(init, initial_carry, step, sequence)
