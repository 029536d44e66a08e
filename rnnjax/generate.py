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


# ----------------------------------------------------------------------------- decoding

Step = Callable[[Any, Any, jax.Array], tuple[Any, jax.Array]]


def _check_decode(where: str, max_len: Any, start_token: Any) -> None:
    if not isinstance(max_len, int) or max_len < 1:
        raise ValueError(f"{where} expects max_len to be an int >= 1, got {max_len!r}")
    if np.ndim(start_token) != 0:
        raise ValueError(
            f"{where} decodes one example: start_token must be a scalar, got shape "
            f"{np.shape(start_token)}; vmap over the batch axis"
        )


def greedy_decode(
    step: Step,
    params: Any,
    carry: Any,
    start_token: jax.typing.ArrayLike,
    max_len: int,
    *,
    end_token: jax.typing.ArrayLike | None = None,
) -> jax.Array:
    """Decode one example by always taking the most likely next token.

    Args:
      step: one decoder step for ONE example, ``(params, carry, token ()) -> (carry,
        logits (V,))``; in an encoder-decoder ``carry`` starts from the encoder's summary.
      carry: the decoder's starting carry.
      start_token: the first input token.
      max_len: the number of tokens to produce (static).
      end_token: once produced, every later token is ``end_token`` (as in
        :func:`beam_search`, so the two agree at ``beam_size=1``); None runs on regardless.

    Returns:
      ``(max_len,)`` int32 tokens, the first one produced after ``start_token``. Runs as one
      ``lax.scan``: jit it (``step`` static) and vmap it over a batch as you like.

    >>> table = jnp.log(jnp.array([[0.1, 0.6, 0.3], [0.1, 0.1, 0.8], [0.7, 0.2, 0.1]]))
    >>> step = lambda p, c, token: (c, p[token])   # the next token's logits depend on the last
    >>> greedy_decode(step, table, None, 0, 4).tolist()
    [1, 2, 0, 1]
    """
    _check_decode("greedy_decode", max_len, start_token)
    end = None if end_token is None else jnp.asarray(end_token, jnp.int32)

    def body(state, _):
        carry, token, done = state
        carry, logits = step(params, carry, token)
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        if end is not None:
            token = jnp.where(done, end, token)
            done = done | (token == end)
        return (carry, token, done), token

    start = (carry, jnp.asarray(start_token, jnp.int32), jnp.bool_(False))
    _, tokens = jax.lax.scan(body, start, None, length=max_len)
    return tokens


def beam_search(
    step: Step,
    params: Any,
    carry: Any,
    start_token: jax.typing.ArrayLike,
    end_token: jax.typing.ArrayLike,
    max_len: int,
    beam_size: int,
    *,
    length_penalty: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
    """Decode one example with beam search: keep the ``beam_size`` best partial sequences.

    At each of ``max_len`` steps every live hypothesis is extended by every token (``step`` is
    vmapped over the beam), and the ``beam_size`` extensions with the highest summed log-prob
    survive. A hypothesis that has produced ``end_token`` is finished: it is frozen (its only
    extension is ``end_token`` again, at no cost) but keeps competing for a place in the beam.
    The final pick is the hypothesis with the best ``score / length ** length_penalty``, where
    ``length`` counts its tokens up to and including the first ``end_token`` (``max_len`` if it
    never ended): ``0`` ranks by total log-prob, ``1`` by mean log-prob per token (the default;
    without it beam search prefers sequences that stop early).

    Args:
      step: one decoder step for ONE example, ``(params, carry, token ()) -> (carry,
        logits (V,))``.
      carry: the decoder's starting carry (one example; it is copied to every hypothesis).
      start_token, end_token: the first input token and the token that ends a sequence.
      max_len: the number of tokens to produce (static).
      beam_size: hypotheses kept (static); ``1`` is :func:`greedy_decode` with ``end_token``.
      length_penalty: the exponent of the length normalisation of the final pick.

    Returns:
      ``(tokens (max_len,) int32, score ())``: the best hypothesis, padded with ``end_token``
      after it ends, and its summed log-prob (up to and including its first ``end_token``).

    >>> table = jnp.log(jnp.array([[0.1, 0.6, 0.3], [0.1, 0.1, 0.8], [0.7, 0.2, 0.1]]))
    >>> step = lambda p, c, token: (c, p[token])
    >>> tokens, score = beam_search(step, table, None, 0, 2, 3, 2, length_penalty=0.0)
    >>> tokens.tolist(), round(float(jnp.exp(score)), 2)   # 1 then 2 (the end): 0.6 * 0.8
    ([1, 2, 2], 0.48)
    """
    _check_decode("beam_search", max_len, start_token)
    if not isinstance(beam_size, int) or beam_size < 1:
        raise ValueError(f"beam_search expects beam_size to be an int >= 1, got {beam_size!r}")
    end = jnp.asarray(end_token, jnp.int32)
    K = beam_size
    step_beam = jax.vmap(step, in_axes=(None, 0, 0))
    carries = jax.tree.map(lambda a: jnp.broadcast_to(a, (K, *jnp.shape(a))), carry)
    # Only hypothesis 0 is alive at the start: the others would be copies of it.
    scores = jnp.full((K,), -jnp.inf).at[0].set(0.0)
    init = (
        carries,
        jnp.full((K,), start_token, jnp.int32),  # each hypothesis' last token
        scores,
        jnp.zeros((K,), bool),  # finished
        jnp.zeros((K,), jnp.int32),  # tokens up to and including the first end_token
        jnp.zeros((K, max_len), jnp.int32),  # the sequences so far
    )

    def body(t, state):
        carries, last, scores, finished, lengths, seqs = state
        carries, logits = step_beam(params, carries, last)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        V = logp.shape[-1]
        frozen = jnp.where(jnp.arange(V) == end, 0.0, -jnp.inf)
        logp = jnp.where(finished[:, None], frozen, logp)
        total = (scores[:, None] + logp).reshape(-1)
        scores, flat = jax.lax.top_k(total, K)
        beam, token = flat // V, (flat % V).astype(jnp.int32)
        carries = jax.tree.map(lambda a: a[beam], carries)
        lengths = lengths[beam] + (~finished[beam]).astype(jnp.int32)
        finished = finished[beam] | (token == end)
        seqs = seqs[beam].at[:, t].set(token)
        return carries, token, scores, finished, lengths, seqs

    _, _, scores, _, lengths, seqs = jax.lax.fori_loop(0, max_len, body, init)
    normalised = scores / jnp.maximum(lengths, 1).astype(scores.dtype) ** length_penalty
    best = jnp.argmax(normalised)
    return seqs[best], scores[best]
