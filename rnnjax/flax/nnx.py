"""rnnjax layers as Flax NNX modules.

:class:`RNNLayer` holds an rnnjax layer's params as ``nnx.Param`` leaves (one per leaf of the
params pytree, in the same nesting) and runs ``layer.apply`` under ``vmap`` on a batch, so it
trains with ``nnx.Optimizer`` / ``nnx.value_and_grad`` and checkpoints the NNX way
(``nnx.split`` -> orbax -> ``nnx.merge``). :class:`RNN` is the common case, one cell scanned
by ``rj.layers.rnn``.

Dropout follows ``nnx.Dropout``: the module keeps a fork of the ``"dropout"`` rng stream
(falling back to ``"default"``) and a ``deterministic`` flag, set by ``.train()`` / ``.eval()``
or ``nnx.view(model, deterministic=...)``.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx

from rnnjax.core import Carry, Cell, Layer
from rnnjax.flax._batch import apply_batch
from rnnjax.layers import rnn

__all__ = ["RNN", "RNNLayer"]


def _is_param(x: Any) -> bool:
    return isinstance(x, nnx.Param)


class RNNLayer(nnx.Module):
    """An rnnjax layer as an NNX module: ``(B, T, I) -> (carry, (B, T, O))``.

    Args:
      layer: any :class:`rnnjax.Layer` (``rj.layers.rnn``, ``bidirectional``, ``stack``, ...).
      input_size: I.
      rngs: ``nnx.Rngs``; ``rngs.params()`` initializes the params (``layer.init``), and a fork
        of ``rngs["dropout"]`` (``rngs.default`` when there is no ``"dropout"`` stream) draws
        the dropout keys.
      deterministic: False (NNX's default, as for ``nnx.Dropout``) runs the layer's dropout;
        True passes ``key=None``. ``.eval()`` / ``.train()`` and ``nnx.view`` set it.

    Attributes:
      params: the rnnjax params pytree with an ``nnx.Param`` at every leaf; :meth:`layer_params`
        gives it back as plain arrays, for ``layer.apply``.

    ``__call__(xs, seq_lengths=None, *, mask=None, initial_carry=None)`` takes ``xs (B, T, I)``,
    ``seq_lengths (B,)`` or a bool ``mask (B, T)``, and an optional carry with a leading ``B``
    axis, and returns ``jax.vmap`` of ``layer.apply``: the final carry and the outputs
    ``(B, T, O)``, zero at padded steps. When not deterministic, each call draws one key from
    the stream and splits it into one key per example.

    >>> import jax, jax.numpy as jnp, rnnjax as rj
    >>> from flax import nnx
    >>> from rnnjax.flax.nnx import RNNLayer
    >>> model = RNNLayer(rj.layers.stack(rj.layers.rnn(rj.cells.lstm(8)), rj.layers.dense(2)),
    ...                  4, rngs=nnx.Rngs(0))
    >>> carry, ys = model(jnp.ones((3, 5, 4)), jnp.array([5, 2, 4]))
    >>> ys.shape, carry[0].h.shape
    ((3, 5, 2), (3, 8))
    >>> jax.tree.map(jnp.shape, nnx.to_pure_dict(nnx.state(model, nnx.Param)))["params"][0]
    {'b': (32,), 'w_h': (8, 32), 'w_i': (4, 32)}
    """

    def __init__(
        self, layer: Layer, input_size: int, *, rngs: nnx.Rngs, deterministic: bool = False
    ):
        if not isinstance(layer, Layer):
            raise TypeError(
                f"RNNLayer expects an rnnjax.Layer, got {type(layer).__name__}: wrap a cell "
                "with rnnjax.layers.rnn(cell), or use rnnjax.flax.nnx.RNN(cell, ...)"
            )
        if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 1:
            raise ValueError(
                f"RNNLayer expects input_size to be a positive int, got {input_size!r}"
            )
        if not isinstance(rngs, nnx.Rngs):
            raise TypeError(f"RNNLayer expects rngs to be an nnx.Rngs, got {type(rngs).__name__}")
        self.layer = nnx.static(layer)
        self.input_size = input_size
        self.params = nnx.data(jax.tree.map(nnx.Param, layer.init(rngs.params(), input_size)))
        try:
            stream = rngs["dropout"]
        except KeyError:
            raise ValueError(
                "RNNLayer needs a 'dropout' (or 'default') stream in rngs for its dropout keys, "
                f"got streams {sorted(rngs)}: e.g. nnx.Rngs(0) or nnx.Rngs(params=0, dropout=1)"
            ) from None
        self.rngs = stream.fork()
        self.deterministic = deterministic

    def layer_params(self) -> Any:
        """The params as ``layer.apply`` takes them: the same pytree with plain arrays."""
        return jax.tree.map(lambda p: p[...], self.params, is_leaf=_is_param)

    def set_view(self, deterministic: bool | None = None) -> None:
        """Used by ``nnx.view(model, deterministic=...)``.

        Args:
          deterministic: True: no dropout; False: dropout on.
        """
        if deterministic is not None:
            self.deterministic = deterministic

    def __call__(
        self,
        xs: jax.Array,
        seq_lengths: jax.Array | None = None,
        *,
        mask: jax.Array | None = None,
        initial_carry: Carry = None,
    ) -> tuple[Carry, jax.Array]:
        if np.ndim(xs) != 3 or np.shape(xs)[-1] != self.input_size:
            fix = "add a batch axis, xs[None]" if np.ndim(xs) == 2 else "check the input size"
            raise ValueError(
                f"RNNLayer expects xs of shape (B, T, {self.input_size}), got {np.shape(xs)}: {fix}"
            )
        key = None if self.deterministic else self.rngs()
        return apply_batch(
            self.layer, self.layer_params(), xs, seq_lengths, mask, initial_carry, key
        )


class RNN(RNNLayer):
    """One rnnjax cell scanned over a batch: ``RNNLayer(rj.layers.rnn(cell, **options), ...)``.

    ``options`` are :func:`rnnjax.layers.rnn`'s (``reverse``, ``unroll``, ``remat``,
    ``input_dropout``, ``recurrent_dropout``, ``zoneout``). Params: the cell's, under
    ``.params`` (``{"w_i": nnx.Param, ...}`` for the built-in cells).

    >>> import jax.numpy as jnp, rnnjax as rj
    >>> from flax import nnx
    >>> from rnnjax.flax.nnx import RNN
    >>> model = RNN(rj.cells.gru(6), 3, rngs=nnx.Rngs(0), recurrent_dropout=0.25)
    >>> h, ys = model(jnp.ones((2, 4, 3)))
    >>> ys.shape, sorted(model.params)
    ((2, 4, 6), ['b_h', 'b_i', 'w_h', 'w_i'])
    """

    def __init__(
        self,
        cell: Cell,
        input_size: int,
        *,
        rngs: nnx.Rngs,
        deterministic: bool = False,
        **options: Any,
    ):
        super().__init__(rnn(cell, **options), input_size, rngs=rngs, deterministic=deterministic)
