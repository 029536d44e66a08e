"""A character language model: learn to predict the next character of a text, measure it in
bits per character against the unigram baseline, and sample new text at a temperature.

The text is found offline: the docstrings of your Python's standard library
(``rnnjax.data.text.stdlib_corpus``), or any UTF-8 file with ``--data FILE``. The last 5% is held
out. The model embeds each character, runs an LSTM over the sequence and reads out logits over
the vocabulary at every step (many-to-many); the loss at step t is the cross-entropy of
character t + 1. The unigram baseline predicts every character with its frequency in the
training text, ignoring context; bits per character (bpc) is the cross-entropy in base 2.

Training reads random windows of ``--seq-len`` characters with full backpropagation through
time. With ``--tbptt K`` it reads the training text as ``--batch-size`` contiguous streams
instead, K characters per step, the carry flowing from one step to the next and gradients
stopping at step boundaries (truncated BPTT); the carry restarts when a stream wraps around.

rnnjax parts used: ``rnnjax.data.text`` (``stdlib_corpus``, ``read_text``, ``CharVocab``),
``rj.layers.embed``/``rnn``/``dense``, ``rnnjax.train.cross_entropy``, ``make_step`` or
``tbptt_step`` + ``stream_step``, ``fit`` (``--out DIR``: orbax checkpoints and resume) and
``rnnjax.generate.sample`` (temperature, top-k, nucleus).

    python examples/char_lm.py [--data FILE] [--steps 1500] [--hidden 256] [--tbptt 100]
                               [--temperature 0.8] [--prompt "The "] [--out runs/char_lm]

Default run (a 256-unit LSTM, 1500 steps of 32 windows of 100 characters), measured on a
2-core CPU (jax 0.10.2) shared with other jobs: 173 s wall (251 s when the machine was busier),
and (one line in the output)

    held-out bits per character 2.1482 (unigram baseline 4.7368)

after a sample that starts "The according the event line of the processed to copy of the first
as a Py...". With ``--tbptt 100`` (the same 1500 steps of 32 x 100 characters, read as
streams): 2.2161 bits per character, 213 s wall. Shrink it with ``--steps``, ``--hidden``,
``--seq-len`` and ``--max-chars``.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import rnnjax as rj
from rnnjax.data.text import CharVocab, DataError, read_text, stdlib_corpus
from rnnjax.generate import sample
from rnnjax.train import cross_entropy, fit, init_state, make_step, stream_step, tbptt_step

CELLS = {"lstm": rj.cells.lstm, "gru": rj.cells.gru, "elman": rj.cells.elman}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="a UTF-8 text file (default: stdlib docstrings)")
    parser.add_argument("--max-chars", type=int, default=1_500_000, help="use at most this much")
    parser.add_argument("--cell", choices=sorted(CELLS), default="lstm")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--embed", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=100, help="characters per window")
    parser.add_argument("--tbptt", type=int, default=0, help="K > 0: streams, K chars per step")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--prompt", default="The ")
    parser.add_argument("--sample-length", type=int, default=300)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="run directory (checkpoints)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    # ---- text: a vocabulary from the training part, the last 5% held out
    try:
        text = read_text(args.data) if args.data else stdlib_corpus()
    except DataError as e:  # a missing, empty, binary or non-UTF-8 file: say which, no traceback
        parser.error(str(e))
    text = text[: args.max_chars]
    n_val = max(len(text) // 20, args.seq_len + 1)
    train_text, val_text = text[:-n_val], text[-n_val:]
    if len(train_text) < 2 * (args.seq_len + 1):
        parser.error(f"{len(text)} characters are too few for --seq-len {args.seq_len}")
    vocab = CharVocab.build(train_text)  # id 0 stands for characters it has not seen
    train_ids, val_ids = vocab.encode(train_text), vocab.encode(val_text)
    V = vocab.size
    print(f"{len(train_text)} training characters, {len(val_text)} held out, vocabulary {V}")

    # ---- the model, for one sequence: tokens (T,) -> logits (T, V)
    embed = rj.layers.embed(V, args.embed)
    cell = CELLS[args.cell](args.hidden)
    body = rj.layers.rnn(cell)
    head = rj.layers.dense(V)
    k_embed, k_body, k_head, k_train = jax.random.split(jax.random.key(args.seed), 4)
    params = {
        "embed": embed.init(k_embed, 1),
        "body": body.init(k_body, args.embed),
        "head": head.init(k_head, args.hidden),
    }

    def apply(params, tokens, carry=None, reset=None):
        """``carry=None`` starts from zeros; ``reset (T,)`` restarts it before flagged steps."""
        _, x = embed.apply(params["embed"], tokens)
        carry, h = body.apply(params["body"], x, carry=carry, reset=reset)
        return carry, head.apply(params["head"], h)[1]

    def bits(loss):
        return loss / math.log(2)

    # ---- held out: up to 64 windows of seq_len characters, the unigram baseline on them
    count = min(64, (len(val_ids) - 1) // args.seq_len)
    val_in = val_ids[: count * args.seq_len].reshape(count, args.seq_len)
    val_out = val_ids[1 : count * args.seq_len + 1].reshape(count, args.seq_len)
    freq = np.bincount(train_ids, minlength=V) + 1.0  # add-one: unseen characters cost finite bits
    unigram_bpc = float(-np.mean(np.log2(freq[val_out] / freq.sum())))

    @jax.jit
    def evaluate(params):
        _, logits = jax.vmap(apply, in_axes=(None, 0))(params, val_in)
        loss = cross_entropy(logits, val_out)
        return {"loss": loss, "bpc": bits(loss)}

    optimizer = optax.adam(args.lr)
    if not args.tbptt:
        # Full BPTT over random windows; window i of a batch starts at a random offset.
        def loss_fn(params, batch, key):
            inputs, targets = batch  # (B, L) each
            _, logits = jax.vmap(apply, in_axes=(None, 0))(params, inputs)
            loss = cross_entropy(logits, targets)
            return loss, {"bpc": bits(loss)}

        def train_data(step):  # batch i is a function of i: a resumed run sees the same batches
            rng = np.random.default_rng([args.seed, step])
            starts = rng.integers(0, len(train_ids) - args.seq_len - 1, args.batch_size)
            windows = train_ids[starts[:, None] + np.arange(args.seq_len + 1)]
            return windows[:, :-1], windows[:, 1:]

        step_fn = make_step(loss_fn, optimizer, clip_norm=1.0)
        state = init_state(params, optimizer, k_train)
    else:
        # Truncated BPTT: row b of the batch reads the b-th stretch of the text, K at a time.
        K, B = args.tbptt, args.batch_size
        per_row = (len(train_ids) - 1) // B
        chunks = per_row // K  # steps per pass over the text
        if chunks < 1:
            parser.error(f"--tbptt {K} is longer than each of {B} streams ({per_row} chars)")

        def chunk_loss(params, carry, chunk, key):
            inputs, targets, reset = chunk  # (B, K) each
            carry, logits = jax.vmap(apply, in_axes=(None, 0, 0, 0))(params, inputs, carry, reset)
            loss = cross_entropy(logits, targets)
            return loss, carry, {"bpc": bits(loss)}

        def train_data(step):
            c = step % chunks
            starts = np.arange(B) * per_row + c * K
            window = train_ids[starts[:, None] + np.arange(K + 1)]
            reset = np.zeros((B, K), bool)
            reset[:, 0] = c == 0  # a new pass: the carry from the end of the stream is stale
            return window[:, :-1], window[:, 1:], reset

        # The carry lives in the training state, so checkpoints and resume keep the streams.
        step_fn = stream_step(tbptt_step(chunk_loss, optimizer, clip_norm=1.0))
        one = cell.initial_carry(params["body"])
        carry = jax.tree.map(lambda a: jnp.zeros((B, *a.shape), a.dtype), one)
        state = init_state(params, optimizer, k_train, carry=carry)

    start = time.perf_counter()
    result = fit(
        step_fn, state, train_data, steps=args.steps, eval_fn=evaluate,
        eval_every=args.eval_every, out_dir=args.out, checkpoint_every=args.eval_every,
        progress=not args.no_progress,
    )  # fmt: skip
    elapsed = time.perf_counter() - start
    for row in result.history:
        if row["split"] == "val":
            print(f"step {row['step']:5d}  held-out bpc {row['bpc']:.4f}")
    params = result.state.params

    # ---- sample: the prompt warms the carry, then each sampled character is fed back
    prompt = vocab.encode(args.prompt or " ")
    tokens = sample(
        apply, params, jnp.asarray(prompt), args.sample_length,
        key=jax.random.key(args.seed), temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p,
    )  # fmt: skip
    print(f"sample (temperature {args.temperature:g}):")
    print(args.prompt + vocab.decode(tokens))
    print(
        f"held-out bits per character {float(evaluate(params)['bpc']):.4f} "
        f"(unigram baseline {unigram_bpc:.4f})"
    )
    print(f"{int(result.state.step)} steps in {elapsed:.1f} s on {jax.devices()[0].platform}")


if __name__ == "__main__":
    main()
