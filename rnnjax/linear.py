"""Linear recurrences ``h_t = a_t * h_{t-1} + b_t``: :func:`linear_scan` and its backends.

The modern recurrent families (minGRU, minLSTM, RG-LRU, LRU) are linear in the carry, so a
whole sequence is one such recurrence after a parallel input projection. The recurrence is
elementwise: every feature is its own scalar recurrence, and the work is a few flops per element
of ``(T, *D)`` arrays, so its speed is the memory bandwidth of the pass.

Backends (``mode=``), one function behind them (recurrentgemma's ``scan.py`` is the model):

- ``"sequential"``: ``lax.scan`` over time, one ``D``-vector per step.
- ``"associative"``: ``lax.associative_scan`` of ``(a, b)`` pairs, ``O(log T)`` depth; the
  form for accelerators, slower than a loop on a few CPU cores.
- ``"chunked"``: blocks of ``chunk`` steps: a scan over the positions inside a block runs all
  blocks at once (``T / chunk`` times wider vectors than ``"sequential"``), a short scan carries
  each block's end into the next, and one elementwise pass adds it in.
- ``"native"``: rnnjax's compiled CPU kernel (``rnnjax/_native/linear.cc``), float32 and
  complex64, where it is built: one pass over the arrays each way, with its own backward pass
  (docs/native.md).
- ``"auto"`` (the default): picks by platform and size (:func:`resolve_mode`).

Every mode gives the same values and gradients (within rounding: the associative and chunked
forms multiply the ``a`` in another order). The gradient is a custom VJP: the backward pass is
the same recurrence run the other way over the cotangents, ``lambda_t = g_t + a_{t+1}
lambda_{t+1}``, so nothing beyond ``h`` is stored and the backward pass runs on the same
backend as the forward pass. Forward mode (``jax.jvp``) is not defined through a custom VJP;
differentiate in reverse mode.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from rnnjax._native import linear as native_linear
from rnnjax.core import check_option

# Backends: (a, b, h0, reverse, reset) -> h, over flattened (T, N) arrays of one dtype, T >= 1;
# reset is None or (T,) bool: there h_t = b_t, whatever h_{t-1} holds (a zero a_t would not do:
# 0 * NaN is NaN, and a NaN carry would cross into the next sequence of a packed stream).
Backend = Callable[[jax.Array, jax.Array, jax.Array, bool, "jax.Array | None"], jax.Array]

CHUNK = 64


def _sequential(a, b, h0, reverse, reset=None):
    if reset is None:

        def step(h, ab):
            h = ab[0] * h + ab[1]
            return h, h

        return lax.scan(step, h0, (a, b), reverse=reverse)[1]

    def step_reset(h, abr):
        a_t, b_t, r_t = abr
        h = jnp.where(r_t, b_t, a_t * h + b_t)
        return h, h

    return lax.scan(step_reset, h0, (a, b, reset), reverse=reverse)[1]


def _combine(left, right):
    """The associative operator: apply ``left`` then ``right`` (h -> a h + b composed); a
    reset in ``right`` forgets ``left``."""
    a1, b1, r1 = left
    a2, b2, r2 = right
    return (
        jnp.where(r2, a2, a1 * a2),
        jnp.where(r2, b2, a2 * b1 + b2),
        r1 | r2,
    )


def _associative(a, b, h0, reverse, reset=None):
    # Fold the starting carry into the first step's offset: h_first = a_first * h0 + b_first.
    first = -1 if reverse else 0
    r = jnp.zeros((a.shape[0], 1), bool) if reset is None else reset[:, None]
    b = b.at[first].add(jnp.where(r[first], 0, a[first] * h0))
    r = jnp.broadcast_to(r, a.shape)
    return lax.associative_scan(_combine, (a, b, r), reverse=reverse)[1]


def _chunked(a, b, h0, reverse, reset=None, chunk: int = CHUNK):
    steps, n = a.shape
    if reverse:
        flip = None if reset is None else reset[::-1]
        return _chunked(a[::-1], b[::-1], h0, False, flip, chunk)[::-1]
    r = jnp.zeros(steps, bool) if reset is None else reset
    k = min(chunk, steps)
    blocks = -(-steps // k)
    pad = blocks * k - steps
    if pad:
        # Past the end: h -> 1 * h + 0, which keeps the carry and is never read.
        a = jnp.concatenate([a, jnp.ones((pad, n), a.dtype)])
        b = jnp.concatenate([b, jnp.zeros((pad, n), b.dtype)])
        r = jnp.concatenate([r, jnp.zeros(pad, bool)])
    # (k, blocks, n): position inside a block first, so the inner scan runs every block at once.
    a_k = a.reshape(blocks, k, n).transpose(1, 0, 2)
    b_k = b.reshape(blocks, k, n).transpose(1, 0, 2)
    r_k = r.reshape(blocks, k).T[..., None]

    def inner(carry, abr):
        prod, h, seen = carry
        a_t, b_t, r_t = abr
        # After a reset inside the block the entering carry no longer counts (seen).
        prod = jnp.where(r_t, jnp.zeros_like(prod), prod * a_t)
        h = jnp.where(r_t, b_t, a_t * h + b_t)
        seen = seen | r_t
        return (prod, h, seen), (prod, h, seen)

    start = (
        jnp.ones((blocks, n), a.dtype),
        jnp.zeros((blocks, n), b.dtype),
        jnp.zeros((blocks, 1), bool),
    )
    (prod_end, h_end, seen_end), (prod, local, seen) = lax.scan(inner, start, (a_k, b_k, r_k))

    # The carry entering each block: a short sequential scan over the blocks' ends.
    def across(h, ends):
        p, e, s = ends
        return jnp.where(s, e, p * h + e), h

    _, entering = lax.scan(across, h0, (prod_end, h_end, seen_end))
    h = jnp.where(seen, local, local + prod * entering[None])
    return h.transpose(1, 0, 2).reshape(blocks * k, n)[:steps]


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def _native(a, b, h0, reverse, reset=None):
    return native_linear.forward(a, b, h0, reset, reverse=reverse)


@_native.defjvp
def _native_jvp(reverse, primals, tangents):
    # Only reached by second derivatives (first ones take the custom VJP): the kernel's values,
    # with the tangents of the sequential backend, which JAX can transpose.
    a, b, h0, reset = primals
    tangent = jax.jvp(
        lambda a, b, h0: _sequential(a, b, h0, reverse, reset), (a, b, h0), tangents[:3]
    )[1]
    return _native(a, b, h0, reverse, reset), tangent


BACKENDS: dict[str, Backend] = {
    "sequential": _sequential,
    "associative": _associative,
    "chunked": _chunked,
    "native": _native,
}

MODES = ("auto", *BACKENDS)


def native_available() -> bool:
    """Whether the compiled CPU kernel of the recurrence is built and loadable."""
    return native_linear.available()


def resolve_mode(mode: str, steps: int, width: int, dtype) -> str:
    """The backend ``mode`` runs for ``steps`` x ``width`` elements of ``dtype``: ``mode``
    itself unless it is ``"auto"``.

    On CPU: the native kernel where it is built and takes the dtype (float32, complex64), else
    ``"sequential"``: on this project's 2-core CPU the kernel was the fastest backend at every
    size measured (T 16 to 65,536, N 16 to 4,096) and ``lax.scan`` the fastest of the others;
    the associative and chunked forms do several times the memory traffic (PERF-NOTES.md). On
    GPU and TPU: ``"associative"`` (a Pallas kernel would slot in here). ``steps`` and
    ``width`` are the hooks for size thresholds, which no measurement has called for yet.

    >>> resolve_mode("chunked", 100, 8, "float32")
    'chunked'
    """
    if mode != "auto":
        return mode
    if jax.default_backend() != "cpu":
        return "associative"
    if native_available() and jnp.dtype(dtype) in native_linear.DTYPES:
        return "native"
    return "sequential"


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _recurrence(a, b, h0, reverse, mode, reset):
    return BACKENDS[mode](a, b, h0, reverse, reset)


def _recurrence_fwd(a, b, h0, reverse, mode, reset):
    h = BACKENDS[mode](a, b, h0, reverse, reset)
    return h, (a, h0, h, reset)


def _shift(x, fill, reverse):
    """``x`` moved one step back in time (``x[t-1]`` at ``t``; forward in reverse mode), the
    first position filled with ``fill``."""
    if reverse:
        return jnp.concatenate([x[1:], fill[None]])
    return jnp.concatenate([fill[None], x[:-1]])


def _backward(a, h0, h, g, reset, reverse, mode):
    """The cotangents of ``(a, b, h0)`` from those of ``h``, on the backend ``mode``."""
    zero = jnp.zeros_like(h0)
    first = -1 if reverse else 0
    # lambda_t = g_t + a_{t+1} lambda_{t+1}: the recurrence in the other direction, with the a
    # of the step that reads h_t; nothing crosses a reset (that step did not read h_t).
    a_next = _shift(a, zero, not reverse)
    reset_next = None if reset is None else _shift(reset, jnp.array(False), not reverse)
    lam = BACKENDS[mode](a_next, g, zero, not reverse, reset_next)
    da = lam * _shift(h, h0, reverse)
    dh0 = a[first] * lam[first]
    if reset is not None:
        da = jnp.where(reset[:, None], jnp.zeros_like(da), da)
        dh0 = jnp.where(reset[first], zero, dh0)
    return da, lam, dh0


@functools.partial(jax.custom_jvp, nondiff_argnums=(5,))
def _native_backward(a, h0, h, g, reset, reverse):
    # The kernel's own backward pass: one pass over a, h and g (20 bytes per float32 element).
    return native_linear.backward(a, h0, h, g, reset, reverse=reverse)


@_native_backward.defjvp
def _native_backward_jvp(reverse, primals, tangents):
    a, h0, h, g, reset = primals
    backward = lambda a, h0, h, g: _backward(a, h0, h, g, reset, reverse, "sequential")  # noqa: E731
    tangent = jax.jvp(backward, (a, h0, h, g), tangents[:4])[1]
    return _native_backward(*primals, reverse), tangent


def _recurrence_bwd(reverse, mode, res, g):
    a, h0, h, reset = res
    if mode == "native":
        da, db, dh0 = _native_backward(a, h0, h, g, reset, reverse)
    else:
        da, db, dh0 = _backward(a, h0, h, g, reset, reverse, mode)
    return da, db, dh0, None


_recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)


def linear_scan(
    a: jax.typing.ArrayLike,
    b: jax.typing.ArrayLike,
    h0: jax.typing.ArrayLike | None = None,
    *,
    reverse: bool = False,
    reset: jax.typing.ArrayLike | None = None,
    mode: str = "auto",
) -> jax.Array:
    """``h_t = a_t * h_{t-1} + b_t`` over one example; batch with ``jax.vmap``.

    Args:
      a: ``(T, *D)`` decay per step and feature (real or complex); broadcast against ``b``.
      b: ``(T, *D)`` input per step.
      h0: ``D``-shaped carry before the first step; ``None`` means zeros.
      reverse: run from the last step to the first (``h_t = a_t * h_{t+1} + b_t``, ``h0``
        entering at step ``T - 1``).
      reset: ``(T,)`` bool: the carry is zeroed just before step ``t`` (the starts of
        sequences packed in one stream, as :func:`rnnjax.scan`'s ``reset=``): there
        ``h_t = b_t`` whatever the carry held, NaN included, and no derivative crosses the
        step (``a_t`` gets a zero gradient).
      mode: ``"auto"``, ``"sequential"``, ``"associative"``, ``"chunked"`` or ``"native"``
        (see the module docstring); every mode gives the same values and gradients.

    Returns:
      ``h`` of shape ``(T, *D)``, in the result dtype of ``a``, ``b`` and ``h0``.

    >>> import jax.numpy as jnp, rnnjax as rj
    >>> rj.linear_scan(jnp.full((4, 1), 0.5), jnp.ones((4, 1)))[:, 0]
    Array([1.   , 1.5  , 1.75 , 1.875], dtype=float32)
    """
    check_option("linear_scan mode", mode, MODES)
    if not isinstance(reverse, bool | np.bool_):
        raise TypeError(f"linear_scan reverse must be True or False, got {reverse!r}")
    b = jnp.asarray(b)
    a = jnp.asarray(a)
    if b.ndim < 1:
        raise ValueError(
            f"linear_scan expects b of shape (T, *D) with a leading time axis, got shape "
            f"{b.shape}: one example; vmap over a batch axis"
        )
    try:
        shape = jnp.broadcast_shapes(a.shape, b.shape)
    except ValueError:
        raise ValueError(
            f"linear_scan expects a and b of one shape (T, *D), got a {a.shape} and b "
            f"{b.shape}: a must broadcast against b"
        ) from None
    if shape != b.shape:
        raise ValueError(
            f"linear_scan expects a to broadcast to b's shape {b.shape}, got a {a.shape}"
        )
    steps, state = shape[0], shape[1:]
    dtypes = [a.dtype, b.dtype] + ([] if h0 is None else [jnp.result_type(h0)])
    dtype = jnp.result_type(*dtypes)
    if not jnp.issubdtype(dtype, jnp.inexact):
        dtype = jnp.result_type(dtype, jnp.float32)
    if h0 is None:
        h0 = jnp.zeros(state, dtype)
    else:
        h0 = jnp.asarray(h0)
        if h0.shape != state:
            raise ValueError(
                f"linear_scan expects h0 of shape D = {state} (one example's carry), got {h0.shape}"
            )
    if reset is not None:
        if np.shape(reset) != (steps,) or jnp.result_type(reset) != jnp.bool_:
            raise ValueError(
                f"linear_scan expects reset to be a boolean array of shape (T,) = ({steps},), "
                f"got {jnp.result_type(reset)}{tuple(np.shape(reset))}"
            )
    if steps == 0:
        return jnp.zeros(shape, dtype)
    a = jnp.broadcast_to(a, shape).astype(dtype)
    b = b.astype(dtype)
    h0 = h0.astype(dtype)
    if reset is not None:
        # A fresh array, not the caller's: vmap over a numpy constant under jit hands that
        # numpy array through, and a custom VJP's residuals refuse it ("non-canonical").
        reset = jnp.logical_and(jnp.asarray(reset), True)
    width = int(np.prod(state, dtype=np.int64))
    mode = resolve_mode(mode, steps, width, dtype)
    if mode == "native" and not native_available():
        raise RuntimeError(
            "linear_scan mode='native' needs rnnjax's compiled CPU kernels, which are not "
            f"available here ({native_linear.unavailable_reason()}); use mode='auto'"
        )
    if mode == "native" and jnp.dtype(dtype) not in native_linear.DTYPES:
        raise TypeError(
            f"linear_scan mode='native' runs float32 and complex64, got {jnp.dtype(dtype)}: "
            "cast a and b, or use mode='auto'"
        )
    flat = lambda x: x.reshape(steps, width)  # noqa: E731
    h = _recurrence(flat(a), flat(b), h0.reshape(width), bool(reverse), mode, reset)
    return h.reshape(shape)
