"""Running a cell over a sequence: :func:`scan` (``lax.scan``) and :func:`loop` (a Python loop).

Both take the same arguments and give the same results; ``loop`` is the unrolled baseline that
benchmarks compare ``scan`` against.

Masking semantics: at a padded step the carry is kept and the output is zero. ``length=n``
means the first ``n`` steps are real (right padding); ``mask`` marks real steps in any pattern.
``reverse=True`` runs the real steps from last to first and keeps outputs aligned with the
input positions, so a reverse pass over right-padded input needs no flipping by the caller.
The returned carry is the carry after the last real step. What padding holds never matters,
NaN included: a padded step's input (and the carry it would have read) reaches neither an
output nor a derivative.

Memory of backpropagation through time (``remat=``): plain BPTT stores every step's
intermediates, so memory grows with T times the cell's activations. ``remat=True`` recomputes
each step in the backward pass and stores only the carry of every step; ``remat=k`` stores the
carry every ``k`` steps and recomputes each ``k``-step segment (its intermediates live only while
that segment's backward runs); ``remat="sqrt"`` picks ``k = round(sqrt(T))``, so about
``sqrt(T)`` carries plus one segment's intermediates are kept, for the cost of one extra forward
pass. Results and gradients are the same in every mode. No mode shrinks the returned outputs
``ys`` (T x output_size per example): when the loss reads every ``ys``, they are held in full,
and so is their cotangent in the backward pass. For a loss that is a sum over steps, compute
each step's term inside the step (a cell whose output is that term) and neither is stored.

The float32 LSTM and GRU run whole sequences, ``remat`` included, in rnnjax's compiled CPU
kernels by default (their ``native=`` argument), with the same results within float32
rounding; docs/native.md says which kernel runs which pass.
"""

from __future__ import annotations

import functools
import inspect
import math
import operator
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


Remat = bool | int | str


def _check_remat(remat: Any, where: str) -> None:
    ok = (
        isinstance(remat, bool)
        or (isinstance(remat, int | np.integer) and remat >= 1)
        or (isinstance(remat, str) and remat == "sqrt")
    )
    if not ok:
        raise ValueError(
            f"{where} expects remat to be True or False, a positive int k (keep the carry every "
            f"k steps) or 'sqrt' (k = round(sqrt(T))), got {remat!r}"
        )


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


def _step_fn(cell: Cell, params: Params):
    """``(carry, (x, real, reset)) -> (carry, y)``, the body of the scan."""

    def step(carry, inputs):
        x, real, reset = inputs
        if reset is not None:
            fresh = cell.initial_carry(params)
            carry = jax.tree.map(lambda new, old: jnp.where(reset, new, old), fresh, carry)
        given = carry
        if real is not None:
            # A padded step's result is dropped, so what it reads must not reach a derivative
            # either: the wheres below alone would still multiply their zero cotangent by the
            # step's Jacobian there (NaN padding, or a NaN carry, would make NaN gradients of
            # weights that did not touch them).
            x = jax.tree.map(lambda a: jnp.where(real, a, jnp.zeros_like(a)), x)
            given = jax.tree.map(lambda a: jnp.where(real, a, jnp.zeros_like(a)), carry)
        new_carry, y = cell.step(params, given, x)
        if real is None:
            return new_carry, y
        carry = jax.tree.map(lambda new, old: jnp.where(real, new, old), new_carry, carry)
        y = jax.tree.map(lambda a: jnp.where(real, a, jnp.zeros_like(a)), y)
        return carry, y

    return step


def scan_steps(
    cell: Cell, params: Params, xs, carry, real, *, reverse: bool, unroll, remat: Remat = False
):
    """``lax.scan`` of ``cell.step`` over checked inputs under ``remat``, whatever
    ``cell.sequence`` is: the loop a cell's whole-sequence fast path falls back to when it does
    not apply."""
    steps = _sequence_length(xs, "rnnjax.scan")
    inputs = (xs, real, None)
    return _scan_remat(_step_fn(cell, params), carry, inputs, steps, remat, reverse, unroll)


# Rematerialization (remat=): which steps' carries are stored, how segments are recomputed.


def _segment_steps(remat: Remat, steps: int) -> int | None:
    """Steps per checkpointed segment: None (store everything) or k in [1, max(T, 1)]."""
    if remat is False:
        return None
    if remat is True:
        return 1
    k = max(1, round(math.sqrt(steps))) if isinstance(remat, str) else operator.index(remat)
    return max(1, min(k, steps))


def _scan_segments(step, carry, inputs, steps: int, k: int, reverse: bool, unroll):
    """``lax.scan(step, ...)`` that stores the carry only every ``k`` steps.

    An outer scan runs over ceil(T/k) segments; its body, a ``jax.checkpoint``-ed inner scan of
    ``k`` steps, is recomputed segment by segment in the backward pass. Segments cover
    positions ``[0, k), [k, 2k), ...`` in either direction (``reverse`` runs both scans
    backwards); positions past T in the last segment are steps that are not real (the carry is
    kept, the output dropped). Each step reads its inputs from ``xs`` by position instead of
    scanning over a reshaped copy: under ``vmap`` that copy would be a time-major transpose of
    the whole input, as large as one layer's activations at long T.
    """
    segments = -(-steps // k)
    xs, real, reset = inputs
    padded = segments * k != steps

    def at(t):
        """The inputs of the step at position ``t`` (clipped to T - 1 past the end)."""
        i = jnp.minimum(t, steps - 1)
        pick = lambda a: lax.dynamic_index_in_dim(a, i, keepdims=False)  # noqa: E731
        x, r, z = jax.tree.map(pick, (xs, real, reset))
        if padded:
            # Past T: not real, and no reset (a reset flag read again from step T - 1 would
            # empty the final carry).
            r = t < steps if r is None else r & (t < steps)
            z = None if z is None else z & (t < steps)
        return x, r, z

    # Inside a scan the recomputation cannot be merged with the forward pass, so the CSE
    # barrier of prevent_cse=True would only cost time (jax.checkpoint's docs).
    @functools.partial(jax.checkpoint, prevent_cse=False)
    def segment(carry, first):
        def step_at(carry, t):
            return step(carry, at(t))

        return lax.scan(step_at, carry, first + jnp.arange(k), reverse=reverse, unroll=unroll)

    carry, ys = lax.scan(segment, carry, jnp.arange(segments) * k, reverse=reverse)
    unfold = lambda a: a.reshape(segments * k, *a.shape[2:])[:steps]  # noqa: E731
    return carry, jax.tree.map(unfold, ys)


def _scan_remat(step, carry, inputs, steps: int, remat: Remat, reverse: bool, unroll):
    """``lax.scan`` of ``step`` under the memory plan ``remat`` (see the module docstring)."""
    k = _segment_steps(remat, steps)
    if k is None:
        return lax.scan(step, carry, inputs, reverse=reverse, unroll=unroll)
    if k == 1:
        step = jax.checkpoint(step, prevent_cse=False)
        return lax.scan(step, carry, inputs, reverse=reverse, unroll=unroll)
    return _scan_segments(step, carry, inputs, steps, k, reverse, unroll)


def _loop_remat(step, carry, inputs, steps: int, remat: Remat, reverse: bool):
    """A Python loop of ``step`` over ``steps >= 1`` positions, each block of ``k`` positions
    ``[0, k), [k, 2k), ...`` checkpointed as one unit when ``remat`` asks for it."""
    k = _segment_steps(remat, steps)

    def block(carry, block_inputs):
        n = jax.tree.leaves(block_inputs)[0].shape[0]
        ys = [None] * n
        for t in reversed(range(n)) if reverse else range(n):
            carry, ys[t] = step(carry, jax.tree.map(lambda a, t=t: a[t], block_inputs))
        return carry, jax.tree.map(lambda *y: jnp.stack(y), *ys)

    if k is None:
        return block(carry, inputs)
    # Outside a scan, jit's CSE could merge the recomputation into the forward pass, so the
    # checkpoint keeps its default prevent_cse=True.
    block = jax.checkpoint(block)
    starts = list(range(0, steps, k))
    ys = [None] * len(starts)
    for i in reversed(range(len(starts))) if reverse else range(len(starts)):
        part = jax.tree.map(lambda a, i=i: a[starts[i] : starts[i] + k], inputs)
        carry, ys[i] = block(carry, part)
    return carry, jax.tree.map(lambda *y: jnp.concatenate(y), *ys)


def _takes(sequence, keyword: str) -> bool:
    """Whether a cell's ``sequence`` accepts ``keyword=``: ``remat`` (it runs checkpointed BPTT
    itself) or ``reset`` (it restarts sequences inside a stream itself)."""
    try:
        return keyword in inspect.signature(sequence).parameters
    except (TypeError, ValueError):
        return False


def _fast_path(cell: Cell, xs: Any, reset: Any, remat: Remat) -> bool:
    """Whether :func:`scan` runs the cell's whole-sequence ``sequence`` instead of its step.

    The built-in cells' fast paths (the native CPU kernels of ``rnnjax.cells._native``, the
    ``fused=True`` path of ``rnnjax.cells._fused``) compute the same values with the
    weight-gradient work moved out of the loop; they cover masks and ``reverse``. ``reset``
    flags take the step-by-step scan unless the ``sequence`` takes ``reset=`` (the linear
    recurrences do: a reset replaces the carry), ``remat`` does too unless it takes ``remat=`` (the
    native kernels do: they checkpoint the carry and recompute segments themselves), and pytree
    inputs always do.
    """
    return (
        cell.sequence is not None
        and (reset is None or _takes(cell.sequence, "reset"))
        and (remat is False or _takes(cell.sequence, "remat"))
        and isinstance(xs, jax.Array | np.ndarray)
    )


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
    remat: Remat = False,
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
      unroll: steps per ``lax.scan`` loop iteration (``True``: fully unrolled); with an int
        ``remat`` it unrolls the scan inside each segment.
      remat: what BPTT stores (results and gradients are the same in every mode).
        ``False``: every step's intermediates. ``True``: only each step's carry; each step is
        recomputed in the backward pass. An int ``k >= 1``: the carry every ``k`` steps; each
        ``k``-step segment is recomputed in the backward pass (memory ~ ``T/k`` carries plus one
        segment's intermediates; ``k >= T`` keeps only the starting carry). ``"sqrt"``:
        ``k = round(sqrt(T))``, for long sequences.

    Returns:
      ``(carry, ys)``: the carry after the last real step and the outputs, ``(T, output_size)``,
      zero at padded steps.

    A cell with a whole-sequence ``sequence`` (the float32 LSTM's and GRU's native kernels, a
    ``fused=True`` cell's fast path) runs it instead of the steps when there are no ``reset``
    flags, with the same results within float32 rounding; ``cell._replace(sequence=None)`` is
    the step-by-step reference.

    >>> import jax, jax.numpy as jnp, rnnjax as rj
    >>> cell = rj.cells.gru(8)
    >>> params = cell.init(jax.random.key(0), 3)
    >>> h, ys = rj.scan(cell, params, jnp.ones((5, 3)), length=3)
    >>> ys.shape, bool((ys[3:] == 0).all()), bool((h == ys[2]).all())
    ((5, 8), True, True)

    BPTT over a long sequence, storing the carry every ``round(sqrt(T))`` = 32 steps:

    >>> xs = jnp.ones((1000, 3))
    >>> bptt = lambda remat: jax.grad(
    ...     lambda p: jnp.sum(rj.scan(cell, p, xs, remat=remat)[1] ** 2))(params)["w_h"]
    >>> stored, recomputed = bptt(False), bptt("sqrt")
    >>> bool(jnp.abs(stored - recomputed).max() <= 1e-4 * jnp.abs(stored).max())
    True
    """
    where = "rnnjax.scan"
    _check_unroll(unroll, where)
    _check_remat(remat, where)
    carry, inputs, steps = _prepare(cell, params, xs, carry, length, mask, reset, where)
    if _fast_path(cell, xs, reset, remat):
        extra = {} if remat is False else {"remat": remat}
        if reset is not None:
            extra["reset"] = inputs[2]
        return cell.sequence(
            params, xs, carry, inputs[1], reverse=bool(reverse), unroll=unroll, **extra
        )
    step = _step_fn(cell, params)
    return _scan_remat(step, carry, inputs, steps, remat, bool(reverse), unroll)


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
    remat: Remat = False,
) -> tuple[Carry, Any]:
    """:func:`scan`'s call and results, run as a plain Python loop over time.

    Under ``jit`` this traces T copies of the step (the "unrolled" baseline); outside ``jit``
    it runs op by op. ``unroll`` is accepted for call compatibility and has no effect (a Python
    loop is fully unrolled); ``remat`` wraps each step (``True``) or each block of ``k`` steps
    (an int, ``"sqrt"``) in ``jax.checkpoint``.

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
    step = _step_fn(cell, params)
    if steps == 0:
        x_spec = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), xs)
        y_spec = jax.eval_shape(lambda c, x: cell.step(params, c, x)[1], carry, x_spec)
        return carry, jax.tree.map(lambda s: jnp.zeros((0, *s.shape), s.dtype), y_spec)
    return _loop_remat(step, carry, inputs, steps, remat, bool(reverse))
