"""rnnjax.diagnostics: gradient norms per step, step Jacobians, hidden-state statistics, plots."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cases import CELLS, I, T

import rnnjax as rj
from rnnjax.data import adding
from rnnjax.diagnostics import (
    HiddenStats,
    carry_gradients,
    hidden_gradients,
    hidden_stats,
    jacobian_norms,
    plot_gradient_norms,
    plot_hidden_stats,
    plot_jacobian_norms,
    product_norms,
    spectral_radii,
    step_jacobians,
)


def last_output_loss(ys, carry):
    return jnp.sum(jnp.sin(ys[-1]))


def brute_force_gradient(cell, params, xs, loss_fn, t):
    """dLoss/dh_t by differentiating a function of h_t written out by hand: run the steps
    before t, then everything after t from the given carry; the output y_t is h_t (the carry's
    first leaf), as in every built-in cell."""
    prefix_carry, prefix_ys = rj.loop(cell, params, xs[:t])
    h_t = cell.step(params, prefix_carry, xs[t])[0]

    def loss_of(carry_t):
        y_t = jax.tree.leaves(carry_t)[0]
        final, ys_after = rj.loop(cell, params, xs[t + 1 :], carry=carry_t)
        ys = jnp.concatenate([prefix_ys, y_t[None], ys_after])
        return loss_fn(ys, final)

    return loss_of, h_t, jax.grad(loss_of)(h_t)


def flat_norms(grads):
    """Norm of the whole carry's gradient at every t (all leaves together)."""
    leaves = [g.reshape(g.shape[0], -1) for g in jax.tree.leaves(grads)]
    return jnp.linalg.norm(jnp.concatenate(leaves, axis=1), axis=1)


@pytest.fixture(scope="module")
def small_elman():
    """The textbook setting: an untrained Elman tanh RNN, recurrent weights of spectral norm
    0.5 (orthogonal at init, so scaling by 0.5 sets every singular value to 0.5)."""
    cell = rj.cells.elman(16)
    params = cell.init(jax.random.key(0), 2)
    params["w_h"] = 0.5 * params["w_h"]
    xs = jax.random.normal(jax.random.key(1), (30, 2))
    return cell, params, xs


# The textbook picture.


def test_gradients_vanish_geometrically_with_distance_from_the_loss(small_elman):
    cell, params, xs = small_elman
    assert float(jnp.linalg.norm(params["w_h"], ord=2)) == pytest.approx(0.5, rel=1e-5)
    norms = np.asarray(hidden_gradients(cell, params, xs, last_output_loss))
    assert norms.shape == (30,) and (norms > 0).all()
    # log-norm is linear in t: it falls by a constant factor per step away from the loss
    t = np.arange(30)
    slope, intercept = np.polyfit(t, np.log(norms), 1)
    residual = np.log(norms) - (slope * t + intercept)
    r2 = 1 - (residual**2).sum() / ((np.log(norms) - np.log(norms).mean()) ** 2).sum()
    assert slope > np.log(2) and r2 > 0.99, (slope, r2)  # each step away: at least twice smaller
    assert norms[0] < 1e-10 * norms[-1]


def test_each_step_shrinks_the_gradient_by_at_most_the_step_jacobian_norm(small_elman):
    """For a loss on the last output only, dLoss/dh_t = J[t+1]^T dLoss/dh_{t+1} for t < T-1, so
    ||g_t|| <= ||J[t+1]|| ||g_{t+1}||, and ||J|| <= ||w_h|| max tanh' <= 0.5."""
    cell, params, xs = small_elman
    norms = hidden_gradients(cell, params, xs, last_output_loss)
    step_norms = jacobian_norms(step_jacobians(cell, params, xs))
    assert float(step_norms.max()) <= 0.5 * (1 + 1e-5)
    ratios = norms[:-1] / norms[1:]
    assert bool((ratios <= step_norms[1:] * (1 + 1e-5)).all())
    assert float(ratios.max()) <= 0.5 * (1 + 1e-5)


def test_hidden_gradients_equal_brute_force_per_step(small_elman):
    cell, params, xs = small_elman
    grads = carry_gradients(cell, params, xs, last_output_loss)
    norms = hidden_gradients(cell, params, xs, last_output_loss)
    for t in (3, 17, 29):
        _, _, reference = brute_force_gradient(cell, params, xs, last_output_loss, t)
        np.testing.assert_allclose(grads[t], reference, rtol=1e-4, atol=1e-30)
        assert float(norms[t]) == pytest.approx(float(jnp.linalg.norm(reference)), rel=1e-5)


def test_hidden_gradients_match_finite_differences(small_elman):
    cell, params, xs = small_elman
    t = 26
    loss_of, h_t, _ = brute_force_gradient(cell, params, xs, last_output_loss, t)
    g = carry_gradients(cell, params, xs, last_output_loss)[t]
    direction = g / jnp.linalg.norm(g)  # the steepest direction: the largest signal
    delta = 1e-2
    slope = (loss_of(h_t + delta * direction) - loss_of(h_t - delta * direction)) / (2 * delta)
    assert float(slope) == pytest.approx(float(jnp.linalg.norm(g)), rel=1e-2)


def test_carry_gradients_equal_brute_force_for_every_cell(cell, params, xs):
    """Every built-in cell, a loss that reads all outputs and the final carry (every path)."""

    def loss_fn(ys, carry):
        return jnp.sum(ys**2 * jnp.arange(1, T + 1)[:, None]) + sum(
            jnp.sum(jnp.cos(leaf)) for leaf in jax.tree.leaves(carry)
        )

    grads = carry_gradients(cell, params, xs, loss_fn)
    assert jax.tree.structure(grads) == jax.tree.structure(cell.initial_carry(params))
    for t in (1, T - 1):
        _, _, reference = brute_force_gradient(cell, params, xs, loss_fn, t)
        for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(reference), strict=True):
            np.testing.assert_allclose(got[t], want, rtol=1e-4, atol=1e-6)


# Exploding, and the LSTM's protection against vanishing.


def test_large_linear_recurrence_explodes_exactly():
    """Linear activation, w_h = 3 x orthogonal: every step Jacobian is w_h^T, so each step back
    multiplies the gradient norm by exactly 3, and norm and spectral radius are both 3."""
    cell = rj.cells.elman(8, activation=lambda z: z)
    params = cell.init(jax.random.key(0), 2)
    params["w_h"] = 3.0 * params["w_h"]
    xs = jax.random.normal(jax.random.key(1), (10, 2))
    norms = hidden_gradients(cell, params, xs, last_output_loss)
    np.testing.assert_allclose(norms[:-1] / norms[1:], 3.0, rtol=1e-4)
    jacs = step_jacobians(cell, params, xs)
    np.testing.assert_allclose(jacobian_norms(jacs), 3.0, rtol=1e-5)
    np.testing.assert_allclose(spectral_radii(jacs), 3.0, rtol=1e-4)
    np.testing.assert_allclose(product_norms(jacs), 3.0 ** np.arange(9, -1, -1), rtol=1e-4)


def test_large_relu_recurrence_explodes():
    cell = rj.cells.elman(16, activation="relu")
    params = cell.init(jax.random.key(0), 2)
    params["w_h"] = 3.0 * params["w_h"]
    xs = jax.random.normal(jax.random.key(1), (12, 2))
    norms = hidden_gradients(cell, params, xs, last_output_loss)
    assert float(norms[0]) > 100 * float(norms[-1])
    states = hidden_stats(cell, params, xs).norm
    assert float(states[-1]) > 100 * float(states[0])


def test_lstm_keeps_gradients_at_a_distance_where_elman_loses_them():
    """The adding problem's setting (T=50, a loss on a readout of the last output), untrained
    cells at their default init: the gradient reaching step 0, relative to the one at the
    loss, is orders of magnitude larger for an LSTM (forget bias 1) than for an Elman tanh."""
    steps, hidden = 50, 16
    xs, targets = adding(jax.random.key(2), 8, steps)
    readout = jax.random.normal(jax.random.key(3), (hidden,)) / 4

    def decay(cell):
        params = cell.init(jax.random.key(0), 2)

        def one(x, target):
            norms = hidden_gradients(
                cell, params, x, lambda ys, carry: (ys[-1] @ readout - target) ** 2
            )
            return norms[0] / norms[-1]

        return np.asarray(jax.vmap(one)(xs, targets))

    elman, lstm = decay(rj.cells.elman(hidden)), decay(rj.cells.lstm(hidden, forget_bias=1.0))
    assert lstm.min() > 10 * elman.max()  # every LSTM example beats every Elman one
    assert np.median(lstm) > 100 * np.median(elman)


# Step Jacobians.


@pytest.mark.parametrize("name", ["elman_tanh", "lstm", "gru"])
def test_step_jacobians_equal_jacrev_of_the_step_by_hand(name, xs):
    cell = CELLS[name]()
    params = cell.init(jax.random.key(0), I)
    jacs = step_jacobians(cell, params, xs)
    h = params["w_h"].shape[0]
    width = 2 * h if name == "lstm" else h
    assert jacs.shape == (T, width, width)
    for t in (0, 4):
        carry = rj.scan(cell, params, xs[:t])[0]  # the carry entering step t
        by_hand = jax.jacrev(lambda c, t=t: cell.step(params, c, xs[t])[0])(carry)
        if name == "lstm":  # blocks d(new.h, new.c)/d(old.h, old.c), laid out [h, c] x [h, c]
            by_hand = jnp.block(
                [[by_hand.h.h, by_hand.h.c], [by_hand.c.h, by_hand.c.c]]
            )  # fmt: skip
        np.testing.assert_allclose(jacs[t], by_hand, rtol=1e-5, atol=1e-6)
    radii, norms = spectral_radii(jacs), jacobian_norms(jacs)
    assert radii.shape == norms.shape == (T,)
    assert bool((radii <= norms * (1 + 1e-5)).all())


def test_product_norms_equal_explicit_products_and_bound_the_gradient():
    cell = rj.cells.lstm(4)
    params = cell.init(jax.random.key(0), 3)
    xs = jax.random.normal(jax.random.key(1), (8, 3))
    jacs = step_jacobians(cell, params, xs)
    products = product_norms(jacs)
    assert float(products[-1]) == pytest.approx(1.0)
    for t in (0, 3, 6):
        explicit = functools.reduce(np.matmul, np.asarray(jacs[t + 1 :][::-1]))
        assert float(products[t]) == pytest.approx(np.linalg.norm(explicit, 2), rel=1e-4)
    # a loss on the last state only: ||dLoss/dh_t|| <= ||dh_{T-1}/dh_t|| ||dLoss/dh_{T-1}||
    grads = carry_gradients(cell, params, xs, lambda ys, c: jnp.sum(jnp.sin(c.h) + c.c**2))
    norms = flat_norms(grads)
    assert bool((norms <= products * norms[-1] * (1 + 1e-5)).all())
    # from a given carry: the same Jacobians as the tail of the whole trajectory's
    carry, _ = rj.scan(cell, params, xs[:2])
    tail = step_jacobians(cell, params, xs[2:], carry=carry)
    np.testing.assert_allclose(tail, jacs[2:], rtol=1e-6, atol=1e-7)


# Carries, leaves, masking, custom cells, jit and vmap.


def test_leaf_picks_the_lstm_cell_state():
    cell = rj.cells.lstm(4)
    params = cell.init(jax.random.key(0), 3)
    xs = jax.random.normal(jax.random.key(1), (6, 3))
    grads = carry_gradients(cell, params, xs, last_output_loss)
    h = hidden_gradients(cell, params, xs, last_output_loss)
    c = hidden_gradients(cell, params, xs, last_output_loss, leaf="c")
    np.testing.assert_allclose(h, jnp.linalg.norm(grads.h, axis=1), rtol=1e-6)
    np.testing.assert_allclose(c, jnp.linalg.norm(grads.c, axis=1), rtol=1e-6)
    np.testing.assert_array_equal(c, hidden_gradients(cell, params, xs, last_output_loss, leaf=1))
    assert float(c[-1]) == 0.0  # the last output is h: c after the last step never reaches it


def test_length_zeroes_padded_steps_and_matches_the_unpadded_sequence():
    cell = rj.cells.gru(4)
    params = cell.init(jax.random.key(0), 3)
    xs = jax.random.normal(jax.random.key(1), (8, 3))

    def loss_fn(ys, carry):
        return jnp.sum(carry**2) + jnp.sum(ys)

    padded = hidden_gradients(cell, params, xs, loss_fn, length=5)
    assert bool((padded[5:] == 0).all())
    np.testing.assert_allclose(padded[:5], hidden_gradients(cell, params, xs[:5], loss_fn), 1e-6)
    masked = hidden_gradients(cell, params, xs, loss_fn, mask=jnp.arange(8) < 5)
    np.testing.assert_array_equal(masked, padded)


def custom_cell(output_is_hidden):
    """A cell with a dict carry ({"h", "m"}: leaves in key order, so h first) whose output is
    either h itself or a separate function of it."""

    def init(key, input_size):
        return {"w": jax.random.normal(key, (input_size + 3, 3)) * 0.5}

    def initial_carry(params):
        return {"h": jnp.zeros(3), "m": jnp.zeros(3)}

    def step(params, carry, x):
        h = jnp.tanh(jnp.concatenate([x, carry["h"]]) @ params["w"] + 0.5 * carry["m"])
        new = {"h": h, "m": 0.9 * carry["m"] + h}
        return new, (h if output_is_hidden else 2.0 * h)

    return rj.Cell(init, initial_carry, step)


def test_custom_pytree_carry_first_leaf_is_h_and_leaf_by_name():
    cell = custom_cell(output_is_hidden=True)
    params = cell.init(jax.random.key(0), 2)
    xs = jax.random.normal(jax.random.key(1), (7, 2))
    grads = carry_gradients(cell, params, xs, last_output_loss)
    for t in (2, 6):
        _, _, reference = brute_force_gradient(cell, params, xs, last_output_loss, t)
        np.testing.assert_allclose(grads["h"][t], reference["h"], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(grads["m"][t], reference["m"], rtol=1e-5, atol=1e-7)
    h = hidden_gradients(cell, params, xs, last_output_loss)  # the first leaf, "h"
    np.testing.assert_allclose(h, jnp.linalg.norm(grads["h"], axis=1), rtol=1e-6)
    m = hidden_gradients(cell, params, xs, last_output_loss, leaf="m")
    np.testing.assert_allclose(m, jnp.linalg.norm(grads["m"], axis=1), rtol=1e-6)
    assert step_jacobians(cell, params, xs).shape == (7, 6, 6)
    assert hidden_stats(cell, params, xs, leaf="m").mean.shape == (7,)


def test_an_output_computed_apart_from_the_carry_only_gets_the_path_through_later_steps():
    cell = custom_cell(output_is_hidden=False)
    params = cell.init(jax.random.key(0), 2)
    xs = jax.random.normal(jax.random.key(1), (7, 2))
    norms = hidden_gradients(cell, params, xs, last_output_loss)
    assert float(norms[-1]) == 0.0 and bool((norms[:-1] > 0).all())


def test_jit_and_vmap_compile_once():
    cell = rj.cells.elman(4)
    params = cell.init(jax.random.key(0), 2)
    run = jax.jit(jax.vmap(lambda x: hidden_gradients(cell, params, x, last_output_loss, length=4)))
    xs = jax.random.normal(jax.random.key(1), (3, 6, 2))
    batched = run(xs)
    run(xs + 1.0)
    assert run._cache_size() == 1
    np.testing.assert_allclose(
        batched[1], hidden_gradients(cell, params, xs[1], last_output_loss, length=4), rtol=1e-6
    )


def test_a_loss_reading_values_that_change_sees_the_new_values():
    """Diagnostics are not cached across calls on the loss function: a notebook that changes
    what its loss reads, and calls again, gets the new gradients."""
    cell = rj.cells.elman(4)
    params = cell.init(jax.random.key(0), 2)
    xs = jax.random.normal(jax.random.key(1), (5, 2))
    target = {"y": 0.0}

    def loss_fn(ys, carry):
        return (jnp.sum(ys[-1]) - target["y"]) ** 2

    before = hidden_gradients(cell, params, xs, loss_fn)
    target["y"] = 10.0
    after = hidden_gradients(cell, params, xs, loss_fn)
    assert float(after[-1]) > 5 * float(before[-1])


def test_hidden_stats_describe_the_hidden_states():
    cell = rj.cells.lstm(6)
    params = cell.init(jax.random.key(0), 3)
    xs = 3.0 * jax.random.normal(jax.random.key(1), (9, 3))
    carry = rj.scan(cell, params, xs[:2])[0]
    stats = hidden_stats(cell, params, xs, carry=carry, threshold=0.5)
    assert isinstance(stats, HiddenStats)
    _, hs = rj.scan(cell, params, xs, carry)
    np.testing.assert_allclose(stats.mean, hs.mean(axis=1), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(stats.std, hs.std(axis=1), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(stats.norm, jnp.linalg.norm(hs, axis=1), rtol=1e-6)
    np.testing.assert_allclose(stats.saturated, (jnp.abs(hs) > 0.5).mean(axis=1))
    cells = hidden_stats(cell, params, xs, carry=carry, leaf="c")
    assert float(jnp.abs(cells.norm - stats.norm).max()) > 0.01


# Errors.


def test_errors_name_the_fix():
    cell = rj.cells.lstm(4)
    params = cell.init(jax.random.key(0), 3)
    xs = jnp.ones((5, 3))
    with pytest.raises(
        ValueError, match=r"lstm.step expects x of shape \(3,\), got \(5, 3\).*vmap"
    ):
        hidden_gradients(cell, params, jnp.ones((2, 5, 3)), last_output_loss)
    with pytest.raises(ValueError, match="loss_fn.*return a scalar, got shape \\(4,\\).*vmap"):
        hidden_gradients(cell, params, xs, lambda ys, c: ys[-1])
    with pytest.raises(ValueError, match="leaf=2 is out of range for a carry with 2 leaves"):
        hidden_gradients(cell, params, xs, last_output_loss, leaf=2)
    with pytest.raises(ValueError, match=r"no field 'x'; its fields are \['h', 'c'\]"):
        hidden_stats(cell, params, xs, leaf="x")
    with pytest.raises(ValueError, match="no named fields, pass an int"):
        hidden_gradients(rj.cells.gru(4), rj.cells.gru(4).init(jax.random.key(0), 3), xs,
                         last_output_loss, leaf="h")  # fmt: skip
    with pytest.raises(TypeError, match="leaf to be an int or a field name"):
        hidden_gradients(cell, params, xs, last_output_loss, leaf=1.0)
    with pytest.raises(ValueError, match=r"length in \[0, T\] = \[0, 5\], got 9"):
        hidden_gradients(cell, params, xs, last_output_loss, length=9)
    wrong = rj.LSTMState(jnp.zeros(3), jnp.zeros(3))
    with pytest.raises(ValueError, match="step_jacobians expects a carry shaped like"):
        step_jacobians(cell, params, xs, carry=wrong)
    with pytest.raises(ValueError, match="carry_gradients expects a carry shaped like"):
        carry_gradients(cell, params, xs, last_output_loss, carry=wrong)
    with pytest.raises(ValueError, match="leading time axis"):
        step_jacobians(cell, params, jnp.float32(1.0))
    for fn in (jacobian_norms, spectral_radii, product_norms):
        with pytest.raises(ValueError, match=r"square Jacobians of shape \(..., S, S\), got \(5,"):
            fn(jnp.ones((5, 3)))
    with pytest.raises(ValueError, match="one example.*vmap"):
        product_norms(jnp.ones((2, 5, 3, 3)))


# Plots.


def test_plots_write_pngs_and_leave_no_pyplot_figures(tmp_path):
    import matplotlib.pyplot as plt

    cell = rj.cells.elman(4)
    params = cell.init(jax.random.key(0), 2)

    @jax.jit
    @jax.vmap
    def diagnose(x):
        norms = hidden_gradients(cell, params, x, last_output_loss)
        return norms, jacobian_norms(step_jacobians(cell, params, x)), hidden_stats(cell, params, x)

    norms, jacs, stats = diagnose(jax.random.normal(jax.random.key(1), (3, 10, 2)))
    one = HiddenStats(*(field[0] for field in stats))
    open_before = plt.get_fignums()
    paths = [tmp_path / f"{name}.png" for name in ("gradients", "jacobians", "stats")]
    figures = [
        plot_gradient_norms({"elman": norms, "one example": norms[0]}, paths[0]),
        plot_jacobian_norms({"elman": jacs}, path=paths[1]),
        plot_hidden_stats({"elman": stats, "one": one}, paths[2]),
    ]
    for path, fig in zip(paths, figures, strict=True):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
        assert fig.axes[0].get_xlabel() == "step t"
    assert figures[0].axes[0].get_yscale() == "log" == figures[1].axes[0].get_yscale()
    assert len(figures[0].axes[0].get_lines()) == 2 and len(figures[2].axes) == 2
    assert plt.get_fignums() == open_before


def test_plots_draw_into_given_axes():
    from matplotlib.figure import Figure

    fig = Figure()
    left, right, top, bottom = fig.subplots(2, 2).ravel()
    assert plot_gradient_norms({"a": np.ones(4)}, ax=left) is fig
    assert plot_jacobian_norms({"a": np.ones(4)}, ax=right) is fig
    stats = HiddenStats(*(np.ones(4),) * 4)
    assert plot_hidden_stats({"a": stats}, ax=[top, bottom]) is fig
    assert len(left.get_lines()) == 1 and len(bottom.get_lines()) == 1
    with pytest.raises(ValueError, match="draws 2 panels; got 1 axes"):
        plot_hidden_stats({"a": stats}, ax=top)


def test_plot_errors():
    with pytest.raises(TypeError, match="non-empty dict of name -> values over time"):
        plot_gradient_norms([np.ones(3)])
    with pytest.raises(ValueError, match=r"\(T,\) or a batch \(B, T\), got 'a' with shape"):
        plot_jacobian_norms({"a": np.ones((2, 2, 2))})
    with pytest.raises(TypeError, match="HiddenStats values"):
        plot_hidden_stats({"a": np.ones(3)})
