"""IndRNN (Li et al. 2018): the hoisted-projection sequence equals the step scan, the cell
equals the paper's equation (in numpy), u's initialisation, errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import rnnjax as rj

T, I, H = 6, 3, 4

MASKS = np.array([[1, 1, 0, 1, 0, 1], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]], bool)
RESETS = np.array([[0, 0, 1, 0, 1, 0], [1, 0, 0, 1, 0, 0], [0, 1, 0, 0, 0, 1]], bool)
LENGTHS = np.array([4, 6, 0])
MODES = {
    "plain": lambda m, r, n: {},
    "reset_mask": lambda m, r, n: {"reset": r, "mask": m},
    "reverse_reset_length": lambda m, r, n: {"reverse": True, "reset": r, "length": n},
    "remat3_reverse_mask": lambda m, r, n: {"remat": 3, "reverse": True, "mask": m},
}


def setup(cell, seed=0, dtype=jnp.float32):
    params = cell.init(jax.random.key(seed), I)
    keys = jax.random.split(jax.random.key(seed + 1), 5)
    params = {
        k: (v + 0.3 * jax.random.normal(keys[0], v.shape)).astype(dtype) for k, v in params.items()
    }
    xs = jax.random.normal(keys[1], (3, T, I), dtype)
    carry = 0.5 + 0.2 * jax.random.normal(keys[2], (H,), dtype)
    weights = jax.random.normal(keys[3], (3, T, H), dtype)
    mask = (jax.random.uniform(keys[4], (H,)) < 0.6).astype(dtype) * 2.0
    return params, xs, carry, weights, mask


def with_mask(cell, recurrent_mask):
    """``cell`` with recurrent dropout's mask bound, as rnnjax.layers.rnn binds it."""
    step = functools.partial(cell.step, recurrent_mask=recurrent_mask)
    sequence = cell.sequence and functools.wraps(cell.sequence)(
        functools.partial(cell.sequence, recurrent_mask=recurrent_mask)
    )
    return cell._replace(step=step, sequence=sequence)


def batched_loss(cell, mode):
    def loss(params, xs, carry, weights):
        def one(x, m, r, n):
            kwargs = MODES[mode](m, r, n)
            real = kwargs.get("mask", jnp.arange(T) < kwargs.get("length", T))
            x = jnp.where(real[:, None], x, jnp.nan)  # padding reaches nothing
            return rj.scan(cell, params, x, carry, **kwargs)

        final, ys = jax.vmap(one)(xs, MASKS, RESETS, LENGTHS)
        return jnp.sum(jnp.sin(ys) * weights) + jnp.sum(final**2), (final, ys)

    return loss


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_sequence_equals_the_step_scan(activation):
    cell = rj.cells.indrnn(H, activation=activation)
    params, xs, carry, weights, rec_mask = setup(cell)
    cells = {
        "fast": cell,
        "ref": cell._replace(sequence=None),
        "fast_dropout": with_mask(cell, rec_mask),
        "ref_dropout": with_mask(cell._replace(sequence=None), rec_mask),
    }

    @jax.jit
    def every(args):
        return {
            (mode, name): jax.grad(batched_loss(c, mode), argnums=(0, 1, 2), has_aux=True)(*args)
            for mode in MODES
            for name, c in cells.items()
        }

    out = every((params, xs, carry, weights))
    for mode in MODES:
        for fast, ref in (("fast", "ref"), ("fast_dropout", "ref_dropout")):
            got, want = out[mode, fast], out[mode, ref]
            for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
                assert np.isfinite(a).all(), (mode, fast)
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=f"{mode} {fast}")
        # The mask changes the result (dropping units' memory), so it was applied.
        assert not np.allclose(out[mode, "fast"][1][1], out[mode, "fast_dropout"][1][1])


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_cell_equals_the_papers_equation(activation):
    cell = rj.cells.indrnn(H, activation=activation)
    params, xs, carry, _, _ = setup(cell, seed=4)
    f = {"relu": lambda v: np.maximum(v, 0), "tanh": np.tanh}[activation]
    w, u, b = (np.asarray(params[k], np.float64) for k in ("w", "u", "b"))
    h, want = np.asarray(carry, np.float64), []
    for x in np.asarray(xs[0], np.float64):
        h = f(x @ w + u * h + b)
        want.append(h)
    final, ys = rj.scan(cell, params, xs[0], carry)
    np.testing.assert_allclose(ys, np.stack(want), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(final, want[-1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cell.step(params, carry, xs[0, 0])[1], want[0], rtol=1e-5)


def test_gradients_pass_check_grads_float64():
    with jax.enable_x64(True):
        cell = rj.cells.indrnn(H, activation="tanh", dtype=jnp.float64)
        params, xs, carry, weights, rec_mask = setup(cell, seed=2, dtype=jnp.float64)
        dropped = with_mask(cell, rec_mask)
        mask, reset = jnp.asarray(MASKS[0]), jnp.asarray(RESETS[1])

        def loss(params, x, carry):
            _, a = rj.scan(cell, params, x, carry, mask=mask, reverse=True)
            last, b = rj.scan(dropped, params, x, carry, reset=reset, remat=True)
            return jnp.sum(jnp.sin(a + b) * weights[0]) + jnp.sum(last**2)

        check_grads(
            jax.jit(loss), (params, xs[0], carry), order=1, modes=("rev",), atol=1e-6, rtol=1e-6
        )


def test_recurrent_weight_init_follows_the_horizon():
    for horizon, bound in ((None, 1.0), (10, 2 ** (1 / 10)), (1000, 2 ** (1 / 1000))):
        u = np.asarray(rj.cells.indrnn(512, horizon=horizon).init(jax.random.key(0), I)["u"])
        assert u.min() >= 0 and u.max() <= bound
        assert u.max() > 0.95 * bound and u.min() < 0.05 * bound  # fills the range
    params = rj.cells.indrnn(H, recurrent_init=jax.nn.initializers.constant(-0.5)).init(
        jax.random.key(0), I
    )
    np.testing.assert_array_equal(params["u"], -0.5)
    assert {k: v.shape for k, v in params.items()} == {"w": (I, H), "u": (H,), "b": (H,)}
    np.testing.assert_array_equal(params["b"], 0.0)
    cell = rj.cells.indrnn(H, dtype=jnp.bfloat16)
    params = cell.init(jax.random.key(0), I)
    assert all(v.dtype == jnp.bfloat16 for v in params.values())
    assert rj.scan(cell, params, jnp.ones((T, I), jnp.bfloat16))[1].dtype == jnp.bfloat16


def test_errors():
    with pytest.raises(ValueError, match="indrnn expects hidden_size to be a positive int"):
        rj.cells.indrnn(0)
    with pytest.raises(ValueError, match="indrnn activation must be one of 'tanh', 'relu'"):
        rj.cells.indrnn(H, activation="gelu")
    with pytest.raises(TypeError, match="indrnn activation must be 'relu', 'tanh' or a function"):
        rj.cells.indrnn(H, activation=3)
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match=r"indrnn expects horizon \(None or the number"):
            rj.cells.indrnn(H, horizon=bad)
    cell = rj.cells.indrnn(H)
    params = cell.init(jax.random.key(0), I)
    with pytest.raises(ValueError, match=r"indrnn.step expects x of shape \(3,\)"):
        cell.step(params, cell.initial_carry(params), jnp.ones((2, I)))


def test_recurrent_dropout_through_the_layer():
    """rnn(recurrent_dropout=) sizes its mask by the carry's h (IndRNN has no w_h): the mask
    changes the outputs, the same key gives the same outputs, and no key means no dropout."""
    layer = rj.layers.rnn(rj.cells.indrnn(4), recurrent_dropout=0.5)
    params = layer.init(jax.random.key(0), 3)
    xs = jax.random.normal(jax.random.key(1), (5, 3))
    plain = rj.scan(rj.cells.indrnn(4), params, xs)[1]
    dropped = layer.apply(params, xs, key=jax.random.key(2))[1]
    again = layer.apply(params, xs, key=jax.random.key(2))[1]
    np.testing.assert_array_equal(dropped, again)
    np.testing.assert_allclose(layer.apply(params, xs)[1], plain, rtol=1e-6)
    assert not np.allclose(dropped, plain)
