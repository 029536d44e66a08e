"""minGRU (Feng et al. 2024, "Were RNNs All We Needed?"): a GRU whose gate reads only the
input, so the recurrence is linear in the carry and trains with a parallel scan."""

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


def mingru(
    hidden_size: int,
    *,
    log_space: bool = False,
    scan_mode: str = "auto",
    input_init: Initializer = default_input_init,
    bias_init: Initializer = default_bias_init,
    dtype: jnp.dtype = jnp.float32,
) -> Cell:
    """A minGRU cell.

    Params: ``w (I, 2H)``, ``b (2H,)``, column blocks (z, h~) (the paper's ``linear_z`` and
    ``linear_h``: ``w = concat([linear_z.weight.T, linear_h.weight.T], 1)``). Carry and output:
    ``h (H,)``. With ``k, v = split(x W + b)``::

        z = sigmoid(k)
        h~ = v                                   # log_space=False
        h~ = g(v) = v + 0.5 if v >= 0 else sigmoid(v)   # log_space=True (Appendix B.3)
        h' = (1 - z) * h + z * h~

    ``step`` runs one step; ``sequence`` (what :func:`rnnjax.scan` runs) projects every step in
    one ``(T, I) x (I, 2H)`` matmul and runs the recurrence ``h_t = a_t h_{t-1} + b_t`` with
    ``a = 1 - z``, ``b = z h~`` through :func:`rnnjax.linear_scan` (``mode=scan_mode``), or,
    with ``log_space=True``, in log space (``log a = -softplus(k)``, ``log b = -softplus(-k) +
    log g(v)``; ``rnnjax.cells._minrnn.log_linear_scan``), as the paper's parallel mode. On
    CPU in float32 with the native kernels, where ``scan_mode`` resolves to ``"native"``, the
    plain form is two compiled passes instead: the matmul on the kernels' sgemm, then the
    gates and the recurrence in one pass each way that never writes ``a`` and ``b``
    (:mod:`rnnjax._native.minrnn`, docs/native.md). All
    equal the ``lax.scan`` of ``step`` (``cell._replace(sequence=None)``) with ``length``,
    ``mask``, ``reverse``, ``reset`` and a given carry. ``remat`` stores only the projection
    and recomputes the gates and the recurrence. Through ``linear_scan`` (its custom VJP) only
    reverse-mode derivatives exist; use the step scan for ``jax.jvp``. NaN and inf reach the
    values as in the step scan; in log space, the derivatives at an infinite pre-activation may
    be NaN where the step scan's are finite (its logarithms of the gates meet inf - inf).

    No ``recurrent_mask`` (recurrent dropout): there is no recurrent weight matrix, and the
    decay ``1 - z`` is the only path from ``h_{t-1}``.

    Args:
      hidden_size: H.
      log_space: the paper's log-space form (positive ``h~ = g(v)``, log-space scan): a
        different parametrisation of the candidate, not only another way to compute it.
      scan_mode: ``linear_scan``'s backend for the plain form (``"auto"``, ``"sequential"``,
        ``"associative"``, ``"chunked"``, ``"native"``).
      input_init, bias_init: initializers; ``input_init`` is called once per ``(I, H)`` block.
      dtype: dtype of the params and the initial carry.

    >>> import jax, jax.numpy as jnp, rnnjax as rj
    >>> cell = rj.cells.mingru(4)
    >>> params = cell.init(jax.random.key(0), 3)
    >>> h, ys = rj.scan(cell, params, jnp.ones((5, 3)))
    >>> params["w"].shape, params["b"].shape, ys.shape
    ((3, 8), (8,), (5, 4))
    >>> h1 = cell.step(params, cell.initial_carry(params), jnp.ones(3))[0]
    >>> bool(jnp.allclose(h1, ys[0]))
    True
    """

    def plain(proj):
        k, v = jnp.split(proj, 2, axis=-1)
        z = jax.nn.sigmoid(k)
        return 1.0 - z, z * (g(v) if log_space else v)

    def logs(proj):
        k, v = jnp.split(proj, 2, axis=-1)
        return -jax.nn.softplus(k), -jax.nn.softplus(-k) + log_g(v)

    return min_cell(
        "mingru", hidden_size, 2, plain, logs, log_space=log_space, scan_mode=scan_mode,
        input_init=input_init, bias_init=bias_init, dtype=dtype, fused=minrnn.mingru_scan,
    )  # fmt: skip
