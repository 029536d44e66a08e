"""Generated sequence tasks: nothing to download, every batch a pure function of a key."""

from __future__ import annotations

import jax
import jax.numpy as jnp

#: MSE of always predicting 1 on the adding problem: the variance of a sum of two U(0, 1).
ADDING_BASELINE_MSE = 1.0 / 6.0


def adding(key: jax.Array, batch_size: int, length: int) -> tuple[jax.Array, jax.Array]:
    """The adding problem (Hochreiter & Schmidhuber 1997): ``xs (B, T, 2)``, ``targets (B,)``.

    Channel 0 holds U(0, 1) values; channel 1 marks two positions, one in each half of the
    sequence. The target is the sum of the two marked values, so a model must remember a value
    for up to T steps. Predicting 1 always scores an MSE of 1/6 (``ADDING_BASELINE_MSE``).

    >>> xs, ys = adding(jax.random.key(0), 4, 10)
    >>> xs.shape, ys.shape, xs[..., 1].sum(axis=1).tolist()
    ((4, 10, 2), (4,), [2.0, 2.0, 2.0, 2.0])
    """
    if length < 2:
        raise ValueError(f"adding needs length >= 2 (one marker per half), got {length}")
    k_v, k_a, k_b = jax.random.split(key, 3)
    values = jax.random.uniform(k_v, (batch_size, length))
    half = length // 2
    first = jax.random.randint(k_a, (batch_size,), 0, half)
    second = jax.random.randint(k_b, (batch_size,), half, length)
    positions = jnp.arange(length)
    marks = (positions == first[:, None]) | (positions == second[:, None])
    xs = jnp.stack([values, marks.astype(values.dtype)], axis=-1)
    return xs, jnp.sum(jnp.where(marks, values, 0.0), axis=1)
