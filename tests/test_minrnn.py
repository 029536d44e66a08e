"""minGRU and minLSTM (Feng et al. 2024): the parallel sequence equals the step scan, the cells
equal the paper's equations (written out in numpy here), and their errors."""

import contextlib
import functools
import io
import re

import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import rnnjax as rj

T, I, H = 6, 3, 4

VARIANTS = {
    "mingru": lambda **kw: rj.cells.mingru(H, **kw),
    "mingru_log": lambda **kw: rj.cells.mingru(H, log_space=True, **kw),
    "minlstm": lambda **kw: rj.cells.minlstm(H, **kw),
    "minlstm_log": lambda **kw: rj.cells.minlstm(H, log_space=True, **kw),
}

# Each mode: (mask, reset, length) of one example -> rnnjax.scan keyword arguments.
MODES = {
    "plain": lambda m, r, n: {},
    "reset_mask": lambda m, r, n: {"reset": r, "mask": m},
    "reverse_reset_length": lambda m, r, n: {"reverse": True, "reset": r, "length": n},
    "remat_reverse_mask": lambda m, r, n: {"remat": True, "reverse": True, "mask": m},
}
# Three examples: a reset at a padded step (example 0, t=4), a sequence that is all padding
# (example 2) and one that is all real.
MASKS = np.array([[1, 1, 0, 1, 0, 1], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]], bool)
RESETS = np.array([[0, 0, 1, 0, 1, 0], [1, 0, 0, 1, 0, 0], [0, 1, 0, 0, 0, 1]], bool)
LENGTHS = np.array([4, 6, 0])


def setup(cell, seed=0, dtype=jnp.float32):
    """Params off their init, inputs ``(3, T, I)``, a nonzero starting carry, loss weights."""
    params = cell.init(jax.random.key(seed), I)
    keys = jax.random.split(jax.random.key(seed + 1), 4)
    params = jax.tree.map(lambda a: a + 0.3 * jax.random.normal(keys[0], a.shape), params)
    params = jax.tree.map(lambda a: a.astype(dtype), params)
    xs = jax.random.normal(keys[1], (3, T, I), dtype)
    carry = 0.5 + 0.2 * jax.random.normal(keys[2], (H,), dtype)
    weights = jax.random.normal(keys[3], (3, T, H), dtype)
    return params, xs, carry, weights


def real_of(kwargs):
    if "mask" in kwargs:
        return kwargs["mask"]
    if "length" in kwargs:
        return jnp.arange(T) < kwargs["length"]
    return jnp.ones(T, bool)


def batched_loss(cell, mode):
    """``(params, xs, carry, weights) -> (loss, (final, ys))`` over the three examples under
    ``vmap``; padded inputs are NaN, which must reach neither an output nor a derivative."""

    def loss(params, xs, carry, weights):
        def one(x, m, r, n):
            kwargs = MODES[mode](m, r, n)
            x = jnp.where(real_of(kwargs)[:, None], x, jnp.nan)
            return rj.scan(cell, params, x, carry, **kwargs)

        final, ys = jax.vmap(one)(xs, MASKS, RESETS, LENGTHS)
        return jnp.sum(jnp.sin(ys) * weights) + jnp.sum(final**2), (final, ys)

    return loss


def spied(cell, calls):
    """``cell`` whose ``sequence`` records the keywords it is called with (same signature, so
    rnnjax.scan still hands it ``reset=`` and ``remat=``)."""

    @functools.wraps(cell.sequence)
    def sequence(*args, **kwargs):
        calls.append(frozenset(k for k, v in kwargs.items() if v is not None))
        return cell.sequence(*args, **kwargs)

    return cell._replace(sequence=sequence)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_parallel_sequence_equals_the_step_scan(variant):
    """Values and gradients (params, inputs, starting carry) of the parallel form equal the
    lax.scan of step in every mode, under vmap, with NaN padding; the fast path really ran."""
    cell = VARIANTS[variant]()
    calls = []
    fast, reference = spied(cell, calls), cell._replace(sequence=None)

    @jax.jit
    def both(args):
        out = {}
        for mode in MODES:
            for name, c in (("fast", fast), ("ref", reference)):
                grad = jax.grad(batched_loss(c, mode), argnums=(0, 1, 2), has_aux=True)
                out[mode, name] = grad(*args)
        return out

    out = both(setup(cell))
    for mode in MODES:
        got, want = out[mode, "fast"], out[mode, "ref"]
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            assert np.isfinite(a).all(), mode
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5, err_msg=mode)
    assert {"reverse", "reset", "remat"} <= set().union(*calls)
    assert len(calls) == len(MODES)  # every mode ran the parallel form


def test_zero_length_sequences_keep_the_carry():
    for make in VARIANTS.values():
        cell = make()
        params, _, carry, _ = setup(cell)
        final, ys = rj.scan(cell, params, jnp.zeros((0, I)), carry)
        np.testing.assert_array_equal(final, carry)
        assert ys.shape == (0, H)


def sigmoid(v):
    return 1 / (1 + np.exp(-v))


def g(v):
    return np.where(v >= 0, v + 0.5, sigmoid(v))


def paper_step(variant, h, x, w, b):
    """One step of the paper's sequential mode (Appendix B), in float64 numpy."""
    proj = x @ w + b
    if variant.startswith("mingru"):
        k, v = np.split(proj, 2)
        z = sigmoid(k)
        cand = g(v) if variant.endswith("log") else v
        return (1 - z) * h + z * cand
    kf, ki, v = np.split(proj, 3)
    f, i = sigmoid(kf), sigmoid(ki)
    cand = g(v) if variant.endswith("log") else v
    return f / (f + i) * h + i / (f + i) * cand


def softplus(v):
    return np.logaddexp(0, v)


def paper_parallel_scan_log(variant, h0, xs, w, b):
    """The paper's log-space parallel mode (Appendix B.1-B.3): ``parallel_scan_log`` with
    ``a_star = cumsum(log_coeffs)`` and ``logcumsumexp``, from ``log h0`` (h0 > 0)."""
    proj = xs @ w + b
    if variant == "mingru_log":
        k, v = np.split(proj, 2, axis=1)
        log_coeffs, log_z = -softplus(k), -softplus(-k)
    else:
        kf, ki, v = np.split(proj, 3, axis=1)
        diff = softplus(-kf) - softplus(-ki)
        log_coeffs, log_z = -softplus(diff), -softplus(-diff)
    log_g = np.where(v >= 0, np.log(np.maximum(v, 0) + 0.5), -softplus(-v))
    log_values = np.concatenate([np.log(h0)[None], log_z + log_g])
    a_star = np.concatenate([np.zeros((1, h0.size)), np.cumsum(log_coeffs, axis=0)])
    log_h = a_star + np.logaddexp.accumulate(log_values - a_star, axis=0)
    return np.exp(log_h)[1:]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_cells_equal_the_papers_equations(variant):
    cell = VARIANTS[variant]()
    params, xs, carry, _ = setup(cell, seed=3)
    p64 = {k: np.asarray(v, np.float64) for k, v in params.items()}
    xs64, h = np.asarray(xs[0], np.float64), np.asarray(carry, np.float64)
    want = []
    for x in xs64:
        h = paper_step(variant, h, x, p64["w"], p64["b"])
        want.append(h)
    want = np.stack(want)
    final, ys = jax.jit(lambda p, x, c: rj.scan(cell, p, x, c))(params, xs[0], carry)
    np.testing.assert_allclose(ys, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(final, want[-1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cell.step(params, carry, xs[0, 0])[1], want[0], rtol=1e-5)
    if variant.endswith("log"):
        assert (np.asarray(carry) > 0).all()  # the paper's form takes log h0
        parallel = paper_parallel_scan_log(variant, np.asarray(carry, np.float64), xs64, **p64)
        np.testing.assert_allclose(ys, parallel, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cell_name", ["mingru", "minlstm"])
def test_log_space_is_the_plain_form_where_g_is_v_plus_half(cell_name):
    """g(v) = v + 0.5 for v >= 0: with the candidate's weights zero and its bias v >= 0 the
    log-space cell equals the plain one with the bias raised by 0.5; with v < 0 it does not
    (there g is a sigmoid: a different parametrisation, not another way to compute one)."""
    plain, log = VARIANTS[cell_name](), VARIANTS[cell_name + "_log"]()
    params, xs, carry, _ = setup(plain, seed=5)
    cand = slice(-H, None)
    params["w"] = params["w"].at[:, cand].set(0.0)
    for bias, same in ((0.7, True), (-0.7, False)):
        p_log = {**params, "b": params["b"].at[cand].set(bias)}
        p_plain = {**params, "b": params["b"].at[cand].set(bias + 0.5)}
        _, y_log = rj.scan(log, p_log, xs[0], carry)
        _, y_plain = rj.scan(plain, p_plain, xs[0], carry)
        assert np.allclose(y_log, y_plain, rtol=1e-5, atol=1e-6) == same


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_gradients_pass_check_grads_float64(variant):
    with jax.enable_x64(True):
        cell = VARIANTS[variant](dtype=jnp.float64)
        params, xs, carry, weights = setup(cell, seed=7, dtype=jnp.float64)
        mask, reset = jnp.asarray(MASKS[0]), jnp.asarray(RESETS[1])

        def loss(params, x, carry):
            _, a = rj.scan(cell, params, x, carry, mask=mask, reverse=True)
            last, b = rj.scan(cell, params, x, carry, reset=reset, remat=3)
            return jnp.sum(jnp.sin(a + b) * weights[0]) + jnp.sum(last**2)

        check_grads(
            jax.jit(loss), (params, xs[0], carry), order=1, modes=("rev",), atol=1e-6, rtol=1e-6
        )


def stored_by_the_cell(cell, remat):
    """Elements of the arrays BPTT stores that the cell's code made (not its arguments)."""
    params, xs, _, _ = setup(cell)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        jax.ad_checkpoint.print_saved_residuals(
            lambda p: jnp.sum(rj.scan(cell, p, xs[0], remat=remat)[1] ** 2), params
        )
    shapes = re.findall(r"f32\[([\d,]*)\] output of .*rnnjax/(?:cells|_native)/", out.getvalue())
    return sum(int(np.prod([int(d) for d in s.split(",") if d])) for s in shapes)


@pytest.mark.parametrize("variant", ["mingru", "minlstm_log"])
def test_remat_stores_only_the_projection(variant):
    cell = VARIANTS[variant]()
    width = 2 * H if variant.startswith("mingru") else 3 * H
    assert stored_by_the_cell(cell, True) == T * width + H  # x W + b, and the zero carry
    # Without remat at least every step's h too (the fused native pass stores nothing else).
    assert stored_by_the_cell(cell, False) >= stored_by_the_cell(cell, True) + T * H


def test_param_layout_init_and_dtype():
    for name, make in VARIANTS.items():
        params = make().init(jax.random.key(0), I)
        blocks = 2 if name.startswith("mingru") else 3
        assert {k: v.shape for k, v in params.items()} == {"w": (I, blocks * H), "b": (blocks * H,)}
        w = np.asarray(params["w"])
        assert not np.allclose(w[:, :H], w[:, H : 2 * H])  # blocks drawn independently
        np.testing.assert_array_equal(params["b"], 0.0)
        if name.endswith("log"):
            continue  # the same init as the plain form
        cell = make(dtype=jnp.bfloat16, bias_init=jax.nn.initializers.constant(0.1))
        params = cell.init(jax.random.key(0), I)
        assert all(v.dtype == jnp.bfloat16 for v in params.values())
        np.testing.assert_allclose(params["b"].astype(np.float32), 0.1, rtol=1e-2)
        final, ys = rj.scan(cell, params, jnp.ones((T, I), jnp.bfloat16))
        assert final.dtype == ys.dtype == jnp.bfloat16


@pytest.mark.parametrize("make", [rj.cells.mingru, rj.cells.minlstm], ids=["mingru", "minlstm"])
def test_errors(make):
    name = make.__name__
    with pytest.raises(ValueError, match=f"{name} expects hidden_size to be a positive int"):
        make(0)
    with pytest.raises(TypeError, match="log_space must be True or False"):
        make(H, log_space="yes")
    with pytest.raises(ValueError, match="scan_mode must be one of 'auto', 'sequential'"):
        make(H, scan_mode="parallel")
    with pytest.raises(ValueError, match="runs its own log-space scan"):
        make(H, log_space=True, scan_mode="chunked")
    cell = make(H)
    params = cell.init(jax.random.key(0), I)
    with pytest.raises(ValueError, match=rf"{name}.step expects x of shape \(3,\)"):
        cell.step(params, cell.initial_carry(params), jnp.ones((2, I)))
    with pytest.raises(ValueError, match="takes no recurrent_mask: it has no recurrent weight"):
        cell.sequence(params, jnp.ones((T, I)), jnp.zeros(H), None, recurrent_mask=jnp.ones(H))
    with pytest.raises(TypeError, match="recurrent_dropout needs a cell whose step accepts"):
        rj.layers.rnn(cell, recurrent_dropout=0.5)


def test_scan_modes_agree():
    cell = rj.cells.mingru(H, scan_mode="associative")
    params, xs, carry, _ = setup(cell)
    want = rj.scan(cell._replace(sequence=None), params, xs[0], carry, reverse=True)
    got = rj.scan(cell, params, xs[0], carry, reverse=True)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
