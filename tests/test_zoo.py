"""The contract every zoo cell keeps (tests/zoo_cases.py): ``rnnjax.scan`` equals
``rnnjax.loop`` equals stepping by hand, with a given carry, ``length``, an arbitrary ``mask``,
``reverse``, ``reset`` and ``remat``, one example and a batch under ``vmap``, all under
``jit``; a cell's whole-sequence fast path (its ``sequence``) equals the step scan in values
and gradients, on special values (NaN, inf, 1e30) too. One jitted program per cell and pass.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from differential import assert_same, may_overflow, poke, pokes
from hypothesis import given, settings
from hypothesis import strategies as st
from zoo_cases import CROSSES_RESET, INF_GRADIENTS, ZOO, T

import rnnjax as rj


def _real(tree):
    """Complex leaves (the LRU's state) as their real and imaginary parts, for comparing."""
    return jax.tree.map(
        lambda a: jnp.stack([jnp.real(a), jnp.imag(a)]) if jnp.iscomplexobj(a) else a, tree
    )


def same(actual, expected, tol, what, **kw):
    assert_same(_real(actual), _real(expected), tol, what, **kw)


MASK = np.array([True, False, True, True, False, True])
RESET = np.array([False, False, True, False, True, False])
LENGTH = 4

# The variants of one scan call: name -> keyword arguments (arrays filled in by _kwargs).
VARIANTS = {
    "plain": {},
    "length": {"carry": True, "length": LENGTH},
    "reverse_mask": {"carry": True, "mask": True, "reverse": True},
    "reset": {"carry": True, "reset": True},
    "reverse_reset_mask": {"carry": True, "mask": True, "reset": True, "reverse": True},
    "remat": {"carry": True, "mask": True, "remat": 4},
}
# rnnjax.loop traces T steps per call: two variants cover its own code (masks, reverse).
LOOPED = ("plain", "reverse_mask")


def _kwargs(spec, carry, mask, reset):
    kw = {}
    if spec.get("carry"):
        kw["carry"] = carry
    if "length" in spec:
        kw["length"] = spec["length"]
    if spec.get("mask"):
        kw["mask"] = mask
    if spec.get("reset"):
        kw["reset"] = reset
    for option in ("reverse", "remat"):
        if option in spec:
            kw[option] = spec[option]
    return kw


@functools.cache
def setup(name):
    make, input_size = ZOO[name]
    cell = make()
    params = cell.init(jax.random.key(0), input_size)
    # Move every weight off its init (zero biases, identity gains would hide a wrong block).
    params = jax.tree.map(
        lambda a, k: a + 0.2 * jax.random.normal(k, a.shape, a.dtype),
        params,
        jax.tree.unflatten(
            jax.tree.structure(params),
            list(jax.random.split(jax.random.key(1), len(jax.tree.leaves(params)))),
        ),
    )
    xs = jax.random.normal(jax.random.key(2), (T, input_size))
    carry = jax.tree.map(
        lambda a: (0.3 * jax.random.normal(jax.random.key(3), a.shape)).astype(a.dtype),
        cell.initial_carry(params),
    )
    return cell, params, xs, carry


def by_hand(cell, params, xs, carry=None, *, length=None, mask=None, reset=None,
            reverse=False, remat=False):  # fmt: skip
    """The contract written out: a Python loop of ``cell.step`` over positions."""
    del remat  # memory only
    step = jax.jit(cell.step)
    carry = cell.initial_carry(params) if carry is None else carry
    real = np.ones(T, bool) if mask is None else np.asarray(mask)
    if length is not None:
        real = np.arange(T) < length
    y_shape = jax.eval_shape(lambda c, x: cell.step(params, c, x)[1], carry, xs[0])
    ys = [jnp.zeros(y_shape.shape, y_shape.dtype)] * T
    for t in reversed(range(T)) if reverse else range(T):
        if reset is not None and reset[t]:
            carry = cell.initial_carry(params)
        if real[t]:
            carry, ys[t] = step(params, carry, xs[t])
    return carry, jnp.stack(ys)


@functools.cache
def forward_program(name):
    """Jitted: every variant through ``scan`` (fast path), the step scan, and ``loop``; and a
    batch of three under ``vmap`` with lengths 0, 3 and T."""
    cell = setup(name)[0]
    reference = cell._replace(sequence=None)

    @jax.jit
    def run(params, xs, carry, mask, reset):
        out = {}
        for v, spec in VARIANTS.items():
            kw = _kwargs(spec, carry, mask, reset)
            out[v] = {
                "scan": rj.scan(cell, params, xs, **kw),
                "step_scan": rj.scan(reference, params, xs, **kw),
            }
            if v in LOOPED:
                out[v]["loop"] = rj.loop(cell, params, xs, **kw)
        batch = jnp.stack([xs, xs[::-1], 2 * xs])
        lengths = jnp.array([0, 3, T])
        out["vmap"] = jax.vmap(lambda x, n: rj.scan(cell, params, x, carry, length=n))(
            batch, lengths
        )
        out["each"] = [rj.scan(cell, params, batch[b], carry, length=n) for b, n in
                       enumerate((0, 3, T))]  # fmt: skip
        return out

    return run


@pytest.fixture(params=sorted(ZOO))
def name(request):
    return request.param


# The cells with a whole-sequence fast path: only there can the scan differ from the step scan.
FAST = sorted(n for n in ZOO if ZOO[n][0]().sequence is not None)


def test_the_zoo_holds_every_new_cell():
    classic = {"elman", "lstm", "gru", "LSTMState", "Initializer"}
    factories = {n for n in rj.cells.__all__ if n not in classic and n[0].islower()}
    named = {n.split("_")[0] for n in ZOO}
    assert factories <= named, f"cells missing from tests/zoo_cases.py: {factories - named}"


def test_scan_equals_loop_equals_stepping_by_hand(name):
    cell, params, xs, carry = setup(name)
    out = forward_program(name)(params, xs, carry, MASK, RESET)
    for v, spec in VARIANTS.items():
        kw = _kwargs(spec, carry, MASK, RESET)
        want = by_hand(cell, params, xs, **kw)
        for how, got in out[v].items():
            same(got, want, 2e-5, f"{name} {v} {how}")
    same(out["vmap"], jax.tree.map(lambda *a: jnp.stack(a), *out["each"]), 2e-5, name)
    # padded steps give zero outputs; length 0 keeps the starting carry
    assert not np.asarray(out["length"]["scan"][1][LENGTH:]).any()
    same(jax.tree.map(lambda a: a[0], out["vmap"][0]), carry, 0, f"{name} length 0")


@functools.cache
def gradient_program(name):
    """Jitted: a linear loss of every output and the final carry, its value and gradient
    w.r.t. (params, xs, carry), for the fast path and the step scan, in every variant."""
    cell = setup(name)[0]
    reference = cell._replace(sequence=None)

    def loss(c, params, xs, carry, mask, reset, weights, spec):
        final, ys = rj.scan(c, params, xs, **_kwargs(spec, carry, mask, reset))
        total = jnp.sum(ys * weights)
        for i, leaf in enumerate(jax.tree.leaves(final)):
            total += jnp.sum(jnp.real(leaf) * (0.5 + 0.1 * i)) + jnp.sum(jnp.imag(leaf))
        return total

    @jax.jit
    def run(params, xs, carry, mask, reset, weights):
        grad = jax.value_and_grad(loss, (1, 2, 3))
        return {
            v: {
                how: grad(c, params, xs, carry, mask, reset, weights, spec)
                for how, c in (("scan", cell), ("step_scan", reference))
            }
            for v, spec in VARIANTS.items()
        }

    return run


def _weights(name, params, xs, carry):
    cell = setup(name)[0]
    ys = jax.eval_shape(lambda: rj.scan(cell, params, xs, carry)[1])
    return jax.random.normal(jax.random.key(4), ys.shape, ys.dtype)


@pytest.mark.parametrize("name", FAST)
def test_fast_path_gradients_equal_the_step_scan(name):
    cell, params, xs, carry = setup(name)
    weights = _weights(name, params, xs, carry)
    out = gradient_program(name)(params, xs, carry, MASK, RESET, weights)
    for v, got in out.items():
        same(got["scan"], got["step_scan"], 2e-5, f"{name} {v}")
    # a real gradient: the weights matter
    assert np.abs(np.asarray(jax.tree.leaves(out["plain"]["scan"][1][0])[0])).max() > 0


@pytest.mark.parametrize("name", FAST)
@settings(max_examples=max(3, settings.default.max_examples // 2))
@given(data=st.data())
def test_special_values_reach_the_fast_path_as_the_step_scan(name, data):
    """NaN, +-inf, 1e30, -0.0 and subnormals in inputs, carries and weights, with random masks
    and resets: the fast path's values have NaN and inf exactly where the step scan's have
    them, and its derivatives are non-finite exactly where the step scan's are (the two
    exceptions, CROSSES_RESET and INF_GRADIENTS, are in zoo_cases.py with their reasons)."""
    cell, params, xs, carry = setup(name)
    params, xs, carry = poke((params, xs, carry), data.draw(pokes(), label="special values"))
    mask = np.array(data.draw(st.lists(st.booleans(), min_size=T, max_size=T)), bool)
    reset = np.array(data.draw(st.lists(st.booleans(), min_size=T, max_size=T)), bool)
    finite = [np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves((params, xs, carry))]
    if name in CROSSES_RESET and not all(finite):
        reset = np.zeros(T, bool)
    finite_params = all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(params))
    if not finite_params and not mask.all():
        # A non-finite weight beside padded steps: the step scan's own gradient there is
        # 0 * inf (docs/native.md); compare the forward pass alone.
        mask = np.ones(T, bool)
    weights = _weights(name, params, xs, carry)
    out = gradient_program(name)(params, xs, carry, mask, reset, weights)
    overflow = may_overflow((params, xs, carry))
    infinite = any(np.isinf(np.asarray(a)).any() for a in jax.tree.leaves((params, xs, carry)))
    for v, got in out.items():
        same(got["scan"][0], got["step_scan"][0], 2e-5, f"{name} {v} loss",
             overflow=overflow, values=not overflow)  # fmt: skip
        if infinite and name in INF_GRADIENTS:
            continue
        # Derivatives: non-finite exactly where the step scan's are, NaN and inf one class (a
        # parallel form multiplies inf by the same zeros in another order: inf * 0 + x is NaN
        # in one and inf - inf in the other).
        same(_nonfinite(got["scan"][1]), _nonfinite(got["step_scan"][1]), 2e-5,
             f"{name} {v} grad", overflow=overflow, values=not overflow)  # fmt: skip


def _nonfinite(tree):
    tree = _real(tree)
    return jax.tree.map(lambda a: np.where(np.isfinite(a), a, np.nan), tree)
