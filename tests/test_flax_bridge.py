"""The Flax bridges (rnnjax.flax.linen, rnnjax.flax.nnx) against rnnjax's own scan and layers.

* ``flax.linen.RNN(RNNCell(cell))`` and ``nn.Bidirectional`` of wrapped cells give what
  ``rj.scan`` / ``rj.layers.bidirectional`` give with the same params, over full and padded
  batches, forwards and in reverse; where Flax's masking differs (padded steps), the test pins
  down what Flax returns instead.
* Flax's own LSTMCell, OptimizedLSTMCell, GRUCell and SimpleCell run by ``nn.RNN`` equal the
  rnnjax cell from ``cell_from_flax`` with converted params; conversions round-trip.
* ``RNNLayer`` (linen) takes dropout keys from the rng stream and trains with optax; the NNX
  modules equal the rnnjax layer, train with ``nnx.Optimizer`` and round-trip through orbax.

Every leaf of every param set is random (Flax inits biases to zero, which would hide a wrong bias
mapping) and initial carries are nonzero. One shape, (B, T, I, H) below, keeps compiles few.
"""

from __future__ import annotations

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from numpy.testing import assert_allclose

import rnnjax as rj
from rnnjax.flax import linen as rjl
from rnnjax.flax import nnx as rjx

B, T, I, H = 3, 6, 4, 5
LENGTHS = np.array([6, 3, 1], dtype=np.int32)  # one full row, one single-step row
REAL = np.arange(T)[None, :] < LENGTHS[:, None]  # (B, T) real steps
ATOL = 1e-5
CELLS = {"lstm": rj.cells.lstm, "gru": rj.cells.gru, "elman": rj.cells.elman}


def _close(actual, desired, what, atol=ATOL):
    """assert_allclose leaf by leaf, plus a guard that the reference is not ~0 (no vacuous pass)."""
    a_leaves, d_leaves = jax.tree.leaves(actual), jax.tree.leaves(desired)
    assert jax.tree.structure(actual) == jax.tree.structure(desired), what
    for a, d in zip(a_leaves, d_leaves, strict=True):
        a, d = np.asarray(a), np.asarray(d)
        assert a.shape == d.shape, f"{what}: shape {a.shape} != {d.shape}"
        assert np.abs(d).max() > 1e-3, f"{what}: reference is ~0, the check would be vacuous"
        assert_allclose(a, d, rtol=0, atol=atol, err_msg=what)


def _randomize(tree, seed, scale=0.5):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = [scale * jax.random.normal(k, np.shape(a)) for k, a in zip(keys, leaves, strict=True)]
    return jax.tree.unflatten(treedef, new)


def _xs(seed=0):
    return jax.random.normal(jax.random.key(seed), (B, T, I))


def _scan(cell, params, xs, carry=None, lengths=None, reverse=False):
    """``rj.scan`` over the batch with ``vmap``."""

    def one(x, c, n):
        return rj.scan(cell, params, x, c, length=n, reverse=reverse)

    return jax.vmap(one)(xs, carry, None if lengths is None else jnp.asarray(lengths))


def _batched_carry(cell, params, seed):
    """A nonzero carry for every example, in rnnjax's layout."""
    one = cell.initial_carry(params)
    return _randomize(jax.tree.map(lambda a: jnp.zeros((B, *a.shape)), one), seed)


# ---------------------------------------------------------------------------------------------
# linen: RNNCell under nn.RNN and nn.Bidirectional
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(CELLS))
def test_rnn_cell_under_flax_rnn_matches_scan(kind):
    cell = CELLS[kind](H)
    xs = _xs()
    rnn = nn.RNN(rjl.RNNCell(cell), return_carry=True)
    variables = rnn.init(jax.random.key(0), xs)
    params = variables["params"]["cell"]
    assert jax.tree.map(np.shape, params) == jax.tree.map(np.shape, cell.init(jax.random.key(0), I))
    params = _randomize(params, 1)
    variables = {"params": {"cell": params}}
    carry0 = _batched_carry(cell, params, 2)

    # Full length; the carry keeps rnnjax's type (LSTMState(h, c) for the LSTM).
    c_flax, y_flax = rnn.apply(variables, xs, initial_carry=carry0)
    c_rj, y_unmasked = _scan(cell, params, xs, carry0)
    assert type(c_flax) is type(c_rj)
    _close(c_flax, c_rj, f"{kind} final carry")
    _close(y_flax, y_unmasked, f"{kind} outputs")

    # seq_lengths: the same carry after the last real step and the same real outputs. Flax
    # keeps stepping through the padding, so its padded outputs are the unmasked run's, where
    # rnnjax's are zero.
    c_flax, y_flax = rnn.apply(variables, xs, initial_carry=carry0, seq_lengths=LENGTHS)
    c_rj, y_rj = _scan(cell, params, xs, carry0, LENGTHS)
    _close(c_flax, c_rj, f"{kind} final carry, seq_lengths")
    _close(y_flax[REAL], y_rj[REAL], f"{kind} real outputs, seq_lengths")
    assert np.all(np.asarray(y_rj)[~REAL] == 0.0)
    _close(y_flax[~REAL], y_unmasked[~REAL], f"{kind}: flax's padded outputs run on")

    # reverse=True, keep_order=True: rnnjax's reverse (outputs aligned with the inputs).
    c_rj, y_rj = _scan(cell, params, xs, carry0, LENGTHS, reverse=True)
    kw = {"initial_carry": carry0, "seq_lengths": LENGTHS, "reverse": True}
    c_flax, y_flax = rnn.apply(variables, xs, keep_order=True, **kw)
    _close(c_flax, c_rj, f"{kind} final carry, reverse")
    _close(y_flax[REAL], y_rj[REAL], f"{kind} real outputs, reverse + keep_order")
    # keep_order=False: Flax returns each real prefix in processing order, last step first.
    c_flax, y_flax = rnn.apply(variables, xs, keep_order=False, **kw)
    t = np.arange(T)[None, :]
    order = np.where(REAL, LENGTHS[:, None] - 1 - t, t)
    y_aligned = np.take_along_axis(np.asarray(y_flax), order[..., None], axis=1)
    _close(y_aligned[REAL], y_rj[REAL], f"{kind} real outputs, reverse without keep_order")


ZOO = ("mingru", "minlstm", "indrnn", "rglru", "lru", "slstm", "mlstm")


@pytest.mark.parametrize("kind", ZOO)
def test_every_zoo_cell_runs_under_flax_rnn_as_its_rnnjax_scan(kind):
    """The zoo's cells (nested params, complex and matrix-memory carries) through ``nn.RNN``
    from the carry ``initialize_carry`` makes: the same final carry and real outputs as
    ``rj.scan`` (the cells' parallel forms) with the same params, with seq_lengths."""
    cell = rj.cells.BY_NAME[kind](H)
    size = H if kind in rj.cells.SQUARE else I
    xs = jax.random.normal(jax.random.key(6), (B, T, size))
    rnn = nn.RNN(rjl.RNNCell(cell), return_carry=True)
    variables = rnn.init(jax.random.key(0), xs)
    params = variables["params"]["cell"]
    assert jax.tree.map(np.shape, params) == jax.tree.map(
        np.shape, cell.init(jax.random.key(0), size)
    )
    params = _randomize(params, 7)  # LRU: |lambda| = exp(-exp(nu_log)) < 1 whatever nu_log is
    c_flax, y_flax = rnn.apply({"params": {"cell": params}}, xs, seq_lengths=LENGTHS)
    c_rj, y_rj = _scan(cell, params, xs, lengths=LENGTHS)
    assert type(c_flax) is type(c_rj)
    _close(c_flax, c_rj, f"{kind} final carry, seq_lengths", atol=2e-5)
    _close(y_flax[REAL], y_rj[REAL], f"{kind} real outputs, seq_lengths", atol=2e-5)


def test_flax_rnn_with_a_zero_length_runs_through_the_padding():
    """For ``n = 0`` rnnjax returns the initial carry; Flax the carry after every padded step."""
    cell = rj.cells.elman(H)
    xs, lengths = _xs(18), np.array([0, T, 2], dtype=np.int32)
    rnn = nn.RNN(rjl.RNNCell(cell), return_carry=True)
    variables = _randomize(rnn.init(jax.random.key(0), xs), 19)
    params = variables["params"]["cell"]
    carry0 = _batched_carry(cell, params, 20)
    h_flax, _ = rnn.apply(variables, xs, initial_carry=carry0, seq_lengths=lengths)
    h_rj, _ = _scan(cell, params, xs, carry0, lengths)
    h_unmasked, _ = _scan(cell, params, xs, carry0)
    _close(h_rj[0], carry0[0], "rnnjax: zero length keeps the initial carry")
    _close(h_flax[0], h_unmasked[0], "flax: zero length runs every step")
    _close(h_flax[1:], h_rj[1:], "final carries for lengths >= 1")


def test_flax_bidirectional_of_wrapped_cells_matches_rnnjax_bidirectional():
    fwd, bwd = rj.cells.lstm(H), rj.cells.gru(H)
    xs = _xs(3)
    bi = nn.Bidirectional(
        nn.RNN(rjl.RNNCell(fwd)), nn.RNN(rjl.RNNCell(bwd)), return_carry=True
    )  # fmt: skip
    variables = _randomize(bi.init(jax.random.key(0), xs), 4)
    p = variables["params"]
    params = {"fwd": p["forward_rnn"]["cell"], "bwd": p["backward_rnn"]["cell"]}
    layer = rj.layers.bidirectional(rj.layers.rnn(fwd), rj.layers.rnn(bwd))

    (c_f, c_b), ys = bi.apply(variables, xs, seq_lengths=LENGTHS)
    (r_f, r_b), ys_rj = jax.vmap(lambda x, n: layer.apply(params, x, length=n))(
        xs, jnp.asarray(LENGTHS)
    )
    _close(c_f, r_f, "bidirectional forward carry")
    _close(c_b, r_b, "bidirectional backward carry")
    _close(ys[REAL], ys_rj[REAL], "bidirectional real outputs")
    assert ys.shape == (B, T, 2 * H)


def _learned_start_cell() -> rj.Cell:
    """An Elman cell whose initial state is a parameter: the carry depends on param values."""
    base = rj.cells.elman(H)

    def init(key, input_size):
        k1, k2 = jax.random.split(key)
        return {**base.init(k1, input_size), "h0": jax.random.normal(k2, (H,))}

    def step(params, h, x):
        return base.step({k: params[k] for k in ("w_i", "w_h", "b")}, h, x)

    return rj.Cell(init, lambda params: params["h0"], step)


def test_rnn_cell_initial_carry_comes_from_the_params():
    cell = _learned_start_cell()
    xs = _xs(5)
    rnn = nn.RNN(rjl.RNNCell(cell), return_carry=True)
    variables = rnn.init(jax.random.key(0), xs)
    assert sorted(variables["params"]["cell"]) == ["b", "h0", "w_h", "w_i"]
    h, ys = rnn.apply(variables, xs, seq_lengths=LENGTHS)
    h_rj, ys_rj = _scan(cell, variables["params"]["cell"], xs, lengths=LENGTHS)
    _close(h, h_rj, "carry from a learned initial state")
    _close(ys[REAL], ys_rj[REAL], "outputs from a learned initial state")


def test_rnn_cell_steps_any_number_of_batch_axes():
    cell = rj.cells.lstm(H)
    wrapped = rjl.RNNCell(cell)
    x = jax.random.normal(jax.random.key(0), (2, 3, I))
    carry = wrapped.initialize_carry(jax.random.key(1), x.shape)
    assert jax.tree.map(np.shape, carry) == rj.LSTMState((2, 3, H), (2, 3, H))
    variables = wrapped.init(jax.random.key(2), carry, x)
    params = _randomize(variables["params"], 3)
    carry = _randomize(carry, 4)
    got = wrapped.apply({"params": params}, carry, x)
    step = jax.vmap(jax.vmap(lambda c, x: cell.step(params, c, x)))
    _close(got, step(carry, x), "two batch axes")
    one = jax.tree.map(lambda a: a[0, 0], carry)
    _close(wrapped.apply({"params": params}, one, x[0, 0]), cell.step(params, one, x[0, 0]),
           "no batch axis")  # fmt: skip


# ---------------------------------------------------------------------------------------------
# linen: Flax's own cells <-> rnnjax params
# ---------------------------------------------------------------------------------------------

FLAX_CELLS = [nn.LSTMCell, nn.OptimizedLSTMCell, nn.GRUCell, nn.SimpleCell]


def _flax_to_rj_carry(flax_carry):
    """Flax's LSTM carry is (c, h); rnnjax's is LSTMState(h, c). Others are h in both."""
    if isinstance(flax_carry, tuple):
        c, h = flax_carry
        return rj.LSTMState(h, c)
    return flax_carry


def _flax_run(flax_cell, flax_params, xs, flax_carry0):
    rnn = nn.RNN(flax_cell, return_carry=True)
    variables = {"params": {"cell": flax_params}}
    return rnn.apply(variables, xs, initial_carry=flax_carry0, seq_lengths=LENGTHS)


@pytest.mark.parametrize("flax_type", FLAX_CELLS, ids=lambda t: t.__name__)
def test_flax_cell_equals_rnnjax_cell_with_converted_params(flax_type):
    flax_cell = flax_type(features=H)
    xs = _xs(6)
    flax_carry0 = _randomize(flax_cell.initialize_carry(jax.random.key(0), (B, I)), 7)
    flax_params = flax_cell.init(jax.random.key(1), flax_carry0, xs[:, 0])["params"]
    flax_params = _randomize(flax_params, 8)
    c_flax, y_flax = _flax_run(flax_cell, flax_params, xs, flax_carry0)

    cell = rjl.cell_from_flax(flax_cell)
    params = rjl.from_flax_params(flax_type, flax_params)
    assert jax.tree.map(np.shape, params) == jax.tree.map(np.shape, cell.init(jax.random.key(0), I))
    c_rj, y_rj = _scan(cell, params, xs, _flax_to_rj_carry(flax_carry0), LENGTHS)
    _close(c_rj, _flax_to_rj_carry(c_flax), f"{flax_type.__name__} final carry")
    _close(y_rj[REAL], y_flax[REAL], f"{flax_type.__name__} real outputs")

    # Flax -> rnnjax -> Flax is exact, for the class and for an instance.
    back = rjl.to_flax_params(flax_cell, params)
    assert jax.tree.structure(back) == jax.tree.structure(dict(flax_params))
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(dict(flax_params)), strict=True):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("flax_type", FLAX_CELLS, ids=lambda t: t.__name__)
def test_rnnjax_params_run_in_flax_cells(flax_type):
    flax_cell = flax_type(features=H)
    cell = rjl.cell_from_flax(flax_cell)
    params = _randomize(cell.init(jax.random.key(0), I), 9)  # GRU: b_h's r, z blocks nonzero
    xs = _xs(10)
    carry0 = _batched_carry(cell, params, 11)
    flax_carry0 = (carry0.c, carry0.h) if isinstance(carry0, rj.LSTMState) else carry0
    c_flax, y_flax = _flax_run(flax_cell, rjl.to_flax_params(flax_type, params), xs, flax_carry0)
    c_rj, y_rj = _scan(cell, params, xs, carry0, LENGTHS)
    _close(_flax_to_rj_carry(c_flax), c_rj, f"{flax_type.__name__} final carry")
    _close(y_flax[REAL], y_rj[REAL], f"{flax_type.__name__} real outputs")

    back = rjl.from_flax_params(flax_type, rjl.to_flax_params(flax_type, params))
    if flax_type is nn.GRUCell:  # b_h's r and z blocks fold into b_i: same function
        h2 = 2 * H
        want = {**params, "b_i": params["b_i"].at[:h2].add(params["b_h"][:h2]),
                "b_h": params["b_h"].at[:h2].set(0.0)}  # fmt: skip
    else:
        want = params
    assert sorted(back) == sorted(want)
    for k in want:
        assert np.array_equal(back[k], want[k]), k


def test_simple_cell_relu_maps_to_elman_relu():
    flax_cell = nn.SimpleCell(features=H, activation_fn=nn.relu)
    cell = rjl.cell_from_flax(flax_cell)
    x, h = jax.random.normal(jax.random.key(0), (I,)), jax.random.normal(jax.random.key(1), (H,))
    flax_params = _randomize(flax_cell.init(jax.random.key(2), h, x)["params"], 3)
    h_flax, _ = flax_cell.apply({"params": flax_params}, h, x)
    h_rj, _ = cell.step(rjl.from_flax_params(flax_cell, flax_params), h, x)
    _close(h_rj, h_flax, "relu SimpleCell step")
    assert np.any(np.asarray(h_rj) == 0.0)  # relu, not tanh, is what ran


def test_converter_errors_name_the_problem():
    params = rj.cells.lstm(H).init(jax.random.key(0), I)
    flax_params = rjl.to_flax_params(nn.LSTMCell, params)
    with pytest.raises(ValueError, match=r"missing \['hi'\]"):
        rjl.from_flax_params(nn.LSTMCell, {k: v for k, v in flax_params.items() if k != "hi"})
    with pytest.raises(ValueError, match=r"pass variables\['params'\]"):
        rjl.from_flax_params(nn.LSTMCell, {"params": flax_params})
    with pytest.raises(ValueError, match=r"variables\['params'\]\['cell'\]"):
        rjl.from_flax_params(nn.LSTMCell, {"cell": flax_params})
    with pytest.raises(ValueError, match=r"these are LSTMCell or OptimizedLSTMCell params"):
        rjl.from_flax_params(nn.GRUCell, flax_params)
    bad = {**flax_params, "hf": {**flax_params["hf"], "kernel": jnp.zeros((H + 1, H))}}
    with pytest.raises(ValueError, match=r"'hf' kernel should be \(5, 5\).*got \(6, 5\)"):
        rjl.from_flax_params(nn.LSTMCell, bad)
    no_bias = {**flax_params, "ho": {"kernel": flax_params["ho"]["kernel"]}}
    with pytest.raises(ValueError, match=r"'ho' should hold \['bias', 'kernel'\]"):
        rjl.from_flax_params(nn.LSTMCell, no_bias)
    with pytest.raises(TypeError, match="expects one of nn.LSTMCell.*got MGUCell"):
        rjl.from_flax_params(nn.MGUCell, flax_params)
    with pytest.raises(ValueError, match=r"keys \['b_h', 'b_i', 'w_h', 'w_i'\], got \['b'"):
        rjl.to_flax_params(nn.GRUCell, params)
    with pytest.raises(ValueError, match=r"w_h of shape \(H, H\), got \(5, 20\): that is an lstm"):
        rjl.to_flax_params(nn.SimpleCell, {**params, "b": params["b"][:H]})
    with pytest.raises(ValueError, match=r"b of shape \(20,\), got \(5,\)"):
        rjl.to_flax_params(nn.LSTMCell, {**params, "b": params["b"][:H]})
    with pytest.raises(TypeError, match=r"pass e.g. nn.GRUCell\(features=H\)"):
        rjl.cell_from_flax(nn.GRUCell)
    with pytest.raises(ValueError, match="residual=True"):
        rjl.cell_from_flax(nn.SimpleCell(features=H, residual=True))
    with pytest.raises(ValueError, match="has no rnnjax cell"):
        rjl.cell_from_flax(nn.LSTMCell(features=H, gate_fn=nn.hard_sigmoid))


def test_linen_wrappers_check_their_inputs():
    odd = rj.Cell(lambda k, n: (jnp.zeros((n, 2)),), lambda p: jnp.zeros(2), lambda p, c, x: (c, c))
    with pytest.raises(TypeError, match=r"RNNLayer\(rnnjax.layers.rnn\(cell\)\)"):
        nn.RNN(rjl.RNNCell(odd)).init(jax.random.key(0), _xs())
    lstm = rjl.RNNCell(rj.cells.lstm(H))
    x = jnp.ones((B, I))
    variables = lstm.init(jax.random.key(0), lstm.initialize_carry(None, x.shape), x)
    with pytest.raises(TypeError, match=r"LSTMState\(h, c\), not Flax's \(c, h\)"):
        lstm.apply(variables, (jnp.zeros((B, H)), jnp.zeros((B, H))), x)
    module = rjl.RNNLayer(rj.layers.rnn(rj.cells.gru(H)))
    with pytest.raises(ValueError, match=r"\(B, T, I\), got \(6, 4\): add a batch axis"):
        module.init(jax.random.key(0), _xs()[0])
    with pytest.raises(ValueError, match=r"seq_lengths of shape \(B,\) = \(3,\)"):
        module.init(jax.random.key(0), _xs(), jnp.ones((3, 1), jnp.int32))


# ---------------------------------------------------------------------------------------------
# linen: RNNLayer
# ---------------------------------------------------------------------------------------------


def _dropout_stack() -> rj.Layer:
    return rj.layers.stack(
        rj.layers.rnn(rj.cells.gru(H), recurrent_dropout=0.3), rj.layers.dense(2), dropout=0.3
    )


def test_linen_rnn_layer_matches_layer_and_uses_the_dropout_stream():
    layer = _dropout_stack()
    module = rjl.RNNLayer(layer)
    xs, lengths = _xs(12), jnp.asarray(LENGTHS)
    variables = module.init(jax.random.key(0), xs, lengths)  # deterministic: no dropout rng
    params = variables["params"]["layer"]
    assert isinstance(params, tuple) and len(params) == 2

    def run(rng=None):
        if rng is None:
            return module.apply(variables, xs, lengths)
        return module.apply(variables, xs, lengths, deterministic=False, rngs={"dropout": rng})

    carry, ys = run()
    carry_rj, ys_rj = jax.vmap(lambda x, n: layer.apply(params, x, length=n))(xs, lengths)
    _close(carry, carry_rj, "RNNLayer carry")
    _close(ys, ys_rj, "RNNLayer outputs")
    assert np.all(np.asarray(ys)[~REAL] == 0.0)

    ys_a, ys_a2, ys_b = (run(jax.random.key(k))[1] for k in (1, 1, 2))
    assert np.array_equal(ys_a, ys_a2)  # the same rng, the same masks
    assert np.abs(np.asarray(ys_a - ys_b)).max() > 1e-3  # another rng, other masks
    assert np.abs(np.asarray(ys_a - ys)).max() > 1e-3  # dropout was on
    assert np.all(np.asarray(ys_a)[~REAL] == 0.0)
    with pytest.raises(flax.errors.InvalidRngError, match="dropout"):  # no stream: no silent eval
        module.apply(variables, xs, lengths, deterministic=False)


def test_linen_rnn_layer_trains_with_optax():
    module = rjl.RNNLayer(_dropout_stack())
    xs, lengths = _xs(13), jnp.asarray(LENGTHS)
    targets = jax.random.normal(jax.random.key(14), (B, T, 2)) * REAL[..., None]
    params = module.init(jax.random.key(0), xs, lengths)["params"]
    tx = optax.adam(3e-2)

    def loss_fn(params, rng):
        _, ys = module.apply({"params": params}, xs, lengths, deterministic=rng is None,
                             rngs=None if rng is None else {"dropout": rng})  # fmt: skip
        return jnp.mean((ys - targets) ** 2)

    @jax.jit
    def step(params, opt_state, rng):
        grads = jax.grad(loss_fn)(params, rng)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    before = float(loss_fn(params, None))
    opt_state = tx.init(params)
    for i in range(15):
        params, opt_state = step(params, opt_state, jax.random.key(100 + i))
    after = float(loss_fn(params, None))
    assert after < 0.7 * before, (before, after)


# ---------------------------------------------------------------------------------------------
# nnx
# ---------------------------------------------------------------------------------------------


def test_nnx_rnn_matches_scan_and_holds_one_param_per_leaf():
    cell = rj.cells.lstm(H)
    model = rjx.RNN(cell, I, rngs=nnx.Rngs(0), recurrent_dropout=0.3)
    assert sorted(model.params) == ["b", "w_h", "w_i"]
    assert all(isinstance(p, nnx.Param) for p in model.params.values())
    for seed, p in enumerate(model.params.values()):  # randomize in place, through the Params
        p[...] = _randomize(p[...], seed)
    params = model.layer_params()
    xs = _xs(15)

    model.eval()
    carry, ys = model(xs, LENGTHS)
    carry_rj, ys_rj = _scan(cell, params, xs, lengths=LENGTHS)
    _close(carry, carry_rj, "nnx RNN carry")
    _close(ys, ys_rj, "nnx RNN outputs")
    assert np.all(np.asarray(ys)[~REAL] == 0.0)

    model.train()  # recurrent dropout on: the stream advances, so two calls differ
    ys_1, ys_2 = model(xs, LENGTHS)[1], model(xs, LENGTHS)[1]
    assert np.abs(np.asarray(ys_1 - ys_2)).max() > 1e-3
    assert np.abs(np.asarray(ys_1 - ys)).max() > 1e-3
    view = nnx.view(model, deterministic=True)
    assert np.array_equal(view(xs, LENGTHS)[1], ys)
    assert model.deterministic is False  # a view leaves the model as it was


def test_nnx_rnn_layer_trains_and_round_trips_through_orbax(tmp_path):
    layer = _dropout_stack()

    def make():
        return rjx.RNNLayer(layer, I, rngs=nnx.Rngs(params=0, dropout=1))

    model = make()
    xs, lengths = _xs(16), jnp.asarray(LENGTHS)
    targets = jax.random.normal(jax.random.key(17), (B, T, 2)) * REAL[..., None]
    n_params = len(jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert n_params == len(jax.tree.leaves(layer.init(jax.random.key(0), I))) == 6

    # The module is the rnnjax layer with the module's params.
    model.eval()
    _, ys = model(xs, lengths)
    _, ys_rj = jax.vmap(lambda x, n: layer.apply(model.layer_params(), x, length=n))(xs, lengths)
    _close(ys, ys_rj, "nnx RNNLayer outputs")

    def loss_fn(model):
        return jnp.mean((model(xs, lengths)[1] - targets) ** 2)

    optimizer = nnx.Optimizer(model, optax.adam(3e-2), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer):
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    before = float(loss_fn(model))
    model.train()
    for _ in range(15):
        train_step(model, optimizer)
    model.eval()
    after = float(loss_fn(model))
    assert after < 0.7 * before, (before, after)

    # Orbax the NNX way: split -> save state -> restore into an abstract state -> merge.
    _, state = nnx.split(model)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "state", state)
    checkpointer.wait_until_finished()
    graphdef, abstract_state = nnx.split(nnx.eval_shape(make))
    restored = nnx.merge(graphdef, checkpointer.restore(tmp_path / "state", abstract_state))
    restored.eval()
    assert np.array_equal(restored(xs, lengths)[1], model(xs, lengths)[1])
    restored.train()  # the dropout stream was saved too: the same masks come next
    model.train()
    ys_model, ys_restored = model(xs, lengths)[1], restored(xs, lengths)[1]
    assert np.array_equal(ys_restored, ys_model)
    assert np.abs(np.asarray(ys_model - ys)).max() > 1e-3


def test_nnx_wrappers_check_their_inputs():
    with pytest.raises(TypeError, match=r"rnnjax.layers.rnn\(cell\)"):
        rjx.RNNLayer(rj.cells.gru(H), I, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="input_size to be a positive int"):
        rjx.RNN(rj.cells.gru(H), 0, rngs=nnx.Rngs(0))
    model = rjx.RNN(rj.cells.gru(H), I, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"'dropout' \(or 'default'\) stream.*\['params'\]"):
        rjx.RNN(rj.cells.gru(H), I, rngs=nnx.Rngs(params=0))
    with pytest.raises(ValueError, match=r"\(B, T, 4\), got \(6, 4\): add a batch axis"):
        model(_xs()[0])
    with pytest.raises(ValueError, match=r"seq_lengths of shape \(B,\)"):
        model(_xs(), jnp.ones((2,), jnp.int32))
