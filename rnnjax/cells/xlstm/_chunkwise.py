"""The mLSTM over a whole sequence in its chunkwise-parallel form (xLSTM, Beck et al. 2024,
appendix; NX-AI/xlstm's ``chunkwise_simple``), equal to stepping the cell.

Per head, with ``F_j = sum_{r <= j} log f_r`` inside a chunk, unrolling the step's recurrence
gives every chunk position ``j`` in closed form:

    D[j, s] = i~_s + F_j - F_s          (s <= j, no reset in (s, j]; else -inf)
    g_j     = F_j + m                   the carried memory's log weight (m: the carry's)
    m_j     = max(g_j, max_s D[j, s])   the step form's stabiliser, unrolled
    S[j, s] = (q_j . k_s) exp(D[j, s] - m_j)
    num_j   = sum_s S[j, s] v_s + exp(g_j - m_j) C^T q_j
    h~_j    = num_j / (max(|sum_s S[j, s] + exp(g_j - m_j) n . q_j|, exp(-m_j)) + eps)

and the chunk's last row is the carry for the next chunk. A reset at position ``r`` (the carry
restarts from zeros with ``m = 0`` just before step ``r``) replaces ``g_j`` for ``j >= r`` by
``F_j - F_{r-1}`` with nothing carried; a padded step has ``i~ = -inf`` and ``log f = 0``, so it
adds nothing and keeps the carry. ``reverse`` runs the flipped sequence.

Special values: padding never matters, and a NaN or inf carry reaches no value past a reset,
as in the step form. What differs lies inside one chunk: a non-finite input at a real step
reaches the later rows' values past a reset (``0 * nan`` in the sums over ``s``), and a row
made non-finite (by its input or by the carry) reaches the derivatives for the chunk's other
steps and the weights (``0 * nan`` in the transposed sums), where stepping, which restarts at
a reset and hands a padded step a zero carry, keeps them finite. Such a row's own output is
non-finite in both forms, so a loss over the outputs is too.

Chunks run one after another (``lax.scan``); under ``remat`` each group of chunks is recomputed
in the backward pass, so BPTT stores the carry once per group.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax


def _chunk(q, k, v, log_i, log_f, reset, c, n, m, eps):
    """One head over one chunk: ``q, k, v (L, d)``, ``log_i, log_f (L,)``, ``reset (L,)``
    bool, carry ``c (d, d)``, ``n (d,)``, ``m ()`` -> ``h~ (L, d)`` and the carry after."""
    steps = q.shape[0]
    pos = jnp.arange(steps)
    big_f = jnp.cumsum(log_f)
    resets = jnp.cumsum(reset)
    # F_{r-1} for the last reset r <= j, where there is one.
    last = lax.cummax(jnp.where(reset, pos, 0))
    fresh = resets > 0
    g = jnp.where(fresh, big_f - (big_f - log_f)[last], big_f + m)
    valid = (pos[None, :] <= pos[:, None]) & (resets[None, :] == resets[:, None])
    log_d = jnp.where(valid, log_i[None, :] + big_f[:, None] - big_f[None, :], -jnp.inf)
    m_j = jnp.maximum(g, jnp.max(log_d, axis=1))
    w = jnp.exp(log_d - m_j[:, None])
    # exp of -inf, not a where after the exp: the where's zero cotangent would meet inf there.
    carried = jnp.exp(jnp.where(fresh, -jnp.inf, big_f + m - m_j))
    # Past a reset the carry is gone, as in the step form: wheres on both sides of each
    # product keep a NaN or inf carry out of those rows' values.
    q_old = jnp.where(fresh[:, None], 0, q)
    from_c = jnp.where(fresh[:, None], 0, carried[:, None] * (q_old @ c))
    from_n = jnp.where(fresh, 0, carried * (q_old @ n))
    # The where (not just w = 0 there) keeps a non-finite row's cotangent off the other pairs.
    s = jnp.where(valid, (q @ k.T) * w, 0)
    num = s @ v + from_c
    den = jnp.maximum(jnp.abs(s.sum(1) + from_n), jnp.exp(-m_j)) + eps
    c_new = jnp.where(fresh[-1], 0, carried[-1] * c) + (k * w[-1][:, None]).T @ v
    n_new = jnp.where(fresh[-1], 0, carried[-1] * n) + w[-1] @ k
    return num / den[:, None], c_new, n_new, m_j[-1]


def _group_chunks(remat, steps: int, chunk: int) -> int:
    """Chunks per checkpointed group: 1 for ``remat=True``; ``k // chunk`` for ``remat=k``
    (``round(sqrt(T))`` for ``"sqrt"``), at least 1; 0 without remat."""
    if remat is False:
        return 0
    if remat is True:
        return 1
    k = max(1, round(math.sqrt(steps))) if isinstance(remat, str) else int(remat)
    return max(1, k // chunk)


def _pad(a, total: int, fill):
    pad = total - a.shape[0]
    if not pad:
        return a
    return jnp.concatenate([a, jnp.full((pad, *a.shape[1:]), fill, a.dtype)])


def run(params, xs, carry, real, reset, *, project, state, eps, chunk_size, reverse, remat):
    """``(carry, ys)`` of the mLSTM over ``xs (T, I)``, as :func:`rnnjax.scan` of its step.

    ``project(params, xs)`` gives ``q, k, v (T, heads, d)``, ``log_i, log_f (T, heads)`` and
    the output gate ``o (T, H)``; ``carry`` is ``state(c, n, m)``; ``real`` and ``reset`` are
    ``(T,)`` bool or None.
    """
    steps = xs.shape[0]
    if steps == 0:
        return carry, jnp.zeros((0, params["w_o"].shape[1]), params["w_o"].dtype)
    real = jnp.ones((steps,), bool) if real is None else real
    reset = jnp.zeros((steps,), bool) if reset is None else reset
    # Padding never reaches a value or a derivative, NaN included.
    xs = jnp.where(real[:, None], xs, jnp.zeros_like(xs))
    if reverse:
        xs, real, reset = xs[::-1], real[::-1], reset[::-1]
    q, k, v, log_i, log_f, o = project(params, xs)
    log_i = jnp.where(real[:, None], log_i, -jnp.inf)
    log_f = jnp.where(real[:, None], log_f, jnp.zeros_like(log_f))

    chunk = min(chunk_size, steps)
    group = _group_chunks(remat, steps, chunk)
    per_pass = chunk * max(group, 1)
    total = -(-steps // per_pass) * per_pass
    inputs = (
        _pad(q, total, 0),
        _pad(k, total, 0),
        _pad(v, total, 0),
        _pad(log_i, total, -jnp.inf),
        _pad(log_f, total, 0),
        _pad(reset, total, False),
    )
    inputs = jax.tree.map(lambda a: a.reshape(total // chunk, chunk, *a.shape[1:]), inputs)

    heads = jax.vmap(
        lambda *a: _chunk(*a, eps=eps),
        in_axes=(1, 1, 1, 1, 1, None, 0, 0, 0),
        out_axes=(1, 0, 0, 0),
    )

    def body(carry, chunk_inputs):
        h, c, n, m = heads(*chunk_inputs, *carry)
        return state(c, n, m), h

    if not group:
        carry, h = lax.scan(body, carry, inputs)
    else:
        grouped = jax.tree.map(lambda a: a.reshape(-1, group, *a.shape[1:]), inputs)

        # Inside a scan the recomputation cannot merge with the forward pass (rnnjax.scan's
        # segments do the same).
        @functools.partial(jax.checkpoint, prevent_cse=False)
        def segment(carry, group_inputs):
            return lax.scan(body, carry, group_inputs)

        carry, h = lax.scan(segment, carry, grouped)
    h = h.reshape(total, -1)[:steps]
    # h is zeroed before the product too: a padded row's h (a non-finite carry's) must not
    # meet the output gate's derivative.
    ys = o * jnp.where(real[:, None], h, jnp.zeros_like(h))
    return carry, ys[::-1] if reverse else ys
