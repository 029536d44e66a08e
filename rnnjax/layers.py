"""Layers: whole sequence to whole sequence, ``Layer(init, apply)`` over one example.

Every ``apply`` has the call ``apply(params, xs, *, length=None, mask=None, carry=None,
key=None) -> (carry, ys)`` with ``xs`` of shape ``(T, input_size)``; padded steps give zero
outputs; ``key=None`` means deterministic. Combinators (:func:`bidirectional`, :func:`stack`)
take layers and return a layer, so they nest.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rnnjax.cells._common import Initializer, check_size, default_bias_init, default_input_init
from rnnjax.core import Cell, Layer, check_option, output_size
from rnnjax.scan import _check_remat, _check_unroll, scan, step_mask

MERGES: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "concat": lambda a, b: jnp.concatenate([a, b], axis=-1),
    "sum": lambda a, b: a + b,
    "mean": lambda a, b: (a + b) / 2,
    "mul": lambda a, b: a * b,
}


def rnn(cell: Cell, *, reverse: bool = False, unroll: int | bool = 1, remat: bool = False) -> Layer:
    """A layer that scans ``cell`` over the sequence; params are the cell's params.

    ``apply`` returns ``(carry, ys)``: the cell's carry after the last real step and its outputs
    ``(T, H)``. ``reverse``, ``unroll`` and ``remat`` are passed to :func:`rnnjax.scan`.

    >>> import jax, jax.numpy as jnp, rnnjax as rj
    >>> layer = rj.layers.rnn(rj.cells.lstm(8))
    >>> params = layer.init(jax.random.key(0), 3)
    >>> carry, ys = layer.apply(params, jnp.ones((5, 3)), length=4)
    >>> ys.shape, bool((carry.h == ys[3]).all())
    ((5, 8), True)
    """
    if not isinstance(cell, Cell):
        raise TypeError(f"rnn expects an rnnjax.Cell, got {type(cell).__name__}")
    _check_unroll(unroll, "rnn")
    _check_remat(remat, "rnn")

    def apply(params, xs, *, length=None, mask=None, carry=None, key=None):
        del key  # no randomness in a plain recurrent layer
        return scan(
            cell, params, xs, carry,
            length=length, mask=mask, reverse=reverse, unroll=unroll, remat=remat,
        )  # fmt: skip

    return Layer(cell.init, apply)


def _split(key: jax.Array | None, n: int) -> list[jax.Array | None]:
    return [None] * n if key is None else list(jax.random.split(key, n))


def _check_carry_tuple(carry: Any, n: int, where: str) -> tuple:
    if carry is None:
        return (None,) * n
    if not isinstance(carry, tuple | list) or len(carry) != n:
        got = type(carry).__name__ + (
            f" of length {len(carry)}" if isinstance(carry, tuple | list) else ""
        )
        raise TypeError(
            f"{where} expects carry to be None or a tuple of {n} carries (one per sublayer), "
            f"got {got}: pass the carry that {where} returned"
        )
    return tuple(carry)


def bidirectional(fwd: Layer, bwd: Layer, *, merge: str = "concat") -> Layer:
    """Run ``fwd`` over the sequence and ``bwd`` over its real steps in reverse; merge outputs.

    ``bwd`` is an ordinary (forward) layer: this combinator feeds it the real steps last to
    first and puts its outputs back at their input positions, so any layer (a stack, a custom
    layer) can serve as the backward direction. With ``length`` only the real prefix is
    reversed, so padding stays at the end.

    Params: ``{"fwd": ..., "bwd": ...}``. Carry: ``(fwd_carry, bwd_carry)``.
    ``merge``: ``"concat"`` (output size ``H_f + H_b``), ``"sum"``, ``"mean"`` or ``"mul"``.

    >>> import jax, jax.numpy as jnp, rnnjax as rj
    >>> gru = rj.layers.rnn(rj.cells.gru(4))
    >>> layer = rj.layers.bidirectional(gru, gru)
    >>> params = layer.init(jax.random.key(0), 3)
    >>> (h_f, h_b), ys = layer.apply(params, jnp.ones((6, 3)), length=5)
    >>> ys.shape, bool((ys[:, 4:][0] == h_b).all())
    ((6, 8), True)
    """
    check_option("bidirectional merge", merge, MERGES)
    combine = MERGES[merge]

    def init(key, input_size):
        kf, kb = jax.random.split(key)
        return {"fwd": fwd.init(kf, input_size), "bwd": bwd.init(kb, input_size)}

    def apply(params, xs, *, length=None, mask=None, carry=None, key=None):
        c_f, c_b = _check_carry_tuple(carry, 2, "bidirectional")
        k_f, k_b = _split(key, 2)
        c_f, y_f = fwd.apply(params["fwd"], xs, length=length, mask=mask, carry=c_f, key=k_f)
        steps = np.shape(xs)[0]
        if length is None:
            order = jnp.arange(steps)[::-1]
        else:  # reverse only the real prefix; the permutation is its own inverse
            t = jnp.arange(steps)
            order = jnp.where(t < length, length - 1 - t, t)
        rev_mask = None if mask is None else jnp.asarray(mask)[order]
        c_b, y_b = bwd.apply(
            params["bwd"], xs[order], length=length, mask=rev_mask, carry=c_b, key=k_b
        )
        return (c_f, c_b), combine(y_f, y_b[order])

    return Layer(init, apply)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout: zero each element with probability ``rate``, scale the rest by
    ``1 / (1 - rate)``; the identity when ``key`` is None or ``rate`` is 0."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, np.shape(x))
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


_dropout = dropout  # stack's `dropout` argument shadows the function


def stack(*layers: Layer, dropout: float = 0.0, residual: bool = False) -> Layer:
    """Layers in sequence: each layer's outputs are the next one's inputs.

    ``dropout`` is applied to the outputs of every layer but the last when a ``key`` is given.
    ``residual=True`` adds each layer's input to its (dropped-out) output wherever the two have
    the same size; a layer that changes the size (typically the first) gets no skip connection.

    Params: a tuple, one entry per layer. Carry: a tuple, one carry per layer.

    >>> import jax, jax.numpy as jnp, rnnjax as rj
    >>> net = rj.layers.stack(
    ...     rj.layers.rnn(rj.cells.lstm(8)), rj.layers.rnn(rj.cells.lstm(8)), rj.layers.dense(2),
    ...     dropout=0.1, residual=True)
    >>> params = net.init(jax.random.key(0), 3)
    >>> carries, ys = net.apply(params, jnp.ones((5, 3)), key=jax.random.key(1))
    >>> len(carries), ys.shape
    (3, (5, 2))
    """
    if not layers:
        raise ValueError("stack expects at least one layer, got none")
    for i, layer in enumerate(layers):
        if not isinstance(layer, Layer):
            raise TypeError(
                f"stack expects rnnjax.Layer arguments, got {type(layer).__name__} "
                f"at position {i}: "
                "wrap a cell with rnnjax.layers.rnn(cell)"
            )
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"stack expects dropout in [0, 1), got {dropout!r}")
    rate = float(dropout)
    n = len(layers)

    def init(key, input_size):
        params, size = [], input_size
        for layer, k in zip(layers, jax.random.split(key, n), strict=True):
            p = layer.init(k, size)
            params.append(p)
            size = output_size(layer, p, size)
        return tuple(params)

    def apply(params, xs, *, length=None, mask=None, carry=None, key=None):
        if not isinstance(params, tuple | list) or len(params) != n:
            raise TypeError(
                f"stack of {n} layers expects a tuple of {n} params, got {type(params).__name__}"
            )
        carries = _check_carry_tuple(carry, n, "stack")
        keys = _split(key, 2 * n)
        h, out_carries = xs, []
        for i, (layer, p, c) in enumerate(zip(layers, params, carries, strict=True)):
            c, y = layer.apply(p, h, length=length, mask=mask, carry=c, key=keys[2 * i])
            if i < n - 1:
                y = _dropout(y, rate, keys[2 * i + 1])
            if residual and np.shape(y) == np.shape(h):
                y = y + h
            out_carries.append(c)
            h = y
        return tuple(out_carries), h

    return Layer(init, apply)


def dense(
    out_size: int,
    *,
    activation: Callable[[jax.Array], jax.Array] | None = None,
    w_init: Initializer = default_input_init,
    b_init: Initializer = default_bias_init,
    dtype: jnp.dtype = jnp.float32,
) -> Layer:
    """A readout ``y_t = activation(h_t W + b)`` applied at every step.

    Params: ``w (I, out_size)``, ``b (out_size,)``. It has no carry (returns ``None``); with
    ``length`` or ``mask`` the padded steps' outputs are zero, as for every layer.

    >>> import jax, jax.numpy as jnp, rnnjax as rj
    >>> head = rj.layers.dense(2)
    >>> params = head.init(jax.random.key(0), 4)
    >>> _, ys = head.apply(params, jnp.ones((3, 4)), length=2)
    >>> ys.shape, bool((ys[2] == 0).all())
    ((3, 2), True)
    """
    check_size("dense", "out_size", out_size)

    def init(key, input_size):
        check_size("dense.init", "input_size", input_size)
        kw, kb = jax.random.split(key)
        return {"w": w_init(kw, (input_size, out_size), dtype), "b": b_init(kb, (out_size,), dtype)}

    def apply(params, xs, *, length=None, mask=None, carry=None, key=None):
        del key
        if carry is not None:
            raise TypeError(f"dense has no carry; expected carry=None, got {type(carry).__name__}")
        in_size = params["w"].shape[0]
        shape = tuple(np.shape(xs))
        if len(shape) != 2 or shape[-1] != in_size:
            raise ValueError(
                f"dense expects xs of shape (T, {in_size}), got {shape}: "
                + (
                    "vmap over the batch axis"
                    if shape[-1:] == (in_size,)
                    else "check the input size"
                )
            )
        ys = xs @ params["w"] + params["b"]
        if activation is not None:
            ys = activation(ys)
        real = step_mask(length, mask, shape[0], "dense")
        if real is not None:
            ys = jnp.where(real[:, None], ys, jnp.zeros_like(ys))
        return None, ys

    return Layer(init, apply)
