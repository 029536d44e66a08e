"""Training steps: pure ``(state, batch) -> (state, metrics)`` functions; the caller jits them.

:func:`make_step` is full backpropagation through time over whatever the loss runs;
:func:`tbptt_step` and :func:`tbptt` train over a long stream in chunks (truncated BPTT).
Both clip by global norm when asked and skip any step whose loss or gradient is not finite:
params and optimizer state stay as they were, the step counter and key still advance (the
batch is consumed), and ``metrics["finite"]`` is False.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rnnjax.train.state import TrainState

Metrics = dict[str, jax.Array]


def _check_optimizer(optimizer: Any, where: str) -> None:
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(
            f"{where} expects an optax.GradientTransformation (e.g. optax.adam(1e-3)), "
            f"got {type(optimizer).__name__}"
        )


def _check_clip(clip_norm: Any, where: str) -> None:
    if clip_norm is not None and not (isinstance(clip_norm, int | float) and clip_norm > 0):
        raise ValueError(
            f"{where} expects clip_norm to be None or a positive number, got {clip_norm!r}"
        )


def _apply(optimizer, clip_norm, state: TrainState, key, loss, grads, metrics) -> tuple:
    """Clip, guard against non-finite values, update; return (state, metrics)."""
    grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if clip_norm is not None:
        scale = jnp.minimum(1.0, clip_norm / jnp.maximum(grad_norm, 1e-12))
        grads = jax.tree.map(lambda g: g * scale.astype(g.dtype), grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    keep_old = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
    params = jax.tree.map(keep_old, params, state.params)
    opt_state = jax.tree.map(keep_old, opt_state, state.opt_state)
    new_state = TrainState(params, opt_state, state.step + 1, key, state.carry)
    return new_state, {"loss": loss, "grad_norm": grad_norm, "finite": finite, **metrics}


def _split_output(out: Any, where: str, n: int) -> tuple:
    """Normalise a loss function's output to ``n`` items, the last being a metrics dict."""
    items = tuple(out) if isinstance(out, tuple) else (out,)
    if len(items) == n - 1:
        items = (*items, {})
    if len(items) != n or not isinstance(items[-1], dict) or np.shape(items[0]) != ():
        raise TypeError(
            f"{where}: the loss function must return a scalar loss"
            + (", the new carry" if n == 3 else "")
            + f" and optionally a dict of metrics; got {jax.tree.map(np.shape, out)}"
        )
    return items


def make_step(
    loss_fn: Callable[..., Any],
    optimizer: optax.GradientTransformation,
    *,
    clip_norm: float | None = None,
) -> Callable[[TrainState, Any], tuple[TrainState, Metrics]]:
    """A full-BPTT training step.

    Args:
      loss_fn: ``(params, batch, key) -> loss`` or ``(loss, metrics_dict)``; ``key`` is a fresh
        PRNG key for this step (for dropout), split from ``state.key``.
      optimizer: any optax transformation: weight decay (``optax.adamw``), schedules
        (``optax.adam(optax.cosine_decay_schedule(...))``) and chains work unchanged.
      clip_norm: clip the gradient to this global norm before the optimizer sees it.

    Returns:
      ``step(state, batch) -> (state, metrics)`` with ``metrics`` holding ``loss``,
      ``grad_norm`` (before clipping), ``finite`` and the loss function's own metrics.

    >>> import jax, jax.numpy as jnp, optax
    >>> from rnnjax.train import init_state
    >>> loss = lambda p, batch, key: jnp.sum((p["w"] - batch) ** 2)
    >>> step = jax.jit(make_step(loss, optax.sgd(0.25), clip_norm=10.0))
    >>> state = init_state({"w": jnp.zeros(2)}, optax.sgd(0.25), jax.random.key(0))
    >>> state, metrics = step(state, jnp.ones(2))
    >>> state.params["w"], float(metrics["loss"]), int(state.step)
    (Array([0.5, 0.5], dtype=float32), 2.0, 1)
    """
    _check_optimizer(optimizer, "make_step")
    _check_clip(clip_norm, "make_step")

    def objective(params, batch, key):
        loss, metrics = _split_output(loss_fn(params, batch, key), "make_step", 2)
        return loss, metrics

    def step(state: TrainState, batch: Any) -> tuple[TrainState, Metrics]:
        key, sub = jax.random.split(state.key)
        (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(
            state.params, batch, sub
        )
        return _apply(optimizer, clip_norm, state, key, loss, grads, metrics)

    return step


def tbptt_step(
    loss_fn: Callable[..., Any],
    optimizer: optax.GradientTransformation,
    *,
    clip_norm: float | None = None,
) -> Callable[[TrainState, Any, Any], tuple[TrainState, Any, Metrics]]:
    """One truncated-BPTT update over one chunk of a stream.

    Args:
      loss_fn: ``(params, carry, chunk, key) -> (loss, carry)`` or ``(loss, carry, metrics)``:
        run the model over ``chunk`` starting from ``carry`` and return the carry at its end.
      optimizer, clip_norm: as in :func:`make_step`.

    Returns:
      ``step(state, carry, chunk) -> (state, carry, metrics)``. Gradients stop at the chunk's
      start (the incoming carry is a constant) and the returned carry carries no gradient, so
      the next chunk continues the forward state without backpropagating into this one.
    """
    _check_optimizer(optimizer, "tbptt_step")
    _check_clip(clip_norm, "tbptt_step")

    def objective(params, carry, chunk, key):
        loss, new_carry, metrics = _split_output(
            loss_fn(params, carry, chunk, key), "tbptt_step", 3
        )
        return loss, (new_carry, metrics)

    def step(state: TrainState, carry: Any, chunk: Any):
        key, sub = jax.random.split(state.key)
        carry = jax.lax.stop_gradient(carry)
        (loss, (carry, metrics)), grads = jax.value_and_grad(objective, has_aux=True)(
            state.params, carry, chunk, sub
        )
        state, metrics = _apply(optimizer, clip_norm, state, key, loss, grads, metrics)
        return state, jax.lax.stop_gradient(carry), metrics

    return step


def split_chunks(batch: Any, k: int, *, axis: int = 1) -> Any:
    """Cut every leaf of ``batch`` along the time ``axis`` into chunks of ``k`` steps, stacked
    on a new leading axis: ``(B, T, ...)`` -> ``(T // k, B, k, ...)``. T must divide by k;
    ``k >= T`` gives one chunk of the whole stream.

    >>> split_chunks(jnp.zeros((2, 6, 3)), 2).shape
    (3, 2, 2, 3)
    """
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"split_chunks expects a positive int chunk length k, got {k!r}")

    def cut(leaf):
        leaf = jnp.asarray(leaf)
        steps = leaf.shape[axis]
        size = min(k, steps)
        if steps % size:
            raise ValueError(
                f"split_chunks: a stream of {steps} steps does not divide into chunks of {k}: "
                f"trim it to {steps - steps % k} steps or pick a k that divides {steps}"
            )
        shape = leaf.shape[:axis] + (steps // size, size) + leaf.shape[axis + 1 :]
        return jnp.moveaxis(leaf.reshape(shape), axis, 0)

    return jax.tree.map(cut, batch)


def tbptt(
    step: Callable[[TrainState, Any, Any], tuple[TrainState, Any, Metrics]],
    state: TrainState,
    carry: Any,
    stream: Any,
    k: int,
    *,
    axis: int = 1,
) -> tuple[TrainState, Any, Metrics]:
    """Run ``step`` (from :func:`tbptt_step`) over ``stream`` in chunks of ``k`` steps with
    ``lax.scan``: one optimizer update per chunk, the carry flowing forward between chunks.

    ``stream`` is a pytree of ``(B, T, ...)`` arrays (inputs, targets, and ``reset`` flags where
    a new sequence starts inside a row, for the loss to pass to ``layer.apply(reset=...)``).
    Returns the final state and carry and the per-chunk metrics stacked, ``(T // k,)``. With
    ``k >= T`` there is one chunk, and its update is exactly full BPTT's.
    """
    chunks = split_chunks(stream, k, axis=axis)

    def body(state_carry, chunk):
        state, carry = state_carry
        state, carry, metrics = step(state, carry, chunk)
        return (state, carry), metrics

    (state, carry), metrics = jax.lax.scan(body, (state, carry), chunks)
    return state, carry, metrics


def stream_step(
    step: Callable[[TrainState, Any, Any], tuple[TrainState, Any, Metrics]],
) -> Callable[[TrainState, Any], tuple[TrainState, Metrics]]:
    """Adapt a :func:`tbptt_step` to ``(state, chunk) -> (state, metrics)`` with the carry kept
    in ``state.carry``, so :func:`rnnjax.train.fit` (and its checkpoints) drive a stream: each
    call trains on the next chunk, starting from the carry the previous chunk ended with."""

    def adapted(state: TrainState, chunk: Any) -> tuple[TrainState, Metrics]:
        state, carry, metrics = step(state._replace(carry=None), state.carry, chunk)
        return state._replace(carry=carry), metrics

    return adapted
