"""Layer contracts: rnn, bidirectional, stack, dense."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cases import H, I, T
from test_scan import MASK, assert_tree_close

import rnnjax as rj

KEY = jax.random.key(0)


@pytest.fixture
def bi_gru():
    return rj.layers.bidirectional(rj.layers.rnn(rj.cells.gru(H)), rj.layers.rnn(rj.cells.gru(H)))


def test_rnn_layer_is_scan(cell, params, xs):
    layer = rj.layers.rnn(cell, reverse=True)
    assert isinstance(layer, rj.Layer)
    assert_tree_close(
        layer.apply(params, xs, length=4), rj.scan(cell, params, xs, length=4, reverse=True)
    )
    assert_tree_close(layer.init(KEY, I), cell.init(KEY, I), atol=0)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"length": 4}, {"length": 0}, {"mask": MASK}],
    ids=["full", "length", "empty", "mask"],
)
def test_bidirectional_is_forward_scan_and_reverse_scan(bi_gru, xs, kwargs):
    params = bi_gru.init(KEY, I)
    cell = rj.cells.gru(H)
    (c_f, c_b), ys = bi_gru.apply(params, xs, **kwargs)
    c_f_ref, y_f = rj.scan(cell, params["fwd"], xs, **kwargs)
    c_b_ref, y_b = rj.scan(cell, params["bwd"], xs, reverse=True, **kwargs)
    assert ys.shape == (T, 2 * H)
    assert_tree_close(ys, jnp.concatenate([y_f, y_b], -1))
    assert_tree_close((c_f, c_b), (c_f_ref, c_b_ref))


@pytest.mark.parametrize(
    ("merge", "fn"),
    [("sum", np.add), ("mean", lambda a, b: (a + b) / 2), ("mul", np.multiply)],
)
def test_bidirectional_merges(xs, merge, fn):
    lstm = rj.layers.rnn(rj.cells.lstm(H))
    concat = rj.layers.bidirectional(lstm, lstm)
    merged = rj.layers.bidirectional(lstm, lstm, merge=merge)
    params = concat.init(KEY, I)
    _, both = concat.apply(params, xs, length=5)
    _, ys = merged.apply(params, xs, length=5)
    np.testing.assert_allclose(ys, fn(np.asarray(both[:, :H]), np.asarray(both[:, H:])), atol=1e-6)
    assert (np.asarray(ys[5:]) == 0).all()
    assert rj.output_size(merged, params, I) == H


def test_bidirectional_backward_direction_can_be_any_layer(xs):
    # A stack as the backward direction: reversing is done by the combinator, not the layer.
    fwd = rj.layers.rnn(rj.cells.elman(H))
    bwd = rj.layers.stack(rj.layers.rnn(rj.cells.elman(H)), rj.layers.dense(2))
    layer = rj.layers.bidirectional(fwd, bwd)
    params = layer.init(KEY, I)
    _, ys = layer.apply(params, xs, length=4)
    _, h_b = rj.scan(rj.cells.elman(H), params["bwd"][0], xs, length=4, reverse=True)
    want = jnp.where(
        jnp.arange(T)[:, None] < 4, h_b @ params["bwd"][1]["w"] + params["bwd"][1]["b"], 0
    )
    assert ys.shape == (T, H + 2)
    np.testing.assert_allclose(ys[:, H:], want, atol=1e-6)


def test_stack_equals_manual_composition(xs):
    l1, l2 = rj.layers.rnn(rj.cells.lstm(H)), rj.layers.rnn(rj.cells.gru(5))
    head = rj.layers.dense(2)
    net = rj.layers.stack(l1, l2, head)
    params = net.init(KEY, I)
    assert isinstance(params, tuple) and len(params) == 3
    assert params[1]["w_i"].shape == (H, 15) and params[2]["w"].shape == (5, 2)
    carries, ys = net.apply(params, xs, length=5)
    c1, h1 = l1.apply(params[0], xs, length=5)
    c2, h2 = l2.apply(params[1], h1, length=5)
    _, y = head.apply(params[2], h2, length=5)
    assert_tree_close(carries, (c1, c2, None))
    assert_tree_close(ys, y)
    assert (np.asarray(ys[5:]) == 0).all()
    # The returned carry feeds straight back in (e.g. to continue a stream).
    carries2, _ = net.apply(params, xs, carry=carries)
    assert_tree_close(carries2[0], l1.apply(params[0], xs, carry=c1)[0])


def test_stack_sizes_flow_through_a_bidirectional_layer():
    bi = rj.layers.bidirectional(rj.layers.rnn(rj.cells.gru(H)), rj.layers.rnn(rj.cells.gru(H)))
    net = rj.layers.stack(bi, rj.layers.rnn(rj.cells.lstm(H)))
    params = net.init(KEY, I)
    assert params[1]["w_i"].shape == (2 * H, 4 * H)
    assert rj.output_size(net, params, I) == H


def test_stack_residual_adds_inputs_where_sizes_match(xs):
    layers = [rj.layers.rnn(rj.cells.elman(H)), rj.layers.rnn(rj.cells.elman(H))]
    plain, res = rj.layers.stack(*layers), rj.layers.stack(*layers, residual=True)
    params = plain.init(KEY, I)
    _, ys = res.apply(params, xs)
    _, h1 = layers[0].apply(params[0], xs)  # I != H: no skip on the first layer
    _, h2 = layers[1].apply(params[1], h1)
    np.testing.assert_allclose(ys, h2 + h1, atol=1e-6)


def test_stack_dropout(xs):
    layers = [rj.layers.rnn(rj.cells.lstm(8)), rj.layers.rnn(rj.cells.lstm(8))]
    net = rj.layers.stack(*layers, dropout=0.5)
    params = net.init(KEY, I)
    # key=None is deterministic and equal to no dropout at all.
    assert_tree_close(net.apply(params, xs), rj.layers.stack(*layers).apply(params, xs), atol=0)
    # With a key, the second layer sees the first's outputs with ~half zeroed and the rest doubled.
    k = jax.random.key(3)
    _, ys = net.apply(params, xs, key=k)
    _, h1 = layers[0].apply(params[0], xs)
    keep = jax.random.bernoulli(jax.random.split(k, 4)[1], 0.5, h1.shape)  # stack's key for it
    _, want = layers[1].apply(params[1], jnp.where(keep, 2 * h1, 0))
    np.testing.assert_allclose(ys, want, atol=1e-6)
    assert 0.25 < float(keep.mean()) < 0.75
    # Different keys, different masks; the last layer's outputs are not dropped.
    _, ys2 = net.apply(params, xs, key=jax.random.key(4))
    assert not np.allclose(ys, ys2)
    assert not (np.asarray(ys) == 0).any()


def test_dense(xs):
    head = rj.layers.dense(2, activation=jax.nn.relu)
    params = head.init(KEY, I)
    assert params["w"].shape == (I, 2) and params["b"].shape == (2,)
    params = {"w": params["w"], "b": jnp.array([0.5, -0.5])}
    carry, ys = head.apply(params, xs, mask=MASK)
    assert carry is None
    want = np.maximum(np.asarray(xs) @ np.asarray(params["w"]) + [0.5, -0.5], 0) * MASK[:, None]
    np.testing.assert_allclose(ys, want, atol=1e-6)


def test_layers_vmap_and_grad(bi_gru):
    net = rj.layers.stack(bi_gru, rj.layers.dense(1))
    params = net.init(KEY, I)
    xs = jax.random.normal(KEY, (3, T, I))
    lengths = jnp.array([T, 3, 1])

    def loss(params):
        ys = jax.vmap(lambda x, n: net.apply(params, x, length=n)[1])(xs, lengths)
        return jnp.sum(ys**2)

    batched = jax.vmap(lambda x, n: net.apply(params, x, length=n)[1])(xs, lengths)
    for b in range(3):
        np.testing.assert_allclose(
            batched[b], net.apply(params, xs[b], length=int(lengths[b]))[1], atol=1e-6
        )
    grads = jax.grad(loss)(params)
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    assert float(jnp.abs(grads[0]["bwd"]["w_i"]).sum()) > 0


def test_a_stack_may_start_with_an_embedding():
    """Token models compose like any other: ``stack(embed, rnn, dense)`` finds each layer's
    input size (the embedding reads int tokens, not features) and masks padding end to end."""
    model = rj.layers.stack(
        rj.layers.embed(10, 4), rj.layers.rnn(rj.cells.gru(6)), rj.layers.dense(10)
    )
    params = model.init(jax.random.key(0), 1)
    assert params[1]["w_i"].shape == (4, 18) and params[2]["w"].shape == (6, 10)
    _, logits = model.apply(params, jnp.array([3, 1, 4, 1]), length=3)
    assert logits.shape == (4, 10) and bool((logits[3] == 0).all())
    with pytest.raises(ValueError, match="embed expects int tokens of shape \\(T,\\)"):
        model.apply(params, jnp.ones((4, 1)))
