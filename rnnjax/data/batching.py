"""Padding, batching and shuffling, every batch addressed by the training step.

A batch is a pure function of ``(seed, step)``: the epoch is ``step // steps_per_epoch`` and its
order a permutation seeded by ``(seed, epoch)``. So the data position is the step counter, saved
in every checkpoint, and a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np


def pad(
    sequences: Sequence[np.ndarray], *, length: int | None = None, multiple: int = 1, value=0
) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad sequences of shape ``(T_i, ...)`` into ``(B, T, ...)`` and their lengths ``(B,)``.

    ``T`` is ``length`` if given, else the longest sequence rounded up to ``multiple`` (fewer
    distinct shapes, fewer jit compilations).

    >>> padded, lengths = pad([np.array([1, 2, 3]), np.array([4])], multiple=4)
    >>> padded.tolist(), lengths.tolist()
    ([[1, 2, 3, 0], [4, 0, 0, 0]], [3, 1])
    """
    arrays = [np.asarray(s) for s in sequences]
    lengths = np.array([len(a) for a in arrays], dtype=np.int32)
    longest = int(lengths.max(initial=0))
    steps = length if length is not None else -(-max(longest, 1) // multiple) * multiple
    if longest > steps:
        raise ValueError(f"pad: a sequence has {longest} steps, more than length={steps}")
    trailing = arrays[0].shape[1:] if arrays else ()
    dtype = arrays[0].dtype if arrays else np.float32
    out = np.full((len(arrays), steps, *trailing), value, dtype=dtype)
    for i, a in enumerate(arrays):
        out[i, : len(a)] = a
    return out, lengths


def _epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def batch_indices(n: int, batch_size: int, step: int, *, seed: int) -> np.ndarray:
    """Indices of batch ``step``: each epoch visits every example once (the last partial batch
    is dropped) in an order seeded by ``(seed, epoch)``; with fewer examples than a batch,
    examples repeat.

    >>> batch_indices(10, 4, 0, seed=0).tolist() == batch_indices(10, 4, 0, seed=0).tolist()
    True
    >>> sorted(np.concatenate([batch_indices(4, 2, s, seed=1) for s in (0, 1)]).tolist())
    [0, 1, 2, 3]
    """
    if n < 1 or batch_size < 1:
        raise ValueError(f"batch_indices needs n >= 1 and batch_size >= 1, got {n}, {batch_size}")
    if n < batch_size:
        return np.random.default_rng([seed, step]).choice(n, batch_size)
    per_epoch = n // batch_size
    epoch, i = divmod(step, per_epoch)
    return _epoch_order(n, seed, epoch)[i * batch_size : (i + 1) * batch_size]


def bucket_indices(
    lengths: np.ndarray, batch_size: int, step: int, *, seed: int, pool: int = 20
) -> np.ndarray:
    """Like :func:`batch_indices`, but each batch holds sequences of similar length (less
    padding): an epoch's shuffled order is cut into pools of ``pool`` batches, each pool sorted
    by length and cut into batches, and the batches shuffled.
    """
    n = len(lengths)
    if n <= batch_size:
        return batch_indices(n, batch_size, step, seed=seed)
    per_epoch = n // batch_size
    epoch, i = divmod(step, per_epoch)
    order = _epoch_order(n, seed, epoch)[: per_epoch * batch_size]
    size = pool * batch_size
    chunks = [order[j : j + size] for j in range(0, len(order), size)]
    order = np.concatenate([c[np.argsort(lengths[c], kind="stable")] for c in chunks])
    batches = order.reshape(per_epoch, batch_size)
    shuffle = np.random.default_rng([seed, epoch, 1]).permutation(per_epoch)
    return batches[shuffle[i]]


def sliding_windows(
    series: np.ndarray, window: int, horizon: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """All windows of a ``(N, F)`` series: inputs ``(M, window, F)`` and the ``horizon`` values
    that follow each, ``(M, horizon, F)``, with ``M = N - window - horizon + 1``.

    >>> x, y = sliding_windows(np.arange(6.0)[:, None], 3, 2)
    >>> x[:, :, 0].tolist(), y[:, :, 0].tolist()
    ([[0.0, 1.0, 2.0], [1.0, 2.0, 3.0]], [[3.0, 4.0], [4.0, 5.0]])
    """
    series = np.asarray(series)
    if series.ndim == 1:
        series = series[:, None]
    count = len(series) - window - horizon + 1
    if count < 1:
        raise ValueError(
            f"a series of {len(series)} steps is shorter than one window of {window} inputs "
            f"and {horizon} targets; use a shorter window or a longer series"
        )
    idx = np.arange(count)[:, None]
    return series[idx + np.arange(window)], series[idx + window + np.arange(horizon)]


class Normalizer:
    """Per-feature standardisation fitted on the training split only, then applied anywhere.

    >>> norm = Normalizer.fit(np.array([[1.0], [3.0]]))
    >>> norm(np.array([[2.0]])).tolist(), norm.invert(np.array([[1.0]])).tolist()
    ([[0.0]], [[3.0]])
    >>> import jax, jax.numpy as jnp
    >>> jax.jit(lambda z: norm.invert(norm(z)))(jnp.array([[5.0]])).tolist()
    [[5.0]]
    """

    def __init__(self, mean: np.ndarray, std: np.ndarray):
        self.mean = np.asarray(mean, np.float32)
        self.std = np.asarray(std, np.float32)

    @classmethod
    def fit(cls, train: np.ndarray) -> Normalizer:
        train = np.asarray(train, np.float32)
        std = train.std(axis=0)
        return cls(train.mean(axis=0), np.where(std > 0, std, 1.0))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Standardise ``x``: numpy in, numpy out; a JAX array (also under ``jit``) stays one."""
        if isinstance(x, jax.Array):
            return (x - self.mean) / self.std
        return (np.asarray(x, np.float32) - self.mean) / self.std

    def invert(self, z: np.ndarray) -> np.ndarray:
        """Undo :meth:`__call__`; as it, numpy or JAX."""
        if isinstance(z, jax.Array):
            return z * self.std + self.mean
        return np.asarray(z, np.float32) * self.std + self.mean

    def to_dict(self) -> dict:
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> Normalizer:
        return cls(np.array(d["mean"]), np.array(d["std"]))
