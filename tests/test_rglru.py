"""rnnjax.cells.rglru against recurrentgemma's own ``RGLRU`` module with its own weights: values
and gradients, a given carry, packed segments, the init. The contract it shares with every cell
(scan == loop == stepping by hand, masks, reverse, reset, remat, vmap, jit, the fast path equal
to the step scan) is tests/test_zoo.py's."""

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from recurrentgemma.jax import layers as rg

import rnnjax as rj

# the module, not the factory rnnjax.cells.rglru that shares its name
rglru_module = importlib.import_module("rnnjax.cells.rglru")

H, HEADS, T = 8, 2, 7
SEGMENTS = (3, 4)  # a packed stream of two sequences, T steps in all


def close(got, want, what, tol=2e-5):
    flat_got, flat_want = jax.tree.leaves(got), jax.tree.leaves(want)
    assert len(flat_got) == len(flat_want), what
    for i, (g, w) in enumerate(zip(flat_got, flat_want, strict=True)):
        np.testing.assert_allclose(g, w, rtol=tol, atol=tol, err_msg=f"{what} leaf {i}")


@functools.cache
def peer():
    """recurrentgemma's module and its variables, moved off the init (zero biases would hide a
    swapped gate); inputs for two examples, a starting carry and loss weights."""
    module = rg.RGLRU(width=H, num_heads=HEADS)
    keys = jax.random.split(jax.random.key(0), 8)
    xs = jax.random.normal(keys[0], (2, T, H))
    variables = module.init(keys[1], xs, jnp.ones((2, T), jnp.int32))
    params = variables["params"]
    leaves, tree = jax.tree.flatten(params)
    noise = jax.random.split(keys[2], len(leaves))
    params = tree.unflatten(
        [a + 0.3 * jax.random.normal(k, a.shape) for a, k in zip(leaves, noise, strict=True)]
    )
    carry = 0.5 * jax.random.normal(keys[3], (2, H))
    weights = jax.random.normal(keys[4], (2, T, H))
    return module, params, xs, carry, weights


@functools.cache
def program():
    """One jitted program: every value and gradient compared below, rnnjax's and the peer's."""
    module, *_ = peer()
    cell = rj.cells.rglru(H, num_heads=HEADS)
    reset = np.zeros(T, bool)
    reset[np.cumsum((0,) + SEGMENTS[:-1])] = True
    bounds = np.cumsum((0,) + SEGMENTS)

    def theirs(params, xs, carry, positions):
        return module.apply({"params": params}, xs, positions, carry)

    def loss(run, params, xs, carry, weights):
        ys, last = run(params, xs, carry)
        return jnp.sum(ys * weights) + jnp.sum(last * jnp.arange(H))

    # rnnjax over a batch from given carries; recurrentgemma with positions counted from 1.
    def ours_given(params, xs, carry):
        last, ys = jax.vmap(lambda x, c: rj.scan(cell, params, x, c))(xs, carry)
        return ys, last

    def theirs_given(params, xs, carry):
        return theirs(params, xs, carry, jnp.broadcast_to(jnp.arange(1, T + 1), (2, T)))

    # A packed stream: rnnjax with reset flags; recurrentgemma one segment at a time, each from
    # a zero cache and positions from 1. The given carry is dropped by the first reset.
    def ours_packed(params, xs, carry):
        last, ys = jax.vmap(lambda x, c: rj.scan(cell, params, x, c, reset=reset))(xs, carry)
        return ys, last

    def theirs_packed(params, xs, carry):
        del carry
        parts = []
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            pos = jnp.broadcast_to(jnp.arange(1, hi - lo + 1), (2, hi - lo))
            ys, last = theirs(params, xs[:, lo:hi], jnp.zeros((2, H)), pos)
            parts.append(ys)
        return jnp.concatenate(parts, axis=1), last

    @jax.jit
    def run(params, xs, carry, weights):
        out = {}
        for name, ours, peers in (
            ("given", ours_given, theirs_given),
            ("packed", ours_packed, theirs_packed),
        ):
            grad = jax.value_and_grad(loss, (1, 2, 3))
            out[name] = {
                "values": (ours(params, xs, carry), peers(params, xs, carry)),
                "grads": (grad(ours, params, xs, carry, weights),
                          grad(peers, params, xs, carry, weights)),
            }  # fmt: skip
        # recurrentgemma at a segment's position 0: no normalisation there, a restart.
        zero_first = theirs(params, xs, carry, jnp.broadcast_to(jnp.arange(T), (2, T)))[0]
        out["position_zero"] = (zero_first, ours_packed(params, xs, carry)[0])
        return out

    return run


def test_outputs_and_final_carry_equal_recurrentgemma_from_a_given_carry():
    _, params, xs, carry, weights = peer()
    (ours, last), (theirs, their_last) = program()(params, xs, carry, weights)["given"]["values"]
    close(ours, theirs, "outputs")
    close(last, their_last, "final carry")
    assert np.abs(np.asarray(ours)).max() > 0.1  # the comparison is of something


def test_gradients_equal_recurrentgemma_from_a_given_carry():
    """w.r.t. the inputs, the starting carry and every param (the layouts are the same tree)."""
    _, params, xs, carry, weights = peer()
    (value, grads), (their_value, their_grads) = program()(params, xs, carry, weights)["given"][
        "grads"
    ]
    close(value, their_value, "loss")
    close(grads, their_grads, "gradients", tol=5e-5)
    assert np.abs(np.asarray(grads[1])).min() > 0  # every input reaches the loss


def test_a_packed_stream_with_resets_equals_recurrentgemma_segment_by_segment():
    _, params, xs, carry, weights = peer()
    out = program()(params, xs, carry, weights)["packed"]
    (ours, last), (theirs, their_last) = out["values"]
    close(ours, theirs, "outputs")
    close(last, their_last, "final carry")
    (value, grads), (their_value, their_grads) = out["grads"]
    close(value, their_value, "loss")
    close(grads[:2], their_grads[:2], "gradients w.r.t. params and inputs", tol=5e-5)
    # the first reset drops the given carry: no gradient reaches it
    assert not np.asarray(grads[2]).any()


def test_recurrentgemma_skips_the_normalisation_at_position_zero():
    """The one difference, by design: at a segment's first step rnnjax's h = sqrt(1 - a^2) i x
    (the equations at every step), recurrentgemma's h = i x."""
    _, params, xs, carry, weights = peer()
    theirs, ours = program()(params, xs, carry, weights)["position_zero"]
    gate_a = jax.nn.sigmoid(rglru_module._block_diagonal(xs[:, 0], params["a_gate"]))
    a = jnp.exp(-8.0 * gate_a * jax.nn.softplus(params["a_param"]))
    close(ours[:, 0], theirs[:, 0] * jnp.sqrt(1 - a**2), "first step")
    assert np.abs(np.asarray(ours[:, 0] - theirs[:, 0])).min() > 1e-3


def test_init_is_recurrentgemmas():
    """The same tree of shapes as the module's variables; ``a_param`` is recurrentgemma's ring
    initializer and the gate weights its variance scaling, on the same keys; biases zero."""
    module, *_ = peer()
    cell = rj.cells.rglru(H, num_heads=HEADS)
    key = jax.random.key(7)
    params = cell.init(key, H)
    theirs = module.init(key, jnp.ones((1, 2, H)), jnp.ones((1, 2), jnp.int32))["params"]
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, theirs)
    k_a, k_input, k_gate = jax.random.split(key, 3)
    close(params["a_param"], rg.rnn_real_param_init(0.9, 0.999)(k_a, (H,)), "a_param", tol=0)
    for name, k in (("input_gate", k_input), ("a_gate", k_gate)):
        want = rg.BlockDiagonalLinear(H, HEADS).kernel_init(k, (HEADS, H // HEADS, H // HEADS))
        close(params[name]["w"], want, f"{name} w", tol=0)
        assert not np.asarray(params[name]["b"]).any()
    # the ring: rho = exp(-softplus(a_param)), rho^2 uniform in [0.9^2, 0.999^2]
    rho2 = np.exp(-2 * jax.nn.softplus(rj.cells.rglru(256).init(key, 256)["a_param"]))
    assert 0.81 <= rho2.min() < 0.83 and 0.98 < rho2.max() <= 0.998 + 1e-6


def test_the_normalisation_has_recurrentgemmas_bounded_derivative():
    """d sqrt(u)/du is capped at 1000 (at u <= 1/(4 * 1000^2)), as recurrentgemma's RGLRU
    calls its own; so the cell's gradient stays finite where a = 1."""
    u = jnp.array([0.0, 1e-9, 2.5e-7, 1e-3, 0.5, 1.0])
    bound = rglru_module.MAX_SQRT_GRADIENT
    ours = jax.vmap(jax.grad(lambda v: rglru_module.sqrt_bound_derivative(v, bound)))(u)
    theirs = jax.vmap(jax.grad(lambda v: rg.sqrt_bound_derivative(v, 1000.0)))(u)
    close(ours, theirs, "d sqrt")
    assert float(ours[0]) == pytest.approx(1000.0, rel=1e-6)

    cell = rj.cells.rglru(4)
    params = cell.init(jax.random.key(0), 4)
    # softplus(-110) underflows to 0 in float32: a = 1 and 1 - a^2 = 0, where sqrt's own
    # derivative is inf (and inf * 0 = NaN in the chain rule)
    params["a_param"] = jnp.full((4,), -110.0)
    grads = jax.grad(lambda p: jnp.sum(rj.scan(cell, p, jnp.ones((3, 4)))[1]))(params)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def test_errors_say_what_was_expected():
    with pytest.raises(ValueError, match="hidden_size divisible by num_heads, got hidden_size=6"):
        rj.cells.rglru(6, num_heads=4)
    cell = rj.cells.rglru(4, num_heads=2)
    with pytest.raises(ValueError, match=r"input_size == hidden_size = 4, got 3: .*project"):
        cell.init(jax.random.key(0), 3)
    params = cell.init(jax.random.key(0), 4)
    with pytest.raises(ValueError, match=r"rglru.step expects x of shape \(4,\), got \(2, 4\)"):
        cell.step(params, cell.initial_carry(params), jnp.ones((2, 4)))
    with pytest.raises(ValueError, match="rglru takes no recurrent_mask"):
        cell.sequence(params, jnp.ones((3, 4)), jnp.zeros(4), None, recurrent_mask=jnp.ones(4))
    with pytest.raises(TypeError, match="recurrent_dropout needs a cell whose step accepts"):
        rj.layers.rnn(cell, recurrent_dropout=0.1)
