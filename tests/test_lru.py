"""rnnjax.cells.lru against memax's ``LRU`` module with its own weights (values, gradients,
packed sequences, a given carry, the init), its complex gradients against finite differences in
float64, the paper's ring, and its errors. The contract it shares with every cell (scan == loop
== stepping by hand, masks, reverse, reset, remat, vmap, jit, the fast path equal to the step
scan) is tests/test_zoo.py's."""

import functools
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from memax.equinox.semigroups.lru import LRU

import rnnjax as rj

# memax's LRU annotates its output as (recurrent_size,), so its type check fails unless the
# state size equals the hidden size: the parity tests run at N == H.
H = N = 4
T = 7
NAMES = ("nu_log", "theta_log", "gamma_log", "B_re", "B_im", "C_re", "C_im", "D")
RESET = np.array([False, False, False, True, False, True, False])


def close(got, want, what, tol=2e-5):
    flat_got, flat_want = jax.tree.leaves(got), jax.tree.leaves(want)
    assert len(flat_got) == len(flat_want), what
    for i, (g, w) in enumerate(zip(flat_got, flat_want, strict=True)):
        np.testing.assert_allclose(g, w, rtol=tol, atol=tol, err_msg=f"{what} leaf {i}")


@functools.cache
def peer():
    """memax's module; its params as an rnnjax dict (the same names), moved off the init; two
    inputs, a complex starting carry and loss weights."""
    module = LRU(N, H, jax.random.key(0))
    keys = jax.random.split(jax.random.key(1), len(NAMES) + 4)
    params = {
        k: getattr(module, k) + 0.1 * jax.random.normal(key, getattr(module, k).shape)
        for k, key in zip(NAMES, keys, strict=False)
    }
    xs = jax.random.normal(keys[-1], (2, T, H))
    carry = jax.lax.complex(*(0.5 * jax.random.normal(keys[-2], (2, 2, N))))
    weights = jax.random.normal(keys[-3], (2, T, H))
    return module, params, xs, carry, weights


@functools.cache
def program():
    """One jitted program: rnnjax's and memax's values and gradients, w.r.t. the params, the
    inputs and the starting carry, over a stream with resets from a given carry."""
    module, *_ = peer()
    cell = rj.cells.lru(H, state_size=N)

    def ours(params, xs, carry):
        last, ys = jax.vmap(lambda x, c: rj.scan(cell, params, x, c, reset=RESET))(xs, carry)
        return ys, last

    def theirs(params, xs, carry):
        model = eqx.tree_at(lambda m: [getattr(m, k) for k in NAMES], module,
                            [params[k] for k in NAMES])  # fmt: skip

        def one(x, c):
            # memax's carry: (product of the decays so far, state), and a reset flag
            start = ((jnp.ones(N, jnp.complex64), c), jnp.zeros((), bool))
            ((_, states), _), ys = model(start, (x, jnp.asarray(RESET)))
            return ys, states[-1]

        return jax.vmap(one)(xs, carry)

    def loss(run, params, xs, carry, weights):
        ys, last = run(params, xs, carry)
        return jnp.sum(ys * weights) + jnp.sum(last.real) + 2 * jnp.sum(last.imag)

    @jax.jit
    def run(params, xs, carry, weights):
        grad = jax.value_and_grad(loss, (1, 2, 3))
        return {
            "values": (ours(params, xs, carry), theirs(params, xs, carry)),
            "grads": (grad(ours, params, xs, carry, weights),
                      grad(theirs, params, xs, carry, weights)),
        }  # fmt: skip

    return run


def test_outputs_and_final_carry_equal_memax_with_resets_and_a_given_carry():
    _, params, xs, carry, weights = peer()
    (ys, last), (their_ys, their_last) = program()(params, xs, carry, weights)["values"]
    close(ys, their_ys, "outputs")
    close((last.real, last.imag), (their_last.real, their_last.imag), "final carry")
    assert np.abs(np.asarray(ys)).max() > 0.1


def test_gradients_equal_memax():
    """w.r.t. every param, the inputs and the complex starting carry (dropped by the first
    reset for steps after it, so its gradient comes from steps 0-2 alone)."""
    _, params, xs, carry, weights = peer()
    (value, grads), (their_value, their_grads) = program()(params, xs, carry, weights)["grads"]
    close(value, their_value, "loss")
    close(grads[:2], their_grads[:2], "gradients w.r.t. params and inputs", tol=5e-5)
    close((grads[2].real, grads[2].imag), (their_grads[2].real, their_grads[2].imag), "carry")
    assert np.abs(np.asarray(grads[2])).min() > 0


def test_init_is_memaxs_on_the_same_key():
    """memax splits the key the same way: every param equal (gamma_log within rounding: rnnjax
    computes 1 - |lambda|^2 without cancellation)."""
    module, *_ = peer()
    params = rj.cells.lru(H, state_size=N).init(jax.random.key(0), H)
    assert sorted(params) == sorted(NAMES)
    for k in NAMES:
        close(params[k], getattr(module, k), k, tol=0 if k != "gamma_log" else 1e-5)


def test_the_ring_initialisation():
    """|lambda|^2 uniform in [r_min^2, r_max^2] (the values lie there and spread over it), the
    phase in [0, max_phase], gamma = sqrt(1 - |lambda|^2)."""
    cell = rj.cells.lru(2, state_size=512, r_min=0.5, r_max=0.9, max_phase=math.pi / 4)
    params = cell.init(jax.random.key(3), 2)
    radius = np.exp(-np.exp(np.asarray(params["nu_log"], np.float64)))
    phase = np.exp(np.asarray(params["theta_log"], np.float64))
    assert 0.5 <= radius.min() < 0.52 and 0.88 < radius.max() <= 0.9 + 1e-6
    # uniform in r^2: its mean is the middle of [0.25, 0.81]
    assert abs(np.mean(radius**2) - 0.53) < 0.03
    assert 0 <= phase.min() < 0.02 and math.pi / 4 - 0.02 < phase.max() <= math.pi / 4 + 1e-6
    np.testing.assert_allclose(np.exp(params["gamma_log"]), np.sqrt(1 - radius**2), rtol=1e-5)


def test_complex_gradients_match_finite_differences_in_float64():
    """The VJP (JAX's convention for complex values: the cotangent of a complex carry is
    conjugate-linear) against numerical JVPs, w.r.t. the params, the inputs and the complex
    starting carry; a complex output (the final carry) and a real one (ys); through
    ``linear_scan`` (forward with resets, reverse with a length) and through the step scan."""
    with jax.enable_x64(True):
        cell = rj.cells.lru(3, state_size=2, dtype=jnp.float64)
        params = cell.init(jax.random.key(0), 3)
        keys = jax.random.split(jax.random.key(1), 3)
        xs = jax.random.normal(keys[0], (5, 3), jnp.float64)
        carry = jax.lax.complex(*jax.random.normal(keys[1], (2, 2), jnp.float64))
        assert carry.dtype == jnp.complex128 == cell.initial_carry(params).dtype
        reset = jnp.array([False, False, True, False, False])

        for c in (cell, cell._replace(sequence=None)):
            for kw in ({"reset": reset}, {"reverse": True, "length": 4}):
                check_grads(functools.partial(rj.scan, c, **kw), (params, xs, carry),
                            order=1, modes=["rev"], eps=1e-6)  # fmt: skip


def test_the_state_size_defaults_to_the_hidden_size():
    params = rj.cells.lru(3).init(jax.random.key(0), 3)
    assert params["B_re"].shape == (3, 3) and params["nu_log"].shape == (3,)


def test_errors_say_what_was_expected():
    cell = rj.cells.lru(4, state_size=3)
    with pytest.raises(ValueError, match=r"input_size == hidden_size = 4, got 3: .*project"):
        cell.init(jax.random.key(0), 3)
    with pytest.raises(ValueError, match=r"0 <= r_min < r_max <= 1 .*r_min=0.9 and r_max=0.5"):
        rj.cells.lru(4, state_size=3, r_min=0.9, r_max=0.5)
    with pytest.raises(ValueError, match="state_size to be a positive int, got 0"):
        rj.cells.lru(4, state_size=0)
    params = cell.init(jax.random.key(0), 4)
    with pytest.raises(ValueError, match=r"lru.step expects x of shape \(4,\), got \(3,\)"):
        cell.step(params, cell.initial_carry(params), jnp.ones(3))
    with pytest.raises(ValueError, match="lru takes no recurrent_mask"):
        cell.sequence(params, jnp.ones((2, 4)), cell.initial_carry(params), None,
                      recurrent_mask=jnp.ones(3))  # fmt: skip
