"""Layers: whole sequence to whole sequence, ``Layer(init, apply)`` over one example.

Every ``apply`` has the call ``apply(params, xs, *, length=None, mask=None, carry=None,
key=None) -> (carry, ys)`` with ``xs`` of shape ``(T, input_size)``; padded steps give zero
outputs; ``key=None`` means deterministic. Combinators (:func:`bidirectional`, :func:`stack`)
take layers and return a layer, so they nest.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rnnjax.cells._common import Initializer, check_size, default_bias_init, default_input_init
from rnnjax.core import Cell, Layer, check_option, output_size
from rnnjax.scan import Remat, _check_remat, _check_unroll, scan, step_mask

MERGES: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "concat": lambda a, b: jnp.concatenate([a, b], axis=-1),
    "sum": lambda a, b: a + b,
    "mean": lambda a, b: (a + b) / 2,
    "mul": lambda a, b: a * b,
}


def _hidden(carry: Any) -> jax.Array:
    """The hidden state inside a carry: the carry itself, or its ``h`` field (LSTMState)."""
    return carry.h if hasattr(carry, "h") else carry


def _check_rate(where: str, name: str, rate: float) -> float:
    if not isinstance(rate, int | float) or not 0.0 <= rate < 1.0:
        raise ValueError(f"{where} expects {name} in [0, 1), got {rate!r}")
    return float(rate)


def rnn(
    cell: Cell,
    *,
    reverse: bool = False,
    unroll: int | bool = 1,
    remat: Remat = False,
    input_dropout: float = 0.0,
    recurrent_dropout: float = 0.0,
    zoneout: float = 0.0,
) -> Layer:
    """A layer that scans ``cell`` over the sequence; params are the cell's params.

    ``apply`` returns ``(carry, ys)``: the cell's carry after the last real step and its outputs
    ``(T, H)``. ``reverse``, ``unroll`` and ``remat`` are passed to :func:`rnnjax.scan`;
    ``remat`` (``True``, an int ``k`` or ``"sqrt"``) trades compute for BPTT memory over long
    sequences and is checked here, when the layer is made.

    Regularizers, active only when ``apply`` gets a ``key`` (``key=None`` is evaluation):

    - ``input_dropout``: one dropout mask on the input features per sequence, reused at every
      step (variational dropout, Gal & Ghahramani 2016; Keras' ``dropout``).
    - ``recurrent_dropout``: one mask on the hidden state per sequence, applied where ``h``
      meets ``W_h`` at every step (Gal & Ghahramani; Keras' ``recurrent_dropout``). The cell's
      step must accept ``recurrent_mask=`` (the built-in cells do).
    - ``zoneout``: at every step each carry unit keeps its previous value with this probability
      (Krueger et al. 2017); the output is the zoned-out hidden state. Without a key the carry
      is the expectation, ``zoneout * old + (1 - zoneout) * new``, as in the paper.

    Under ``vmap`` give every example its own key (:func:`batched` does), or every sequence in
    the batch shares one mask.

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
    p_in = _check_rate("rnn", "input_dropout", input_dropout)
    p_rec = _check_rate("rnn", "recurrent_dropout", recurrent_dropout)
    p_zone = _check_rate("rnn", "zoneout", zoneout)
    if p_rec and "recurrent_mask" not in inspect.signature(cell.step).parameters:
        raise TypeError(
            "rnn recurrent_dropout needs a cell whose step accepts recurrent_mask= "
            "(the built-in elman, lstm and gru do); this cell's step does not"
        )

    def regularized(params, xs, key) -> tuple[Cell, Any]:
        """The cell and inputs to scan, with this sequence's dropout masks and zoneout."""
        step, sequence, k_in, k_rec, k_zone = cell.step, cell.sequence, *_split(key, 3)
        if p_in and key is not None:
            xs = xs * _dropout(jnp.ones(np.shape(xs)[1:], xs.dtype), p_in, k_in)
        if p_rec and key is not None:
            # One flag per unit of h (the carry's hidden state), whatever the weights' layout.
            h = jax.eval_shape(lambda: _hidden(cell.initial_carry(params)))
            mask = _dropout(jnp.ones(h.shape, h.dtype), p_rec, k_rec)
            step = functools.partial(step, recurrent_mask=mask)
            if sequence is not None:
                sequence = functools.partial(sequence, recurrent_mask=mask)
        if not p_zone:
            return Cell(cell.init, cell.initial_carry, step, sequence), xs

        def zoned(params, carry, inputs):
            x, k = inputs
            new, _ = step(params, carry, x)
            news, tree = jax.tree.flatten(new)
            olds = jax.tree.leaves(carry)
            if k is None:
                mixed = [p_zone * o + (1.0 - p_zone) * n for n, o in zip(news, olds, strict=True)]
            else:
                keep = [
                    jax.random.bernoulli(k_leaf, p_zone, n.shape)
                    for k_leaf, n in zip(jax.random.split(k, len(news)), news, strict=True)
                ]
                mixed = [jnp.where(m, o, n) for m, n, o in zip(keep, news, olds, strict=True)]
            carry = jax.tree.unflatten(tree, mixed)
            return carry, _hidden(carry)

        step_keys = None if key is None else jax.random.split(k_zone, np.shape(xs)[0])
        return Cell(cell.init, cell.initial_carry, zoned), (xs, step_keys)

    def apply(params, xs, *, length=None, mask=None, reset=None, carry=None, key=None):
        run_cell, inputs = regularized(params, xs, key)
        return scan(
            run_cell, params, inputs, carry,
            length=length, mask=mask, reset=reset, reverse=reverse, unroll=unroll, remat=remat,
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

    def apply(params, xs, *, length=None, mask=None, reset=None, carry=None, key=None):
        if reset is not None:
            raise ValueError(
                "bidirectional cannot take reset=: a stream with sequence boundaries is read "
                "causally; split it into sequences and pass length= instead"
            )
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


def _dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout: zero each element with probability ``rate``, scale the rest by
    ``1 / (1 - rate)``; the identity when ``key`` is None or ``rate`` is 0."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, np.shape(x))
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def dropout(rate: float) -> Layer:
    """A parameter-free layer that drops each element of ``xs`` with probability ``rate``
    (fresh at every step) when given a key; the identity without one. For dropout on a stack's
    inputs or outputs: ``stack(dropout(0.2), rnn(...), ..., dropout(0.2), dense(n))``.

    >>> import jax, jax.numpy as jnp, rnnjax as rj
    >>> layer = rj.layers.dropout(0.5)
    >>> params = layer.init(jax.random.key(0), 4)
    >>> _, ys = layer.apply(params, jnp.ones((3, 4)), key=jax.random.key(1))
    >>> sorted(set(ys.ravel().tolist()))
    [0.0, 2.0]
    """
    p = _check_rate("dropout", "rate", rate)

    def init(key, input_size):
        del key, input_size
        return {}

    def apply(params, xs, *, length=None, mask=None, reset=None, carry=None, key=None):
        del params, length, mask, reset  # padded steps are zero in, so zero out
        if carry is not None:
            raise TypeError(
                f"dropout has no carry; expected carry=None, got {type(carry).__name__}"
            )
        return None, _dropout(xs, p, key)

    return Layer(init, apply)


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
    rate = _check_rate("stack", "dropout", dropout)
    n = len(layers)

    def init(key, input_size):
        params, size = [], input_size
        for layer, k in zip(layers, jax.random.split(key, n), strict=True):
            p = layer.init(k, size)
            params.append(p)
            size = output_size(layer, p, size)
        return tuple(params)

    def apply(params, xs, *, length=None, mask=None, reset=None, carry=None, key=None):
        if not isinstance(params, tuple | list) or len(params) != n:
            raise TypeError(
                f"stack of {n} layers expects a tuple of {n} params, got {type(params).__name__}"
            )
        carries = _check_carry_tuple(carry, n, "stack")
        keys = _split(key, 2 * n)
        h, out_carries = xs, []
        for i, (layer, p, c) in enumerate(zip(layers, params, carries, strict=True)):
            c, y = layer.apply(
                p, h, length=length, mask=mask, reset=reset, carry=c, key=keys[2 * i]
            )
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

    def apply(params, xs, *, length=None, mask=None, reset=None, carry=None, key=None):
        del key, reset  # stateless and deterministic
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


def batched(layer: Layer) -> Layer:
    """The same layer over a batch: ``xs (B, T, I)``, ``length (B,)``, ``mask``/``reset``
    ``(B, T)``, a batched carry; ``key`` is split so every example draws its own dropout masks.
    Params are shared (not batched).

    >>> import jax, jax.numpy as jnp, rnnjax as rj
    >>> layer = rj.layers.batched(rj.layers.rnn(rj.cells.gru(4), recurrent_dropout=0.5))
    >>> params = layer.init(jax.random.key(0), 3)
    >>> h, ys = layer.apply(params, jnp.ones((2, 5, 3)), length=jnp.array([5, 2]),
    ...                     key=jax.random.key(1))
    >>> h.shape, ys.shape, bool((ys[0] != ys[1]).any())
    ((2, 4), (2, 5, 4), True)
    """

    def apply(params, xs, *, length=None, mask=None, reset=None, carry=None, key=None):
        shape = tuple(np.shape(xs))
        if len(shape) < 3:
            raise ValueError(
                f"batched layer expects xs of shape (B, T, input_size), got {shape}: "
                "for one example call the unbatched layer"
            )
        keys = None if key is None else jax.random.split(key, shape[0])

        def one(x, n, m, r, c, k):
            return layer.apply(params, x, length=n, mask=m, reset=r, carry=c, key=k)

        axes = [0, *(None if a is None else 0 for a in (length, mask, reset, carry, keys))]
        return jax.vmap(one, in_axes=axes)(xs, length, mask, reset, carry, keys)

    return Layer(layer.init, apply)


# Flax's nn.Embed default: N(0, 1 / features).
_embed_init = jax.nn.initializers.variance_scaling(1.0, "fan_in", "normal", out_axis=0)


def embed(
    vocab_size: int,
    features: int,
    *,
    init: Initializer = _embed_init,
    dtype: jnp.dtype = jnp.float32,
) -> Layer:
    """A lookup table from int tokens ``(T,)`` to vectors ``(T, features)``; params
    ``{"table": (vocab_size, features)}``. ``init``'s ``input_size`` is ignored (tokens are
    scalars); padded steps give zero vectors.

    >>> import jax, jax.numpy as jnp, rnnjax as rj
    >>> layer = rj.layers.embed(10, 4)
    >>> params = layer.init(jax.random.key(0), 1)
    >>> _, ys = layer.apply(params, jnp.array([3, 3, 7]), length=2)
    >>> ys.shape, bool((ys[0] == ys[1]).all()), bool((ys[2] == 0).all())
    ((3, 4), True, True)
    """
    check_size("embed", "vocab_size", vocab_size)
    check_size("embed", "features", features)

    def init_params(key, input_size=1):
        del input_size
        return {"table": init(key, (vocab_size, features), dtype)}

    def apply(params, tokens, *, length=None, mask=None, reset=None, carry=None, key=None):
        del reset, key
        if carry is not None:
            raise TypeError(f"embed has no carry; expected carry=None, got {type(carry).__name__}")
        shape = tuple(np.shape(tokens))
        if len(shape) != 1 or not jnp.issubdtype(jnp.result_type(tokens), jnp.integer):
            raise ValueError(
                f"embed expects int tokens of shape (T,), got {jnp.result_type(tokens)}{shape}"
                + (": vmap over the batch axis" if len(shape) == 2 else "")
            )
        ys = params["table"][tokens]
        real = step_mask(length, mask, shape[0], "embed")
        if real is not None:
            ys = jnp.where(real[:, None], ys, jnp.zeros_like(ys))
        return None, ys

    return Layer(init_params, apply)
