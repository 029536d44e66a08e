"""Checkpoints: exact round trips, retention, atomicity under kill -9, errors naming the leaf."""

import importlib.util
import re
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

from rnnjax.train import TrainState, init_state
from rnnjax.train.checkpoint import Checkpoints

WRITER = Path(__file__).parent / "scripts" / "checkpoint_writer.py"
OPTIMIZER = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))


def train_state(hidden=32, impl="threefry2x32", extra_param=False, drop_b=False):
    """A TrainState after two adam steps: dict and tuple params, bf16/f32/int32, a typed key."""
    key = jax.random.key(0, impl=impl)
    params = {
        "w_h": jax.random.normal(jax.random.key(1), (hidden // 4, hidden)),
        "b": (jnp.linspace(-1, 1, 3).astype(jnp.bfloat16), jnp.arange(2.0)),
    }
    if extra_param:
        params["extra"] = jnp.zeros(2)
    if drop_b:
        del params["b"]
    state = init_state(params, OPTIMIZER, key)
    for _ in range(2):
        grads = jax.tree.map(jnp.ones_like, params)
        updates, opt_state = OPTIMIZER.update(grads, state.opt_state, params)
        params = optax.apply_updates(params, updates)
        state = TrainState(params, opt_state, state.step + 1, jax.random.split(state.key)[0])
    return state


def assert_identical(restored, expected):
    """Same tree structure (NamedTuples, tuples), dtypes and bits; typed keys stay typed keys."""
    assert jax.tree.structure(restored) == jax.tree.structure(expected)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(expected), strict=True):
        assert isinstance(got, jax.Array) and got.dtype == want.dtype and got.shape == want.shape
        if jax.dtypes.issubdtype(want.dtype, jax.dtypes.prng_key):
            got, want = jax.random.key_data(got), jax.random.key_data(want)
        assert np.asarray(got).tobytes() == np.asarray(want).tobytes()


@pytest.mark.parametrize("impl", ["threefry2x32", "rbg"])
@pytest.mark.parametrize("template", ["arrays", "shapes"])
def test_round_trip_is_exact(tmp_path, impl, template):
    state = train_state(impl=impl)
    with Checkpoints(tmp_path) as ckpt:
        ckpt.save(2, state)
        assert (tmp_path / "2").is_dir()  # synchronous: on disk when save returns
    like = state if template == "arrays" else jax.eval_shape(lambda: state)
    with Checkpoints(tmp_path) as ckpt:  # a fresh instance, as after a restart
        restored = ckpt.restore(like)
    assert isinstance(restored, TrainState)
    assert isinstance(restored.opt_state[0], optax.EmptyState)
    assert isinstance(restored.opt_state[1][0], optax.ScaleByAdamState)
    assert jax.random.key_impl(restored.key) == impl
    assert_identical(restored, state)


def save_losses(ckpt, start, entries):
    for step, metrics in enumerate(entries, start):
        ckpt.save(step, {"w": jnp.full(2, step, jnp.float32)}, metrics=metrics)


def test_keeps_the_last_and_the_best(tmp_path):
    kw = dict(keep_last=2, keep_best=2, best_metric="loss", best_mode="min")
    with Checkpoints(tmp_path, **kw) as ckpt:
        losses = [5.0, 1.0, 4.0, 2.0, 3.0]
        save_losses(ckpt, 1, [{"loss": v} for v in losses] + [None, {"acc": 0.0}])
        # last two: 6 (no metrics) and 7 (no loss); best two losses: 2 (1.0) and 4 (2.0)
        assert ckpt.steps() == [2, 4, 6, 7]
        assert ckpt.best_step() == 2
        save_losses(ckpt, 8, [{"loss": float("nan")}])  # NaN is never best
        assert ckpt.steps() == [2, 4, 7, 8]
    with Checkpoints(tmp_path, **kw) as ckpt:  # the metrics are read back from disk
        save_losses(ckpt, 9, [{"loss": 0.5}])
        assert ckpt.steps() == [2, 8, 9] and ckpt.best_step() == 9
        assert ckpt.restore({"w": jnp.zeros(2)}, step=2)["w"].tolist() == [2.0, 2.0]


def test_keeps_the_highest_in_max_mode(tmp_path):
    with Checkpoints(tmp_path, keep_last=1, keep_best=1, best_metric="acc", best_mode="max") as c:
        save_losses(c, 1, [{"acc": v} for v in (0.1, 0.9, 0.5, 0.2)])
        assert c.steps() == [2, 4] and c.best_step() == 2 and c.latest_step() == 4


def test_steps_without_the_metric_are_never_best(tmp_path):
    # orbax's BestN alone keeps every checkpoint while there are at most n of them
    with Checkpoints(tmp_path, keep_last=1, keep_best=2) as ckpt:
        save_losses(ckpt, 1, [None, {"acc": 1.0}, None])
        assert ckpt.steps() == [3] and ckpt.best_step() is None


def test_keep_best_zero_keeps_only_the_last(tmp_path):
    with Checkpoints(tmp_path, keep_last=2) as ckpt:
        save_losses(ckpt, 1, [{"loss": v} for v in (1.0, 5.0, 4.0, 3.0)])
        assert ckpt.steps() == [3, 4] and ckpt.best_step() == 4


def test_bad_options():
    with pytest.raises(ValueError, match="best_mode must be one of 'min', 'max', got 'lowest'"):
        Checkpoints("unused", best_mode="lowest")
    with pytest.raises(ValueError, match="keep_last >= 1"):
        Checkpoints("unused", keep_last=0)
    assert not Path("unused").exists()


def test_metrics_and_extra(tmp_path):
    with Checkpoints(tmp_path, keep_last=5) as ckpt:
        extra = {"patience": 3, "best": 0.25, "history": [1.0, 0.5], "stop": False}
        ckpt.save(1, {"w": jnp.ones(2)}, metrics={"loss": jnp.float32(2.0)}, extra=extra)
        ckpt.save(2, {"w": jnp.ones(2)}, metrics={"loss": np.float64(1.0), "n": np.int32(4)})
        ckpt.save(3, {"w": jnp.ones(2)}, metrics={"loss": jnp.array(3.0, jnp.bfloat16)})
        assert ckpt.best_step() == 2
        assert ckpt.restore_extra(1) == extra
        assert ckpt.restore_extra() is None  # step 3 has none
        with pytest.raises(
            TypeError, match=r"metrics\['loss'\] must be a scalar, got shape \(2,\)"
        ):
            ckpt.save(4, {"w": jnp.ones(2)}, metrics={"loss": jnp.ones(2)})
        with pytest.raises(TypeError, match="extra must be JSON-serializable"):
            ckpt.save(4, {"w": jnp.ones(2)}, extra={"a": jnp.ones(2)})
        with pytest.raises(ValueError, match="step 3 is not after the latest step 3"):
            ckpt.save(3, {"w": jnp.ones(2)})
        assert ckpt.steps() == [1, 2, 3]


@pytest.mark.parametrize(
    "template, message",
    [
        (
            dict(hidden=16),
            ".params['w_h'] has shape (8, 32) float32 in the checkpoint, "
            "the template expects (4, 16) float32",
        ),
        (dict(extra_param=True), ".params['extra'] is in the template, not the checkpoint"),
        (dict(drop_b=True), "['params']['b'][0] is in the checkpoint but not in the template"),
        (
            dict(impl="rbg"),
            ".key has shape (2,) uint32 in the checkpoint, the template expects (4,)",
        ),
    ],
    ids=["shape", "extra-key", "missing-key", "key-impl"],
)
def test_mismatched_template_names_the_leaf(tmp_path, template, message):
    with Checkpoints(tmp_path) as ckpt:
        ckpt.save(3, train_state())
        with pytest.raises(ValueError, match=re.escape(message)) as info:
            ckpt.restore(train_state(**template))
        assert str(info.value).startswith("checkpoint step 3 does not match the model: ")


def test_mismatched_dtype_is_refused(tmp_path):
    with Checkpoints(tmp_path) as ckpt:
        ckpt.save(1, {"w": jnp.ones((2, 3), jnp.float32)})
        with pytest.raises(ValueError, match=re.escape("the template expects (2, 3) bfloat16")):
            ckpt.restore({"w": jnp.ones((2, 3), jnp.bfloat16)})


def test_missing_checkpoints_raise_file_not_found(tmp_path):
    missing = tmp_path / "nope"
    with Checkpoints(missing) as ckpt:
        assert ckpt.steps() == [] and ckpt.latest_step() is None and ckpt.best_step() is None
        with pytest.raises(
            FileNotFoundError, match=r"no checkpoints in .*nope; available steps: none"
        ):
            ckpt.restore({"w": jnp.zeros(2)})
    assert not missing.exists()  # reading does not create the directory
    with Checkpoints(tmp_path) as ckpt:
        save_losses(ckpt, 1, [None, None])
        pattern = r"no checkpoint for step 5 in .*; available steps: \[1, 2\]"
        with pytest.raises(FileNotFoundError, match=pattern):
            ckpt.restore({"w": jnp.zeros(2)}, step=5)
        with pytest.raises(FileNotFoundError, match=pattern):
            ckpt.restore_extra(5)


def test_a_reader_leaves_unfinished_saves_alone(tmp_path):
    with Checkpoints(tmp_path) as ckpt:
        save_losses(ckpt, 1, [None])
    unfinished = tmp_path / "2.orbax-checkpoint-tmp"  # another process may be writing it
    unfinished.mkdir()
    with Checkpoints(tmp_path) as ckpt:
        assert ckpt.steps() == [1] and ckpt.restore({"w": jnp.zeros(2)})["w"].tolist() == [1, 1]
        assert unfinished.exists()
        save_losses(ckpt, 2, [None])  # the writer cleans up, and can save step 2
        assert ckpt.steps() == [1, 2] and sorted(p.name for p in tmp_path.iterdir()) == ["1", "2"]


def load_writer():
    spec = importlib.util.spec_from_file_location("checkpoint_writer", WRITER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kill_during_a_save_keeps_the_previous_checkpoint(tmp_path):
    directory, log = tmp_path / "ckpt", tmp_path / "stderr.txt"
    with open(log, "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, str(WRITER), str(directory)],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    try:
        for expected in ("saved 1", "saving 2"):
            line = proc.stdout.readline().strip()
            assert line == expected, f"writer printed {line!r}; stderr: {log.read_text()[-2000:]}"
        deadline = time.monotonic() + 10
        while not (unfinished := [p.name for p in directory.iterdir() if ".orbax" in p.name]):
            assert time.monotonic() < deadline, "the save of step 2 never started"
            time.sleep(0.005)
        time.sleep(0.1)  # into the write of the 300 MB: 0.5 s on tmpfs, 1 s on disk
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    names = sorted(p.name for p in directory.iterdir())
    # killed mid-save: step 2 is only orbax's tmp dir ("2.orbax-checkpoint-tmp" in 0.12.8)
    assert unfinished[0].startswith("2.orbax-checkpoint-tmp") and names == ["1", *unfinished]

    small_state = load_writer().small_state()
    with Checkpoints(directory) as ckpt:
        assert ckpt.steps() == [1] and ckpt.latest_step() == 1
        assert_identical(ckpt.restore(small_state), small_state)
        assert ckpt.restore_extra() == {"epoch": 1}
        ckpt.save(2, small_state)  # a later run saves step 2 over the leftover
        assert ckpt.steps() == [1, 2]
    assert sorted(p.name for p in directory.iterdir()) == ["1", "2"]
