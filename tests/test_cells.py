"""Cell contracts: parameter layouts, initializers, dtypes, shape agreement."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cases import CELLS, H, I

import rnnjax as rj

LAYOUTS = {
    "elman_tanh": {"w_i": (I, H), "w_h": (H, H), "b": (H,)},
    "elman_relu": {"w_i": (I, H), "w_h": (H, H), "b": (H,)},
    "lstm": {"w_i": (I, 4 * H), "w_h": (H, 4 * H), "b": (4 * H,)},
    "gru": {"w_i": (I, 3 * H), "w_h": (H, 3 * H), "b_i": (3 * H,), "b_h": (3 * H,)},
    "gru_reset_before": {"w_i": (I, 3 * H), "w_h": (H, 3 * H), "b_i": (3 * H,), "b_h": (3 * H,)},
}


def test_cell_is_a_namedtuple_of_pure_functions(cell, cell_name):
    assert isinstance(cell, rj.Cell)
    assert cell._fields == ("init", "initial_carry", "step", "sequence")
    # The optional whole-sequence fast path: the LSTM's native kernels by default
    # (tests/test_native.py), fused=True for the others (tests/test_fused.py); a three-field
    # Cell(init, initial_carry, step) still works.
    # (Attached whether or not the kernels are built: without them it runs the step scan.)
    assert (cell.sequence is not None) == (cell_name in ("lstm", "gru"))
    assert rj.Cell(cell.init, cell.initial_carry, cell.step).sequence is None


def test_param_names_and_shapes_follow_the_design_table(cell_name, params):
    assert {k: v.shape for k, v in params.items()} == LAYOUTS[cell_name]
    assert all(v.dtype == jnp.float32 for v in params.values())


def test_shape_agreement(cell, params, xs):
    """stax's contract: step returns a carry shaped like initial_carry, and y of size H."""
    carry0 = cell.initial_carry(params)
    carry1, y = cell.step(params, carry0, xs[0])
    assert jax.tree.structure(carry1) == jax.tree.structure(carry0)
    for a, b in zip(jax.tree.leaves(carry1), jax.tree.leaves(carry0), strict=True):
        assert a.shape == b.shape == (H,) and a.dtype == b.dtype
    assert y.shape == (H,)
    assert all((np.asarray(c) == 0).all() for c in jax.tree.leaves(carry0))


def test_lstm_carry_is_lstmstate():
    cell = rj.cells.lstm(H)
    carry = cell.initial_carry(cell.init(jax.random.key(0), I))
    assert isinstance(carry, rj.LSTMState) and carry._fields == ("h", "c")


def test_recurrent_gate_blocks_are_orthogonal(cell_name, params):
    w_h = np.asarray(params["w_h"])
    for g in range(w_h.shape[1] // H):
        block = w_h[:, g * H : (g + 1) * H]
        np.testing.assert_allclose(block @ block.T, np.eye(H), atol=1e-5)
    # Blocks are initialised independently, not copies of one another.
    if w_h.shape[1] > H:
        assert not np.allclose(w_h[:, :H], w_h[:, H : 2 * H])


@pytest.mark.parametrize("forget_bias", [1.0, 0.0, 2.5])
def test_lstm_forget_bias(forget_bias):
    b = rj.cells.lstm(H, forget_bias=forget_bias).init(jax.random.key(0), I)["b"]
    np.testing.assert_array_equal(b[H : 2 * H], forget_bias)
    np.testing.assert_array_equal(np.delete(np.asarray(b), np.s_[H : 2 * H]), 0.0)


def test_initializers_are_selectable(cell_name):
    const = jax.nn.initializers.constant
    cell = CELLS[cell_name](
        input_init=const(0.25), recurrent_init=const(-0.5), bias_init=const(0.1)
    )
    params = cell.init(jax.random.key(0), I)
    np.testing.assert_array_equal(params["w_i"], 0.25)
    np.testing.assert_array_equal(params["w_h"], -0.5)
    for name in set(params) - {"w_i", "w_h"}:
        # LSTM adds its forget bias on top of bias_init.
        expected = np.full(params[name].shape, 0.1, np.float32)
        if cell_name == "lstm":
            expected[H : 2 * H] += 1.0
        np.testing.assert_allclose(params[name], expected)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_dtype_is_selectable(cell_name, dtype):
    cell = CELLS[cell_name](dtype=dtype)
    params = cell.init(jax.random.key(0), I)
    assert all(v.dtype == dtype for v in params.values())
    xs = jnp.ones((3, I), dtype)
    carry, ys = rj.scan(cell, params, xs)
    assert ys.dtype == dtype
    assert all(c.dtype == dtype for c in jax.tree.leaves(carry))


def test_activation_choice_changes_the_elman_cell(xs):
    tanh, relu = rj.cells.elman(H), rj.cells.elman(H, activation="relu")
    params = tanh.init(jax.random.key(0), I)
    _, y_tanh = rj.scan(tanh, params, xs)
    _, y_relu = rj.scan(relu, params, xs)
    assert (np.asarray(y_relu) >= 0).all() and (np.asarray(y_relu) == 0).any()
    assert (np.abs(np.asarray(y_tanh)) < 1).all()
    # A function works as an activation too.
    _, y_fn = rj.scan(rj.cells.elman(H, activation=jnp.tanh), params, xs)
    np.testing.assert_array_equal(y_fn, y_tanh)


def test_gru_forms_differ():
    a, b = rj.cells.gru(H), rj.cells.gru(H, reset_after=False)
    params = a.init(jax.random.key(0), I)
    params["b_h"] = params["b_h"] + 0.3  # the forms differ by where b_hn and r meet
    x = jnp.ones(I)
    h = jnp.full(H, 0.5)
    assert not np.allclose(a.step(params, h, x)[0], b.step(params, h, x)[0])


def test_init_is_deterministic_in_the_key(cell):
    p1, p2 = cell.init(jax.random.key(5), I), cell.init(jax.random.key(5), I)
    p3 = cell.init(jax.random.key(6), I)
    assert all((p1[k] == p2[k]).all() for k in p1)
    assert not (p1["w_i"] == p3["w_i"]).all()
