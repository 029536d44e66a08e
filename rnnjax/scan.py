"""Running a cell over a sequence: :func:`scan` (``lax.scan``) and :func:`loop` (a Python loop).

Both take the same arguments and give the same results; ``loop`` is the unrolled baseline that
benchmarks compare ``scan`` against.

Masking semantics: at a padded step the carry is kept and the output is zero. ``length=n``
means the first ``n`` steps are real (right padding); ``mask`` marks real steps in any pattern.
``reverse=True`` runs the real steps from last to first and keeps outputs aligned with the
input positions, so a reverse pass over right-padded input needs no flipping by the caller.
The returned carry is the carry after the last real step.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from rnnjax.core import Carry, Cell, Params, check_carry


def _sequence_length(xs: Any, where: str) -> int:
    leaves = jax.tree.leaves(xs)
    if not leaves:
        raise ValueError(f"{where} expects xs of shape (T, input_size), got an empty pytree")
    lengths = set()
    for leaf in leaves:
        shape = tuple(np.shape(leaf))
        if len(shape) < 1:
            raise ValueError(
                f"{where} expects xs of shape (T, input_size) with a leading time axis, "
                f"got shape {shape}: add a time axis, e.g. xs[None] for one step"
            )
        lengths.add(shape[0])
    if len(lengths) > 1:
        raise ValueError(
            f"{where} expects every leaf of xs to have the same T, got {sorted(lengths)}"
        )
    return lengths.pop()


def step_mask(length: Any, mask: Any, steps: int, where: str) -> jax.Array | None:
    """The boolean ``(T,)`` mask of real steps from ``length`` or ``mask`` (None if neither).

    A concrete ``length`` must lie in ``[0, T]``; a traced one (under ``jit``/``vmap``) cannot be
    checked and acts as if clipped to that range.
    """
    if length is not None and mask is not None:
        raise ValueError(f"{where} takes length= or mask=, not both: fold the length into the mask")
    if length is not None:
        if np.ndim(length) != 0:
            raise ValueError(
                f"{where} expects length to be a scalar (one example), got shape "
                f"{np.shape(length)}: vmap over the batch axis, e.g. "
                "jax.vmap(lambda x, n: ...(x, length=n))(xs, lengths)"
            )
        if not jnp.issubdtype(jnp.result_type(length), jnp.integer):
            raise TypeError(
                f"{where} expects an integer length, got dtype {jnp.result_type(length)}"
            )
        if not isinstance(length, jax.core.Tracer):
            n = int(length)
            if not 0 <= n <= steps:
                raise ValueError(
                    f"{where} expects length in [0, T] = [0, {steps}], got {n}: "
                    "length counts the real (unpadded) steps of xs"
                )
        return jnp.arange(steps) < length
    if mask is not None:
        if tuple(np.shape(mask)) != (steps,):
            raise ValueError(
                f"{where} expects mask of shape (T,) = ({steps},), got {tuple(np.shape(mask))}: "
                "one flag per time step of one example; vmap over the batch axis"
            )
        if jnp.result_type(mask) != jnp.bool_:
            raise TypeError(
                f"{where} expects a boolean mask, got dtype {jnp.result_type(mask)}: "
                "use mask.astype(bool)"
            )
        return jnp.asarray(mask)
    return None


def _check_unroll(unroll: Any, where: str) -> None:
    ok = isinstance(unroll, bool) or (isinstance(unroll, int) and unroll >= 1)
    if not ok:
        raise ValueError(f"{where} expects unroll to be a positive int or True, got {unroll!r}")


def _check_remat(remat: Any, where: str) -> None:
    if not isinstance(remat, bool):
        raise ValueError(f"{where} expects remat to be True or False, got {remat!r}")


def _prepare(cell, params, xs, carry, length, mask, reset, where):
    """Check the inputs; return the starting carry and the scanned inputs ``(x, real, reset)``
    (``real`` and ``reset`` are None when unused, which lax.scan treats as empty)."""
    steps = _sequence_length(xs, where)
    real = step_mask(length, mask, steps, where)
    if reset is not None:
        if tuple(np.shape(reset)) != (steps,) or jnp.result_type(reset) != jnp.bool_:
            raise ValueError(
                f"{where} expects reset to be a boolean array of shape (T,) = ({steps},), got "
                f"{jnp.result_type(reset)}{tuple(np.shape(reset))}: True where a new sequence "
                "starts; vmap over the batch axis"
            )
        reset = jnp.asarray(reset)
    if carry is None:
        carry = cell.initial_carry(params)
    else:
        check_carry(carry, jax.eval_shape(cell.initial_carry, params), where)
    return carry, (xs, real, reset), steps


def _step_fn(cell: Cell, params: Params, remat: bool):
    """``(carry, (x, real, reset)) -> (carry, y)``, the body of the scan."""

    def step(carry, inputs):
        x, real, reset = inputs
        if reset is not None:
            fresh = cell.initial_carry(params)
            carry = jax.tree.map(lambda new, old: jnp.where(reset, new, old), fresh, carry)
        new_carry, y = cell.step(params, carry, x)
        if real is None:
            return new_carry, y
        carry = jax.tree.map(lambda new, old: jnp.where(real, new, old), new_carry, carry)
        y = jax.tree.map(lambda a: jnp.where(real, a, jnp.zeros_like(a)), y)
        return carry, y

    return jax.checkpoint(step) if remat else step


def scan(
    cell: Cell,
    params: Params,
    xs: Any,
    carry: Carry = None,
    *,
    length: Any = None,
    mask: Any = None,
    reset: Any = None,
    reverse: bool = False,
    unroll: int | bool = 1,
    remat: bool = False,
) -> tuple[Carry, Any]:
    """Run ``cell`` over ``xs`` with ``jax.lax.scan``.

    Args:
      cell: a :class:`rnnjax.Cell`.
      params: the cell's params.
      xs: ``(T, input_size)`` for one example (or a pytree whose leaves share the leading T).
      carry: the starting carry; ``None`` means ``cell.initial_carry(params)``.
      length: scalar int, the number of real steps at the front of ``xs`` (right padding).
      mask: ``(T,)`` bool, True at real steps. Give ``length`` or ``mask``, not both.
      reset: ``(T,)`` bool, True where a new sequence starts inside ``xs`` (a stream of
        concatenated sequences): the carry is replaced by ``cell.initial_carry(params)`` just
        before that step is run, in either direction.
      reverse: run from the last real step to the first; outputs stay aligned with ``xs``.
      unroll: steps per ``lax.scan`` loop iteration (``True``: fully unrolled).
      remat: recompute each step in the backward pass instead of storing its intermediates.

    Returns:
      ``(carry, ys)``: the carry after the last real step and the outputs, ``(T, output_size)``,
      zero at padded steps.

    >>> import jax, jax.numpy as jnp, rnnjax as rj
    >>> cell = rj.cells.gru(8)
    >>> params = cell.init(jax.random.key(0), 3)
    >>> h, ys = rj.scan(cell, params, jnp.ones((5, 3)), length=3)
    >>> ys.shape, bool((ys[3:] == 0).all()), bool((h == ys[2]).all())
    ((5, 8), True, True)
    """
    where = "rnnjax.scan"
    _check_unroll(unroll, where)
    _check_remat(remat, where)
    carry, inputs, _ = _prepare(cell, params, xs, carry, length, mask, reset, where)
    step = _step_fn(cell, params, remat)
    return lax.scan(step, carry, inputs, reverse=bool(reverse), unroll=unroll)


def loop(
    cell: Cell,
    params: Params,
    xs: Any,
    carry: Carry = None,
    *,
    length: Any = None,
    mask: Any = None,
    reset: Any = None,
    reverse: bool = False,
    unroll: int | bool = 1,
    remat: bool = False,
) -> tuple[Carry, Any]:
    """:func:`scan`'s call and results, run as a plain Python loop over time.

    Under ``jit`` this traces T copies of the step (the "unrolled" baseline); outside ``jit``
    it runs op by op. ``unroll`` is accepted for call compatibility and has no effect (a Python
    loop is fully unrolled); ``remat`` wraps each step in ``jax.checkpoint``.

    >>> import jax, jax.numpy as jnp, rnnjax as rj
    >>> cell = rj.cells.elman(4)
    >>> params = cell.init(jax.random.key(0), 2)
    >>> xs = jnp.ones((3, 2))
    >>> bool(jnp.allclose(rj.loop(cell, params, xs)[1], rj.scan(cell, params, xs)[1]))
    True
    """
    where = "rnnjax.loop"
    _check_unroll(unroll, where)
    _check_remat(remat, where)
    carry, inputs, steps = _prepare(cell, params, xs, carry, length, mask, reset, where)
    step = _step_fn(cell, params, remat)
    if steps == 0:
        x_spec = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), xs)
        y_spec = jax.eval_shape(lambda c, x: cell.step(params, c, x)[1], carry, x_spec)
        return carry, jax.tree.map(lambda s: jnp.zeros((0, *s.shape), s.dtype), y_spec)
    ys = [None] * steps
    for t in reversed(range(steps)) if reverse else range(steps):
        carry, ys[t] = step(carry, jax.tree.map(lambda a, t=t: a[t], inputs))
    return carry, jax.tree.map(lambda *y: jnp.stack(y), *ys)
