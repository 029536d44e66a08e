"""The built-in cells' whole-sequence fast path (rnnjax.cells._fused) against the step scan.

``rj.scan`` takes the fast path for cells made with ``fused=True``; the same cell with
``sequence=None`` is the plain step-by-step ``lax.scan``, itself checked against stepping by
hand, PyTorch and finite differences elsewhere. Here: values, reverse-mode gradients, forward
mode and second order, batching, masks, dropout, and that the weight gradients leave the loop.
"""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from cases import batched_scan, derivatives, perturbed

import rnnjax as rj

T, I, H, B = 5, 2, 4, 3

FUSED_CELLS = {
    "lstm": lambda **kw: rj.cells.lstm(H, fused=True, **kw),
    "gru": lambda **kw: rj.cells.gru(H, fused=True, **kw),
    "elman_tanh": lambda **kw: rj.cells.elman(H, fused=True, **kw),
    "elman_relu": lambda **kw: rj.cells.elman(H, activation="relu", fused=True, **kw),
    "elman_softsign": lambda **kw: rj.cells.elman(H, activation=jax.nn.soft_sign, fused=True, **kw),
}
# Per-example lengths (full, partial, zero) or a mask, forwards and backwards.
MODES = {
    "reverse": {"reverse": True},
    "length": {"length": True},
    "reverse_mask": {"reverse": True, "mask": np.array([True, False, True, True, False])},
}
LENGTHS = np.array([T, 2, 0])


def setup(name):
    """A cell (float64 under enable_x64), params perturbed off their init, inputs and a
    nonzero starting carry."""
    dtype = jnp.result_type(float)
    cell = FUSED_CELLS[name](dtype=dtype)
    return cell, *perturbed(cell, B, T, I, dtype=dtype)


def batched_run(cell, mode):
    kw = dict(MODES[mode])
    return batched_scan(cell, LENGTHS, use_length=kw.pop("length", False), **kw)


def loss_of(run):
    def loss(params, xs, carry):
        final, ys = run(params, xs, carry)
        return jnp.sum(jnp.sin(ys)) + sum(jnp.sum(c**2) for c in jax.tree.leaves(final))

    return loss


def assert_close(a, b, tol=1e-12):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=tol, rtol=tol)


# Masked (per-example lengths) for every cell, reverse-with-mask for every kernel, the unmasked
# branch on one. Masking, direction and the unmasked branch are one piece of code around every
# kernel (rnnjax.cells._fused._sequence_fn); the Elman cells share one kernel, the activation
# (and its derivative) is all that differs, and "length" checks each to second order.
CASES = [(name, "length") for name in FUSED_CELLS]
CASES += [(name, "reverse_mask") for name in ("lstm", "gru", "elman_tanh")]
CASES += [("lstm", "reverse")]


@pytest.mark.parametrize(("name", "mode"), CASES)
def test_fast_path_equals_step_scan_to_second_order(name, mode):
    with jax.enable_x64(True):
        cell, params, xs, carry = setup(name)
        args = (params, xs, carry)
        tangent = jax.tree.map(lambda a: jnp.cos(jnp.arange(a.size).reshape(a.shape)), args)
        run, step = batched_run(cell, mode), batched_run(cell._replace(sequence=None), mode)
        fast = derivatives(run, loss_of(run))(args, tangent)
        ref = derivatives(step, loss_of(step))(args, tangent)
        assert_close(fast, ref, tol=1e-10)


def _jaxpr_text(fn, *args):
    return str(jax.make_jaxpr(fn)(*args))


@pytest.mark.parametrize("name", ["lstm", "gru", "elman_tanh"])
def test_scan_takes_the_fast_path_and_step_scan_does_not(name):
    cell, params, xs, carry = setup(name)
    assert "custom_jvp_call" in _jaxpr_text(batched_run(cell, "length"), params, xs, carry)
    plain = batched_run(cell._replace(sequence=None), "length")
    assert "custom_jvp_call" not in _jaxpr_text(plain, params, xs, carry)


def test_fast_path_is_opt_in():
    # (The default LSTM's sequence is the native kernels' path: tests/test_native.py.)
    assert rj.cells.lstm(H, native=False).sequence is None
    assert rj.cells.lstm(H, fused=True).sequence is not None
    # The reset-before GRU's recurrent matmul takes r * h, so it has no fast path.
    with pytest.raises(ValueError, match=r"reset_after=False\) has no fused fast path"):
        rj.cells.gru(H, reset_after=False, fused=True)
    with pytest.raises(TypeError, match="fused must be True or False, got 'yes'"):
        rj.cells.elman(H, fused="yes")


def _loop_bodies(jaxpr):
    """Every scan/while body in a jaxpr, recursively."""
    for eqn in jaxpr.eqns:
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            if eqn.primitive.name in ("scan", "while"):
                yield sub
            yield from _loop_bodies(sub)


@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_weight_gradients_are_computed_outside_the_loop(name):
    """The reason for the fast path: no (H, G) weight-gradient matmul inside any loop body
    of the backward pass, while the plain step scan has one per step."""
    cell, params, xs, carry = setup(name)
    weight_shapes = {params[w].shape for w in ("w_i", "w_h")}
    weight_shapes |= {shape[::-1] for shape in weight_shapes}

    def dots_in_loops_with_weight_shape(run):
        grad = jax.grad(loss_of(run))
        jaxpr = jax.make_jaxpr(grad)(params, xs, carry).jaxpr
        return [
            eqn
            for body in _loop_bodies(jaxpr)
            for eqn in body.eqns
            if eqn.primitive.name == "dot_general"
            and tuple(eqn.outvars[0].aval.shape) in weight_shapes
        ]

    assert dots_in_loops_with_weight_shape(batched_run(cell, "length")) == []
    plain = batched_run(cell._replace(sequence=None), "length")
    assert dots_in_loops_with_weight_shape(plain) != []


@pytest.mark.parametrize("name", ["lstm", "gru", "elman_tanh"])
def test_recurrent_dropout_on_the_fast_path_equals_the_step_path(name):
    with jax.enable_x64(True):
        cell, params, xs, _ = setup(name)
        layer = rj.layers.rnn(cell, recurrent_dropout=0.5, input_dropout=0.25)
        key = jax.random.key(5)

        def loss(layer):
            def f(params, xs):
                return jnp.sum(jnp.sin(layer.apply(params, xs, length=3, key=key)[1]))

            return f

        # Same key, same masks: the layer draws them before choosing the path.
        step_layer = rj.layers.rnn(
            cell._replace(sequence=None), recurrent_dropout=0.5, input_dropout=0.25
        )
        assert_close(loss(layer)(params, xs[0]), loss(step_layer)(params, xs[0]))
        assert_close(
            jax.grad(loss(layer))(params, xs[0]), jax.grad(loss(step_layer))(params, xs[0])
        )


def test_fast_path_rejects_wrong_input_size_with_the_step_message():
    cell = rj.cells.lstm(H, fused=True)
    params = cell.init(jax.random.key(0), I)
    with pytest.raises(ValueError, match=r"lstm.step expects x of shape \(2,\), got \(5,\)"):
        rj.scan(cell, params, jnp.ones((T, 5)))
