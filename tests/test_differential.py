"""Every fast path equals the reference on every input class, property-based (hypothesis).

Fast paths: the native kernels of ``rj.cells.lstm`` / ``gru`` (all their loops), the fused
sequence path (``fused=True``) and ``compute_dtype`` on it; the reference of each is the
``lax.scan`` of its step, ``cell._replace(sequence=None)``. Inputs: random values with NaN,
+-inf, 1e30, -0.0 and subnormals poked into inputs, carries and weights; lengths from 0 to T
and arbitrary masks; reverse; remat; sizes around the kernels' panel widths. Passes: inference,
training (forward saving, backward) and forward mode. ``tests/differential.py`` has the
machinery; the profile (``--hypothesis-profile=long`` for many more examples) is in conftest.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from differential import (  # fmt: skip
    FAST_PATHS,
    Config,
    all_finite,
    assert_same,
    compare,
    draw_args,
    program,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import rnnjax as rj
from rnnjax import _native

# Without the kernels the native paths are the step scan itself: nothing to compare.
_kernels = pytest.mark.skipif(
    not _native.available(), reason=f"no native kernels: {_native.unavailable_reason()}"
)
NATIVE = tuple(pytest.param(p, marks=_kernels) for p in ("lstm", "gru"))
OTHERS = tuple(p for p in FAST_PATHS if p not in ("lstm", "gru"))


def check(data, config: Config) -> None:
    args, tangent, weights = draw_args(data, config)
    got = program(config, reference=False)(args, tangent, weights)
    compare(got, program(config, reference=True)(args, tangent, weights), args, config)


def pick(data, path, shapes, maskings=("none", "length", "mask"), remats=(False,)):
    batch, steps, inputs, hidden = data.draw(st.sampled_from(shapes), label="B, T, I, H")
    return Config(
        path, batch, steps, inputs, hidden,
        reverse=data.draw(st.booleans(), label="reverse"),
        masking=data.draw(st.sampled_from(maskings), label="masking"),
        remat=data.draw(st.sampled_from(remats), label="remat"),
    )  # fmt: skip


# A single row and a partial panel of 4 units; 7 rows (a tile of 6 and one) and 17 units (a
# full panel of 16 and one more).
VALUE_SHAPES = ((1, 5, 3, 4), (7, 4, 3, 17))


@pytest.mark.parametrize("path", NATIVE)
@given(data=st.data())
def test_native_kernels_equal_the_reference_on_special_values(path, data):
    check(data, pick(data, path, VALUE_SHAPES))


@pytest.mark.parametrize("path", OTHERS)
# pure JAX, no dispatch: fewer examples (2/3 of the profile's)
@settings(max_examples=max(4, settings.default.max_examples * 2 // 3))
@given(data=st.data())
def test_fused_paths_equal_the_reference_on_special_values(path, data):
    check(data, pick(data, path, VALUE_SHAPES[1:], maskings=("none", "mask")))


# Batch and hidden of 1, primes, and sizes just below, at and above the AVX-512 loops' tile
# (6 rows) and panel (16 units); inputs 1 and 17 (just above a vector).
BATCHES, HIDDENS, STEPS, INPUTS = (1, 2, 5, 6, 7, 13), (1, 2, 15, 16, 17, 33), (0, 1, 3), (1, 17)


@pytest.mark.parametrize("path", NATIVE)
@given(data=st.data())
def test_native_kernels_equal_the_reference_at_every_size(path, data):
    shape = tuple(data.draw(st.sampled_from(s)) for s in (BATCHES, STEPS, INPUTS, HIDDENS))
    check(data, pick(data, path, (shape,)))


@pytest.mark.parametrize("path", NATIVE)
@given(data=st.data())
def test_checkpointed_kernels_equal_the_reference(path, data):
    shapes = [(3, t, 2, 5) for t in (0, 1, 5, 7)]
    check(data, pick(data, path, shapes, maskings=("none", "length", "mask"),
                     remats=(True, 1, 2, 3, "sqrt")))  # fmt: skip


# ------------------------------------------------------------------ what these tests found
# Each failed before its fix (the commit that made it pass says what was wrong).


def _forward(path, x, carry=None, **scan_kw):
    """The fast path's and the reference's ``(final, ys)`` on one example ``x (T, I)``."""
    fast, plain, _ = FAST_PATHS[path]
    hidden = 4
    params = plain(hidden).init(jax.random.key(0), x.shape[-1])
    return [
        jax.jit(lambda p, x, c, cell=cell: rj.scan(cell, p, x, c, **scan_kw))(params, x, carry)
        for cell in (fast(hidden), plain(hidden))
    ]


@pytest.mark.parametrize("path", NATIVE)
def test_nan_input_stays_nan_in_the_kernels_forward_pass(path):
    """The AVX-512 loops' tanh clamped NaN to +-7.9 (max/min return their second operand when
    one is NaN): every output after a NaN input was finite, the reference's NaN."""
    x = np.array(jax.random.normal(jax.random.key(1), (5, 3)))
    x[2, 1] = np.nan
    got, want = _forward(path, x)
    assert np.isnan(np.asarray(got[1][2:])).all()
    assert_same(got, want, 2e-5)


@pytest.mark.parametrize("path", NATIVE)
@pytest.mark.parametrize("value", [np.inf, -np.inf, 1e30])
def test_infinite_input_with_a_partial_panel(path, value):
    """4 hidden units fill a quarter of a 16-unit panel: the other 12 have zero weights, and an
    infinite input made their gates inf * 0 = NaN, which the next step spread to every unit
    (hidden before by the clamp that made NaN finite: it failed with that fixed alone)."""
    x = np.array(jax.random.normal(jax.random.key(2), (5, 3)))
    x[2, 1] = value
    got, want = _forward(path, x)
    assert np.isfinite(np.asarray(want[1])).all()
    assert_same(got, want, 2e-5)


@_kernels
def test_saturated_gate_closes_exactly():
    """A GRU whose update gate sees -inf keeps none of h: the AVX-512 loops' sigmoid was 1.5e-7
    there (the tanh's reciprocal), which carried 1.5e23 of an h of 1e30 into h'."""
    x = np.zeros((2, 3), np.float32)
    cell = rj.cells.gru(4)
    params = cell.init(jax.random.key(0), 3)
    params["b_i"] = params["b_i"].at[4:8].set(-np.inf)  # z's bias: the gate shut
    carry = jnp.full(4, 1e30)
    got = rj.scan(cell, params, x, carry)
    want = rj.scan(cell._replace(sequence=None), params, x, carry)
    assert np.abs(np.asarray(got[1])).max() <= 1.0  # h' = n, |n| <= 1
    assert_same(got, want, 2e-5)


@pytest.mark.parametrize("path", [*NATIVE, "lstm_fused", "elman_fused"])
@pytest.mark.parametrize("where", ["input", "carry"])
def test_padding_never_reaches_a_gradient(path, where):
    """NaN in the padding (of the inputs, or a NaN carry entering padded steps only) gave NaN
    weight gradients: in rnnjax.scan (0 cotangent times the padded step's Jacobian), the fused
    path, and the kernels (x^T dz and h_prev^T dz over padded rows)."""
    fast, plain, _ = FAST_PATHS[path]
    cell = fast(4)
    params = cell.init(jax.random.key(0), 3)
    xs = np.array(jax.random.normal(jax.random.key(1), (2, 5, 3)))
    carry = jax.tree.map(lambda a: np.full((2, *a.shape), 0.3, np.float32),
                         cell.initial_carry(params))  # fmt: skip
    lengths = np.array([3, 0])
    if where == "input":
        xs[0, 4] = xs[1, :] = np.nan  # padding only
    else:
        jax.tree.map(lambda a: a.__setitem__(1, np.nan), carry)  # the all-padded example

    def grad(cell):
        def loss(p, x, c):
            run = jax.vmap(lambda x, c, n: rj.scan(cell, p, x, c, length=n)[1])
            return jnp.sum(run(x, c, lengths)[0] * 0.5)  # the first example only

        return jax.jit(jax.grad(loss, (0, 1)))(params, xs, carry)

    got, want = grad(cell), grad(plain(4))
    assert all_finite(want)
    assert_same(got, want, 2e-5)
