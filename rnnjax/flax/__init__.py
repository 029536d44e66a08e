"""Bridges to Flax: :mod:`rnnjax.flax.linen` and :mod:`rnnjax.flax.nnx`.

- ``rnnjax.flax.linen``: :class:`~rnnjax.flax.linen.RNNCell` wraps an rnnjax cell as a
  ``flax.linen.RNNCellBase``, so ``flax.linen.RNN`` and ``flax.linen.Bidirectional`` take it
  unchanged; :class:`~rnnjax.flax.linen.RNNLayer` runs any rnnjax layer as a linen module; and
  converters move params between Flax's own ``LSTMCell``, ``OptimizedLSTMCell``, ``GRUCell``,
  ``SimpleCell`` and rnnjax's layouts.
- ``rnnjax.flax.nnx``: :class:`~rnnjax.flax.nnx.RNNLayer` and :class:`~rnnjax.flax.nnx.RNN`,
  NNX modules holding an rnnjax layer's params as ``nnx.Param`` leaves.

The submodules are imported on demand (``import rnnjax.flax.linen``), so ``import rnnjax`` does
not pay for them. Every import here is absolute: ``flax`` always means the real Flax, never this
package.
"""
