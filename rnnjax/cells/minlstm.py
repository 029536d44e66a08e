"""minLSTM (Feng et al. 2024, "Were RNNs All We Needed?"): an LSTM whose gates read only the
input and are normalised to sum to one, so the recurrence is linear in the carry and trains
with a parallel scan."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rnnjax._native import minrnn
from rnnjax.cells._common import (
    Initializer,
    default_bias_init,
    default_input_init,
)
from rnnjax.cells._minrnn import g, log_g, min_cell
from rnnjax.core import Cell


def minlstm(
    hidden_size: int,
    *,
    log_space: bool = False,
    scan_mode: str = "auto",
    input_init: Initializer = default_input_init,
    bias_init: Initializer = default_bias_init,
    dtype: jnp.dtype = jnp.float32,
) -> Cell:
    """A minLSTM cell (the paper's length-independent form: normalised gates, no output gate).

    Params: ``w (I, 3H)``, ``b (3H,)``, column blocks (f, i, h~) (the paper's ``linear_f``,
    ``linear_i``, ``linear_h``). Carry and output: ``h (H,)``. With
    ``kf, ki, v = split(x W + b)``::

        f = sigmoid(kf)        i = sigmoid(ki)
        f' = f / (f + i)       i' = i / (f + i)
        h~ = v                 # log_space=False
        h~ = g(v)              # log_space=True: v + 0.5 if v >= 0 else sigmoid(v)
        h' = f' * h + i' * h~

    ``sequence`` (what :func:`rnnjax.scan` runs) projects every step in one
    ``(T, I) x (I, 3H)`` matmul and runs ``h_t = f'_t h_{t-1} + i'_t h~_t`` through
    :func:`rnnjax.linear_scan` (``mode=scan_mode``) or, with ``log_space=True``, in log space as
    the paper's Appendix B.2 (``d = softplus(-kf) - softplus(-ki)``, ``log f' = -softplus(d)``,
    ``log i' = -softplus(-d)``, ``log b = log i' + log g(v)``). Masks, ``reverse``, ``reset``,
    a given carry, ``remat`` and the missing ``recurrent_mask`` are as in
    :func:`rnnjax.cells.mingru`; so are the native fused pass (float32 on CPU) and the
    reverse-mode-only derivative of the plain form.

    Args:
      hidden_size: H.
      log_space: the paper's log-space form (positive ``h~ = g(v)``, log-space scan).
      scan_mode: ``linear_scan``'s backend for the plain form.
      input_init, bias_init: initializers; ``input_init`` is called once per ``(I, H)`` block.
      dtype: dtype of the params and the initial carry.

    >>> import jax, jax.numpy as jnp, rnnjax as rj
    >>> cell = rj.cells.minlstm(4, log_space=True)
    >>> params = cell.init(jax.random.key(0), 3)
    >>> h, ys = rj.scan(cell, params, jnp.ones((5, 3)))
    >>> params["w"].shape, params["b"].shape, ys.shape, bool((ys > 0).all())
    ((3, 12), (12,), (5, 4), True)
    """

    def plain(proj):
        kf, ki, v = jnp.split(proj, 3, axis=-1)
        f, i = jax.nn.sigmoid(kf), jax.nn.sigmoid(ki)
        total = f + i
        return f / total, i / total * (g(v) if log_space else v)

    def logs(proj):
        kf, ki, v = jnp.split(proj, 3, axis=-1)
        d = jax.nn.softplus(-kf) - jax.nn.softplus(-ki)
        return -jax.nn.softplus(d), -jax.nn.softplus(-d) + log_g(v)

    return min_cell(
        "minlstm", hidden_size, 3, plain, logs, log_space=log_space, scan_mode=scan_mode,
        input_init=input_init, bias_init=bias_init, dtype=dtype, fused=minrnn.minlstm_scan,
    )  # fmt: skip
