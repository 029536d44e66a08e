"""The native minGRU and minLSTM kernels and the matmul primitive under them
(``rnnjax._native.minrnn``): the matmul equals ``jnp.matmul`` under every transformation
(vmap of either operand, nested, per-example gradients, transposed operands through the
transposes, second order); the fused passes equal their JAX reference (gates, then a
``lax.scan``) on values and derivatives of first and second order, with resets, padded steps,
reverse and special values; and ``rnnjax.scan`` of a float32 minGRU or minLSTM on CPU runs
them. The cell-level contract (the fast path equals the step
scan with NaN and inf, under vmap and jit) is tests/test_zoo.py's and tests/test_minrnn.py's,
which run this pass wherever the kernels are built. Without the kernels these tests skip,
except under RNNJAX_EXPECT_NATIVE=1 (CI's README install), where that is a failure.
"""

import itertools
import os

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given

import rnnjax as rj
from rnnjax._native import minrnn

EXPECTED = os.environ.get("RNNJAX_EXPECT_NATIVE") == "1"
pytestmark = pytest.mark.skipif(
    not minrnn.available() and not EXPECTED,
    reason=f"native minGRU kernels unavailable: {minrnn.unavailable_reason()}",
)

B, T, K, H = 3, 5, 4, 6
KINDS = sorted(minrnn.KINDS)
KEYS = jax.random.split(jax.random.key(0), 8)
X = jax.random.normal(KEYS[0], (B, T, K))
W = jax.random.normal(KEYS[1], (K, 2 * H))
WS = jax.random.normal(KEYS[2], (B, K, 2 * H))


def test_kernels_are_built_where_expected():
    assert minrnn.available(), minrnn.unavailable_reason()


def close(a, b, tol=1e-5):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=tol, atol=tol)


@jax.jit
def matmul_cases(x, w, ws):
    """The same quantities through minrnn.matmul (``mine``) and jnp.matmul (``ref``)."""
    out = {}
    for name, mm in (("mine", minrnn.matmul), ("ref", jnp.matmul)):
        loss = lambda x, w, mm=mm: jnp.sum(jnp.sin(jax.vmap(lambda e: mm(e, w))(x)))  # noqa: E731
        one = lambda w, e, mm=mm: jnp.sum(jnp.sin(mm(e, w)))  # noqa: E731
        out[name] = {
            "value": jax.vmap(lambda e, mm=mm: mm(e, w))(x),
            "grad": jax.grad(loss, (0, 1))(x, w),
            "vmap_weights": jax.vmap(mm)(x, ws),
            "nested": jax.vmap(jax.vmap(lambda r, mm=mm: mm(r[None], w)))(x),
            "per_example": jax.vmap(jax.grad(one), (None, 0))(w, x),
            "per_example_weights": jax.vmap(jax.grad(one))(ws, x),
            "hessian": jax.hessian(lambda w, one=one: one(w, x[0]))(w),
            "jvp": jax.jvp(lambda w, mm=mm: mm(x[0], w), (w,), (jnp.cos(w),)),
            "grad_of_transposes": jax.grad(
                lambda x, w, mm=mm: jnp.sum(jnp.sin(mm(x[0].T, mm(x[0], w)))), (0, 1)
            )(x, w),
        }
    return out


def test_matmul_equals_jnp_matmul_under_every_transformation():
    out = matmul_cases(X, W, WS)
    for case in out["ref"]:
        close(out["mine"][case], out["ref"][case], 2e-5)


def test_matmul_folds_a_vmap_into_one_call_and_its_weight_gradient_into_another():
    def loss(x, w):
        return jnp.sum(jax.vmap(lambda e: minrnn.matmul(e, w))(x) ** 2)

    hlo = jax.jit(jax.grad(loss, 1)).lower(X, W).as_text()
    calls = [line for line in hlo.splitlines() if "rnnjax_matmul" in line and "call" in line]
    # forward (B*T, K) @ (K, 2H); weight gradient (B*T, K)^T @ (B*T, 2H): no dx, no loop
    assert len(calls) == 2, calls
    assert f"tensor<{B * T}x{K}xf32>" in hlo
    assert "stablehlo.dot_general" not in hlo


def test_matmul_other_dtypes_take_xlas_dot():
    a, b = X[0].astype(jnp.bfloat16), W.astype(jnp.bfloat16)
    assert minrnn.matmul(a, b).dtype == jnp.bfloat16
    hlo = jax.jit(minrnn.matmul).lower(a, b).as_text()
    assert "rnnjax_matmul" not in hlo and "dot_general" in hlo
    with pytest.raises(ValueError, match=r"\(M, K\) @ \(K, N\), got \(5, 4\) @ \(3, 12\)"):
        minrnn.matmul(X[0], W[:3])


def _inputs(seed, special=None):
    keys = jax.random.split(jax.random.key(seed), 6)
    proj = jax.random.normal(keys[0], (B, T, 3 * H))  # minGRU reads the first 2H
    bias = jax.random.normal(keys[1], (3 * H,))
    h0 = jax.random.normal(keys[2], (B, H))
    g = jax.random.normal(keys[3], (B, T, H))
    if special is not None:
        for where, value in special:
            proj = proj.at[where].set(value)
    return proj, bias, h0, g


@jax.jit
def scan_cases(proj, bias, h0, g, reset, keep):
    """Loss values, gradients and a Hessian-vector product of each cell's recurrence, through
    the kernels (``mine``) and the JAX reference (``ref``), forward and reverse."""
    out = {}
    for kind, name, reverse in itertools.product(KINDS, ("mine", "ref"), (False, True)):
        width = minrnn.KINDS[kind][0] * H
        p0, b0 = proj[..., :width], bias[:width]

        def loss(p, b, h, kind=kind, name=name, reverse=reverse):
            def one(p, h, r, k):
                if name == "mine":
                    return minrnn.min_scan(kind, p, b, h, r, k, reverse=reverse)
                return minrnn.reference(kind, p, b, h, r, k, reverse)

            return jnp.sum(jax.vmap(one)(p, h, reset, keep) * g)

        grad = jax.grad(loss, (0, 1, 2))
        hvp = jax.jvp(lambda p, grad=grad, b0=b0: grad(p, b0, h0), (p0,), (jnp.cos(p0),))[1]
        out[kind, name, reverse] = (loss(p0, b0, h0), grad(p0, b0, h0), hvp)
    return out


FLAGS = st.lists(st.booleans(), min_size=B * T, max_size=B * T).map(
    lambda f: np.array(f, bool).reshape(B, T)
)


@given(reset=FLAGS, keep=FLAGS, seed=st.integers(0, 3))
def test_fused_pass_equals_its_reference_to_second_order(reset, keep, seed):
    out = scan_cases(*_inputs(seed), reset, keep)
    for kind, reverse in itertools.product(KINDS, (False, True)):
        close(out[kind, "mine", reverse], out[kind, "ref", reverse], 2e-5)


SPECIAL = st.lists(
    st.tuples(
        st.tuples(st.integers(0, B - 1), st.integers(0, T - 1), st.integers(0, 3 * H - 1)),
        st.sampled_from([np.nan, np.inf, -np.inf, 1e30, -1e30, -0.0, 1e-40]),
    ),
    min_size=1,
    max_size=3,
)


@given(special=SPECIAL, reset=FLAGS, keep=FLAGS)
def test_special_values_land_where_the_reference_puts_them(special, reset, keep):
    """NaN, inf and overflow in the projection: the values and first derivatives are
    non-finite exactly where the reference's are, and equal elsewhere."""
    out = scan_cases(*_inputs(0, special), reset, keep)
    for kind, reverse in itertools.product(KINDS, (False, True)):
        (mine_loss, mine_grad, _), (ref_loss, ref_grad, _) = (
            out[kind, "mine", reverse],
            out[kind, "ref", reverse],
        )
        for a, b in zip(jax.tree.leaves((mine_loss, mine_grad)),
                        jax.tree.leaves((ref_loss, ref_grad)), strict=True):  # fmt: skip
            a, b = np.asarray(a), np.asarray(b)
            np.testing.assert_array_equal(np.isfinite(a), np.isfinite(b))
            finite = np.isfinite(a) & (np.abs(b) < 1e20)
            np.testing.assert_allclose(a[finite], b[finite], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_rnnjax_scan_of_a_float32_cell_runs_the_fused_pass(kind):
    make = getattr(rj.cells, kind)
    cell = make(H)
    params = cell.init(jax.random.key(1), K)

    def hlo(cell, dtype=jnp.float32):
        p = jax.tree.map(lambda a: a.astype(dtype), params)

        def loss(p, x):
            return jnp.sum(jax.vmap(lambda e: rj.scan(cell, p, e)[1])(x) ** 2)

        return jax.jit(jax.grad(loss)).lower(p, X.astype(dtype)).as_text()

    fused = hlo(cell)
    for target in ("rnnjax_matmul", f"rnnjax_{kind}_forward", f"rnnjax_{kind}_backward"):
        assert target in fused, target
    # another linear_scan mode keeps the projection on the kernels' sgemm, not the fused pass
    sequential = hlo(make(H, scan_mode="sequential"))
    assert "rnnjax_matmul" in sequential and f"rnnjax_{kind}_forward" not in sequential
    # the log-space form, and float16, are not the fused pass's
    assert f"rnnjax_{kind}_forward" not in hlo(make(H, log_space=True))
    assert "rnnjax_" not in hlo(cell, jnp.float16)


def test_the_kernels_reject_operands_of_the_wrong_shape():
    call = jax.ffi.ffi_call("rnnjax_mingru_forward", jax.ShapeDtypeStruct((T, H), jnp.float32))
    with pytest.raises(Exception, match=r"proj \(\.\.\., T, kH\) does not match"):
        jax.block_until_ready(
            call(
                jnp.zeros((T, H)),
                jnp.zeros(2 * H),
                jnp.zeros(H),
                jnp.zeros(T, bool),
                jnp.ones(T, bool),
                reverse=False,
            )  # fmt: skip
        )
