"""The classify task: its generator, padding and masking (padded steps cannot change a
prediction, the backward direction starts at the last real step) and the real ``rnnjax``
command on a tiny run."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cli_process import rows, train_evaluate_resume

import rnnjax as rj
from rnnjax import cli
from rnnjax.data.batching import pad
from rnnjax.data.synthetic import majority
from rnnjax.tasks import classify
from rnnjax.tasks.base import COMMON_DEFAULTS

ARGS = ["--task", "classify", "--hidden", "8", "--seq-len", "12", "--batch-size", "8"]
ARGS += ["--bidirectional", "--eval-every", "5", "--checkpoint-every", "0", "--no-progress"]


def config(**overrides):
    return {"task": "classify", **COMMON_DEFAULTS, **classify.DEFAULTS, "hidden": 8, **overrides}


# ----------------------------------------------------------------------------- the data


def test_labels_follow_the_rule():
    seqs, labels = majority(np.random.default_rng(0), 2000, 5, 20, symbols=3)
    lengths = np.array([len(s) for s in seqs])
    assert lengths.min() == 5 and lengths.max() == 20
    for seq, label in zip(seqs, labels, strict=True):
        counts = np.bincount(seq, minlength=3)
        assert counts.max() == counts[label] and (counts == counts.max()).sum() == 1
    assert np.bincount(labels).min() > 600  # balanced classes, no tie-break bias
    again, _ = majority(np.random.default_rng(0), 2000, 5, 20, symbols=3)
    assert all(np.array_equal(a, b) for a, b in zip(seqs, again, strict=True))


def test_generator_rejects_bad_lengths():
    with pytest.raises(ValueError, match="majority needs 1 <= min_len <= max_len"):
        majority(np.random.default_rng(0), 4, 10, 5)


def test_batches_are_bucketed_padded_and_addressed_by_step(tmp_path):
    task = classify.build(config(seq_len=40, batch_size=16), tmp_path)
    widths = set()
    for step in range(30):
        tokens, lengths, labels = task.train_data(step)
        assert tokens.shape[0] == lengths.shape[0] == labels.shape[0] == 16
        assert tokens.shape[1] % 10 == 0 and lengths.max() <= tokens.shape[1] <= 40
        assert lengths.min() >= 10
        widths.add(tokens.shape[1])
        # Bucketed: a batch's lengths span much less than the whole range [10, 40].
        assert lengths.max() - lengths.min() < 15
    assert widths <= {10, 20, 30, 40} and len(widths) >= 3
    a, b = task.train_data(7), task.train_data(7)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_baseline_is_the_majority_class(tmp_path):
    task = classify.build(config(seq_len=12), tmp_path)
    val = task.evaluate(task.params)
    assert {"loss", "accuracy", "baseline_accuracy"} <= set(val)
    assert 0.3 < float(val["baseline_accuracy"]) < 0.4  # 3 balanced classes


# ----------------------------------------------------------------------------- masking


@pytest.mark.parametrize(
    ("cell", "layers", "bidirectional"), [("lstm", 2, True), ("gru", 1, False), ("elman", 1, True)]
)
def test_padded_steps_cannot_change_the_prediction(cell, layers, bidirectional):
    cfg = config(seq_len=16, bidirectional=bidirectional, cell=cell, layers=layers)
    init, apply = classify.model(cfg)
    params = init(jax.random.key(0))
    seqs, _ = majority(np.random.default_rng(1), 6, 4, 16)
    tokens, lengths = pad(seqs, length=16)
    noise = np.random.default_rng(2).integers(0, 3, tokens.shape)
    pads = np.arange(16) >= lengths[:, None]
    noisy = np.where(pads, noise, tokens)
    assert (noisy != tokens).any()
    run = jax.jit(jax.vmap(lambda t, n: apply(params, t, n)))
    padded, changed = run(tokens, lengths), run(noisy, lengths)
    assert padded.shape == (6, 3)
    np.testing.assert_array_equal(padded, changed)
    for i, seq in enumerate(seqs[:2]):  # the same as the unpadded sequence, alone
        np.testing.assert_allclose(padded[i], apply(params, jnp.asarray(seq)), atol=1e-5)


def test_backward_direction_starts_at_the_last_real_step():
    cfg = config(seq_len=16, bidirectional=True, hidden=6)
    init, apply = classify.model(cfg)
    params = init(jax.random.key(3))
    seq = np.array([0, 2, 1, 1, 2, 0, 0], np.int32)
    tokens, lengths = pad([seq], length=16)
    x = jax.nn.one_hot(seq, 3)
    lstm = rj.layers.rnn(rj.cells.lstm(6))
    layer = params["body"][0]
    fwd, _ = lstm.apply(layer["fwd"], x)
    bwd, _ = lstm.apply(layer["bwd"], x[::-1])  # reads the real steps last to first
    features = jnp.concatenate([fwd.h, bwd.h])
    expected = features @ params["head"]["w"] + params["head"]["b"]
    got = apply(params, jnp.asarray(tokens[0]), jnp.asarray(lengths[0]))
    np.testing.assert_allclose(got, expected, atol=1e-5)
    # Reading the padding first (a plain reverse of the padded row) would give other logits.
    wrong, _ = lstm.apply(layer["bwd"], jax.nn.one_hot(tokens[0][::-1], 3))
    wrong = jnp.concatenate([fwd.h, wrong.h]) @ params["head"]["w"] + params["head"]["b"]
    assert not np.allclose(wrong, expected, atol=1e-3)


# ----------------------------------------------------------------------------- the real CLI


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A bidirectional run of 10 steps; then its checkpoint evaluated (on a copy), the run
    resumed to 15, and the same run trained 15 steps without a stop, all three at once."""
    root = tmp_path_factory.mktemp("runs")
    out, straight = root / "classify", root / "straight"
    seen = train_evaluate_resume(ARGS, root, out, straight, 10, 15)
    return out, seen, straight


def test_train_writes_a_run_directory(runs):
    out, seen, _ = runs
    assert {"config.json", "metrics.jsonl", "checkpoints", "loss.png"} <= set(seen["files"])
    saved = json.loads((out / "config.json").read_text())
    assert saved["task"] == "classify" and saved["bidirectional"] is True
    lines = seen["metrics"]
    assert all({"step", "split", "loss", "accuracy"} <= set(r) for r in lines)
    assert [r["step"] for r in lines if r["split"] == "val"] == [5, 10]
    assert "baseline_accuracy" in lines[-1]
    assert (out / "loss.png").stat().st_size > 1000
    assert "for always answering the majority class" in seen["train"]


def test_evaluate_json_is_the_checkpoint(runs):
    _, seen, _ = runs
    evaluated = seen["evaluate"]
    assert {"loss", "accuracy", "baseline_accuracy"} <= set(evaluated)
    last_val = seen["metrics"][-1]
    assert evaluated["step"] == 10 and evaluated["loss"] == last_val["loss"]
    assert evaluated["accuracy"] == last_val["accuracy"]


def test_resume_continues_the_same_run(runs):
    out, _, uninterrupted = runs
    assert [e["step"] for e in rows(out / "events.jsonl") if e["event"] == "resume"] == [10]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["10", "15"]
    resumed = [r for r in rows(out / "metrics.jsonl") if r["split"] == "val"]
    assert [r["step"] for r in resumed] == [5, 10, 15]
    assert resumed == [r for r in rows(uninterrupted / "metrics.jsonl") if r["split"] == "val"]


def test_tbptt_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--task", "classify", "--tbptt", "4", "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "rnnjax: error: --tbptt is a flag of the charlm task, not of classify: drop it "
        "(rnnjax train --task classify --help lists the flags classify takes)"
    ]
    assert not out.exists()
