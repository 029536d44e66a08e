"""The seq2seq task: its problems, teacher forcing and masking in-process; training, evaluation
and decoding through the real ``rnnjax`` command."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cli_process import finish, launch, ok, rnnjax

import rnnjax as rj
from rnnjax import cli
from rnnjax.data.text import DataError
from rnnjax.generate import greedy_decode
from rnnjax.tasks import seq2seq
from rnnjax.tasks.base import COMMON_DEFAULTS, recurrent_layers
from rnnjax.tasks.flags import generate_options
from rnnjax.tasks.seq2seq import END_ID, PAD_ID, START_ID, VOCAB

CONFIG = {"task": "seq2seq", **COMMON_DEFAULTS, **seq2seq.DEFAULTS, "hidden": 8, "batch_size": 6}
TINY = ["--steps", "20", "--hidden", "16", "--batch-size", "8", "--eval-every", "10"]
TINY += ["--checkpoint-every", "10", "--no-progress"]
ANSWER = r"(\d*) \(beam: (\d*)\)"


def config(**overrides):
    return {**CONFIG, **overrides}


def read(batch, i):
    """Row i of a batch as text: source, answer (as written, least significant digit first)."""
    source = VOCAB.decode(batch.source[i, : batch.source_len[i]])
    answer = VOCAB.decode(batch.decoder_out[i, : batch.decoder_len[i] - 1])
    return source, answer


# ----------------------------------------------------------------------------- data


def test_problems_have_the_right_answers(tmp_path):
    task = seq2seq.build(config(), tmp_path)
    for step in range(5):
        batch = task.train_data(step)
        assert batch.source.shape == (6, 7) and batch.decoder_out.shape == (6, 5)
        for i in range(6):
            source, answer = read(batch, i)
            a, b = source.split("+")
            assert len(a) <= 3 and len(b) <= 3 and a == str(int(a)) and b == str(int(b))
            assert answer[::-1] == str(int(a) + int(b))
            n = batch.decoder_len[i]
            assert n == len(answer) + 1 and batch.decoder_out[i, n - 1] == END_ID
            assert (batch.decoder_out[i, n:] == PAD_ID).all()
            assert (batch.source[i, batch.source_len[i] :] == PAD_ID).all()
    # Addressed by step: the same step gives the same batch, another step another one.
    first, again, other = task.train_data(7), task.train_data(7), task.train_data(8)
    assert all((x == y).all() for x, y in zip(first, again, strict=True))
    assert (first.source != other.source).any()
    assert seq2seq.decode_answer(first.decoder_out[0]) == str(eval(read(first, 0)[0]))


def test_validation_problems_are_fixed_distinct_and_never_trained_on():
    digits = 1  # 100 problems: a quarter held out, and training must avoid all of them
    a, b = seq2seq.validation_problems(0, digits)
    keys = set((a * 10 + b).tolist())
    assert len(a) == len(keys) == 25
    again = seq2seq.validation_problems(0, digits)
    assert (again[0] == a).all() and (again[1] == b).all()
    assert (seq2seq.validation_problems(1, digits)[0] != a).any()
    held_out = np.sort(a * 10 + b)
    seen = set()
    for step in range(200):
        batch = seq2seq.training_batch(0, step, 16, digits, held_out)
        for i in range(16):
            x, y = read(batch, i)[0].split("+")
            seen.add(int(x) * 10 + int(y))
    assert not seen & keys and len(seen) == 75  # every other problem does get trained on


def test_teacher_forcing_feeds_the_shifted_answer(tmp_path):
    batch = seq2seq.build(config(), tmp_path).train_data(0)
    for i in range(6):
        n = batch.decoder_len[i]
        assert batch.decoder_in[i, 0] == START_ID
        np.testing.assert_array_equal(batch.decoder_in[i, 1:n], batch.decoder_out[i, : n - 1])
    # The decoder is causal: what it reads at step k changes its predictions at k and after
    # only; and fed its own greedy output it predicts exactly that output, so training and
    # decoding run the same model.
    net = seq2seq.model(config())
    T = 5
    forward = jax.jit(lambda p, x: net.forward(p, batch.source[0], batch.source_len[0], x, T))
    x = jnp.asarray(batch.decoder_in[0])
    logits, changed = forward(net.params, x), forward(net.params, x.at[2].set(9))
    np.testing.assert_array_equal(logits[:2], changed[:2])
    assert not np.allclose(logits[2], changed[2])

    @jax.jit
    def decode(params):
        carry = net.encode(params, batch.source[0], batch.source_len[0])
        return greedy_decode(net.step, params, carry, START_ID, T, end_token=END_ID)

    for seed in range(3):
        params = jax.tree.map(  # a sharper random model, so that outputs vary
            lambda p, s=seed: 4 * jax.random.normal(jax.random.key(s), p.shape), net.params
        )
        out = decode(params)
        forced = forward(params, jnp.concatenate([jnp.array([START_ID]), out[:-1]]))
        stop = out.tolist().index(END_ID) + 1 if END_ID in out.tolist() else T
        np.testing.assert_array_equal(jnp.argmax(forced, -1)[:stop], out[:stop])


def test_padding_does_not_change_the_loss(tmp_path):
    task = seq2seq.build(config(), tmp_path)
    batch = task.train_data(0)
    loss_fn = jax.jit(task.loss_fn)
    loss = lambda b: float(loss_fn(task.params, b, None)[0])  # noqa: E731
    base = loss(batch)
    real_out = np.arange(5) < batch.decoder_len[:, None]
    real_src = np.arange(7) < batch.source_len[:, None]
    junk = np.random.default_rng(0).integers(0, VOCAB.size, batch.decoder_out.shape)
    junk_src = np.random.default_rng(1).integers(0, VOCAB.size, batch.source.shape)
    assert (~real_out).any() and (~real_src).any()  # there is padding to change
    padded = batch._replace(
        decoder_out=np.where(real_out, batch.decoder_out, junk),
        decoder_in=np.where(real_out, batch.decoder_in, junk),
        source=np.where(real_src, batch.source, junk_src),
    )
    assert loss(padded) == base
    # ... while any real target does.
    wrong = batch.decoder_out.copy()
    wrong[0, 0] = (wrong[0, 0] + 1) % VOCAB.size
    assert loss(batch._replace(decoder_out=wrong)) != base


def test_deep_bidirectional_encoders_bridge_into_the_decoder(tmp_path):
    task = seq2seq.build(config(cell="lstm", layers=2, bidirectional=True), tmp_path)
    assert len(task.params["bridge"]) == 2  # one projection per LSTM carry leaf: h and c
    batch = task.train_data(0)
    grads = jax.jit(jax.grad(lambda p: task.loss_fn(p, batch, None)[0]))(task.params)
    leaves = jax.tree.leaves((grads["bridge"], grads["encoder"]))
    assert len(leaves) == 2 * 2 + 2 * 2 * 3  # bridges (w, b); 2 layers x 2 directions x 3
    for leaf in leaves:
        assert np.isfinite(leaf).all() and np.abs(leaf).sum() > 0


def test_deep_encoders_of_a_complex_state_start_the_decoder_from_their_mean(tmp_path):
    """The LRU's carry is a complex state: two layers' final states are averaged, not projected
    (no bridge params), and the gradient reaches both layers through it."""
    cfg = config(cell="lru", layers=2)
    task = seq2seq.build(cfg, tmp_path)
    net = seq2seq.model(cfg)
    assert task.params["bridge"] == net.params["bridge"] == []
    batch = task.train_data(0)
    source, length = batch.source[0], batch.source_len[0]
    _, x = rj.layers.embed(VOCAB.size, seq2seq.EMBED).apply(
        net.params["embed"], source, length=length
    )
    carries, _ = recurrent_layers(cfg).apply(net.params["encoder"], x, length=length)
    carry = net.encode(net.params, source, length)
    assert jnp.iscomplexobj(carry) and carry.shape == (cfg["hidden"],)
    np.testing.assert_allclose(carry, (carries[0] + carries[1]) / 2, rtol=1e-6, atol=1e-6)
    grads = jax.jit(jax.grad(lambda p: task.loss_fn(p, batch, None)[0]))(task.params)
    for layer in grads["encoder"]:
        leaves = jax.tree.leaves(layer)
        assert all(np.isfinite(leaf).all() for leaf in leaves)
        assert sum(float(np.abs(leaf).sum()) for leaf in leaves) > 0


def test_bad_flags_and_prompts(tmp_path):
    with pytest.raises(DataError, match="--seq-len 2 does not fit.*3 to 19"):
        seq2seq.build(config(seq_len=2), tmp_path)
    with pytest.raises(DataError, match="--seq-len 21 does not fit"):
        seq2seq.build(config(seq_len=21), tmp_path)
    for prompt in ("12+3456", "12-3", "1+2+3", "+3", "a+b", "", "١+٢"):
        with pytest.raises(DataError, match=r"adds two numbers of up to 3 digits.*got"):
            seq2seq.check_prompt(prompt, 3)
    seq2seq.check_prompt("0+999", 3)


# ----------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny run, then evaluate and generate on it. The processes share a compilation cache:
    evaluate and the first generate side by side (evaluate's programs are the run's), then the
    two of seed 3 side by side, on the first's programs."""
    root = tmp_path_factory.mktemp("runs")
    out = root / "seq2seq"
    train = ok(rnnjax("train", "--task", "seq2seq", *TINY, "--out", out, cache=root))
    commands = [
        {
            "evaluate": ("evaluate", "--run", out, "--json"),
            "prompt": ("generate", "--run", out, "--prompt", "12+345"),
        },
        {
            "seed 3": ("generate", "--run", out, "--seed", "3"),
            "seed 3 again": ("generate", "--run", out, "--seed", "3"),
        },
    ]
    results = {}
    for together in commands:
        procs = {name: launch(*args, cache=root) for name, args in together.items()}
        results |= {name: ok(finish(proc)) for name, proc in procs.items()}
    return out, train, results


def test_train_writes_a_run_directory(run):
    out, stdout, _ = run
    assert {"config.json", "metrics.jsonl", "checkpoints", "loss.png"} <= {
        p.name for p in out.iterdir()
    }
    config = json.loads((out / "config.json").read_text())
    assert config["task"] == "seq2seq" and config["hidden"] == 16 and config["seq_len"] == 7
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all({"step", "split", "loss", "token_accuracy"} <= set(r) for r in rows)
    val = [r for r in rows if r["split"] == "val"]
    assert [r["step"] for r in val] == [10, 20]
    for r in val:
        assert {"exact_match", "exact_match_beam", "baseline_exact_match"} <= set(r)
        assert 0 <= r["exact_match"] <= 1 and np.isfinite(r["loss"])
    assert [r["step"] for r in rows if r["split"] == "train"] == [10, 20]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["10", "20"]
    assert (out / "loss.png").stat().st_size > 1000
    assert "validation exact match: greedy" in stdout and "baseline (always answer 9)" in stdout
    examples = re.findall(rf"^  (\d+)\+(\d+) -> {ANSWER}  \[(right|wrong, expected (\d+))\]$",
                          stdout, flags=re.M)  # fmt: skip
    assert len(examples) == 6
    for a, b, greedy, _, verdict, expected in examples:
        total = str(int(a) + int(b))
        assert verdict == "right" if greedy == total else expected == total


def test_evaluate_reports_the_last_validation(run):
    out, _, results = run
    metrics = json.loads(results["evaluate"])
    assert metrics["step"] == 20
    keys = ("loss", "token_accuracy", "exact_match", "exact_match_beam", "baseline_exact_match")
    last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["split"] == "val" and {k: metrics[k] for k in keys} == {k: last[k] for k in keys}


def test_generate_answers_a_prompt_or_a_random_problem_of_the_seed(run, tmp_path):
    out, _, results = run
    assert re.fullmatch(rf"12\+345 -> {ANSWER}\n", results["prompt"])
    problem = rf"(\d{{1,3}})\+(\d{{1,3}}) -> {ANSWER}\n"
    assert re.fullmatch(problem, results["seed 3"])
    assert results["seed 3"] == results["seed 3 again"]
    # Other seeds, other problems (in-process, untrained).
    task = seq2seq.build(config(), tmp_path)
    options = [generate_options("seq2seq", seed=s) for s in range(5)]
    problems = {task.generate(task.params, o).split(" -> ")[0] for o in options}
    assert len(problems) == 5


def test_command_errors_are_one_line(run, tmp_path, capsys):
    out, _, _ = run
    assert cli.main(["generate", "--run", str(out), "--prompt", "1+2+3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "rnnjax: error: the seq2seq model adds two numbers" in err
    target = tmp_path / "never"
    assert cli.main(["train", "--task", "seq2seq", "--tbptt", "8", "--out", str(target)]) == 2
    assert "--tbptt is a flag of the charlm task, not of seq2seq" in capsys.readouterr().err
    assert not target.exists()
