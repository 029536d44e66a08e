"""Every fast path equals the reference on every input class, property-based (hypothesis).

Fast paths: the native kernels of ``rj.cells.lstm`` / ``gru`` (all their loops), the fused
sequence path (``fused=True``) and ``compute_dtype`` on it; the reference of each is the
``lax.scan`` of its step, ``cell._replace(sequence=None)``. Inputs: random values with NaN,
+-inf, 1e30, -0.0 and subnormals poked into inputs, carries and weights; lengths from 0 to T
and arbitrary masks; reverse; remat; sizes around the kernels' panel widths. Passes: inference,
training (forward saving, backward) and forward mode. ``tests/differential.py`` has the
machinery; the profile (``--hypothesis-profile=long`` for many more examples) is in conftest.
"""

import pytest
from differential import (
    FAST_PATHS,
    Config,
    all_finite,
    assert_same,
    draw_args,
    may_overflow,
    program,
    real_steps,
)  # fmt: skip
from hypothesis import assume, given
from hypothesis import strategies as st

NATIVE = ("lstm", "gru")
OTHERS = tuple(p for p in FAST_PATHS if p not in NATIVE)


def check(data, config: Config) -> None:
    args, tangent, weights = draw_args(data, config)
    # The one place where the reference is not the standard: a non-finite weight that meets no
    # real step. JAX's gradient of the padded steps' dropped results is 0 times the step's
    # Jacobian at that weight, NaN; the kernels never run a padded step, and give 0.
    assume(all_finite(args[0]) or real_steps(config, *args[3:]))
    got = program(config, reference=False)(args, tangent, weights)
    want = program(config, reference=True)(args, tangent, weights)
    tol = FAST_PATHS[config.path][2]
    overflow = may_overflow(args)
    for name in ("forward", "grad", "jvp"):
        # With 1e30 in the inputs a derivative is a sum of terms of 1e30 times a saturated
        # gate's f (1 - f), whose float32 rounding leaves the reference itself without a
        # correct digit: there only where the values are finite is compared.
        values = not overflow or name == "forward"
        assert_same(got[name], want[name], tol, f"{config} {name}", overflow=overflow,
                    values=values)  # fmt: skip


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
