"""The training state: everything a run needs to continue exactly where it stopped."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class TrainState(NamedTuple):
    """A pytree of the whole training state.

    Attributes:
      params: the model's params.
      opt_state: the optax optimizer state.
      step: int32 scalar, the number of steps taken (and so the data position: batches are
        addressed by step, see :func:`rnnjax.train.fit`).
      key: a typed PRNG key (``jax.random.key``), split once per step for dropout.
      carry: the recurrent state carried from one step to the next in truncated BPTT over a
        stream (None otherwise); part of the state so a resumed run continues the stream.
    """

    params: Any
    opt_state: Any
    step: jax.Array
    key: jax.Array
    carry: Any = None


def init_state(
    params: Any, optimizer: optax.GradientTransformation, key: jax.Array, carry: Any = None
) -> TrainState:
    """A fresh :class:`TrainState` at step 0.

    >>> import jax, jax.numpy as jnp, optax
    >>> state = init_state({"w": jnp.zeros(2)}, optax.adam(1e-3), jax.random.key(0))
    >>> int(state.step)
    0
    """
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(
            f"init_state expects an optax.GradientTransformation, got {type(optimizer).__name__}"
        )
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        raise TypeError(
            f"init_state expects a typed PRNG key from jax.random.key(seed), got dtype "
            f"{key.dtype}: use jax.random.key rather than the legacy jax.random.PRNGKey"
        )
    return TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32), key, carry)
