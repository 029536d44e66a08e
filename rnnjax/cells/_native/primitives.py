"""The kernels as JAX primitives: three per cell (:class:`Kernels`, :data:`LSTM`, :data:`GRU`)
with their abstract evaluation, batching, forward-mode and transpose rules.

- ``forward`` runs the whole sequence and, when differentiated (``save``), returns the
  residuals its backward pass reads.
- ``tangent`` is linear in the input, weight and initial-state tangents; JAX transposes it
  for reverse mode into ``backward``, the BPTT loop, which does the weight gradients as large
  ``(B*T, .)^T @ (B*T, G)`` matmuls after the loop (and ``backward`` transposes back into
  ``tangent``, so second derivatives work).
- They take batch-first arrays ``(B, T, .)``; one example is ``B = 1`` and the batching rules
  fold any number of ``vmap`` axes into ``B``. A ``vmap`` over the weights (or weight
  tangents), and any ``vmap`` of ``backward`` (per-example gradients: the summed weight
  gradients of one call do not apply), run the :mod:`~rnnjax.cells._native.references` under
  ``jax.vmap`` instead.
- Every primitive lowers to its reference until :func:`rnnjax.cells._native.ready` registers
  the CPU lowerings of :mod:`~rnnjax.cells._native.lowering` (``forward`` and ``backward``;
  ``tangent`` always runs its reference: ``jax.jvp`` and ``jax.linearize`` evaluate the
  tangent as XLA's loop). Forward mode through any primitive is ``jax.jvp`` of its reference.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from rnnjax.cells._native.references import (
    backward_reference,
    forward_reference,
    gru_backward_reference,
    gru_forward_reference,
    gru_tangent_reference,
    tangent_reference,
)


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
            out = jax.vmap(functools.partial(reference, **params), in_axes=list(dims))(*args)
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


_REFERENCES: dict[Primitive, Callable] = {}


def reference(prim: Primitive) -> Callable:
    """The pure-JAX function a primitive computes (its lowering off the CPU)."""
    return _REFERENCES[prim]


def _primitive(name: str, reference, shared) -> Primitive:
    prim = Primitive(name)
    prim.multiple_results = True
    _REFERENCES[prim] = reference

    @prim.def_impl
    def impl(*args, **params):
        return jax.jit(functools.partial(prim.bind, **params))(*args)

    prim.def_abstract_eval(_abstract(reference))
    mlir.register_lowering(prim, mlir.lower_fun(reference, multiple_results=True))
    batching.primitive_batchers[prim] = _batching_rule(prim, reference, shared)
    ad.primitive_jvps[prim] = _jvp_rule(reference)
    return prim


class Kernels(NamedTuple):
    """One cell's three primitives and the layout of their operands.

    forward: ``(x, *weights, *state0, mask) -> (ys, *state_last, h_prev, res)``;
    tangent: ``(dx, *dweights, *dstate0, *forward_inputs, *forward_outputs) -> (dys,
    *dstate_last)``, linear in the leading tangents; backward: ``(gys, *gstate_last,
    *forward_inputs, *forward_outputs) -> (gx, *gweights, *gstate0)``, its transpose. ``weights``
    is ``(w_i, b, w_h)`` for the LSTM and ``(w_i, b_i, w_h, b_h)`` for the GRU (``w_h`` third in
    both); the state is ``(h, c)`` or ``(h,)``. Every primitive takes ``reverse``; ``forward``
    also ``save`` (differentiated: keep residuals) and ``dense`` (no mask: oneDNN may run it,
    :func:`uses_onednn`); ``tangent`` and ``backward`` know oneDNN's residuals by their shape.
    """

    name: str
    forward: Primitive
    tangent: Primitive
    backward: Primitive
    n_weights: int
    n_state: int


def _kernels(name, n_weights, n_state, forward_ref, tangent_ref, backward_ref) -> Kernels:
    n_tangent = 1 + n_weights + n_state
    n_inputs = n_tangent + 1  # x, weights, state0, mask
    n_rest = n_inputs + 1 + n_state + 2  # and ys, state_last, h_prev, res
    weights = range(1, 1 + n_weights)
    # `shared`: operands that are the same for every example (weights and weight tangents).
    # The backward's weight cotangents are sums over the batch, so a vmapped backward (per-example
    # gradients: vmap of grad) runs the reference for every example.
    kernels = Kernels(
        name,
        _primitive(f"rnnjax_{name}_forward", forward_ref, shared=weights),
        _primitive(
            f"rnnjax_{name}_tangent",
            tangent_ref,
            shared=(*weights, *(n_tangent + i for i in weights)),
        ),  # fmt: skip
        _primitive(f"rnnjax_{name}_backward", backward_ref, shared=range(1 + n_state + n_rest)),
        n_weights,
        n_state,
    )

    def tangent_transpose(cts, *args, reverse, checkpoint=0):
        linear, rest = args[:n_tangent], args[n_tangent:]
        if any(ad.is_undefined_primal(a) for a in rest):
            raise NotImplementedError(f"rnnjax {name}: transpose with respect to a primal value")
        out = kernels.backward.bind(
            *[ad.instantiate_zeros(ct) for ct in cts], *rest,
            reverse=reverse, need_dx=ad.is_undefined_primal(linear[0]), checkpoint=checkpoint,
        )  # fmt: skip
        picked = [
            o if ad.is_undefined_primal(a) else None for o, a in zip(out, linear, strict=True)
        ]
        return picked + [None] * len(rest)

    def backward_transpose(cts, *args, reverse, need_dx, checkpoint=0):
        linear, rest = args[: 1 + n_state], args[1 + n_state :]
        if any(ad.is_undefined_primal(a) for a in rest):
            raise NotImplementedError(f"rnnjax {name}: transpose with respect to a primal value")
        cts = [ad.instantiate_zeros(ct) for ct in cts]
        if not need_dx:  # gx was not computed: it carries nothing back
            cts[0] = jnp.zeros_like(cts[0])
        out = kernels.tangent.bind(*cts, *rest, reverse=reverse, checkpoint=checkpoint)
        picked = [
            o if ad.is_undefined_primal(a) else None for o, a in zip(out, linear, strict=True)
        ]
        return picked + [None] * len(rest)

    ad.primitive_transposes[kernels.tangent] = tangent_transpose
    ad.primitive_transposes[kernels.backward] = backward_transpose
    return kernels


LSTM = _kernels("lstm", 3, 2, forward_reference, tangent_reference, backward_reference)
GRU = _kernels("gru", 4, 1, gru_forward_reference, gru_tangent_reference, gru_backward_reference)
