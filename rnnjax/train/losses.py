"""Losses for the three shapes of sequence problem, averaged over real steps only.

Shapes follow the batch: ``(B, T, ...)`` per-step values with ``lengths (B,)`` or a ``mask
(B, T)``; a single example (``(T, ...)`` with a scalar length) works the same way. The mean is
over every real step in the batch (a token-level mean), so padding never counts and long
sequences weigh by their length.

- many-to-one: pick the output at each sequence's last real step with :func:`last_step`, then
  :func:`cross_entropy` / :func:`mse` on ``(B, ...)``.
- many-to-many: :func:`cross_entropy` / :func:`mse` on ``(B, T, ...)`` with ``lengths``.
- language modelling: :func:`next_token_cross_entropy`, outputs at t predict the token at t+1.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax


def length_mask(lengths: jax.typing.ArrayLike, steps: int) -> jax.Array:
    """``mask[..., t] = t < lengths[...]``: ``(B,)`` lengths give a ``(B, T)`` mask.

    >>> length_mask(jnp.array([2, 0]), 3)
    Array([[ True,  True, False],
           [False, False, False]], dtype=bool)
    """
    return jnp.arange(steps) < jnp.asarray(lengths)[..., None]


def _real(target_shape: tuple[int, ...], lengths: Any, mask: Any, where: str) -> jax.Array | None:
    """The mask of real entries, shaped like the leading axes of ``target_shape``."""
    if lengths is not None and mask is not None:
        raise ValueError(f"{where} takes lengths= or mask=, not both")
    if lengths is not None:
        n = np.ndim(lengths)
        if len(target_shape) < n + 1 or tuple(np.shape(lengths)) != target_shape[:n]:
            raise ValueError(
                f"{where} expects lengths of shape {target_shape[:1] if target_shape else ()} "
                f"for targets of shape {target_shape} (batch, time, ...), got "
                f"{tuple(np.shape(lengths))}"
            )
        return length_mask(lengths, target_shape[n])
    if mask is not None:
        m_shape = tuple(np.shape(mask))
        if m_shape != target_shape[: len(m_shape)]:
            raise ValueError(
                f"{where} expects a mask matching the leading axes of targets {target_shape}, "
                f"got {m_shape}"
            )
        return jnp.asarray(mask, bool)
    return None


def masked_mean(values: jax.Array, real: jax.Array | None) -> jax.Array:
    """Mean of ``values`` over entries where ``real`` (broadcast on trailing axes) is True;
    0 when nothing is real, with zero gradient."""
    if real is None:
        return jnp.mean(values)
    real = jnp.reshape(real, real.shape + (1,) * (values.ndim - real.ndim))
    weights = jnp.broadcast_to(real, values.shape).astype(values.dtype)
    return jnp.sum(jnp.where(real, values, 0)) / jnp.maximum(jnp.sum(weights), 1)


def cross_entropy(
    logits: jax.Array, labels: jax.Array, *, lengths: Any = None, mask: Any = None
) -> jax.Array:
    """Softmax cross-entropy with integer labels, mean over real entries (nats).

    ``logits (..., C)``, ``labels (...)``; ``lengths`` / ``mask`` select real time steps.

    >>> logits = jnp.array([[[0.0, 5.0], [9.0, -9.0]]])  # (B=1, T=2, C=2)
    >>> round(float(cross_entropy(logits, jnp.array([[1, 1]]), lengths=jnp.array([1]))), 4)
    0.0067
    """
    if logits.shape[:-1] != jnp.shape(labels):
        raise ValueError(
            f"cross_entropy expects labels of shape {logits.shape[:-1]} for logits of shape "
            f"{logits.shape}, got {jnp.shape(labels)}"
        )
    real = _real(jnp.shape(labels), lengths, mask, "cross_entropy")
    values = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return masked_mean(values, real)


def accuracy(
    logits: jax.Array, labels: jax.Array, *, lengths: Any = None, mask: Any = None
) -> jax.Array:
    """Fraction of real entries where ``argmax(logits) == labels``."""
    real = _real(jnp.shape(labels), lengths, mask, "accuracy")
    return masked_mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32), real)


def mse(pred: jax.Array, target: jax.Array, *, lengths: Any = None, mask: Any = None) -> jax.Array:
    """Mean squared error over real steps (and all feature axes).

    >>> pred, target = jnp.zeros((1, 3, 1)), jnp.array([[[1.0], [2.0], [100.0]]])
    >>> float(mse(pred, target, lengths=jnp.array([2])))
    2.5
    """
    if jnp.shape(pred) != jnp.shape(target):
        raise ValueError(
            f"mse expects pred and target of one shape, got {pred.shape} and {target.shape}"
        )
    real = _real(jnp.shape(target), lengths, mask, "mse")
    return masked_mean(jnp.square(pred - target), real)


def last_step(ys: jax.Array, lengths: jax.typing.ArrayLike) -> jax.Array:
    """The output at each sequence's last real step: ``ys (B, T, ...)``, ``lengths (B,)`` ->
    ``(B, ...)`` (zeros where a length is 0). The many-to-one readout; for a single layer the
    final carry holds the same value.

    >>> ys = jnp.arange(6.0).reshape(2, 3, 1)
    >>> last_step(ys, jnp.array([2, 0]))[:, 0]
    Array([1., 0.], dtype=float32)
    """
    lengths = jnp.asarray(lengths)
    if lengths.shape != ys.shape[: lengths.ndim]:
        raise ValueError(f"last_step expects lengths of shape {ys.shape[:1]}, got {lengths.shape}")
    index = jnp.clip(lengths - 1, 0, ys.shape[lengths.ndim] - 1)
    picked = jnp.take_along_axis(
        ys, jnp.reshape(index, index.shape + (1,) * (ys.ndim - index.ndim)), axis=index.ndim
    )
    picked = jnp.squeeze(picked, axis=index.ndim)
    return jnp.where(
        jnp.reshape(lengths > 0, index.shape + (1,) * (picked.ndim - index.ndim)), picked, 0
    )


def next_token_cross_entropy(
    logits: jax.Array, tokens: jax.Array, *, lengths: Any = None
) -> jax.Array:
    """Language-model loss: the logits at step t predict ``tokens[t + 1]``.

    ``logits (B, T, V)``, ``tokens (B, T)``; with ``lengths`` the pairs reaching past the last
    real token do not count. For truncated BPTT over a stream, where the next chunk's first
    token is the target of this chunk's last step, pass inputs and targets explicitly to
    :func:`cross_entropy` instead.
    """
    if logits.shape[:-1] != jnp.shape(tokens):
        raise ValueError(
            f"next_token_cross_entropy expects tokens of shape {logits.shape[:-1]}, "
            f"got {jnp.shape(tokens)}"
        )
    time_axis = jnp.ndim(tokens) - 1
    steps = jnp.shape(tokens)[time_axis]
    inputs = jax.lax.slice_in_dim(logits, 0, steps - 1, axis=time_axis)
    targets = jax.lax.slice_in_dim(tokens, 1, steps, axis=time_axis)
    pair_lengths = None if lengths is None else jnp.maximum(jnp.asarray(lengths) - 1, 0)
    return cross_entropy(inputs, targets, lengths=pair_lengths)
