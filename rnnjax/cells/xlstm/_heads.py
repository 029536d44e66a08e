"""What the xLSTM cells share: the head split, the forget gate's log and the option checks."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rnnjax.cells._common import check_size
from rnnjax.core import check_option

FORGET_GATES = ("sigmoid", "exp")


def head_size(cell_name: str, hidden_size: int, num_heads: int) -> int:
    """``hidden_size // num_heads`` after checking both, with a message that names the fix."""
    check_size(cell_name, "hidden_size", hidden_size)
    check_size(cell_name, "num_heads", num_heads)
    if hidden_size % num_heads:
        divisors = [k for k in range(1, hidden_size + 1) if hidden_size % k == 0]
        raise ValueError(
            f"{cell_name} expects hidden_size divisible by num_heads, got hidden_size="
            f"{hidden_size} and num_heads={num_heads}: each head holds hidden_size / num_heads "
            f"units; use num_heads in {divisors} or another hidden_size"
        )
    return hidden_size // num_heads


def check_forget_gate(cell_name: str, forget_gate: str) -> None:
    check_option(f"{cell_name} forget_gate", forget_gate, FORGET_GATES)


def log_forget(forget_gate: str, f_pre: jax.Array) -> jax.Array:
    """``log f_t``: ``log sigmoid(f~)`` (the paper's and the reference code's default) or ``f~``
    itself for the exponential forget gate ``f_t = exp(f~)``."""
    return jax.nn.log_sigmoid(f_pre) if forget_gate == "sigmoid" else f_pre


def forget_bias_init(rows: int, cols: int, dtype) -> jax.Array:
    """The reference code's forget-gate bias (its ``bias_linspace_init_`` / ``small_init``):
    evenly spaced from 3 to 6 along the last axis, ``(rows, cols)``, so gates start mostly
    open with a spread of memory lengths."""
    return jnp.broadcast_to(jnp.linspace(3.0, 6.0, cols, dtype=dtype), (rows, cols))
