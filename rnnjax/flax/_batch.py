"""What both Flax bridges' ``RNNLayer`` do with a batch: check it, then run the layer over it
with :func:`rnnjax.layers.batched` (per-example dropout keys split from one key)."""

from __future__ import annotations

import jax
import numpy as np

from rnnjax.core import Carry, Layer, Params
from rnnjax.layers import batched


def apply_batch(
    layer: Layer,
    params: Params,
    xs: jax.Array,
    seq_lengths: jax.Array | None,
    mask: jax.Array | None,
    initial_carry: Carry,
    key: jax.Array | None,
) -> tuple[Carry, jax.Array]:
    batch = np.shape(xs)[0]
    if seq_lengths is not None and np.shape(seq_lengths) != (batch,):
        raise ValueError(
            f"RNNLayer expects seq_lengths of shape (B,) = ({batch},), "
            f"got {np.shape(seq_lengths)}: one length per sequence"
        )
    return batched(layer).apply(
        params, xs, length=seq_lengths, mask=mask, carry=initial_carry, key=key
    )
