"""One-to-many generation: feed each sampled token back in, as one jitted ``lax.scan``.

The model is any ``apply(params, tokens, carry) -> (carry, logits)`` over one sequence,
``tokens (T,)`` int and ``logits (T, V)``, e.g. an embedding, a stack of recurrent layers and a
dense readout. A prompt warms the carry (one scan over it); then each step runs the model on the
one token it just sampled.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Apply = Callable[[Any, jax.Array, Any], tuple[Any, jax.Array]]


def filter_logits(
    logits: jax.Array, *, temperature: float = 1.0, top_k: int | None = None, top_p: float = 1.0
) -> jax.Array:
    """Logits ``(..., V)`` scaled by ``1 / temperature`` with everything outside the ``top_k``
    most likely tokens and outside the nucleus of probability ``top_p`` set to ``-inf``.

    >>> filter_logits(jnp.log(jnp.array([0.5, 0.3, 0.2])), top_p=0.6).tolist()[2]
    -inf
    """
    logits = logits / temperature
    if top_k is not None:
        kth = jnp.sort(logits, axis=-1)[..., -top_k, None]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        ranked = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(ranked, axis=-1)
        # Keep a token if the tokens ranked above it hold less than top_p (the first always).
        outside = jnp.cumsum(probs, axis=-1) - probs >= top_p
        ranked = jnp.where(outside, -jnp.inf, ranked)
        logits = jnp.put_along_axis(logits, order, ranked, axis=-1, inplace=False)
    return logits


def check_sampling(temperature: float, top_k: int | None, top_p: float) -> None:
    """Raise ValueError for sampling settings that make no sense."""
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


@functools.partial(jax.jit, static_argnames=("apply", "length", "top_k", "top_p", "greedy"))
def _sample(apply, params, carry, prompt, key, temperature, *, length, top_k, top_p, greedy):
    carry, logits = apply(params, prompt, carry)

    def body(state, k):
        carry, last = state
        if greedy:
            token = jnp.argmax(last, axis=-1)
        else:
            filtered = filter_logits(last, temperature=temperature, top_k=top_k, top_p=top_p)
            token = jax.random.categorical(k, filtered, axis=-1)
        carry, logits = apply(params, token[None].astype(prompt.dtype), carry)
        return (carry, logits[0]), token

    (carry, _), tokens = jax.lax.scan(body, (carry, logits[-1]), jax.random.split(key, length))
    return tokens, carry


def sample(
    apply: Apply,
    params: Any,
    prompt: jax.typing.ArrayLike,
    length: int,
    *,
    key: jax.Array,
    carry: Any = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
) -> jax.Array:
    """Sample ``length`` tokens following ``prompt``.

    Args:
      apply: ``(params, tokens (T,), carry) -> (carry, logits (T, V))``; ``carry=None`` starts
        from the model's initial state. Keep one function object per model: it is the jit
        cache key.
      prompt: ``(P,)`` int tokens, ``P >= 1``, run through the model first to warm the carry.
      key: PRNG key; the same key gives the same text.
      temperature: divides the logits; ``0`` means greedy (argmax, no randomness).
      top_k, top_p: sample only among the k most likely tokens / the smallest set holding
        probability ``top_p`` (nucleus sampling).

    Returns:
      ``(length,)`` int tokens.

    >>> import rnnjax as rj
    >>> V = 5
    >>> model = rj.layers.stack(rj.layers.rnn(rj.cells.gru(8)), rj.layers.dense(V))
    >>> params = model.init(jax.random.key(0), V)
    >>> apply = lambda p, t, c: model.apply(p, jax.nn.one_hot(t, V), carry=c)
    >>> out = sample(apply, params, jnp.array([1, 2]), 6, key=jax.random.key(1), top_k=3)
    >>> out.shape, bool((out == sample(apply, params, jnp.array([1, 2]), 6,
    ...                                key=jax.random.key(1), top_k=3)).all())
    ((6,), True)
    """
    check_sampling(temperature, top_k, top_p)
    prompt = jnp.asarray(prompt)
    if prompt.ndim != 1 or prompt.shape[0] < 1 or not jnp.issubdtype(prompt.dtype, jnp.integer):
        raise ValueError(
            f"sample expects a prompt of shape (P,) int with P >= 1, got "
            f"{prompt.dtype}{np.shape(prompt)}"
        )
    if not isinstance(length, int) or length < 0:
        raise ValueError(f"sample expects length >= 0, got {length!r}")
    tokens, _ = _sample(
        apply, params, carry, prompt, key, jnp.float32(max(temperature, 1e-6)),
        length=length, top_k=top_k, top_p=float(top_p), greedy=temperature == 0,
    )  # fmt: skip
    return tokens
