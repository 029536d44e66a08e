"""Contracts of remat= in rnnjax.scan and rnnjax.loop, and the memory benchmark suite.

Every remat mode must give the outputs, final carry and BPTT gradients (w.r.t. params, inputs
and the starting carry) of remat=False, in every masking mode, under vmap; and checkpointing must
really shrink what XLA keeps for the backward pass.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cases import CELLS, I, T, pair_input_cell
from test_scan import MASK, assert_tree_close, by_hand, nonzero_carry

import rnnjax as rj
from rnnjax.bench.memory import memory, plot_memory, remat_of
from rnnjax.cells import _native as native_kernels

# remat values over T = 6 steps: per step, k = 1, k dividing T (2 = "sqrt", 3), k not dividing T
# (4: the last segment is padded), k = T (one segment) and k > T (clamped to T).
REMATS = [True, 1, 3, 4, T + 5, "sqrt"]
# (run, cell, remat): every remat value on the LSTM; each code path on the other cells and on
# loop (whose compiles are slow: it is unrolled; test_scan covers its remat=True), to keep the
# file's compile time small.
CASES = (
    [(rj.scan, "lstm", remat) for remat in REMATS]
    + [(rj.scan, cell, remat) for cell in ["gru", "elman_tanh"] for remat in [True, 4, "sqrt"]]
    + [(rj.loop, "lstm", 4)]
)
B = 3
LENGTHS = np.array([T, 4, 0])
MASKS = np.stack([MASK, ~MASK, np.ones(T, bool)])
RESETS = np.stack(
    [
        np.eye(T, dtype=bool)[2],
        np.zeros(T, bool),
        np.eye(T, dtype=bool)[4] | np.eye(T, dtype=bool)[T - 1],
    ]
)

# Each mode: the keywords of one example's scan, from its row of the batched flags above.
MODES = {
    "plain": lambda n, m, r: {},
    "reverse": lambda n, m, r: {"reverse": True},
    "length_reset": lambda n, m, r: {"length": n, "reset": r},
    "mask_reset_reverse": lambda n, m, r: {"mask": m, "reset": r, "reverse": True},
}


@functools.cache
def bptt(run, cell_name, remat):
    """jit(value_and_grad) of a loss over every mode at once, batched with vmap: one compile per
    (run, cell, remat)."""
    cell = CELLS[cell_name]()

    def loss(params, xs, carry0, weights):
        total, outputs = 0.0, []
        for make in MODES.values():

            def one(x, c, n, m, r, make=make):
                return run(cell, params, x, c, remat=remat, **make(n, m, r))

            carry, ys = jax.vmap(one)(xs, carry0, LENGTHS, MASKS, RESETS)
            leaves = jax.tree.leaves(carry)
            total += jnp.sum(weights * ys) + sum(jnp.sum(jnp.sin(h)) for h in leaves)
            outputs.append((carry, ys))
        return total, outputs

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


@functools.cache
def inputs(cell_name):
    cell = CELLS[cell_name]()
    params = cell.init(jax.random.key(0), I)
    xs = jax.random.normal(jax.random.key(1), (B, T, I))
    carry0 = jax.tree.map(lambda a: jnp.stack([a] * B), nonzero_carry(cell, params))
    weights = jax.random.normal(jax.random.key(2), (B, T, 4))
    return params, xs, carry0, weights


@pytest.mark.parametrize(
    ("run", "cell_name", "remat"),
    CASES,
    ids=[f"{run.__name__}-{cell}-{remat}" for run, cell, remat in CASES],
)
def test_remat_equals_no_remat(run, cell_name, remat):
    args = inputs(cell_name)
    (loss, outputs), grads = bptt(run, cell_name, remat)(*args)
    (loss_ref, outputs_ref), grads_ref = bptt(rj.scan, cell_name, False)(*args)
    assert_tree_close(outputs, outputs_ref, atol=1e-6)
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-6)
    assert_tree_close(grads, grads_ref, atol=2e-5, rtol=1e-5)  # params, xs, starting carry
    # Padded outputs are exactly zero (example 1 has 4 real steps, example 2 none).
    _, ys = outputs[list(MODES).index("length_reset")]
    assert (np.asarray(ys)[1, 4:] == 0).all() and (np.asarray(ys)[2] == 0).all()


@pytest.mark.parametrize("remat", [4, "sqrt"], ids=str)
def test_remat_equals_stepping_by_hand(remat):
    cell = CELLS["lstm"]()
    params = cell.init(jax.random.key(0), I)
    xs = jax.random.normal(jax.random.key(1), (T, I))
    carry0 = nonzero_carry(cell, params)
    for kwargs, visits in [
        ({"length": 5}, [0, 1, 2, 3, 4]),
        ({"reverse": True, "mask": MASK}, [5, 3, 2, 0]),
    ]:
        got = rj.scan(cell, params, xs, carry0, remat=remat, **kwargs)
        assert_tree_close(got, by_hand(cell, params, xs, carry0, visits))


@pytest.mark.parametrize("steps", [0, 1, 2])
@pytest.mark.parametrize("remat", [True, 3, "sqrt"], ids=str)
@pytest.mark.parametrize("run", [rj.scan, rj.loop], ids=["scan", "loop"])
def test_short_sequences(run, remat, steps):
    cell = CELLS["gru"]()
    params = cell.init(jax.random.key(0), I)
    xs = jax.random.normal(jax.random.key(1), (steps, I))
    carry0 = nonzero_carry(cell, params)
    got = run(cell, params, xs, carry0, remat=remat)
    assert_tree_close(got, rj.scan(cell, params, xs, carry0))
    assert got[1].shape == (steps, 4)


def test_remat_with_unroll_and_pytree_inputs():
    cell0, cell = pair_input_cell(3)
    params = cell.init(jax.random.key(0), 2)
    a = jax.random.normal(jax.random.key(1), (7, 2))
    b = jax.random.normal(jax.random.key(2), (7, 2))
    want = rj.scan(cell0, params, a * b, length=6)
    for remat, unroll in [(3, 2), (3, True), ("sqrt", 4)]:
        got = rj.scan(cell, params, (a, b), length=6, remat=remat, unroll=unroll)
        assert_tree_close(got, want)
        assert_tree_close(rj.loop(cell, params, (a, b), length=6, remat=remat), want)


def test_rnn_layer_passes_remat_through():
    layer = rj.layers.rnn(rj.cells.lstm(4), remat="sqrt", reverse=True)
    params = layer.init(jax.random.key(0), I)
    xs = jax.random.normal(jax.random.key(1), (T, I))
    want = rj.layers.rnn(rj.cells.lstm(4), reverse=True).apply(params, xs, length=4)
    assert_tree_close(layer.apply(params, xs, length=4), want)


def test_jitted_segment_scan_compiles_once():
    cell = CELLS["lstm"]()
    params = cell.init(jax.random.key(0), I)
    traces = []

    @jax.jit
    def run(params, xs, n):
        traces.append(1)
        return rj.scan(cell, params, xs, length=n, remat=4)

    for seed, n in enumerate([6, 3, 0]):
        run(params, jax.random.normal(jax.random.key(seed), (T, I)), n)
    assert len(traces) == 1


@pytest.mark.parametrize("bad", [0, -1, "sqrt2", 1.5, None, "True"])
@pytest.mark.parametrize("where", ["scan", "loop", "rnn"])
def test_bad_remat_names_what_was_expected(where, bad):
    cell = CELLS["lstm"]()
    params = cell.init(jax.random.key(0), I)
    call = {
        "scan": lambda: rj.scan(cell, params, jnp.ones((T, I)), remat=bad),
        "loop": lambda: rj.loop(cell, params, jnp.ones((T, I)), remat=bad),
        "rnn": lambda: rj.layers.rnn(cell, remat=bad),
    }[where]
    prefix = {"scan": "rnnjax.scan", "loop": "rnnjax.loop", "rnn": "rnn"}[where]
    message = (
        f"{prefix} expects remat to be True or False, a positive int k (keep the carry every "
        f"k steps) or 'sqrt' (k = round(sqrt(T))), got {bad!r}"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        call()


def test_numpy_int_remat_is_accepted():
    cell = CELLS["gru"]()
    params = cell.init(jax.random.key(0), I)
    xs = jnp.ones((T, I))
    assert_tree_close(rj.scan(cell, params, xs, remat=np.int64(4)), rj.scan(cell, params, xs))


@pytest.mark.parametrize("kernels", ["native", "scan"])
def test_checkpointing_shrinks_what_bptt_keeps(kernels):
    """XLA's static estimate of the gradient's temporaries at T = 1024: per-step remat keeps
    less than plain BPTT, sqrt(T) checkpointing several times less. The native kernels'
    checkpointed gradient holds one copy of the outputs ys (their cotangent 2 ys is written
    over them: ys is the replay call's only output) plus the input gradient; the step scan's
    holds ys and 2 ys side by side."""
    if kernels == "native" and not native_kernels.ready():
        pytest.skip(f"no native kernels here: {native_kernels.unavailable_reason()}")
    cell = rj.cells.lstm(16)
    if kernels == "scan":
        cell = cell._replace(sequence=None)
    params = cell.init(jax.random.key(0), 4)
    xs = jnp.ones((2, 1024, 4))

    def temp_bytes(remat):
        def loss(params, xs):
            _, ys = jax.vmap(lambda x: rj.scan(cell, params, x, remat=remat))(xs)
            return jnp.sum(ys**2)

        compiled = jax.jit(jax.grad(loss)).lower(params, xs).compile()
        if kernels == "native":
            assert ("rnnjax_lstm_replay" in compiled.as_text()) == (remat is not False)
        return compiled.memory_analysis().temp_size_in_bytes

    plain, step, sqrt = temp_bytes(False), temp_bytes(True), temp_bytes("sqrt")
    assert plain > step > sqrt
    assert plain > 4 * sqrt, (plain, step, sqrt)
    ys_bytes, xs_bytes = xs.shape[0] * 1024 * 16 * 4, xs.size * 4
    if kernels == "native":
        assert sqrt < ys_bytes + xs_bytes + ys_bytes // 4, (sqrt, ys_bytes)
    else:
        assert sqrt > 2 * ys_bytes, (sqrt, ys_bytes)


# The memory benchmark suite, at tiny sizes.


def test_remat_of_modes():
    assert [remat_of(m) for m in ("none", "step", "sqrt", "64", 8)] == [False, True, "sqrt", 64, 8]
    for bad in ("half", "0", 0, -3, True):
        with pytest.raises(ValueError, match="'none', 'step', 'sqrt' or a positive int"):
            remat_of(bad)


def test_memory_suite_runs_each_mode_in_its_own_process(tmp_path):
    messages = []
    result = memory(
        lengths=(64,), hidden=8, batch=2, input_size=3, modes=("none", 8), repeats=1,
        progress=messages.append,
    )  # fmt: skip
    assert {"suite", "schema", "command", "config", "machine", "methodology", "results"} <= set(
        result
    )
    assert result["suite"] == "memory" and result["config"]["modes"] == ["none", "8"]
    assert result["config"]["kernels"] == "native"  # the LSTM as built: rnnjax's kernels
    assert result["command"].startswith("rnnjax.bench.memory(cell='lstm', lengths=[64]")
    rows = result["results"]
    assert [(r["T"], r["mode"], r["remat"], r["status"]) for r in rows] == [
        (64, "none", False, "ok"),
        (64, "8", 8, "ok"),
    ]
    assert [r["k"] for r in rows] == [None, 8]
    for row in rows:
        assert row["finite"] is True
        assert row["peak_rss_bytes"] >= row["ready_rss_bytes"] > row["baseline_rss_bytes"] > 2**20
        assert row["memory"]["temp_bytes"] > 0 and row["memory"]["argument_bytes"] > 0
        assert row["compile_s"] > 0 and row["time_s"] > 0 and len(row["times_s"]) == 1
    assert len(messages) == 2 and messages[1].startswith("T=64 8: peak RSS")
    plot_memory(result, tmp_path / "memory.png")
    assert (tmp_path / "memory.png").read_bytes()[:4] == b"\x89PNG"


def test_memory_suite_reports_timeouts_and_bad_arguments(tmp_path):
    result = memory(lengths=(64,), hidden=8, modes=("sqrt",), timeout=0.05)
    [row] = result["results"]
    assert row["status"] == "timed out" and row["wall_s"] < 30
    plot_memory(result, tmp_path / "memory.png")  # nothing measured: still a figure
    for kwargs, match in [
        ({"modes": ("half",)}, "'none', 'step', 'sqrt' or a positive int"),
        ({"cell": "rnn"}, "cell to be one of lstm, gru, elman, mingru, .*; got 'rnn'"),
        ({"loss": "mean"}, "loss to be one of outputs, outputs_in_scan, final; got 'mean'"),
        ({"kernels": "cuda"}, "kernels to be one of native, scan; got 'cuda'"),
        ({"lengths": (0,)}, "each length to be a positive int, got 0"),
        ({"timeout": 0}, "timeout to be positive seconds, got 0"),
    ]:
        with pytest.raises(ValueError, match=match):
            memory(**kwargs)
