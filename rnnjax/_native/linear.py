"""The JAX binding of the native linear-recurrence kernel (``rnnjax/_native/linear.cc``).

Two XLA FFI targets, registered with XLA by :func:`available` once the kernel library is loaded
(:mod:`rnnjax._native`), and called through :func:`jax.ffi.ffi_call`:

- ``rnnjax_linear_forward``: ``h_t = a_t * h_{t-1} + b_t`` over ``(T, N)`` arrays, the carry
  replaced by zero before the steps ``reset`` (T,) flags (:func:`forward`);
- ``rnnjax_linear_backward``: its reverse-mode derivative in one pass (:func:`backward`).

Both take float32 or complex64. Under ``jax.vmap`` the calls use ffi_call's ``"expand_dims"``
rule: the kernel receives batch-first ``(B, T, N)`` arrays and treats an unbatched operand's
batch dimension of 1 as broadcast (read again for every row, never copied), so a vmapped call
is one kernel call over all rows, with no transpose and no broadcast in memory.
:func:`rnnjax.linear_scan` (``mode="native"``) is the public entry point.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from rnnjax import _native

TARGETS = {
    "rnnjax_linear_forward": "RnnjaxLinearForward",
    "rnnjax_linear_backward": "RnnjaxLinearBackward",
}

#: The dtypes the kernel runs.
DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.complex64))


@functools.cache
def _load() -> str | None:
    """Register the two targets once; None on success, else why the kernel is unavailable."""
    if not _native.available():
        return _native.unavailable_reason()
    lib = _native._LIBRARY[0]
    for target, symbol in TARGETS.items():
        try:
            handler = getattr(lib, symbol)
        except AttributeError:
            return (
                f"{_native.library_path().name} was built before the linear-recurrence kernel "
                f"(no {symbol}): reinstall rnnjax (pip install -e .) to rebuild it"
            )
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(handler), platform="cpu")
    return None


def available() -> bool:
    """Whether the kernel is built, loaded and registered (CPU only)."""
    return _load() is None


def unavailable_reason() -> str | None:
    """Why :func:`available` is False (None when it is True)."""
    return _load()


def _check(name: str, *arrays: jax.Array) -> None:
    if not available():
        raise RuntimeError(f"rnnjax: the native linear recurrence is unavailable: {_load()}")
    dtypes = {x.dtype for x in arrays}
    if len(dtypes) != 1 or next(iter(dtypes)) not in DTYPES:
        raise TypeError(
            f"rnnjax._native.linear.{name} runs float32 or complex64 operands of one dtype, got "
            f"{', '.join(str(x.dtype) for x in arrays)}: cast them, or use another linear_scan mode"
        )


def _flags(reset, steps: int) -> jax.Array:
    return jnp.zeros(steps, bool) if reset is None else jnp.asarray(reset, bool)


def forward(
    a: jax.Array, b: jax.Array, h0: jax.Array, reset: jax.Array | None = None, *, reverse: bool
) -> jax.Array:
    """``h`` (T, N) with ``h_t = a_t * h_{t-1} + b_t`` from ``a``, ``b`` (T, N) and ``h0`` (N,),
    from the last step to the first when ``reverse``; where ``reset`` (T,) is True,
    ``h_t = b_t`` whatever the carry held.

    >>> import jax.numpy as jnp
    >>> forward(jnp.full((3, 1), 0.5), jnp.ones((3, 1)), jnp.zeros(1), reverse=False)[:, 0]
    Array([1.  , 1.5 , 1.75], dtype=float32)
    """
    _check("forward", a, b, h0)
    out = jax.ShapeDtypeStruct(a.shape, a.dtype)
    call = jax.ffi.ffi_call("rnnjax_linear_forward", out, vmap_method="expand_dims")
    return call(a, b, h0, _flags(reset, a.shape[-2]), reverse=bool(reverse))


def backward(
    a: jax.Array,
    h0: jax.Array,
    h: jax.Array,
    g: jax.Array,
    reset: jax.Array | None = None,
    *,
    reverse: bool,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The cotangents ``(da, db, dh0)`` of :func:`forward`'s inputs from its output's
    cotangent ``g`` (T, N), given its ``a``, ``h0`` and output ``h``: ``db = lambda`` with
    ``lambda_t = g_t + a_{t+1} lambda_{t+1}`` (the steps in the other order), ``da_t = lambda_t
    h_{t-1}`` and ``dh0 = a_first lambda_first``, in one pass over the arrays; no cotangent
    crosses a ``reset`` step (its ``da`` is zero, and so is ``dh0`` when it is the first)."""
    _check("backward", a, h0, h, g)
    outs = (
        jax.ShapeDtypeStruct(a.shape, a.dtype),
        jax.ShapeDtypeStruct(a.shape, a.dtype),
        jax.ShapeDtypeStruct(h0.shape, a.dtype),
    )
    call = jax.ffi.ffi_call("rnnjax_linear_backward", outs, vmap_method="expand_dims")
    da, db, dh0 = call(a, h, h0, g, _flags(reset, a.shape[-2]), reverse=bool(reverse))
    return da, db, dh0
