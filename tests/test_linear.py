"""rnnjax.linear_scan: every mode equals a plain ``lax.scan`` of the recurrence (differentiated
by JAX itself) in values and in gradients, for real and complex inputs, with reverse, reset and
h0, under vmap and jit; non-finite values; errors; second and finite-difference derivatives."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from jax import lax
from jax.test_util import check_grads

import rnnjax as rj
from rnnjax import linear
from rnnjax._native import linear as native_linear

CHUNK = linear.CHUNK
NATIVE = pytest.mark.skipif(
    not native_linear.available(),
    reason=f"the native linear kernel is unavailable: {native_linear.unavailable_reason()}",
)
MODES = ["sequential", "associative", "chunked", pytest.param("native", marks=NATIVE)]
MODE_NAMES = ["sequential", "associative", "chunked", "native"]


def reference(a, b, h0, reset, reverse):
    """The recurrence as written: the carry is zeroed before a reset step, then h = a h + b."""

    def step(h, x):
        a_t, b_t, r_t = x
        h = a_t * jnp.where(r_t, jnp.zeros_like(h), h) + b_t
        return h, h

    return lax.scan(step, h0, (a, b, reset), reverse=reverse)[1]


def _loss(h, w):
    # Real-valued, nonlinear in h, and touching both parts of a complex h.
    return jnp.sum(jnp.real(w * h)) + 0.5 * jnp.sum(jnp.abs(h) ** 2)


@functools.cache
def program(mode: str | None, reverse: bool):
    """Jitted (h, grads wrt a, b, h0) of linear_scan in `mode` (None: the reference); cached so
    that each mode and direction is one jit object, retraced only for new shapes."""

    def run(a, b, h0, reset):
        if mode is None:
            return reference(a, b, h0, reset, reverse)
        return rj.linear_scan(a, b, h0, reverse=reverse, reset=reset, mode=mode)

    def loss(a, b, h0, reset, w):
        h = run(a, b, h0, reset)
        return _loss(h, w), h

    grad = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)
    return jax.jit(lambda *args: grad(*args)[::-1])


@functools.cache
def jitted(mode: str, reverse: bool = False):
    """linear_scan(a, b, reset=...) in `mode`, jitted (eager associative scans are slow)."""
    return jax.jit(
        lambda a, b, reset: rj.linear_scan(a, b, reverse=reverse, reset=reset, mode=mode)
    )


def draw(rng, shape, dtype, decay=False):
    """a: magnitudes in [0, 1) (complex: on a random phase); b, h0: normal."""
    if decay:
        x = rng.uniform(0.0, 1.0, shape)
        if dtype == np.complex64:
            x = x * np.exp(1j * rng.uniform(-np.pi, np.pi, shape))
    else:
        x = rng.normal(size=shape)
        if dtype == np.complex64:
            x = x + 1j * rng.normal(size=shape)
    return jnp.asarray(x.astype(dtype))


def assert_close(actual, desired, scale=1.0):
    np.testing.assert_allclose(actual, desired, rtol=3e-5, atol=3e-5 * scale)


CASE = st.fixed_dictionaries(
    {
        "steps": st.sampled_from([1, 2, 7, CHUNK, CHUNK + 1, 2 * CHUNK + 9]),
        "state": st.sampled_from([(3,), (2, 5), (17,)]),
        "dtype": st.sampled_from([np.float32, np.complex64]),
        "reverse": st.booleans(),
        "reset": st.booleans(),
        "h0": st.booleans(),
        "seed": st.integers(0, 2**16),
    }
)
EDGES = [  # T = 0, T = 1, and T neither a multiple of the chunk nor below it, complex
    dict(steps=0, state=(3,), dtype=np.float32, reverse=False, reset=False, h0=True, seed=0),
    dict(steps=1, state=(2, 5), dtype=np.complex64, reverse=True, reset=True, h0=True, seed=1),
    dict(steps=2 * CHUNK + 9, state=(2, 5), dtype=np.complex64, reverse=True, reset=True,
         h0=True, seed=2),
]  # fmt: skip


def inputs(case):
    rng = np.random.default_rng(case["seed"])
    shape = (case["steps"], *case["state"])
    dtype = case["dtype"]
    a, b, w = draw(rng, shape, dtype, decay=True), draw(rng, shape, dtype), draw(rng, shape, dtype)
    h0 = draw(rng, case["state"], dtype) if case["h0"] else jnp.zeros(case["state"], dtype)
    reset = rng.uniform(size=case["steps"]) < (0.2 if case["reset"] else 0.0)
    return a, b, h0, jnp.asarray(reset), w


@given(case=CASE)
@example(case=EDGES[0])
@example(case=EDGES[1])
@example(case=EDGES[2])
def test_every_mode_equals_the_scan_in_values_and_gradients(case):
    args = inputs(case)
    want_h, want_grads = program(None, case["reverse"])(*args)
    assert want_h.shape == args[0].shape and want_h.dtype == case["dtype"]
    for mode in MODE_NAMES:
        if mode == "native" and not native_linear.available():
            continue
        h, grads = program(mode, case["reverse"])(*args)
        assert h.dtype == want_h.dtype, mode
        assert_close(h, want_h)
        for got, want, name in zip(grads, want_grads, ("a", "b", "h0"), strict=True):
            assert got.dtype == want.dtype, (mode, name)
            assert_close(got, want, scale=float(jnp.max(jnp.abs(want), initial=1.0)))


@pytest.mark.parametrize("mode", MODES)
def test_vmap_and_jit_equal_the_scan_per_example(mode):
    """vmap over batches of (T, D) examples, each of a, b and h0 batched or shared by the batch
    (in_axes None: the kernel reads a shared operand again for every row), and two nested
    vmaps; the gradient of a shared operand sums over its batch."""
    rng = np.random.default_rng(3)
    batch, steps, state = 3, CHUNK + 5, (2, 3)
    a = draw(rng, (2, batch, steps, *state), np.float32, decay=True)
    b = draw(rng, (2, batch, steps, *state), np.float32)
    h0 = draw(rng, (2, batch, *state), np.float32)
    w = draw(rng, (2, batch, steps, *state), np.float32)

    def batched_loss(run, axes, nested):
        def loss(a, b, h0):
            inner = jax.vmap(run, in_axes=axes)
            h = jax.vmap(inner, in_axes=axes)(a, b, h0) if nested else inner(a, b, h0)
            return _loss(h, w if nested else w[0]), h

        return jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))

    scan = lambda a, b, h0: reference(a, b, h0, jnp.zeros(steps, bool), True)  # noqa: E731
    ours = lambda a, b, h0: rj.linear_scan(a, b, h0, reverse=True, mode=mode)  # noqa: E731
    cases = [((None, 0, None), False), ((0, None, 0), False), ((0, 0, None), True)]
    for axes, nested in cases:
        args = [x if nested else x[0] for x in (a, b, h0)]
        args = [
            x if axis == 0 else x[(0,) * (1 + nested)] for x, axis in zip(args, axes, strict=True)
        ]
        want_grads, want_h = batched_loss(scan, axes, nested)(*args)
        grads, h = batched_loss(ours, axes, nested)(*args)
        assert_close(h, want_h)
        for got, want in zip(grads, want_grads, strict=True):
            assert got.shape == want.shape, (axes, nested)
            assert_close(got, want, scale=float(jnp.max(jnp.abs(want))))


@pytest.mark.parametrize("mode", MODES)
def test_nan_reaches_every_later_step_up_to_a_reset(mode):
    """A NaN in a or b at step s gives NaN at s and every later step (in the scan's order) up to
    the next reset, which replaces the carry (h = b there, not 0 * NaN + b): from the reset on
    and before s the values are the reference's, finite. Other features never see it."""
    steps, s, gap = 2 * CHUNK + 3, CHUNK - 2, CHUNK // 2
    rng = np.random.default_rng(4)
    a = np.asarray(draw(rng, (steps, 4), np.float32, decay=True))
    b = np.asarray(draw(rng, (steps, 4), np.float32))
    for reverse in (False, True):
        at = steps - 1 - s if reverse else s
        stop = at - gap if reverse else at + gap  # the reset, `gap` steps later in scan order
        reset = np.zeros(steps, bool)
        reset[stop] = True
        nan = slice(stop + 1, at + 1) if reverse else slice(at, stop)
        clean = np.ones(steps, bool)
        clean[nan] = False
        want = np.asarray(reference(a, b, jnp.zeros(4), jnp.asarray(reset), reverse))
        for x, col in ((a, 0), (b, 2)):
            x_nan = x.copy()
            x_nan[at, col] = np.nan
            a_in, b_in = (x_nan, b) if x is a else (a, x_nan)
            h = np.asarray(jitted(mode, reverse)(a_in, b_in, reset))
            assert np.isnan(h[nan, col]).all(), (reverse, col)
            assert_close(h[clean], want[clean])
            assert_close(np.delete(h, col, axis=1), np.delete(want, col, axis=1))


@pytest.mark.parametrize("mode", MODES)
def test_inf_times_zero_is_nan_and_a_reset_clears_both(mode):
    """An inf in b at step s: h is +inf from s on while the a's are nonzero (here in [0.5, 1),
    so no product of them underflows), and NaN from the first later step whose a is exactly 0
    (0 * inf); a reset step instead replaces the carry, and h is finite from it on. Other
    features stay finite. Where products of the a's underflow to 0 the associative and chunked
    forms give NaN where the step-by-step forms still give inf: only that is mode-dependent."""
    steps, s, zero = CHUNK + 20, 10, CHUNK + 4
    rng = np.random.default_rng(5)
    a = rng.uniform(0.5, 1.0, (steps, 3)).astype(np.float32)
    b = rng.normal(size=(steps, 3)).astype(np.float32)
    b[s, 1] = np.inf
    a[zero, 1] = 0.0
    reset = np.zeros(steps, bool)
    h = np.asarray(jitted(mode)(a, b, reset))
    assert np.isposinf(h[s:zero, 1]).all()
    assert np.isnan(h[zero:, 1]).all()
    assert np.isfinite(h[:s, 1]).all() and np.isfinite(h[:, [0, 2]]).all()
    reset[zero + 3] = True
    h = np.asarray(jitted(mode)(a, b, reset))
    assert np.isposinf(h[s:zero, 1]).all() and np.isnan(h[zero : zero + 3, 1]).all()
    assert np.isfinite(h[zero + 3 :]).all() and h[zero + 3, 1] == b[zero + 3, 1]


@pytest.mark.parametrize("mode", ["sequential", pytest.param("native", marks=NATIVE)])
def test_second_derivatives_equal_the_scan(mode):
    """grad of grad: the custom VJP's backward pass is differentiable (the native kernels' jvp
    rules run the sequential backend's tangents)."""
    rng = np.random.default_rng(6)
    a = draw(rng, (9, 2), np.float32, decay=True)
    b, h0 = draw(rng, (9, 2), np.float32), draw(rng, (2,), np.float32)
    reset = jnp.zeros(9, bool)

    def second(run):
        loss = lambda a, b, h0: jnp.sum(run(a, b, h0) ** 3)  # noqa: E731
        inner = jax.grad(loss, argnums=(0, 1, 2))
        return jax.jit(jax.grad(lambda *x: sum(jnp.sum(g**2) for g in inner(*x)), (0, 1, 2)))

    want = second(lambda a, b, h0: reference(a, b, h0, reset, False))(a, b, h0)
    got = second(lambda a, b, h0: rj.linear_scan(a, b, h0, mode=mode))(a, b, h0)
    for g, w in zip(got, want, strict=True):
        assert_close(g, w, scale=float(jnp.max(jnp.abs(w))))


def test_gradients_match_finite_differences_in_float64():
    with jax.enable_x64(True):
        rng = np.random.default_rng(7)
        a = jnp.asarray(rng.uniform(0.2, 0.9, (CHUNK + 3, 2)) * np.exp(1j * rng.normal(size=2)))
        b = jnp.asarray(rng.normal(size=(CHUNK + 3, 2)) + 1j * rng.normal(size=(CHUNK + 3, 2)))
        h0 = jnp.asarray(rng.normal(size=2) + 0j)
        for mode in ("sequential", "chunked"):
            f = functools.partial(rj.linear_scan, reverse=True, mode=mode)
            check_grads(f, (a, b, h0), order=1, modes=["rev"], eps=1e-6, rtol=1e-5)


def test_auto_mode_resolves_by_platform_and_dtype():
    native = "native" if native_linear.available() else "sequential"
    assert linear.resolve_mode("auto", 1000, 64, jnp.float32) == native
    assert linear.resolve_mode("auto", 1000, 64, jnp.complex64) == native
    assert linear.resolve_mode("auto", 1000, 64, jnp.float64) == "sequential"
    assert linear.resolve_mode("associative", 1000, 64, jnp.float32) == "associative"


def test_bad_arguments_raise_clear_errors(monkeypatch):
    a, b = jnp.ones((5, 3)), jnp.ones((5, 3))
    with pytest.raises(ValueError, match="linear_scan mode must be one of .*'native'; got 'fast'"):
        rj.linear_scan(a, b, mode="fast")
    with pytest.raises(ValueError, match=r"b of shape \(T, \*D\) with a leading time axis"):
        rj.linear_scan(1.0, jnp.float32(2.0))
    with pytest.raises(ValueError, match=r"a must broadcast against b"):
        rj.linear_scan(jnp.ones((4, 3)), b)
    with pytest.raises(ValueError, match=r"a to broadcast to b's shape \(5, 3\), got a"):
        rj.linear_scan(jnp.ones((2, 5, 3)), b)
    with pytest.raises(ValueError, match=r"h0 of shape D = \(3,\).*got \(5, 3\)"):
        rj.linear_scan(a, b, h0=b)
    with pytest.raises(ValueError, match=r"reset to be a boolean array of shape \(T,\) = \(5,\)"):
        rj.linear_scan(a, b, reset=jnp.zeros(5))
    with pytest.raises(TypeError, match="reverse must be True or False, got 'yes'"):
        rj.linear_scan(a, b, reverse="yes")
    if native_linear.available():
        with (
            jax.enable_x64(True),
            pytest.raises(TypeError, match="runs float32 and complex64, got float64"),
        ):
            rj.linear_scan(jnp.ones((5, 3), jnp.float64), b, mode="native")
        with pytest.raises(TypeError, match="float32 or complex64 operands of one dtype"):
            native_linear.forward(a, b.astype(jnp.bfloat16), jnp.zeros(3), reverse=False)
    monkeypatch.setattr(native_linear, "_load", lambda: "switched off for this test")
    with pytest.raises(RuntimeError, match=r"needs .* kernels.*\(switched off for this test\)"):
        rj.linear_scan(a, b, mode="native")
