"""Contracts of rnnjax.scan and rnnjax.loop, over every cell and every mode."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cases import CELLS, I, T, pair_input_cell
from jax.test_util import check_grads

import rnnjax as rj

MASK = np.array([True, False, True, True, False, True])

# Each mode: scan/loop keyword arguments, and the positions the hand-stepped reference visits.
MODES = {
    "plain": ({}, list(range(T))),
    "length": ({"length": 4}, [0, 1, 2, 3]),
    "length_full": ({"length": T}, list(range(T))),
    "length_zero": ({"length": 0}, []),
    "mask": ({"mask": MASK}, [0, 2, 3, 5]),
    "reverse": ({"reverse": True}, list(range(T))[::-1]),
    "reverse_length": ({"reverse": True, "length": 4}, [3, 2, 1, 0]),
    "reverse_mask": ({"reverse": True, "mask": MASK}, [5, 3, 2, 0]),
    "unroll2": ({"unroll": 2}, list(range(T))),
    "unroll_full_length": ({"unroll": True, "length": 5}, [0, 1, 2, 3, 4]),
    "remat": ({"remat": True}, list(range(T))),
    "remat_reverse_length": ({"remat": True, "reverse": True, "length": 3}, [2, 1, 0]),
}


def by_hand(cell, params, xs, carry, visits):
    """The reference: call cell.step at the real positions, in order; zeros elsewhere."""
    ys = [None] * xs.shape[0]
    for t in visits:
        carry, ys[t] = cell.step(params, carry, xs[t])
    y_like = cell.step(params, carry, xs[0])[1]
    ys = [jnp.zeros_like(y_like) if y is None else y for y in ys]
    return carry, jnp.stack(ys)


def assert_tree_close(a, b, **kw):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **{"atol": 1e-6, **kw})


def nonzero_carry(cell, params):
    c0 = cell.initial_carry(params)
    keys = jax.random.split(jax.random.key(7), len(jax.tree.leaves(c0)))
    leaves = [
        0.5 * jax.random.normal(k, x.shape) for k, x in zip(keys, jax.tree.leaves(c0), strict=True)
    ]
    return jax.tree.unflatten(jax.tree.structure(c0), leaves)


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("run", [rj.scan, rj.loop], ids=["scan", "loop"])
def test_run_equals_stepping_by_hand(cell, params, xs, mode, run):
    kwargs, visits = MODES[mode]
    carry0 = nonzero_carry(cell, params)
    want_carry, want_ys = by_hand(cell, params, xs, carry0, visits)
    got_carry, got_ys = run(cell, params, xs, carry0, **kwargs)
    assert_tree_close(got_carry, want_carry)
    assert_tree_close(got_ys, want_ys)
    # Padded outputs are exactly zero, not just small.
    pads = sorted(set(range(T)) - set(visits))
    assert (np.asarray(got_ys)[pads] == 0).all()


def test_default_carry_is_initial_carry(cell, params, xs):
    assert_tree_close(
        rj.scan(cell, params, xs), rj.scan(cell, params, xs, cell.initial_carry(params))
    )


def test_final_carry_is_carry_after_last_real_step(cell, params, xs):
    n = 4
    carry, ys = rj.scan(cell, params, xs, length=n)
    carry_prefix, ys_prefix = rj.scan(cell, params, xs[:n])
    assert_tree_close(carry, carry_prefix)
    assert_tree_close(ys[:n], ys_prefix)
    assert (np.asarray(ys[n:]) == 0).all()


def test_reverse_over_padding_equals_loop_over_reversed_prefix(cell, params, xs):
    n = 4
    carry, ys = rj.scan(cell, params, xs, length=n, reverse=True)
    carry_ref, ys_ref = rj.loop(cell, params, xs[:n][::-1])
    assert_tree_close(carry, carry_ref)
    assert_tree_close(ys[:n], ys_ref[::-1])
    assert (np.asarray(ys[n:]) == 0).all()


@pytest.mark.parametrize("run", [rj.scan, rj.loop], ids=["scan", "loop"])
def test_zero_length_sequence(cell, params, run):
    carry0 = nonzero_carry(cell, params)
    carry, ys = run(cell, params, jnp.zeros((0, I)), carry0)
    assert_tree_close(carry, carry0, atol=0)
    assert ys.shape == (0, jax.tree.leaves(carry0)[0].shape[0])


def test_vmap_equals_per_example(cell, params):
    xs = jax.random.normal(jax.random.key(3), (3, T, I))
    lengths = jnp.array([T, 2, 0])
    batched = jax.vmap(lambda x, n: rj.scan(cell, params, x, length=n))(xs, lengths)
    for b in range(3):
        one = rj.scan(cell, params, xs[b], length=int(lengths[b]))
        assert_tree_close(jax.tree.map(lambda a, b=b: a[b], batched), one)


def loss_fn(run, cell, **kwargs):
    def loss(params, xs):
        carry, ys = run(cell, params, xs, **kwargs)
        return jnp.sum(ys**2) + sum(jnp.sum(jnp.sin(c)) for c in jax.tree.leaves(carry))

    return loss


@pytest.mark.parametrize("mode", ["plain", "reverse_length", "mask", "remat_reverse_length"])
def test_bptt_gradients_of_scan_equal_loop(cell, params, xs, mode):
    kwargs = MODES[mode][0]
    g_scan = jax.grad(loss_fn(rj.scan, cell, **kwargs), argnums=(0, 1))(params, xs)
    g_loop = jax.grad(loss_fn(rj.loop, cell, **kwargs), argnums=(0, 1))(params, xs)
    assert_tree_close(g_scan, g_loop, atol=1e-5)
    # Padded steps get no gradient at all.
    if "length" in kwargs:
        assert (np.asarray(g_scan[1])[kwargs["length"] :] == 0).all()


@pytest.mark.parametrize("mode", ["plain", "reverse_length", "remat"])
def test_bptt_gradients_pass_check_grads_float64(cell_name, mode):
    with jax.enable_x64(True):
        cell = CELLS[cell_name](dtype=jnp.float64)
        params = cell.init(jax.random.key(0), I)
        xs = jax.random.normal(jax.random.key(1), (T, I), dtype=jnp.float64)
        loss = loss_fn(rj.scan, cell, **MODES[mode][0])
        check_grads(loss, (params, xs), order=1, modes=("rev",), atol=1e-6, rtol=1e-6)


def test_jitted_scan_compiles_once(cell, params):
    traces = []

    @jax.jit
    def run(params, xs, n):
        traces.append(1)
        return rj.scan(cell, params, xs, length=n)

    for seed, n in enumerate([6, 3, 0]):
        run(params, jax.random.normal(jax.random.key(seed), (T, I)), n)
    assert len(traces) == 1
    assert run._cache_size() == 1


def test_pytree_inputs():
    # A cell whose input is a pair: scan slices every leaf along time.
    cell0, cell = pair_input_cell(2)
    params = cell.init(jax.random.key(0), 3)
    a, b = jnp.ones((4, 3)), jnp.arange(12.0).reshape(4, 3)
    assert_tree_close(rj.scan(cell, params, (a, b)), rj.scan(cell0, params, a * b))
    assert_tree_close(rj.loop(cell, params, (a, b)), rj.scan(cell0, params, a * b))
