"""Generated sequence tasks: nothing to download, every batch a pure function of a key (or, for a
fixed data set drawn once, of a numpy ``Generator``)."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

#: MSE of always predicting 1 on the adding problem: the variance of a sum of two U(0, 1).
ADDING_BASELINE_MSE = 1.0 / 6.0


def adding(key: jax.Array, batch_size: int, length: int) -> tuple[jax.Array, jax.Array]:
    """The adding problem (Hochreiter & Schmidhuber 1997): ``xs (B, T, 2)``, ``targets (B,)``.

    Channel 0 holds U(0, 1) values; channel 1 marks two positions, one in each half of the
    sequence. The target is the sum of the two marked values, so a model must remember a value
    for up to T steps. Predicting 1 always scores an MSE of 1/6 (``ADDING_BASELINE_MSE``).
    Compiled once per ``(batch_size, length)``.

    >>> xs, ys = adding(jax.random.key(0), 4, 10)
    >>> xs.shape, ys.shape, xs[..., 1].sum(axis=1).tolist()
    ((4, 10, 2), (4,), [2.0, 2.0, 2.0, 2.0])
    """
    if length < 2:
        raise ValueError(f"adding needs length >= 2 (one marker per half), got {length}")
    return _adding(key, int(batch_size), int(length))


# Compiled once per shape: called step by step in a training loop, the eager ops would each
# dispatch (and first compile) on their own.
@functools.partial(jax.jit, static_argnums=(1, 2))
def _adding(key: jax.Array, batch_size: int, length: int) -> tuple[jax.Array, jax.Array]:
    k_v, k_a, k_b = jax.random.split(key, 3)
    values = jax.random.uniform(k_v, (batch_size, length))
    half = length // 2
    first = jax.random.randint(k_a, (batch_size,), 0, half)
    second = jax.random.randint(k_b, (batch_size,), half, length)
    positions = jnp.arange(length)
    marks = (positions == first[:, None]) | (positions == second[:, None])
    xs = jnp.stack([values, marks.astype(values.dtype)], axis=-1)
    return xs, jnp.sum(jnp.where(marks, values, 0.0), axis=1)


def copy_memory(
    key: jax.Array, batch_size: int, delay: int, *, symbols: int = 10, alphabet: int = 8
) -> tuple[jax.Array, jax.Array]:
    """The copy-memory task (Hochreiter & Schmidhuber 1997; Arjovsky et al. 2016): int tokens
    ``inputs (B, T + 2S)`` and ``targets (B, T + 2S)`` for a delay ``T`` and ``S = symbols``.

    Tokens: 0 is the blank, ``1..K`` the symbols (``K = alphabet``), ``K + 1`` the delimiter.
    The input is S random symbols, ``T - 1`` blanks, the delimiter, then S blanks; the target is
    blank for the first ``T + S`` steps, then the S symbols. So the model must hold S symbols
    for T steps and write them out when it sees the delimiter.

    >>> xs, ys = copy_memory(jax.random.key(0), 2, 4, symbols=3, alphabet=5)
    >>> xs.shape, xs[0, 3:].tolist(), ys[0, :7].tolist()
    ((2, 10), [0, 0, 0, 6, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0])
    >>> bool((ys[:, 7:] == xs[:, :3]).all())
    True
    """
    if delay < 1 or symbols < 1 or alphabet < 1:
        raise ValueError(
            f"copy_memory needs delay, symbols and alphabet >= 1, got {delay}, {symbols}, "
            f"{alphabet}"
        )
    return _copy_memory(key, int(batch_size), int(delay), int(symbols), int(alphabet))


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _copy_memory(key, batch_size, delay, symbols, alphabet):
    data = jax.random.randint(key, (batch_size, symbols), 1, alphabet + 1)
    blanks = jnp.zeros((batch_size, delay - 1), data.dtype)
    delimiter = jnp.full((batch_size, 1), alphabet + 1, data.dtype)
    tail = jnp.zeros((batch_size, symbols), data.dtype)
    inputs = jnp.concatenate([data, blanks, delimiter, tail], axis=1)
    targets = jnp.concatenate([jnp.zeros((batch_size, delay + symbols), data.dtype), data], axis=1)
    return inputs, targets


def copy_baseline(delay: int, symbols: int = 10, alphabet: int = 8) -> float:
    """Cross-entropy per step (nats) of the memoryless strategy on :func:`copy_memory`: blank
    with certainty until the delimiter, then uniform over the K symbols, which scores
    ``S log(K) / (T + 2S)`` (Arjovsky et al. 2016).

    >>> round(copy_baseline(100, 10, 8), 4)  # the paper's T = 100: 10 log 8 / 120
    0.1733
    """
    return symbols * math.log(alphabet) / (delay + 2 * symbols)


def majority(
    rng: np.random.Generator, count: int, min_len: int, max_len: int, *, symbols: int = 3
) -> tuple[list[np.ndarray], np.ndarray]:
    """A fixed data set for many-to-one classification of variable-length sequences: ``count``
    int sequences with lengths uniform in ``[min_len, max_len]`` and symbols uniform in
    ``0..symbols - 1``, each labelled with its most frequent symbol. Sequences with a tie for
    the most frequent are drawn again, so every label is defined, and depends on every step.

    A finite set drawn once (like a real data set, batched with
    :func:`rnnjax.data.batching.bucket_indices`), so it takes a numpy ``Generator``.

    >>> seqs, labels = majority(np.random.default_rng(0), 3, 4, 8)
    >>> [len(s) for s in seqs], labels.tolist()
    ([8, 7, 6], [0, 1, 2])
    >>> all(np.bincount(s, minlength=3).argmax() == y for s, y in zip(seqs, labels))
    True
    """
    if not 1 <= min_len <= max_len or symbols < 2:
        raise ValueError(
            f"majority needs 1 <= min_len <= max_len and symbols >= 2, got {min_len}, "
            f"{max_len}, {symbols}"
        )
    lengths = rng.integers(min_len, max_len + 1, count)
    tokens = np.zeros((count, max_len), np.int32)
    labels = np.zeros(count, np.int32)
    todo = np.arange(count)
    while todo.size:  # draw again the rows with a tie
        tokens[todo] = rng.integers(0, symbols, (todo.size, max_len))
        real = np.arange(max_len) < lengths[todo, None]
        counts = ((tokens[todo, :, None] == np.arange(symbols)) & real[..., None]).sum(axis=1)
        labels[todo] = counts.argmax(axis=1)
        todo = todo[(counts == counts.max(axis=1, keepdims=True)).sum(axis=1) > 1]
    return [tokens[i, :n] for i, n in enumerate(lengths)], labels
