"""Initialisation shared by the cell families: fused gate blocks, each initialised on its own."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from rnnjax._native import minrnn

Initializer = Callable[[jax.Array, tuple[int, ...], jnp.dtype], jax.Array]

# Flax's choices: lecun-normal input weights, orthogonal recurrent weights, zero biases.
default_input_init: Initializer = jax.nn.initializers.lecun_normal()
default_recurrent_init: Initializer = jax.nn.initializers.orthogonal()
default_bias_init: Initializer = jax.nn.initializers.zeros


def check_size(cell_name: str, what: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{cell_name} expects {what} to be a positive int, got {value!r}")


def gate_blocks(
    key: jax.Array, init: Initializer, rows: int, hidden: int, gates: int, dtype: jnp.dtype
) -> jax.Array:
    """A fused ``(rows, gates * hidden)`` matrix whose ``(rows, hidden)`` gate blocks are
    initialised independently, so e.g. each gate's recurrent block is itself orthogonal."""
    # Initialise in at least float32 and cast: half-precision QR (orthogonal init) is not
    # implemented on CPU, and float32 draws keep bfloat16 params on the same distribution.
    wide = jnp.promote_types(dtype, jnp.float32)
    keys = jax.random.split(key, gates)
    blocks = [init(k, (rows, hidden), wide) for k in keys]
    return jnp.concatenate(blocks, axis=1).astype(dtype)


def check_fused(fused: bool) -> bool:
    if not isinstance(fused, bool):
        raise TypeError(f"fused must be True or False, got {fused!r}")
    return fused


def check_compute_dtype(cell_name: str, compute_dtype, fused: bool):
    """``None`` or a floating dtype; the fused fast path computes in the params' dtype only."""
    if compute_dtype is None:
        return None
    try:
        dtype = jnp.dtype(compute_dtype)
    except TypeError:
        dtype = None
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"{cell_name} expects compute_dtype to be None or a floating dtype such as "
            f"jnp.bfloat16, got {compute_dtype!r}"
        )
    if fused:
        raise ValueError(
            f"{cell_name}(compute_dtype={dtype.name}, fused=True): the fused fast path computes "
            "in the params' dtype; use fused=False with a compute_dtype"
        )
    return dtype


def matmul(a: jax.Array, w: jax.Array, compute_dtype) -> jax.Array:
    """``a @ w``. With a ``compute_dtype`` (e.g. bfloat16) both operands are cast to it and the
    product is accumulated and returned in the wider of their own dtypes (float32 params give a
    float32 result), so only the matmul runs in low precision: gates, state and the weights
    themselves stay in float32 (mixed precision).

    The derivative is that of ``a @ w`` in the operands' own dtype, taken at the low-precision
    forward's values (the rounding's derivative is the identity, as for any cast): so the
    backward pass runs the float32 matmuls of the float32 cell, on the trajectory the bfloat16
    forward took. Measured on a CPU with bfloat16 matmul units (BENCHMARKS.md), backward
    matmuls with bfloat16 operands and float32 cotangents were slower than float32 ones."""
    if compute_dtype is None:
        return a @ w
    return _low_precision_matmul(a, w, jnp.dtype(compute_dtype))


def native_matmul_runs(xs: jax.Array, w: jax.Array) -> bool:
    """Whether :func:`sequence_matmul` runs ``xs @ w`` on the native kernels' sgemm: float32
    operands on CPU with the kernels loaded."""
    return (
        xs.dtype == jnp.float32 and w.dtype == jnp.float32
        and jax.default_backend() == "cpu" and minrnn.available()
    )  # fmt: skip


def sequence_matmul(xs: jax.Array, w: jax.Array) -> jax.Array:
    """A whole sequence's ``(T, K) @ (K, N)`` (a parallel form's projection): on the native
    kernels' sgemm where :func:`native_matmul_runs` (:func:`rnnjax._native.minrnn.matmul`,
    whose ``vmap`` is one matmul over every example's rows, ~1.5-2x XLA's dot on the 2-core
    CPU at B=16, T=2048, 256 x 512), else XLA's ``xs @ w``."""
    if xs.ndim == 2 and w.ndim == 2 and native_matmul_runs(xs, w):
        return minrnn.matmul(xs, w)
    return xs @ w


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _low_precision_matmul(a: jax.Array, w: jax.Array, compute_dtype) -> jax.Array:
    out = jnp.promote_types(a.dtype, w.dtype)
    return jnp.matmul(a.astype(compute_dtype), w.astype(compute_dtype), preferred_element_type=out)


def _low_precision_matmul_jvp(compute_dtype, primals, tangents):
    # JAX calls this rule only when some tangent is not a symbolic zero. A symbolic zero marks
    # an input nobody differentiates (such as the data x): no matmul of zeros is built for it.
    a, w = primals
    da, dw = tangents
    out = _low_precision_matmul(a, w, compute_dtype)
    terms = [da @ w] if not isinstance(da, SymbolicZero) else []
    if not isinstance(dw, SymbolicZero):
        terms.append(a @ dw)
    return out, sum(terms[1:], terms[0]).astype(out.dtype)


_low_precision_matmul.defjvp(_low_precision_matmul_jvp, symbolic_zeros=True)


def native_blockers(compute_dtype, fused: bool, dtype, *options) -> list[tuple[bool, str]]:
    """The cell options that keep it off the native kernels, as ``(applies, "name=value")``;
    ``options`` are extra ``(value, name)`` pairs that block when not None."""
    name = getattr(compute_dtype, "name", compute_dtype)
    return [
        *((value is not None, f"{key}={value}") for value, key in options),
        (compute_dtype is not None, f"compute_dtype={name}"),
        (fused, "fused=True"),
        (jnp.dtype(dtype) != jnp.float32, f"dtype={jnp.dtype(dtype).name}"),
    ]


LAYER_NORM_EPS = 1e-5


def layer_norm(v: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
    """Layer normalisation over the last axis (Ba et al. 2016), with learned ``scale`` and
    ``bias``: ``(v - mean) / sqrt(var + 1e-5) * scale + bias`` (PyTorch's epsilon)."""
    mean = jnp.mean(v, axis=-1, keepdims=True)
    centred = v - mean
    var = jnp.mean(jnp.square(centred), axis=-1, keepdims=True)
    return centred * jax.lax.rsqrt(var + LAYER_NORM_EPS) * scale + bias


def check_flag(cell_name: str, name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{cell_name} {name} must be True or False, got {value!r}")
    return value


def decay_sequence(cell_name: str, outputs):
    """The ``sequence`` of a cell whose recurrence is a decay ``h_t = a_t h_{t-1} + b_t`` run
    by :func:`rnnjax.linear_scan` (the RG-LRU, the LRU): ``outputs(params, xs, h, real, reset,
    *, reverse) -> (carry, ys)`` under ``remat`` (any mode: there are no per-step carries to
    checkpoint, so the whole parallel pass is recomputed in the backward pass). There is no
    ``recurrent_mask``: a dropout mask on ``h_{t-1}`` scaled by ``1/(1-p)`` would push the
    decay above 1."""

    def sequence(params, xs, h, real, *, reverse=False, unroll=1, recurrent_mask=None,
                 remat=False, reset=None):  # fmt: skip
        del unroll  # the recurrence has no loop body to unroll
        if recurrent_mask is not None:
            raise ValueError(
                f"{cell_name} takes no recurrent_mask: its recurrence is a decay, not a weight "
                "matrix, and a dropout mask on h_{t-1} scaled by 1/(1-p) would push the decay "
                "above 1; use input dropout or zoneout"
            )
        run = functools.partial(outputs, reverse=bool(reverse))
        if remat is not False:
            run = jax.checkpoint(run)
        with jax.named_scope(cell_name):
            return run(params, xs, h, real, reset)

    return sequence
