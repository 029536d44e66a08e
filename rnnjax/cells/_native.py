"""The LSTM's and GRU's recurrences as compiled CPU kernels (``rnnjax/_native``), with JAX's
rules around them.

A scanned LSTM step is ~45 small XLA thunks on CPU, and its BPTT accumulates the weight
gradients step by step; here each direction of the recurrence is one call. Per cell
(:class:`Kernels`, :data:`LSTM` and :data:`GRU`) there are three primitives:

- ``forward`` runs the whole sequence (one or two matmuls and one pass over the gates per
  step) and, when differentiated, saves ``h`` entering each step and the gate values.
- The derivative is a :func:`jax.custom_jvp` whose tangent is ``tangent``, a primitive linear
  in the input, weight and initial-state tangents. JAX transposes it for reverse mode into
  ``backward``, the native BPTT loop, which also does the weight gradients as large
  ``(B*T, .)^T @ (B*T, G)`` matmuls after the loop: no per-step or per-example weight gradient.
- The primitives work on batch-first arrays ``(B, T, .)``; one example is ``B = 1`` and their
  batching rules fold any number of ``vmap`` axes into ``B``. Batched weights (a ``vmap`` over
  params) and per-example gradients (``vmap`` of ``grad``, where the summed weight gradients
  of ``backward`` do not apply) run the pure-JAX references instead.
- Every primitive has a pure-JAX reference (``lax.scan``): its lowering off the CPU, its
  forward-mode rule (so ``jax.jvp`` and second derivatives work) and the tests' oracle.
- rnnjax's loops (``rnnjax/_native/rnn_cpu.cc``), in kernels built with oneDNN and with a
  step of at least 4096 units (batch rows x hidden units), do their per-step matmuls with
  oneDNN's matmul on weights packed once per pass, their other matmuls with oneDNN's sgemm and
  the per-row gate arithmetic on all cores (one OpenMP team on one thread); smaller steps, or
  builds without oneDNN, use OpenBLAS's sgemm on one calling thread.
- Forward passes that save nothing (inference) or every step (training; not checkpointed;
  steps of 4096 units or more, with oneDNN), masked or not, where the kernels were compiled
  for a CPU with AVX-512 (:func:`rnnjax._native.avx512`), run their AVX-512 loops instead of
  either path below: per step, 16 hidden units and up to 6 batch rows at a time, the gate
  pre-activations accumulate in registers and the new carry and output (and the saved gates)
  are computed from them, on weights packed once per call, on all cores. The lowering still
  says ``dense`` as below, so that ``RNNJAX_AVX512=0``, read by the kernels at every call,
  runs what it would have.
- Dense mode: an inference pass (nothing saved) over a sequence with no mask (``real is None``:
  every step real) and a step of at least :data:`ONEDNN_MIN_UNITS` runs oneDNN's RNN
  primitive instead of rnnjax's loops when the kernels were built with oneDNN
  (``rnnjax._native.onednn()``), as PyTorch's CPU LSTM does: the input projection of all steps
  as one matmul, packed weights, the gates fused into the recurrent matmul, all cores.
  Differentiated passes use it only where :data:`ONEDNN_MIN_UNITS` says so (by default never:
  rnnjax's loops measured faster); the forward pass then saves oneDNN's opaque workspace in
  ``res`` (``(B, W)``, W from :func:`rnnjax._native.workspace_bytes`), which only the kernels
  read: the references recompute the forward pass instead. Masked sequences (variable
  lengths) keep rnnjax's loops, which handle masks step by step.
- Checkpointed mode (``rnnjax.scan(..., remat=...)``: ``checkpoint`` k > 0, rnnjax's loops
  always): the differentiated forward pass saves only the carry entering every k-th step,
  ``res (B, ceil(T/k), state width)``, and the backward pass runs the segments last to first,
  recomputing each one's residuals from its checkpoint into k-step arrays before its BPTT
  steps. Its lowering is two calls: the pass that makes the checkpoints and the final carry,
  then a replay that recomputes ``ys`` from the checkpoints (all segments at once, one matmul
  per step over segments x batch rows) as its only output, so that XLA can write an
  elementwise cotangent of ``ys`` over it (it does not over one element of a call's tuple).
  The tangent and backward primitives of a pass that keeps no ``ys`` for oneDNN get an empty
  stand-in, so ``ys`` can be freed once the loss has read it.

Values and derivatives equal the step-by-step :func:`rnnjax.scan` of ``rj.cells.lstm`` and
``rj.cells.gru`` within float32 rounding, and PyTorch's ``nn.LSTM``/``nn.GRU``
(``tests/test_native.py``, ``tests/test_reference.py``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
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


# oneDNN's RNN primitives run a dense inference pass (one that saves nothing) when it has at
# least this many units per step (batch rows times hidden units); below, rnnjax's own loops
# measured faster (per-process A/B, 2-core CPU, BENCHMARKS.md): a call of the primitive costs
# ~0.25 ms more (LSTM inference: 4-9% faster at 16 x 64 units, 5-13x slower at 1 x 16).
# Differentiated passes (``save``) never run them (None): since rnnjax's loops do their
# per-step matmuls on weights packed once per pass with oneDNN's matmul (the kernels'
# ``StepGemm``), its training primitives measured slower at every shape tried: forward+backward
# 51 vs 67 ms at LSTM 32x128x64x256, 146 vs 179 ms at 64x64x128x512, 128 vs 169 ms at GRU
# 64x64x128x512 (``benchmarks/ab/onednn_matmul.py``), 148 vs 218 ms at LSTM 4x128x64x1024.
# Setting a value here brings them back (the tests do, to keep that path right).
ONEDNN_MIN_UNITS: dict[tuple[str, bool], int | None] = {
    ("lstm", False): 1024,
    ("lstm", True): None,
    ("gru", False): 2048,
    ("gru", True): None,
}


def uses_onednn(cell: str, batch: int, hidden: int, *, save: bool, dense: bool) -> bool:
    """Whether a forward pass over ``batch`` rows (vmap axes folded in) runs oneDNN's RNN
    primitive: the sequence is dense (no mask, kernels built with oneDNN) and large enough
    (:data:`ONEDNN_MIN_UNITS`)."""
    least = ONEDNN_MIN_UNITS[(cell, save)]
    return dense and least is not None and batch * hidden >= least


def _workspace(res) -> bool:
    """Whether a saved ``res`` is oneDNN's workspace, ``(B, W)`` (rnnjax's is ``(B, T, .)``)."""
    return res.ndim == 2 and res.shape[1] > 0


def checkpoints(entering, k: int, *, reverse: bool):
    """The carry entering every ``k``-th step of a pass, ``(B, ceil(T / k), W)``, from the carry
    entering each step, ``entering (B, T, W)`` (steps count in the pass's order)."""
    t = np.arange(0, entering.shape[1], k)
    return entering[:, entering.shape[1] - 1 - t if reverse else t]


def _kept(cell, x, w_h, h_prev, res, entering, *, reverse, save, dense, checkpoint):
    """The residuals a forward reference returns: ``(h_prev, res)`` as computed when they are
    saved for rnnjax's own kernels; both empty, ``(B, 0)``, for inference; with ``checkpoint``
    k > 0 an empty ``h_prev`` and in ``res`` the :func:`checkpoints` of the carry ``entering``
    each step; and when oneDNN runs the pass an empty ``h_prev`` and ``res`` of oneDNN's
    workspace shape, ``(B, W)``, left zero (the references recompute what they need from the
    inputs instead)."""
    empty = jnp.zeros((x.shape[0], 0), x.dtype)
    if save and checkpoint:
        return empty, checkpoints(entering, checkpoint, reverse=reverse)
    onednn = save and uses_onednn(cell, x.shape[0], w_h.shape[0], save=save, dense=dense)
    if save and not onednn:
        return h_prev, res
    if not onednn:
        return empty, empty
    nbytes = _native.workspace_bytes(cell, x.shape[1], x.shape[2], w_h.shape[0], bool(reverse))
    return empty, jnp.zeros((x.shape[0], -(-nbytes // 4)), x.dtype)


def _saved(forward, inputs, h_prev, res, *, reverse, checkpoint):
    """``(h_prev, res)`` as a tangent or backward reference uses them: recomputed with the
    cell's ``forward`` reference over its ``inputs`` when ``res`` holds checkpoints or oneDNN's
    workspace."""
    if checkpoint or _workspace(res):
        return tuple(forward(*inputs, reverse=reverse)[-2:])
    return h_prev, res


def forward_reference(x, w_i, b, w_h, h0, c0, mask, *, reverse, save=True, dense=False,
                      checkpoint=0):  # fmt: skip
    """``(ys, h_last, c_last, h_prev, res)`` of the masked LSTM over ``x (B, T, I)``; without
    ``save`` (inference) ``h_prev`` and ``res`` are empty, ``(B, 0)``; with ``checkpoint`` k > 0
    ``h_prev`` is empty and ``res`` holds ``[h, c]`` entering every k-th step; when oneDNN runs
    the pass (``dense``: no mask; :func:`uses_onednn`) ``h_prev`` is empty and ``res`` holds its
    workspace."""

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
    entering = jnp.concatenate([h_prev, _gates(res)[4]], axis=-1)
    h_prev, res = _kept("lstm", x, w_h, h_prev, res, entering, reverse=reverse, save=save,
                        dense=dense, checkpoint=checkpoint)  # fmt: skip
    return ys, h, c, h_prev, res


def _weight_cotangents(inputs, w, gz, need_dx):
    """After a backward loop: from the gate cotangents ``gz (B, T, G)`` of all steps and the
    ``inputs (B, T, K)`` that met ``w (K, G)``, the cotangents ``(inputs, w, bias)`` (the
    first zero unless ``need_dx``), as the kernels' WeightGradients computes them."""
    gin = gz @ w.T if need_dx else jnp.zeros_like(inputs)
    return gin, jnp.einsum("btk,btg->kg", inputs, gz), gz.sum((0, 1))


def _gates(res):
    return jnp.split(res, 6, axis=-1)  # i, f, g, o, c entering, tanh(c leaving)


def _gate_tangents(dx, dw_i, db, dw_h, x, w_i, h_prev):
    """``dz``: the part of the gates' tangent that is linear in input and weight tangents."""
    return dx @ w_i + x @ dw_i + db + h_prev @ dw_h


def tangent_reference(dx, dw_i, db, dw_h, dh0, dc0, x, w_i, b, w_h, h0, c0, mask, ys, h, c,
                      h_prev, res, *, reverse, checkpoint=0):  # fmt: skip
    """The recurrence's tangent, linear in ``(dx, dW_i, db, dW_h, dh0, dc0)``, at the forward
    pass whose inputs and outputs follow: ``(dys, dh_last, dc_last)``."""
    inputs = (x, w_i, b, w_h, h0, c0, mask)
    h_prev, res = _saved(
        forward_reference, inputs, h_prev, res, reverse=reverse, checkpoint=checkpoint
    )
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


def backward_reference(gys, gh_last, gc_last, x, w_i, b, w_h, h0, c0, mask, ys, h, c, h_prev, res,
                       *, reverse, need_dx, checkpoint=0):  # fmt: skip
    """The transpose of :func:`tangent_reference` (backpropagation through time): the
    cotangents ``(gx, gW_i, gb, gW_h, gh0, gc0)`` from those of ``(ys, h_last, c_last)``.
    ``need_dx=False`` may leave ``gx`` unset (zero here)."""
    inputs = (x, w_i, b, w_h, h0, c0, mask)
    h_prev, res = _saved(
        forward_reference, inputs, h_prev, res, reverse=reverse, checkpoint=checkpoint
    )

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
    gx, gw_i, gb = _weight_cotangents(x, w_i, gz, need_dx)
    gw_h, _ = _weight_cotangents(h_prev, None, gz, False)[1:]
    return gx, gw_i, gb, gw_h, gh, gc


def gru_forward_reference(x, w_i, b_i, w_h, b_h, h0, mask, *, reverse, save=True, dense=False,
                          checkpoint=0):  # fmt: skip
    """``(ys, h_last, h_prev, res)`` of the masked reset-after GRU, ``res = [r, z, n, gh_n]``
    with ``gh_n = h W_hn + b_hn``; without ``save`` ``h_prev`` and ``res`` are ``(B, 0)``; with
    ``checkpoint`` as :func:`forward_reference` (``res`` holds ``h``)."""

    def body(h, inputs):
        x_t, m = inputs
        gi_r, gi_z, gi_n = jnp.split(x_t @ w_i + b_i, 3, axis=-1)
        gh_r, gh_z, gh_n = jnp.split(h @ w_h + b_h, 3, axis=-1)
        r, z = jax.nn.sigmoid(gi_r + gh_r), jax.nn.sigmoid(gi_z + gh_z)
        n = jnp.tanh(gi_n + r * gh_n)
        h_new = (1 - z) * n + z * h
        m = m[:, None]
        res = jnp.concatenate([r, z, n, gh_n], axis=-1)
        return jnp.where(m, h_new, h), (jnp.where(m, h_new, 0), h, res)

    h, (ys, h_prev, res) = lax.scan(body, h0, _time_major(x, mask), reverse=reverse)
    ys, h_prev, res = _time_major(ys, h_prev, res)
    h_prev, res = _kept("gru", x, w_h, h_prev, res, h_prev, reverse=reverse, save=save,
                        dense=dense, checkpoint=checkpoint)  # fmt: skip
    return ys, h, h_prev, res


def gru_tangent_reference(dx, dw_i, db_i, dw_h, db_h, dh0, x, w_i, b_i, w_h, b_h, h0, mask, ys, h,
                          h_prev, res, *, reverse, checkpoint=0):  # fmt: skip
    """The GRU's tangent, linear in ``(dx, dW_i, db_i, dW_h, db_h, dh0)``: ``(dys, dh_last)``."""
    inputs = (x, w_i, b_i, w_h, b_h, h0, mask)
    h_prev, res = _saved(
        gru_forward_reference, inputs, h_prev, res, reverse=reverse, checkpoint=checkpoint
    )
    dgi = dx @ w_i + x @ dw_i + db_i
    dgh_w = h_prev @ dw_h + db_h

    def body(dh, inputs):
        dgi_t, dgh_t, hp, r_t, m = inputs
        r, z, n, gh_n = jnp.split(r_t, 4, axis=-1)
        dgi_r, dgi_z, dgi_n = jnp.split(dgi_t, 3, axis=-1)
        dgh_r, dgh_z, dgh_n = jnp.split(dgh_t + dh @ w_h, 3, axis=-1)
        dr = r * (1 - r) * (dgi_r + dgh_r)
        dz = z * (1 - z) * (dgi_z + dgh_z)
        dn = (1 - n * n) * (dgi_n + dr * gh_n + r * dgh_n)
        dh_new = (1 - z) * dn + (hp - n) * dz + z * dh
        m = m[:, None]
        return jnp.where(m, dh_new, dh), jnp.where(m, dh_new, 0)

    dh, dys = lax.scan(
        body, dh0, _time_major(dgi, dgh_w, h_prev, res, mask), reverse=reverse
    )  # fmt: skip
    return jnp.swapaxes(dys, 0, 1), dh


def gru_backward_reference(gys, gh_last, x, w_i, b_i, w_h, b_h, h0, mask, ys, h, h_prev, res, *,
                           reverse, need_dx, checkpoint=0):  # fmt: skip
    """The transpose of :func:`gru_tangent_reference`: ``(gx, gW_i, gb_i, gW_h, gb_h, gh0)``."""
    inputs = (x, w_i, b_i, w_h, b_h, h0, mask)
    h_prev, res = _saved(
        gru_forward_reference, inputs, h_prev, res, reverse=reverse, checkpoint=checkpoint
    )

    def body(gh, inputs):
        gy, hp, r_t, m = inputs
        r, z, n, gh_n = jnp.split(r_t, 4, axis=-1)
        dh = gh + gy
        dan = dh * (1 - z) * (1 - n * n)
        dar = dan * gh_n * r * (1 - r)
        daz = dh * (hp - n) * z * (1 - z)
        m = m[:, None]
        gzi = jnp.where(m, jnp.concatenate([dar, daz, dan], axis=-1), 0)
        gzh = jnp.where(m, jnp.concatenate([dar, daz, dan * r], axis=-1), 0)
        return jnp.where(m, dh * z + gzh @ w_h.T, gh), (gzi, gzh)

    gh, (gzi, gzh) = lax.scan(
        body, gh_last, _time_major(gys, h_prev, res, mask), reverse=not reverse
    )  # fmt: skip
    gzi, gzh = _time_major(gzi, gzh)
    gx, gw_i, gb_i = _weight_cotangents(x, w_i, gzi, need_dx)
    gw_h, gb_h = _weight_cotangents(h_prev, None, gzh, False)[1:]
    return gx, gw_i, gb_i, gw_h, gb_h, gh


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


# Inference (a forward pass that saves nothing) that oneDNN's RNN primitive does not run (a
# padded sequence), with at least this many units per step (batch rows times hidden units),
# runs XLA's loop when the kernels were built without oneDNN: their loops then do the matmuls
# with OpenBLAS and the gate arithmetic on one core, which measured 6-19% slower than XLA's
# loop at 64 x 512 (BENCHMARKS.md). With oneDNN (its matmul, the gates on all cores) the
# kernels' loops measured faster than XLA's at every size: padded LSTM 64x64x128x512 45.2 vs
# 66.2 ms, GRU 37.0 vs 48.3 ms (``benchmarks/ab/onednn_matmul.py``).
INFERENCE_MAX_UNITS = 16384


def _forward_lowering(cell: str, prim: Primitive, n_weights: int):
    native = jax.ffi.ffi_lowering(prim.name)
    replay = jax.ffi.ffi_lowering(f"rnnjax_{cell}_replay")
    loop = mlir.lower_fun(reference(prim), multiple_results=True)

    def checkpointed(ctx, *args, reverse, checkpoint):
        """A checkpointed forward pass as two calls: the pass that makes the checkpoints, the
        final carry and no ys, then the replay that recomputes ys from the checkpoints as its
        only output (which lets XLA write an elementwise cotangent of ys in place; see Replay in
        rnn_cpu.cc)."""
        ys = ctx.avals_out[0]
        no_ys = ys.update(shape=(ys.shape[0], 0, ys.shape[2]))
        out = native(
            ctx.replace(avals_out=[no_ys, *ctx.avals_out[1:]]), *args,
            reverse=reverse, save=True, dense=False, checkpoint=checkpoint,
        )  # fmt: skip
        picked = [0, *range(1, 1 + n_weights), len(args) - 1]  # x, weights, mask
        replay_ctx = ctx.replace(
            avals_in=[*(ctx.avals_in[i] for i in picked), ctx.avals_out[-1]], avals_out=[ys]
        )
        (ys_value,) = replay(
            replay_ctx, *(args[i] for i in picked), out[-1],
            reverse=reverse, checkpoint=checkpoint,
        )  # fmt: skip
        return [ys_value, *out[1:]]

    def lowering(ctx, *args, reverse, save, dense, checkpoint=0):
        if save and checkpoint:
            return checkpointed(ctx, *args, reverse=reverse, checkpoint=checkpoint)
        batch, hidden = ctx.avals_in[0].shape[0], ctx.avals_in[3].shape[0]
        if save:  # the abstract evaluation chose, and shaped the residuals accordingly
            onednn = _workspace(ctx.avals_out[-1])
        else:
            onednn = uses_onednn(cell, batch, hidden, save=save, dense=dense)
        xla_loop = batch * hidden >= INFERENCE_MAX_UNITS and not _native.onednn()
        if not save and not onednn and xla_loop:
            return loop(ctx, *args, reverse=reverse, save=save, dense=dense, checkpoint=checkpoint)
        return native(ctx, *args, reverse=reverse, save=save, dense=onednn, checkpoint=checkpoint)

    return lowering


def _backward_lowering(prim: Primitive):
    native = jax.ffi.ffi_lowering(prim.name)

    def lowering(ctx, *args, reverse, need_dx, checkpoint=0):
        onednn = _workspace(ctx.avals_in[-1])
        return native(
            ctx, *args, reverse=reverse, need_dx=need_dx, dense=onednn, checkpoint=checkpoint
        )

    return lowering


@functools.cache
def _register_native_lowerings() -> None:
    for kernels in (LSTM, GRU):
        forward = _forward_lowering(kernels.name, kernels.forward, kernels.n_weights)
        mlir.register_lowering(kernels.forward, forward, platform="cpu")
        mlir.register_lowering(
            kernels.backward, _backward_lowering(kernels.backward), platform="cpu"
        )


available = _native.available
unavailable_reason = _native.unavailable_reason


def float32(*arrays) -> bool:
    """Whether every array is float32 (the only dtype the kernels take)."""
    return all(jnp.result_type(a) == jnp.float32 for a in arrays)


def explain(cell_name: str, *arrays) -> None:
    """Raise why ``<cell>(native=True)`` cannot run here (arrays: inputs, carry, params)."""
    if not float32(*arrays):
        dtypes = sorted({jnp.result_type(a).name for a in arrays})
        raise TypeError(
            f"{cell_name}(native=True) runs float32 only, got inputs/params of dtypes {dtypes}: "
            "cast them to float32 or use native=None"
        )
    if jax.default_backend() != "cpu":
        raise RuntimeError(
            f"{cell_name}(native=True): the native kernels are CPU kernels and JAX's default "
            f"backend is {jax.default_backend()!r}; use native=None"
        )
    raise RuntimeError(
        f"{cell_name}(native=True): the native CPU kernels are unavailable: {unavailable_reason()}"
    )


def ready() -> bool:
    """Whether the native kernels can run here: loaded, and JAX's default backend is the CPU."""
    if not _native.available() or jax.default_backend() != "cpu":
        return False
    _register_native_lowerings()
    return True


# ----------------------------------------------------------------------------- the recurrence


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 2, 3, 4))
def recurrence(kernels: Kernels, args: tuple, reverse: bool, dense: bool, checkpoint: int):
    """``(ys, *state_last)`` of a cell over ``args = (x (B, T, I), *weights, *state0, mask)``;
    ``dense``: the mask is all True and oneDNN may run the passes (:func:`uses_onednn`);
    ``checkpoint`` k > 0: differentiated, the forward pass keeps the carry every k steps only
    and the backward pass recomputes each k-step segment (rnnjax's own loops)."""
    out = kernels.forward.bind(*args, reverse=reverse, save=False, dense=dense, checkpoint=0)
    return tuple(out[: 1 + kernels.n_state])


@recurrence.defjvp
def _recurrence_jvp(kernels, reverse, dense, checkpoint, primals, tangents):
    (args,), (dargs,) = primals, tangents
    out = kernels.forward.bind(
        *args, reverse=reverse, save=True, dense=dense, checkpoint=checkpoint
    )
    n = 1 + kernels.n_state
    # Only oneDNN's backward reads the forward's outputs; for rnnjax's loops an empty stand-in
    # for ys lets XLA free ys once the loss has read it (and write its cotangent in place).
    given = list(out)
    if not _workspace(out[-1]):
        given[0] = jnp.zeros((args[0].shape[0], 0), args[0].dtype)
    tangent_out = kernels.tangent.bind(
        *dargs[:-1], *args, *given, reverse=reverse, checkpoint=checkpoint
    )
    return tuple(out[:n]), tuple(tangent_out)


def _dense(xs, w_h, real) -> bool:
    """Whether oneDNN may run this sequence: no mask and no empty axis, on kernels built with
    oneDNN (and ``RNNJAX_ONEDNN`` not 0); :func:`uses_onednn` decides by size."""
    return real is None and min(*xs.shape, w_h.shape[0]) > 0 and _native.onednn()


def _run(kernels, weights, xs, state0, real, reverse, remat):
    from rnnjax.scan import _segment_steps

    w_i = weights[0]
    name = kernels.name
    check_step_input(name, jax.ShapeDtypeStruct(xs.shape[1:], xs.dtype), w_i.shape[0])
    dense = _dense(xs, weights[2], real)
    mask = jnp.ones(xs.shape[:1], bool) if real is None else real
    args = (xs[None], *weights, *(s[None] for s in state0), mask[None])
    checkpoint = _segment_steps(remat, xs.shape[0]) or 0
    return [o[0] for o in recurrence(kernels, args, bool(reverse), dense, checkpoint)]


def lstm_sequence(params: dict, xs, h0, c0, real, *, reverse: bool, remat=False):
    """One example: ``xs (T, I)`` -> ``(ys (T, H), h_last, c_last)``; ``real`` is the ``(T,)``
    mask of real steps or None; ``remat`` as :func:`rnnjax.scan`'s."""
    weights = (params["w_i"], params["b"], params["w_h"])
    return tuple(_run(LSTM, weights, xs, (h0, c0), real, reverse, remat))


def gru_sequence(params: dict, xs, h0, real, *, reverse: bool, remat=False):
    """One example of the reset-after GRU: ``xs (T, I)`` -> ``(ys (T, H), h_last)``."""
    weights = (params["w_i"], params["b_i"], params["w_h"], params["b_h"])
    return tuple(_run(GRU, weights, xs, (h0,), real, reverse, remat))


# ----------------------------------------------------------------------------- cells


def check_native(cell_name: str, native, blockers: list[tuple[bool, str]]) -> bool:
    """Whether a cell gets the native sequence path: ``native`` is the cell's argument,
    ``blockers`` the ``(applies, "option=value")`` options the kernels do not cover."""
    if native is not None and not isinstance(native, bool):
        raise TypeError(f"{cell_name} expects native to be None, True or False, got {native!r}")
    blocked = [why for hit, why in blockers if hit]
    if native is True:
        if blocked:
            raise ValueError(
                f"{cell_name}(native=True) with {', '.join(blocked)}: the native kernels run the "
                f"plain float32 {cell_name} only; drop those options or use native=None"
            )
        if not available():
            raise RuntimeError(
                f"{cell_name}(native=True): the native CPU kernels are unavailable: "
                f"{unavailable_reason()}"
            )
    return native is not False and not blocked


def sequence_fn(cell_name: str, step_cell, native, run: Callable) -> Callable:
    """A cell's ``sequence``: ``run(params, xs, carry, real, reverse, remat) -> (carry, ys)`` on
    the kernels when they can run, else the ``lax.scan`` of ``step_cell.step`` under ``remat``
    (with ``native=True``, an error saying why, unless recurrent dropout asked for the step)."""

    def sequence(params, xs, carry, real, *, reverse=False, unroll=1, recurrent_mask=None,
                 remat=False):  # fmt: skip
        arrays = (xs, *jax.tree.leaves(carry), *jax.tree.leaves(params))
        if recurrent_mask is None and ready() and float32(*arrays):
            return run(params, xs, carry, real, reverse, remat)
        if native is True and recurrent_mask is None:
            explain(cell_name, *arrays)
        from rnnjax.scan import scan_steps

        cell = step_cell
        if recurrent_mask is not None:
            step = functools.partial(step_cell.step, recurrent_mask=recurrent_mask)
            cell = step_cell._replace(step=step)
        return scan_steps(
            cell, params, xs, carry, real, reverse=reverse, unroll=unroll, remat=remat
        )

    return sequence
