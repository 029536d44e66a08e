"""Training: losses, steps, truncated BPTT, regularizers, fit, faults, exact resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_scan import assert_tree_close

import rnnjax as rj
from rnnjax.data import ADDING_BASELINE_MSE, adding
from rnnjax.train import (
    EarlyStopping,
    TrainingDiverged,
    cross_entropy,
    fit,
    init_state,
    last_step,
    make_step,
    mse,
    next_token_cross_entropy,
    split_chunks,
    tbptt,
    tbptt_step,
)

ROOT = Path(__file__).resolve().parents[1]
KEY = jax.random.key(0)


# ----------------------------------------------------------------------------- losses


def test_losses_ignore_padding():
    logits = jax.random.normal(KEY, (2, 5, 3))
    labels = jnp.array([[0, 1, 2, 0, 1], [2, 2, 1, 0, 0]])
    lengths = jnp.array([3, 5])
    loss = cross_entropy(logits, labels, lengths=lengths)
    # Garbage in the padded steps changes nothing.
    junk = logits.at[0, 3:].set(1e4)
    assert float(cross_entropy(junk, labels.at[0, 3:].set(2), lengths=lengths)) == float(loss)
    # Token-level mean over the 8 real steps.
    per_step = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    np.testing.assert_allclose(loss, (per_step[0, :3].sum() + per_step[1].sum()) / 8, rtol=1e-6)
    mask = rj.train.length_mask(lengths, 5)
    assert float(cross_entropy(logits, labels, mask=mask)) == float(loss)
    pred, target = jnp.zeros((2, 5, 1)), jnp.ones((2, 5, 1)).at[0, 3:].set(100.0)
    assert float(mse(pred, target, lengths=lengths)) == 1.0
    with pytest.raises(ValueError, match="lengths= or mask=, not both"):
        mse(pred, target, lengths=lengths, mask=mask)
    with pytest.raises(ValueError, match=r"expects labels of shape \(2, 5\).*got \(2, 4\)"):
        cross_entropy(logits, labels[:, :4])


def test_many_to_one_and_language_model_losses():
    ys = jnp.arange(24.0).reshape(2, 4, 3)
    np.testing.assert_array_equal(last_step(ys, jnp.array([2, 4])), [ys[0, 1], ys[1, 3]])
    # Next-token: logits at t predict token t+1; with length n only n-1 pairs are real.
    tokens = jnp.array([[1, 2, 0, 0]])
    logits = jax.nn.one_hot(jnp.array([[2, 0, 2, 2]]), 3) * 50.0  # right at t=0 only
    assert float(next_token_cross_entropy(logits, tokens, lengths=jnp.array([2]))) < 1e-6
    assert float(next_token_cross_entropy(logits, tokens)) > 10


# ----------------------------------------------------------------------------- steps


def quadratic(params, batch, key):
    return jnp.sum((params["w"] - batch) ** 2), {"w_mean": jnp.mean(params["w"])}


def test_make_step_is_sgd_with_metrics():
    state = init_state({"w": jnp.zeros(3)}, optax.sgd(0.1), KEY)
    state2, metrics = jax.jit(make_step(quadratic, optax.sgd(0.1)))(state, jnp.ones(3))
    np.testing.assert_allclose(state2.params["w"], 0.2)  # w - 0.1 * 2 (w - 1)
    assert (
        int(state2.step) == 1
        and not (jax.random.key_data(state2.key) == jax.random.key_data(KEY)).all()
    )
    np.testing.assert_allclose(metrics["grad_norm"], 2 * np.sqrt(3), rtol=1e-6)
    assert set(metrics) == {"loss", "grad_norm", "finite", "w_mean"} and bool(metrics["finite"])


def test_clip_norm_caps_the_update():
    state = init_state({"w": jnp.zeros(4)}, optax.sgd(1.0), KEY)
    state, metrics = make_step(quadratic, optax.sgd(1.0), clip_norm=0.5)(state, 10 * jnp.ones(4))
    np.testing.assert_allclose(jnp.linalg.norm(state.params["w"]), 0.5, rtol=1e-6)
    np.testing.assert_allclose(metrics["grad_norm"], 40.0)  # reported before clipping


def test_weight_decay_and_schedules_come_from_optax():
    schedule = optax.piecewise_constant_schedule(1.0, {1: 0.0})  # lr 1, then 0
    opt = optax.chain(optax.add_decayed_weights(0.5), optax.sgd(schedule))
    step = jax.jit(make_step(lambda p, b, k: jnp.sum(p["w"] * 0.0), opt))
    state = init_state({"w": jnp.ones(2)}, opt, KEY)
    state, _ = step(state, None)
    np.testing.assert_allclose(state.params["w"], 0.5)  # pure decay: w - 1.0 * 0.5 w
    state, _ = step(state, None)
    np.testing.assert_allclose(state.params["w"], 0.5)  # the schedule reached lr 0


def test_nonfinite_step_is_skipped():
    opt = optax.adam(0.1)
    step = jax.jit(make_step(quadratic, opt))
    state = init_state({"w": jnp.zeros(2)}, opt, KEY)
    state, _ = step(state, jnp.ones(2))
    bad, metrics = step(state, jnp.array([jnp.nan, 1.0]))
    assert not bool(metrics["finite"])
    assert_tree_close((bad.params, bad.opt_state), (state.params, state.opt_state), atol=0)
    assert int(bad.step) == int(state.step) + 1  # the batch is consumed


# ----------------------------------------------------------------------------- truncated BPTT

CELL = rj.cells.lstm(4)
PARAMS = CELL.init(KEY, 2)
STREAM = jax.random.normal(jax.random.key(1), (3, 12, 2))  # (B, T, I)


def stream_loss(params, carry, chunk, key):
    xs, reset = chunk
    carry, ys = jax.vmap(lambda x, c, r: rj.scan(CELL, params, x, c, reset=r))(xs, carry, reset)
    return jnp.mean(ys**2), carry, {"carry_in_h": chunk_carry_marker(carry)}


def chunk_carry_marker(carry):
    return carry.h  # the carry at the chunk's end, reported so the test can line it up


def full_scan(params, xs, reset):
    carry0 = jax.vmap(lambda _: CELL.initial_carry(params))(xs)
    return jax.vmap(lambda x, c, r: rj.scan(CELL, params, x, c, reset=r))(xs, carry0, reset)


@pytest.mark.parametrize("k", [12, 50])
def test_tbptt_with_k_at_least_T_is_full_bptt(k):
    reset = jnp.zeros(STREAM.shape[:2], bool)
    carry0 = jax.vmap(lambda _: CELL.initial_carry(PARAMS))(STREAM)
    opt = optax.sgd(1.0)
    state = init_state(PARAMS, opt, KEY)
    state, _, metrics = jax.jit(tbptt, static_argnums=(0, 4))(
        tbptt_step(stream_loss, opt), state, carry0, (STREAM, reset), k
    )
    assert metrics["loss"].shape == (1,)
    full = jax.grad(lambda p: jnp.mean(full_scan(p, STREAM, reset)[1] ** 2))(PARAMS)
    update = jax.tree.map(lambda new, old: old - new, state.params, PARAMS)
    assert_tree_close(update, full, atol=1e-6)


def test_tbptt_chunks_carry_the_forward_state_and_truncate_gradients():
    k = 4
    reset = jnp.zeros(STREAM.shape[:2], bool).at[1, 6].set(True)  # a new sequence mid-chunk
    carry0 = jax.vmap(lambda _: CELL.initial_carry(PARAMS))(STREAM)
    opt = optax.sgd(0.0)  # params stay put, so chunk carries line up with one forward pass
    state = init_state(PARAMS, opt, KEY)
    step = tbptt_step(stream_loss, opt)
    _, carry, metrics = jax.jit(tbptt, static_argnums=(0, 4))(
        step, state, carry0, (STREAM, reset), k
    )
    carry_full, ys_full = full_scan(PARAMS, STREAM, reset)
    np.testing.assert_allclose(
        metrics["carry_in_h"], ys_full[:, k - 1 :: k].swapaxes(0, 1), atol=1e-6
    )
    assert_tree_close(carry, carry_full)
    # Row 1 restarted at t=6: from there it equals a fresh run over the rest of its stream.
    np.testing.assert_allclose(ys_full[1, 6:], rj.scan(CELL, PARAMS, STREAM[1, 6:])[1], atol=1e-6)
    # Gradients stop at chunk boundaries: the chunked gradient differs from full BPTT's.
    chunk_grads = jax.grad(
        lambda p: sum(
            stream_loss(p, c, ch, None)[0]
            for c, ch in zip(*_chunk_starts(carry_full, k, reset), strict=True)
        )
    )(PARAMS)
    full = jax.grad(lambda p: jnp.mean(full_scan(p, STREAM, reset)[1] ** 2) * 3)(PARAMS)
    assert not np.allclose(chunk_grads["w_h"], full["w_h"], atol=1e-6)


def _chunk_starts(carry_full, k, reset):
    """The stop-gradient carries at chunk starts and the chunks, for a truncated-gradient sum."""
    _, ys = full_scan(PARAMS, STREAM, reset)
    chunks = split_chunks((STREAM, reset), k)
    carries = []
    carry = jax.vmap(lambda _: CELL.initial_carry(PARAMS))(STREAM)
    for i in range(STREAM.shape[1] // k):
        carries.append(carry)
        carry = stream_loss(PARAMS, carry, jax.tree.map(lambda a, i=i: a[i], chunks), None)[1]
        carry = jax.lax.stop_gradient(carry)
    return carries, [jax.tree.map(lambda a, i=i: a[i], chunks) for i in range(len(carries))]


def test_split_chunks_rejects_ragged_streams():
    with pytest.raises(
        ValueError, match="12 steps does not divide into chunks of 5: trim it to 10"
    ):
        split_chunks(STREAM, 5)


# ----------------------------------------------------------------------------- regularizers


def mask_probe(hidden=6):
    """A cell whose output is the recurrent mask it was given (ones without one)."""

    def step(params, h, x, *, recurrent_mask=None):
        mask = jnp.ones(hidden) if recurrent_mask is None else recurrent_mask
        return h, mask + 0.0 * x.sum()

    return rj.Cell(
        lambda k, i: {"w_h": jnp.zeros((hidden, hidden))}, lambda p: jnp.zeros(hidden), step
    )


def test_variational_recurrent_dropout_masks():
    layer = rj.layers.batched(rj.layers.rnn(mask_probe(), recurrent_dropout=0.5))
    xs = jnp.ones((4, 5, 2))
    params = layer.init(KEY, 2)
    _, masks = layer.apply(params, xs, key=jax.random.key(1))  # (B, T, H)
    # One mask per sequence, the same at every step; values are 0 or 1 / (1 - p).
    assert (masks == masks[:, :1]).all()
    assert set(np.unique(masks).tolist()) <= {0.0, 2.0} and {0.0, 2.0} <= set(
        np.unique(masks).tolist()
    )
    # Different sequences, different masks; a different key (next training step), new masks.
    assert len({tuple(m) for m in np.asarray(masks[:, 0])}) > 1
    _, masks2 = layer.apply(params, xs, key=jax.random.key(2))
    assert not (masks2 == masks).all()
    # Off at evaluation.
    _, eval_masks = layer.apply(params, xs)
    assert (eval_masks == 1).all()


def test_training_steps_draw_new_masks():
    layer = rj.layers.batched(rj.layers.rnn(mask_probe(), recurrent_dropout=0.5))
    params = layer.init(KEY, 2)

    def loss(params, xs, key):
        _, masks = layer.apply(params, xs, key=key)
        return jnp.sum(params["w_h"]), {"mask": masks[0, 0]}

    opt = optax.sgd(0.1)
    step = jax.jit(make_step(loss, opt))
    state = init_state(params, opt, KEY)
    state, m1 = step(state, jnp.ones((2, 3, 2)))
    _, m2 = step(state, jnp.ones((2, 3, 2)))
    assert not (m1["mask"] == m2["mask"]).all()


@pytest.mark.parametrize("name", ["elman", "lstm", "gru", "gru_before"])
def test_recurrent_mask_drops_h_where_it_meets_w_h(name):
    cell = {
        "elman": rj.cells.elman(4),
        "lstm": rj.cells.lstm(4),
        "gru": rj.cells.gru(4),
        "gru_before": rj.cells.gru(4, reset_after=False),
    }[name]
    params = cell.init(KEY, 3)
    carry = jax.tree.map(lambda a: a + 0.7, cell.initial_carry(params))
    mask = jnp.array([2.0, 0.0, 2.0, 0.0])
    x = jnp.ones(3)
    got = cell.step(params, carry, x, recurrent_mask=mask)
    # Same as scaling the rows of W_h: (h * m) @ W_h == h @ (diag(m) W_h)
    want = cell.step({**params, "w_h": mask[:, None] * params["w_h"]}, carry, x)
    assert_tree_close(got, want, atol=1e-6)
    assert not np.allclose(got[1], cell.step(params, carry, x)[1])


def test_input_dropout_reuses_one_mask_per_sequence():
    cell = rj.cells.elman(3, recurrent_init=jax.nn.initializers.zeros)
    layer = rj.layers.rnn(cell, input_dropout=0.5)
    params = layer.init(KEY, 8)
    _, ys = layer.apply(params, jnp.ones((4, 8)), key=jax.random.key(3))
    _, ys_eval = layer.apply(params, jnp.ones((4, 8)))
    assert (ys == ys[:1]).all() and not np.allclose(ys, ys_eval)  # W_h = 0: y_t depends on x_t only


def test_zoneout():
    cell = rj.cells.gru(16)  # carry == output, so every zoned-out state is observable
    params = cell.init(KEY, 3)
    xs = jax.random.normal(KEY, (5, 3))
    layer = rj.layers.rnn(cell, zoneout=0.3)
    carry, ys = layer.apply(params, xs, key=jax.random.key(4))
    np.testing.assert_array_equal(carry, ys[-1])
    # Each unit at each step is either its previous value or the freshly computed one.
    h_prev, kept, fresh = cell.initial_carry(params), 0, 0
    for t in range(5):
        new, _ = cell.step(params, h_prev, xs[t])
        same_old = np.isclose(ys[t], h_prev, atol=1e-6)
        same_new = np.isclose(ys[t], new, atol=1e-6)
        assert (same_old | same_new).all()
        kept, fresh, h_prev = kept + same_old.sum(), fresh + same_new.sum(), ys[t]
    assert 0.1 < kept / (kept + fresh) < 0.6
    # Without a key: the expectation, 0.3 * old + 0.7 * new.
    h0 = cell.initial_carry(params)
    new, _ = cell.step(params, h0, xs[0])
    carry, _ = layer.apply(params, xs[:1])
    np.testing.assert_allclose(carry, 0.3 * h0 + 0.7 * new, atol=1e-6)


# ----------------------------------------------------------------------------- fit


def adding_setup(length=10, hidden=16, lr=1e-2):
    encoder, head = rj.layers.rnn(rj.cells.lstm(hidden)), rj.layers.dense(1)
    k1, k2 = jax.random.split(KEY)
    params = {"encoder": encoder.init(k1, 2), "head": head.init(k2, hidden)}

    def loss_fn(params, batch, key):
        xs, targets = batch
        h = jax.vmap(lambda x: encoder.apply(params["encoder"], x)[0].h)(xs)
        return mse(h @ params["head"]["w"][:, 0] + params["head"]["b"][0], targets)

    opt = optax.adam(lr)
    val = adding(jax.random.key(99), 256, length)
    data = lambda step: adding(jax.random.fold_in(KEY, step), 32, length)  # noqa: E731
    evaluate = jax.jit(lambda p: {"loss": loss_fn(p, val, None)})
    return make_step(loss_fn, opt, clip_norm=1.0), init_state(params, opt, KEY), data, evaluate


def test_lstm_learns_the_adding_problem(tmp_path):
    step, state, data, evaluate = adding_setup()
    result = fit(
        step,
        state,
        data,
        steps=300,
        eval_fn=evaluate,
        eval_every=100,
        out_dir=tmp_path,
        checkpoint_every=100,
        progress=False,
    )
    val = float(evaluate(result.state.params)["loss"])
    assert val < ADDING_BASELINE_MSE / 10, val
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all({"step", "split", "loss"} <= set(r) for r in rows)
    train = [r for r in rows if r["split"] == "train"]
    assert {"step", "split", "loss", "grad_norm"} <= set(train[0])
    assert [r["step"] for r in rows if r.get("split") == "val"] == [100, 200, 300]
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert rj.train.Checkpoints(tmp_path / "checkpoints").steps() == [100, 200, 300]


def test_early_stopping_stops_fit(tmp_path):
    step, state, data, _ = adding_setup()
    worsening = iter(range(100))
    result = fit(
        step,
        state,
        data,
        steps=1000,
        eval_fn=lambda p: {"loss": float(next(worsening))},
        eval_every=5,
        early_stopping=EarlyStopping(patience=2),
        out_dir=tmp_path,
        progress=False,
        checkpoint_every=5,
        keep_last=1,
        keep_best=1,
    )
    assert result.stopped == "early_stopping" and int(result.state.step) == 15
    ckpt = rj.train.Checkpoints(tmp_path / "checkpoints", keep_last=1, keep_best=1)
    assert ckpt.best_step() == 5 and ckpt.steps() == [5, 15]


def test_planted_nan_batch_is_skipped(tmp_path):
    step, state, data, _ = adding_setup()
    nan_at = 7

    def poisoned(i):
        xs, ys = data(i)
        return (xs.at[0, 0, 0].set(jnp.nan), ys) if i == nan_at else (xs, ys)

    before = fit(step, state, poisoned, steps=nan_at, progress=False).state
    result = fit(
        step,
        state,
        poisoned,
        steps=12,
        out_dir=tmp_path,
        checkpoint_every=4,
        log_every=1,
        progress=False,
    )
    assert result.skipped_steps == 1
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [(e["event"], e["step"]) for e in events] == [("skipped_nonfinite", nan_at + 1)]
    # Step 8 (batch 7) did not touch the params: replaying it gives the params after batch 6.
    after = fit(step, state, poisoned, steps=nan_at + 1, progress=False).state
    assert_tree_close(after.params, before.params, atol=0)
    # No checkpoint is written on the bad step itself; the later ones hold finite params.
    ckpt = rj.train.Checkpoints(tmp_path / "checkpoints")
    assert ckpt.steps() == [4, 12]
    restored = ckpt.restore(state, step=12)
    assert_tree_close(restored.params, result.state.params, atol=0)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(restored.params))


def test_consecutive_nonfinite_steps_stop_the_run(tmp_path):
    step, state, data, _ = adding_setup()
    broken = lambda i: data(i) if i < 4 else (jnp.full((32, 10, 2), jnp.nan), data(i)[1])  # noqa: E731
    with pytest.raises(
        TrainingDiverged, match=r"3 consecutive steps.*steps 5\.\.7.*of step 4.*checkpoints/4"
    ):
        fit(
            step,
            state,
            broken,
            steps=20,
            out_dir=tmp_path,
            checkpoint_every=2,
            max_bad_steps=3,
            progress=False,
        )


def test_sigkill_then_resume_is_bit_identical(tmp_path):
    """Killed once a checkpoint at step >= 100 of 300 exists (the next comes every 50 steps),
    resumed to the end: the final params are those of a run never killed, bit for bit. The
    three processes share a compilation cache: they compile the same programs."""
    cmd = [
        sys.executable, str(ROOT / "examples" / "adding_problem.py"), "--length", "10",
        "--hidden", "16", "--steps", "300", "--checkpoint-every", "50", "--eval-every", "100",
        "--no-progress",
    ]  # fmt: skip
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **compilation_cache(tmp_path / "jax-cache")}
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    proc = subprocess.Popen(
        [*cmd, "--out", str(killed)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        done = [int(p.name) for p in (killed / "checkpoints").glob("[0-9]*") if p.name.isdigit()]
        if done and max(done) >= 100:
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed / "final_params.npz").exists()
    resumed = subprocess.run(
        [*cmd, "--out", str(killed)], env=env, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    subprocess.run(
        [*cmd, "--out", str(clean)], env=env, check=True, capture_output=True, timeout=300
    )
    a, b = np.load(killed / "final_params.npz"), np.load(clean / "final_params.npz")
    assert sorted(a.files) == sorted(b.files) and len(a.files) == 5
    for name in a.files:
        assert a[name].tobytes() == b[name].tobytes(), name
    resume_rows = [
        r
        for r in map(json.loads, (killed / "events.jsonl").read_text().splitlines())
        if r.get("event") == "resume"
    ]
    assert len(resume_rows) == 1 and 100 <= resume_rows[0]["step"] < 300


def compilation_cache(directory):
    """Environment variables that make JAX processes share compiled programs in
    ``directory`` (every program, however small or quick to compile)."""
    return {
        "JAX_COMPILATION_CACHE_DIR": str(directory),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }


def test_plots_leave_matplotlibs_backend_alone(tmp_path):
    """Writing loss.png must not switch the process's backend (in a notebook that would stop
    every later inline plot)."""
    import matplotlib

    from rnnjax.train.fit import plot_losses

    before = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        metrics = tmp_path / "metrics.jsonl"
        rows = [{"step": s, "split": "train", "loss": 1.0 / s} for s in (1, 2, 3)]
        metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
        plot_losses(metrics, tmp_path / "loss.png")
        assert matplotlib.get_backend() == "svg"
        assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        matplotlib.use(before)
