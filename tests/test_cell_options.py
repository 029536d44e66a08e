"""The LSTM's and GRU's layer normalisation (Ba et al. 2016) and the LSTM's peepholes (Gers &
Schmidhuber 2000): the cells equal those papers' equations written out in numpy, gradients
match finite differences, and the options say when they cannot run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import rnnjax as rj

T, I, H, P = 6, 3, 4, 2

OPTIONS = {
    "lstm_ln": lambda **kw: rj.cells.lstm(H, layer_norm=True, **kw),
    "lstm_peephole": lambda **kw: rj.cells.lstm(H, peephole=True, **kw),
    "lstm_ln_peephole_proj": lambda **kw: rj.cells.lstm(
        H, layer_norm=True, peephole=True, proj_size=P, **kw
    ),
    "gru_ln": lambda **kw: rj.cells.gru(H, layer_norm=True, **kw),
}


def setup(cell, seed=0, dtype=jnp.float32):
    """Params moved off their init (unit LN scales, zero LN biases and peepholes would hide a
    wrongly placed term), inputs ``(T, I)`` and a nonzero starting carry."""
    params = cell.init(jax.random.key(seed), I)
    keys = iter(jax.random.split(jax.random.key(seed + 1), len(params) + 3))
    params = {
        k: (v + 0.4 * jax.random.normal(next(keys), v.shape)).astype(dtype)
        for k, v in params.items()
    }
    xs = jax.random.normal(next(keys), (T, I), dtype)
    c0 = cell.initial_carry(params)
    carry = jax.tree.map(
        lambda a: (0.3 + 0.5 * jax.random.normal(next(keys), a.shape)).astype(dtype), c0
    )
    return params, xs, carry


def sigmoid(v):
    return 1 / (1 + np.exp(-v))


def ln(v, scale, bias):
    """Ba et al.'s layer normalisation over the units, with PyTorch's epsilon."""
    return (v - v.mean()) / np.sqrt(v.var() + 1e-5) * scale + bias


def lstm_step(p, h, c, x, *, layer_norm, peephole):
    """Ba et al. (2016), LN-LSTM; Gers & Schmidhuber (2000), peepholes; Sak et al. (2014), w_p."""
    zx, zh = x @ p["w_i"], h @ p["w_h"]
    if layer_norm:
        zx, zh = ln(zx, p["ln_i_scale"], p["ln_i_bias"]), ln(zh, p["ln_h_scale"], p["ln_h_bias"])
    i, f, g, o = np.split(zx + zh + p["b"], 4)
    if peephole:
        i, f = i + p["p_i"] * c, f + p["p_f"] * c
    c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
    if peephole:
        o = o + p["p_o"] * c
    h = sigmoid(o) * np.tanh(ln(c, p["ln_c_scale"], p["ln_c_bias"]) if layer_norm else c)
    return (h @ p["w_p"] if "w_p" in p else h), c


def gru_step(p, h, x):
    """The reset-after GRU with each pre-activation layer-normalised before its bias."""
    gi = ln(x @ p["w_i"], p["ln_i_scale"], p["ln_i_bias"]) + p["b_i"]
    gh = ln(h @ p["w_h"], p["ln_h_scale"], p["ln_h_bias"]) + p["b_h"]
    (ir, iz, in_), (hr, hz, hn) = np.split(gi, 3), np.split(gh, 3)
    r, z = sigmoid(ir + hr), sigmoid(iz + hz)
    n = np.tanh(in_ + r * hn)
    return (1 - z) * n + z * h


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_cells_equal_the_papers_equations(option):
    cell = OPTIONS[option]()
    params, xs, carry = setup(cell, seed=2)
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    state = jax.tree.map(lambda a: np.asarray(a, np.float64), carry)
    want = []
    for x in np.asarray(xs, np.float64):
        if option.startswith("gru"):
            state = gru_step(p, state, x)
            want.append(state)
        else:
            h, c = lstm_step(p, *state, x, layer_norm="ln" in option, peephole="peephole" in option)
            state = rj.LSTMState(h, c)
            want.append(h)
    final, ys = jax.jit(lambda p, x, c: rj.scan(cell, p, x, c))(params, xs, carry)
    np.testing.assert_allclose(ys, np.stack(want), rtol=1e-5, atol=1e-6)
    for got, expected in zip(jax.tree.leaves(final), jax.tree.leaves(state), strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_gradients_pass_check_grads_float64(option):
    with jax.enable_x64(True):
        cell = OPTIONS[option](dtype=jnp.float64)
        params, xs, carry = setup(cell, seed=3, dtype=jnp.float64)
        mask = jnp.array([1, 1, 0, 1, 0, 1], bool)

        def loss(params, xs, carry):
            final, ys = rj.scan(cell, params, xs, carry, mask=mask, reverse=True)
            return jnp.sum(jnp.sin(ys)) + sum(jnp.sum(c**2) for c in jax.tree.leaves(final))

        # eps below check_grads' 1e-4: a layer norm over small-variance pre-activations (the
        # projected h) curves enough for a 1e-4 central difference to be off by 2e-4.
        loss, args = jax.jit(loss), (params, xs, carry)
        check_grads(loss, args, order=1, modes=("rev",), atol=1e-6, rtol=1e-6, eps=1e-6)


def test_params_layout_init_and_what_the_options_leave_alone():
    params = rj.cells.lstm(H, layer_norm=True, peephole=True).init(jax.random.key(0), I)
    shapes = {k: v.shape for k, v in params.items()}
    assert shapes == {
        "w_i": (I, 4 * H), "w_h": (H, 4 * H), "b": (4 * H,),
        "ln_i_scale": (4 * H,), "ln_i_bias": (4 * H,), "ln_h_scale": (4 * H,),
        "ln_h_bias": (4 * H,), "ln_c_scale": (H,), "ln_c_bias": (H,),
        "p_i": (H,), "p_f": (H,), "p_o": (H,),
    }  # fmt: skip
    for name in params:
        if name.endswith("_scale"):
            np.testing.assert_array_equal(params[name], 1.0)
        elif name.endswith("_bias") or name.startswith("p_"):
            np.testing.assert_array_equal(params[name], 0.0)
    gru = rj.cells.gru(H, layer_norm=True).init(jax.random.key(0), I)
    assert {k: v.shape for k, v in gru.items() if k.startswith("ln_")} == {
        f"ln_{s}_{t}": (3 * H,) for s in "ih" for t in ("scale", "bias")
    }
    # Off by default: the plain cells' params; zero peepholes are the plain LSTM exactly.
    plain = rj.cells.lstm(H)
    assert sorted(plain.init(jax.random.key(0), I)) == ["b", "w_h", "w_i"]
    peephole = rj.cells.lstm(H, peephole=True)
    p = peephole.init(jax.random.key(0), I)
    carry = rj.LSTMState(jnp.full(H, 0.3), jnp.full(H, -0.7))
    want = plain._replace(sequence=None).step(p, carry, jnp.ones(I))
    got = peephole.step(p, carry, jnp.ones(I))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)
    # The options run the step scan: no native or fused sequence is attached.
    for make in OPTIONS.values():
        assert make().sequence is None
    bf16 = rj.cells.lstm(H, layer_norm=True, peephole=True, dtype=jnp.bfloat16)
    assert all(v.dtype == jnp.bfloat16 for v in bf16.init(jax.random.key(0), I).values())


def test_recurrent_dropout_masks_h_where_it_meets_w_h():
    cell = rj.cells.lstm(H, layer_norm=True, peephole=True)
    params, xs, carry = setup(cell)
    mask = jnp.array([0.0, 2.0, 2.0, 0.0])
    got = cell.step(params, carry, xs[0], recurrent_mask=mask)
    want = cell.step(params, carry._replace(h=carry.h * mask), xs[0])
    # The mask reaches only the h fed to W_h: same gates as a masked h, same c_{t-1}.
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    layer = rj.layers.rnn(rj.cells.gru(H, layer_norm=True), recurrent_dropout=0.5)
    layer_params = layer.init(jax.random.key(0), I)
    _, ys = layer.apply(layer_params, xs, key=jax.random.key(1))
    _, ys_eval = layer.apply(layer_params, xs)
    assert np.isfinite(ys).all() and not np.allclose(ys, ys_eval)


def test_errors_say_why():
    for make, name in ((rj.cells.lstm, "lstm"), (rj.cells.gru, "gru")):
        with pytest.raises(ValueError, match=rf"{name}\(native=True\) with layer_norm=True: the"):
            make(H, layer_norm=True, native=True)
        with pytest.raises(ValueError, match="has no fused fast path"):
            make(H, layer_norm=True, fused=True)
        with pytest.raises(TypeError, match=f"{name} layer_norm must be True or False"):
            make(H, layer_norm=1)
    with pytest.raises(ValueError, match=r"lstm\(native=True\) with peephole=True"):
        rj.cells.lstm(H, peephole=True, native=True)
    with pytest.raises(ValueError, match=r"lstm\(layer_norm=False, peephole=True\) has no fused"):
        rj.cells.lstm(H, peephole=True, fused=True)
    with pytest.raises(TypeError, match="lstm peephole must be True or False"):
        rj.cells.lstm(H, peephole="yes")
    with pytest.raises(ValueError, match="use reset_after=True with layer_norm"):
        rj.cells.gru(H, layer_norm=True, reset_after=False)
