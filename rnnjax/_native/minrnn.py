"""The JAX side of ``rnnjax/_native/minrnn.cc``: a matmul primitive on the kernels' sgemm, and
minGRU's and minLSTM's fused gates-and-recurrence passes, forward and backward.

- :func:`matmul` ``(a, b)`` is ``a @ b`` as the primitive ``rnnjax_matmul``: on CPU, with the
  kernels loaded and float32 operands, oneDNN's (or OpenBLAS's) sgemm, which ran XLA's
  tall-skinny ``(B*T, I) @ (I, kH)`` about twice as fast as XLA's dot on the 2-core CPU;
  elsewhere XLA's dot. Its batching rule folds a ``vmap`` of the left operand into its rows,
  so a vmapped projection is one matmul over all ``B*T`` rows, and its transposes are the same
  primitive with transposed operands: the weight gradient ``x^T dproj`` of a vmapped
  projection is one matmul over all rows too, summed over the batch by the matmul itself. A
  ``vmap`` over the weights (or of a transposed product: per-example gradients) runs XLA's dot.
- :func:`min_scan` ``(kind, proj, bias, h0, reset, keep, reverse) -> h``: minGRU's
  (``z = sigmoid(k + b_k)``, ``h_t = (1 - z) h_{t-1} + z (v + b_v)`` over ``proj = k | v``) or
  minLSTM's recurrence over the projection, gates and recurrence in one pass that never writes
  the gates (``RnnjaxMin{Gru,Lstm}Forward``), with a custom VJP whose backward pass is one
  more (``RnnjaxMin{Gru,Lstm}Backward``): what the cells' parallel form runs when
  ``linear_scan``'s mode resolves to ``"native"`` (:mod:`rnnjax.cells._minrnn`). Batching:
  ffi_call's ``"expand_dims"`` rule, as :mod:`rnnjax._native.linear`. Second derivatives take
  the tangents of :func:`reference`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from rnnjax import _native

TARGETS = {
    "rnnjax_matmul": "RnnjaxMatmul",
    "rnnjax_mingru_forward": "RnnjaxMinGruForward",
    "rnnjax_mingru_backward": "RnnjaxMinGruBackward",
    "rnnjax_minlstm_forward": "RnnjaxMinLstmForward",
    "rnnjax_minlstm_backward": "RnnjaxMinLstmBackward",
}


@functools.cache
def _load() -> str | None:
    """Register the targets once; None on success, else why the kernels are unavailable."""
    if not _native.available():
        return _native.unavailable_reason()
    lib = _native._LIBRARY[0]
    for target, symbol in TARGETS.items():
        try:
            handler = getattr(lib, symbol)
        except AttributeError:
            return (
                f"{_native.library_path().name} was built before the minGRU kernels (no "
                f"{symbol}): reinstall rnnjax (pip install -e .) to rebuild it"
            )
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(handler), platform="cpu")
    return None


def available() -> bool:
    """Whether the kernels are built, loaded and registered (CPU only)."""
    return _load() is None


def unavailable_reason() -> str | None:
    """Why :func:`available` is False (None when it is True)."""
    return _load()


# ---------------------------------------------------------------------------- the matmul
def _op(x, trans):
    return x.T if trans else x


def _matmul_reference(a, b, *, trans_a, trans_b):
    return jnp.matmul(_op(a, trans_a), _op(b, trans_b))


matmul_p = Primitive("rnnjax_matmul")
matmul_p.def_impl(lambda a, b, **kw: jax.jit(functools.partial(matmul_p.bind, **kw))(a, b))


@matmul_p.def_abstract_eval
def _matmul_abstract(a, b, *, trans_a, trans_b):
    m = a.shape[1] if trans_a else a.shape[0]
    n = b.shape[0] if trans_b else b.shape[1]
    return jax.core.ShapedArray((m, n), jnp.result_type(a.dtype, b.dtype))


def _matmul_batch(args, dims, *, trans_a, trans_b):
    (a, b), (da, db) = args, dims
    if db is None and not trans_a:
        # The rows of every example one after another: one matmul, reshaped back.
        a = jnp.moveaxis(a, da, 0)
        out = matmul_p.bind(a.reshape(-1, a.shape[-1]), b, trans_a=False, trans_b=trans_b)
        return out.reshape(*a.shape[:2], out.shape[-1]), 0
    reference = functools.partial(_matmul_reference, trans_a=trans_a, trans_b=trans_b)
    return jax.vmap(reference, in_axes=(da, db))(a, b), 0


batching.primitive_batchers[matmul_p] = _matmul_batch


def _transpose_a(ct, a, b, *, trans_a, trans_b):
    # c = op(a) op(b): d op(a) = ct op(b)^T, and a^T's is that transposed.
    if trans_a:
        return matmul_p.bind(b, ct, trans_a=trans_b, trans_b=True)
    return matmul_p.bind(ct, b, trans_a=False, trans_b=not trans_b)


def _transpose_b(ct, a, b, *, trans_a, trans_b):
    if trans_b:
        return matmul_p.bind(ct, a, trans_a=True, trans_b=trans_a)
    return matmul_p.bind(a, ct, trans_a=not trans_a, trans_b=False)


ad.defbilinear(matmul_p, _transpose_a, _transpose_b)
mlir.register_lowering(matmul_p, mlir.lower_fun(_matmul_reference, multiple_results=False))


def _matmul_cpu(ctx, a, b, *, trans_a, trans_b):
    if available() and all(x.dtype == jnp.float32 for x in (*ctx.avals_in, *ctx.avals_out)):
        return jax.ffi.ffi_lowering("rnnjax_matmul")(ctx, a, b, trans_a=trans_a, trans_b=trans_b)
    lowered = mlir.lower_fun(_matmul_reference, multiple_results=False)
    return lowered(ctx, a, b, trans_a=trans_a, trans_b=trans_b)


mlir.register_lowering(matmul_p, _matmul_cpu, platform="cpu")


def matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a @ b`` for a 2-D ``a`` (rows, K) and ``b`` (K, N) through :data:`matmul_p`.

    >>> import jax.numpy as jnp
    >>> matmul(jnp.ones((2, 3)), jnp.ones((3, 4))).shape
    (2, 4)
    """
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"matmul expects (M, K) @ (K, N), got {a.shape} @ {b.shape}")
    a, b = jnp.asarray(a), jnp.asarray(b)
    dtype = jnp.result_type(a.dtype, b.dtype)
    return matmul_p.bind(a.astype(dtype), b.astype(dtype), trans_a=False, trans_b=False)


# ------------------------------------------------------------- the cells' recurrences
def _mingru_coefficients(k, v):
    z = jax.nn.sigmoid(k)
    return 1.0 - z, z * v


def _minlstm_coefficients(kf, ki, v):
    f, i = jax.nn.sigmoid(kf), jax.nn.sigmoid(ki)
    total = f + i
    return f / total, i / total * v


#: The kernels' cells: name -> (blocks k of the (T, kH) projection, the recurrence's (a, b) from
#: them, as the cell writes them).
KINDS = {"mingru": (2, _mingru_coefficients), "minlstm": (3, _minlstm_coefficients)}


def reference(kind, proj, bias, h0, reset, keep, reverse):
    """What :func:`min_scan` computes, in JAX: the gates, then the recurrence as a plain
    ``lax.scan`` (differentiable in both modes, unlike ``linear_scan``'s custom VJP); its
    tangents are the kernels' second derivatives."""
    blocks, coefficients = KINDS[kind]
    # A padded step's projection reaches nothing, its derivative included (zero, not 0 * NaN).
    proj = jnp.where(keep[:, None], proj, jnp.zeros_like(proj))
    a, b = coefficients(*jnp.split(proj + bias, blocks, axis=-1))
    a = jnp.where(keep[:, None], a, jnp.ones_like(a))
    b = jnp.where(keep[:, None], b, jnp.zeros_like(b))

    def step(h, abr):
        a_t, b_t, r_t = abr
        # The carry replaced before the step, so that nothing before a reset (NaN included)
        # reaches a derivative after it: no 0 * NaN through an unselected branch.
        h = a_t * jnp.where(r_t, jnp.zeros_like(h), h) + b_t
        return h, h

    return jax.lax.scan(step, h0, (a, b, reset), reverse=reverse)[1]


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 6))
def _forward(kind, proj, bias, h0, reset, keep, reverse):
    out = jax.ShapeDtypeStruct((proj.shape[0], h0.shape[-1]), proj.dtype)
    call = jax.ffi.ffi_call(f"rnnjax_{kind}_forward", out, vmap_method="expand_dims")
    return call(proj, bias, h0, reset, keep, reverse=bool(reverse))


@_forward.defjvp
def _forward_jvp(kind, reverse, primals, tangents):
    # Reached by second derivatives only (first ones take the custom VJP).
    proj, bias, h0, reset, keep = primals
    run = lambda p, b, h: reference(kind, p, b, h, reset, keep, reverse)  # noqa: E731
    tangent = jax.jvp(run, (proj, bias, h0), tangents[:3])[1]
    return _forward(kind, *primals, reverse), tangent


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 8))
def _backward(kind, proj, bias, h, h0, g, reset, keep, reverse):
    outs = (
        jax.ShapeDtypeStruct(proj.shape, proj.dtype),
        jax.ShapeDtypeStruct(bias.shape, proj.dtype),
        jax.ShapeDtypeStruct(h0.shape, proj.dtype),
    )
    call = jax.ffi.ffi_call(f"rnnjax_{kind}_backward", outs, vmap_method="expand_dims")
    return tuple(call(proj, bias, h, h0, g, reset, keep, reverse=bool(reverse)))


def _reference_backward(kind, proj, bias, h0, g, reset, keep, reverse):
    run = lambda p, b, h: reference(kind, p, b, h, reset, keep, reverse)  # noqa: E731
    return jax.vjp(run, proj, bias, h0)[1](g)


@_backward.defjvp
def _backward_jvp(kind, reverse, primals, tangents):
    proj, bias, h, h0, g, reset, keep = primals
    dproj, dbias, _, dh0, dg = tangents[:5]  # h is the forward's of (proj, bias, h0)

    def run(p, b, h0, g):
        return _reference_backward(kind, p, b, h0, g, reset, keep, reverse)

    tangent = jax.jvp(run, (proj, bias, h0, g), (dproj, dbias, dh0, dg))[1]
    return _backward(kind, *primals, reverse), tangent


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 6))
def _scan(kind, proj, bias, h0, reset, keep, reverse):
    return _forward(kind, proj, bias, h0, reset, keep, reverse)


def _scan_fwd(kind, proj, bias, h0, reset, keep, reverse):
    h = _forward(kind, proj, bias, h0, reset, keep, reverse)
    return h, (proj, bias, h, h0, reset, keep)


def _scan_bwd(kind, reverse, res, g):
    proj, bias, h, h0, reset, keep = res
    dproj, dbias, dh0 = _backward(kind, proj, bias, h, h0, g, reset, keep, reverse)
    return dproj, dbias, dh0, None, None


_scan.defvjp(_scan_fwd, _scan_bwd)


def min_scan(kind, proj, bias, h0, reset=None, keep=None, *, reverse=False) -> jax.Array:
    """The recurrence of minGRU (``kind="mingru"``, ``proj = z | h~``, (T, 2H)) or minLSTM
    (``"minlstm"``, ``f | i | h~``, (T, 3H)) over the projection ``x W`` without its bias
    ``bias`` (kH,), from ``h0`` (H,): ``h`` (T, H). ``reset`` (T,) zeroes the carry before a
    step; where ``keep`` (T,) is False the step keeps the carry (a padded step). float32, CPU,
    :func:`available`.

    >>> import jax.numpy as jnp
    >>> h = min_scan("mingru", jnp.zeros((3, 2)), jnp.zeros(2), jnp.ones(1))
    >>> h[:, 0].tolist()  # z = 0.5, h~ = 0: h halves
    [0.5, 0.25, 0.125]
    """
    if not available():
        raise RuntimeError(f"rnnjax: the native minGRU/minLSTM kernels are unavailable: {_load()}")
    if kind not in KINDS:
        raise ValueError(f"min_scan kind must be one of {', '.join(KINDS)}, got {kind!r}")
    steps = proj.shape[0]
    # Fresh arrays, not the caller's (as linear_scan's reset): vmap over a numpy constant under
    # jit hands that array through, and the custom VJP's residuals refuse it.
    reset = jnp.zeros(steps, bool) if reset is None else jnp.logical_and(jnp.asarray(reset), True)
    keep = jnp.ones(steps, bool) if keep is None else jnp.logical_and(jnp.asarray(keep), True)
    return _scan(kind, proj, bias, h0, reset, keep, bool(reverse))


mingru_scan = functools.partial(min_scan, "mingru")
minlstm_scan = functools.partial(min_scan, "minlstm")
