"""The LSTM's recurrence as compiled CPU kernels (``rnnjax/_native``), with JAX's rules around them.

A scanned LSTM step is ~45 small XLA thunks on CPU, and its BPTT accumulates the weight
gradients step by step; here each direction of the recurrence is one call:

- :data:`forward_p` runs the whole sequence (one ``[x_t, h] @ [W_i; W_h]`` matmul and one pass
  over the gates per step) and, when differentiated, saves ``h`` entering each step and the
  gate values.
- The derivative is a :func:`jax.custom_jvp` whose tangent is :data:`tangent_p`, a primitive
  linear in ``(dx, dW_i, db, dW_h, dh0, dc0)``. JAX transposes it for reverse mode into
  :data:`backward_p`, the native BPTT loop, which also does the weight gradients as three large
  ``(B*T, .)^T @ (B*T, 4H)`` matmuls after the loop: no per-step or per-example weight gradient.
- The primitives work on batch-first arrays ``(B, T, .)``; one example is ``B = 1`` and their
  batching rules fold any number of ``vmap`` axes into ``B``. Batched weights (a ``vmap`` over
  params) and per-example gradients (``vmap`` of ``grad``, where the summed weight gradients
  of :data:`backward_p` do not apply) run the pure-JAX references instead.
- Every primitive has a pure-JAX reference (``lax.scan``): its lowering off the CPU, its
  forward-mode rule (so ``jax.jvp`` and second derivatives work) and the tests' oracle.

Values and derivatives equal the step-by-step :func:`rnnjax.scan` of ``rj.cells.lstm`` within
float32 rounding, and PyTorch's ``nn.LSTM`` (``tests/test_native.py``, ``tests/test_reference.py``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from rnnjax import _native
from rnnjax.core import check_step_input

# ----------------------------------------------------------------------------- references
# Shapes: x (B, T, I); dz (B, T, 4H); h0, c0 (B, H); mask (B, T) bool; ys, h_prev (B, T, H);
# res (B, T, 6H) = [i, f, g, o, c entering, tanh(c leaving)] for each step.


def _time_major(*arrays):
    return tuple(jnp.swapaxes(x, 0, 1) for x in arrays)


def forward_reference(x, w_i, b, w_h, h0, c0, mask, *, reverse, save=True):
    """``(ys, h_last, c_last, h_prev, res)`` of the masked LSTM over ``x (B, T, I)``; without
    ``save`` (inference) ``h_prev`` and ``res`` are empty, ``(B, 0)``."""

    def body(carry, inputs):
        h, c = carry
        x_t, m = inputs
        z = x_t @ w_i + b + h @ w_h
        zi, zf, zg, zo = jnp.split(z, 4, axis=-1)
        i, f, g, o = jax.nn.sigmoid(zi), jax.nn.sigmoid(zf), jnp.tanh(zg), jax.nn.sigmoid(zo)
        c_new = f * c + i * g
        tc = jnp.tanh(c_new)
        h_new = o * tc
        m = m[:, None]
        res = jnp.concatenate([i, f, g, o, c, tc], axis=-1)
        carry = (jnp.where(m, h_new, h), jnp.where(m, c_new, c))
        return carry, (jnp.where(m, h_new, 0), h, res)

    (h, c), (ys, h_prev, res) = lax.scan(body, (h0, c0), _time_major(x, mask), reverse=reverse)
    ys, h_prev, res = _time_major(ys, h_prev, res)
    if not save:
        h_prev = res = jnp.zeros((x.shape[0], 0), x.dtype)
    return ys, h, c, h_prev, res


def _gates(res):
    return jnp.split(res, 6, axis=-1)  # i, f, g, o, c entering, tanh(c leaving)


def _gate_tangents(dx, dw_i, db, dw_h, x, w_i, h_prev):
    """``dz``: the part of the gates' tangent that is linear in input and weight tangents."""
    return dx @ w_i + x @ dw_i + db + h_prev @ dw_h


def tangent_reference(dx, dw_i, db, dw_h, dh0, dc0, x, w_i, w_h, h_prev, res, mask, *, reverse):
    """The recurrence's tangent, linear in ``(dx, dW_i, db, dW_h, dh0, dc0)``:
    ``(dys, dh_last, dc_last)``."""
    dz = _gate_tangents(dx, dw_i, db, dw_h, x, w_i, h_prev)

    def body(carry, inputs):
        dh, dc = carry
        dz_t, r, m = inputs
        i, f, g, o, c, tc = _gates(r)
        di, df, dg, do = jnp.split(dz_t + dh @ w_h, 4, axis=-1)
        dc_new = i * (1 - i) * g * di + f * (1 - f) * c * df + i * (1 - g * g) * dg + f * dc
        dh_new = o * (1 - o) * tc * do + o * (1 - tc * tc) * dc_new
        m = m[:, None]
        carry = (jnp.where(m, dh_new, dh), jnp.where(m, dc_new, dc))
        return carry, jnp.where(m, dh_new, 0)

    (dh, dc), dys = lax.scan(body, (dh0, dc0), _time_major(dz, res, mask), reverse=reverse)
    return jnp.swapaxes(dys, 0, 1), dh, dc


def backward_reference(gys, gh_last, gc_last, x, w_i, w_h, h_prev, res, mask, *, reverse, need_dx):
    """The transpose of :func:`tangent_reference` (backpropagation through time): the
    cotangents ``(gx, gW_i, gb, gW_h, gh0, gc0)`` from those of ``(ys, h_last, c_last)``.
    ``need_dx=False`` may leave ``gx`` unset (zero here)."""

    def body(carry, inputs):
        gh, gc = carry
        gy, r, m = inputs
        i, f, g, o, c, tc = _gates(r)
        dh = gh + gy
        dc = gc + dh * o * (1 - tc * tc)
        dz = jnp.concatenate(
            [
                dc * g * i * (1 - i),
                dc * c * f * (1 - f),
                dc * i * (1 - g * g),
                dh * tc * o * (1 - o),
            ],
            axis=-1,
        )
        m = m[:, None]
        dz = jnp.where(m, dz, 0)
        carry = (jnp.where(m, dz @ w_h.T, gh), jnp.where(m, dc * f, gc))
        return carry, dz

    (gh, gc), gz = lax.scan(
        body, (gh_last, gc_last), _time_major(gys, res, mask), reverse=not reverse
    )
    gz = jnp.swapaxes(gz, 0, 1)
    gx = gz @ w_i.T if need_dx else jnp.zeros_like(x)
    gw_i = jnp.einsum("bti,btg->ig", x, gz)
    gw_h = jnp.einsum("bth,btg->hg", h_prev, gz)
    return gx, gw_i, gz.sum((0, 1)), gw_h, gh, gc


# ----------------------------------------------------------------------------- primitives


def _abstract(reference):
    def abstract_eval(*avals, **params):
        out = jax.eval_shape(functools.partial(reference, **params), *avals)
        return [jax.core.ShapedArray(o.shape, o.dtype) for o in out]

    return abstract_eval


def _fold(x, dim, size):
    """``x`` with its vmap axis ``dim`` (None: unbatched) folded into its leading B axis."""
    if dim is None:
        x = jnp.broadcast_to(x, (size, *x.shape))
    else:
        x = jnp.moveaxis(x, dim, 0)
    return x.reshape(size * x.shape[1], *x.shape[2:]), x.shape[1]


def _batching_rule(prim, reference, shared):
    def rule(args, dims, **params):
        size = next(a.shape[d] for a, d in zip(args, dims, strict=True) if d is not None)
        if any(dims[i] is not None for i in shared):
            # Per-example weights (vmap over params): no native kernel for that; use JAX loops.
            in_axes = [None if d is None else d for d in dims]
            out = jax.vmap(functools.partial(reference, **params), in_axes=in_axes)(*args)
            return out, [0] * len(out)
        folded, inner = [], None
        for i, (a, d) in enumerate(zip(args, dims, strict=True)):
            if i in shared:
                folded.append(a)
            else:
                a, inner = _fold(a, d, size)
                folded.append(a)
        out = prim.bind(*folded, **params)
        return [o.reshape(size, inner, *o.shape[1:]) for o in out], [0] * len(out)

    return rule


def _jvp_rule(reference):
    def jvp(primals, tangents, **params):
        tangents = tuple(ad.instantiate_zeros(t) for t in tangents)
        return jax.jvp(functools.partial(reference, **params), tuple(primals), tangents)

    return jvp


def _primitive(name: str, reference, shared) -> Primitive:
    prim = Primitive(name)
    prim.multiple_results = True

    @prim.def_impl
    def impl(*args, **params):
        return jax.jit(functools.partial(prim.bind, **params))(*args)

    prim.def_abstract_eval(_abstract(reference))
    mlir.register_lowering(prim, mlir.lower_fun(reference, multiple_results=True))
    batching.primitive_batchers[prim] = _batching_rule(prim, reference, shared)
    ad.primitive_jvps[prim] = _jvp_rule(reference)
    return prim


# `shared`: the operands that are the same for every example (the weights).
forward_p = _primitive("rnnjax_lstm_forward", forward_reference, shared=(1, 2, 3))
tangent_p = _primitive("rnnjax_lstm_tangent", tangent_reference, shared=(1, 2, 3, 7, 8))
# Its weight cotangents are sums over the batch, so a vmapped backward_p (per-example
# gradients: vmap of grad) runs the reference for every example.
backward_p = _primitive("rnnjax_lstm_backward", backward_reference, shared=range(9))


def _tangent_transpose(cts, *args, reverse):
    linear, rest = args[:6], args[6:]
    if any(ad.is_undefined_primal(a) for a in rest):
        raise NotImplementedError("rnnjax LSTM tangent: transpose with respect to a primal value")
    need_dx = ad.is_undefined_primal(linear[0])
    out = backward_p.bind(
        *[ad.instantiate_zeros(ct) for ct in cts], *rest[:4], *rest[4:],
        reverse=reverse, need_dx=need_dx,
    )  # fmt: skip
    picked = [o if ad.is_undefined_primal(a) else None for o, a in zip(out, linear, strict=True)]
    return picked + [None] * len(rest)


def _backward_transpose(cts, *args, reverse, need_dx):
    linear, rest = args[:3], args[3:]
    if any(ad.is_undefined_primal(a) for a in rest):
        raise NotImplementedError("rnnjax LSTM backward: transpose with respect to a primal value")
    cts = [ad.instantiate_zeros(ct) for ct in cts]
    if not need_dx:  # gx was not computed: it carries nothing back
        cts[0] = jnp.zeros_like(cts[0])
    out = tangent_p.bind(*cts, *rest, reverse=reverse)
    picked = [o if ad.is_undefined_primal(a) else None for o, a in zip(out, linear, strict=True)]
    return picked + [None] * len(rest)


ad.primitive_transposes[tangent_p] = _tangent_transpose
ad.primitive_transposes[backward_p] = _backward_transpose


@functools.cache
def _register_native_lowerings() -> None:
    for prim, target in ((forward_p, "rnnjax_lstm_forward"), (backward_p, "rnnjax_lstm_backward")):
        mlir.register_lowering(prim, jax.ffi.ffi_lowering(target), platform="cpu")


available = _native.available
unavailable_reason = _native.unavailable_reason


def float32(*arrays) -> bool:
    """Whether every array is float32 (the only dtype the kernels take)."""
    return all(jnp.result_type(a) == jnp.float32 for a in arrays)


def explain(*arrays) -> None:
    """Raise why ``lstm(native=True)`` cannot run here (arrays: inputs, carry, params)."""
    if not float32(*arrays):
        dtypes = sorted({jnp.result_type(a).name for a in arrays})
        raise TypeError(
            f"lstm(native=True) runs float32 only, got inputs/params of dtypes {dtypes}: cast "
            "them to float32 or use native=None"
        )
    if jax.default_backend() != "cpu":
        raise RuntimeError(
            f"lstm(native=True): the native kernels are CPU kernels and JAX's default backend is "
            f"{jax.default_backend()!r}; use native=None"
        )
    raise RuntimeError(
        f"lstm(native=True): the native CPU kernels are unavailable: {unavailable_reason()}"
    )


def ready() -> bool:
    """Whether the native kernels can run here: loaded, and JAX's default backend is the CPU."""
    if not _native.available() or jax.default_backend() != "cpu":
        return False
    _register_native_lowerings()
    return True


# ----------------------------------------------------------------------------- the recurrence


@functools.partial(jax.custom_jvp, nondiff_argnums=(7,))
def recurrence(x, w_i, b, w_h, h0, c0, mask, reverse):
    """``(ys, h_last, c_last)`` of the LSTM over batch-first inputs ``x (B, T, I)``."""
    ys, h, c, _, _ = forward_p.bind(x, w_i, b, w_h, h0, c0, mask, reverse=reverse, save=False)
    return ys, h, c


@recurrence.defjvp
def _recurrence_jvp(reverse, primals, tangents):
    x, w_i, b, w_h, h0, c0, mask = primals
    dx, dw_i, db, dw_h, dh0, dc0, _ = tangents
    ys, h, c, h_prev, res = forward_p.bind(x, w_i, b, w_h, h0, c0, mask, reverse=reverse, save=True)
    dys, dh, dc = tangent_p.bind(
        dx, dw_i, db, dw_h, dh0, dc0, x, w_i, w_h, h_prev, res, mask, reverse=reverse
    )
    return (ys, h, c), (dys, dh, dc)


def lstm_sequence(params: dict, xs, h0, c0, real, *, reverse: bool):
    """One example: ``xs (T, I)`` -> ``(ys (T, H), h_last, c_last)``; ``real`` is the ``(T,)``
    mask of real steps or None."""
    w_i, b, w_h = params["w_i"], params["b"], params["w_h"]
    check_step_input("lstm", jax.ShapeDtypeStruct(xs.shape[1:], xs.dtype), w_i.shape[0])
    mask = jnp.ones(xs.shape[:1], bool) if real is None else real
    ys, h, c = recurrence(xs[None], w_i, b, w_h, h0[None], c0[None], mask[None], bool(reverse))
    return ys[0], h[0], c[0]
