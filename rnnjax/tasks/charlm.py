"""charlm: a next-character language model (many-to-many) that reports bits per character and
generates text. The default corpus is the installed standard library's docstrings (offline on
any machine with Python); ``--data PATH`` takes any UTF-8 text file.

Training reads random windows of ``seq_len`` characters; with ``--tbptt K`` it instead reads
the training text as ``batch_size`` contiguous streams, K characters per step, the carry flowing
from step to step (truncated BPTT) and reset when a stream wraps around.
"""

from __future__ import annotations

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import rnnjax as rj
from rnnjax.data.text import CharVocab, DataError, read_text, stdlib_corpus
from rnnjax.generate import sample
from rnnjax.tasks.base import Task, recurrent_layers, recurrent_size, split_keys
from rnnjax.tasks.flags import number
from rnnjax.train import cross_entropy, stream_step, tbptt_step

DEFAULTS = {
    "hidden": 256,
    "steps": 1500,
    "batch_size": 32,
    "seq_len": 100,
    "lr": 3e-3,
    "checkpoint_every": 500,
    "eval_every": 250,
    "tbptt": 0,
}
EMBED = 64
VAL_FRACTION = 0.05
VAL_WINDOWS = 64  # held-out windows of seq_len characters, evaluated in one batch
PROMPT = "The "  # the sample after training starts here


def add_train_flags(group) -> None:
    """``rnnjax train --task charlm --tbptt K``."""
    group.add_argument(
        "--tbptt", type=number(int, 0), metavar="K",
        help="truncated BPTT: read the training text as --batch-size contiguous streams, K "
        "characters per step, the carry flowing from step to step; 0 is off: random windows "
        f"of --seq-len (default: {DEFAULTS['tbptt']})",
    )  # fmt: skip


def add_generate_flags(group) -> None:
    """``rnnjax generate --run DIR`` of a charlm run: sample text."""
    group.add_argument(
        "--prompt",
        help="the text to continue (default: none: the sample starts at the start of the "
        "training text, from its first character)",
    )
    group.add_argument(
        "--length", type=number(int, 0), default=300,
        help="characters to sample after the prompt (default: 300)",
    )  # fmt: skip
    group.add_argument(
        "--temperature", type=number(float, 0.0), default=0.8,
        help="divides the logits: below 1 more likely characters, 0 the likeliest always "
        "(greedy; default: 0.8)",
    )  # fmt: skip
    group.add_argument(
        "--top-k", type=number(int, 1), metavar="K",
        help="sample among the K likeliest characters only (default: none: all of them)",
    )  # fmt: skip
    group.add_argument(
        "--top-p", type=number(float, 0.0, inclusive=False, high=1.0), default=1.0, metavar="P",
        help="sample among the likeliest characters that hold probability P (nucleus "
        "sampling; default: 1.0, all)",
    )  # fmt: skip
    group.add_argument(
        "--seed", type=number(int, 0), default=0,
        help="seeds the sampling: the same seed, the same text (default: 0)",
    )  # fmt: skip


def load_text(config: dict) -> str:
    return read_text(config["data"]) if config["data"] else stdlib_corpus()


def build(config: dict, run_dir: Path) -> Task:
    text = load_text(config)
    seq_len, batch_size = config["seq_len"], config["batch_size"]
    n_val = max(int(len(text) * VAL_FRACTION), seq_len + 1)
    train_text, val_text = text[:-n_val], text[-n_val:]
    if len(train_text) < 2 * (seq_len + 1):
        raise DataError(
            f"the text has {len(text)} characters, too few for windows of --seq-len {seq_len} "
            f"plus a held-out {VAL_FRACTION:.0%}; use a longer file or a smaller --seq-len"
        )
    vocab_path = run_dir / "vocab.json"
    if vocab_path.exists():  # a resumed or evaluated run keeps the vocabulary it trained with
        vocab = CharVocab.from_json(vocab_path.read_text(encoding="utf-8"))
    else:
        vocab = CharVocab.build(train_text)
        vocab_path.write_text(vocab.to_json(), encoding="utf-8")
    train_ids, val_ids = vocab.encode(train_text), vocab.encode(val_text)
    V = vocab.size

    embed = rj.layers.embed(V, EMBED)
    body = recurrent_layers(config, causal=True)
    head = rj.layers.dense(V)
    k_embed, k_body, k_head, k_data = split_keys(config, 4)
    params = {
        "embed": embed.init(k_embed, 1),
        "body": body.init(k_body, EMBED),
        "head": head.init(k_head, recurrent_size(config)),
    }

    def apply(params, tokens, carry=None, *, reset=None, key=None):
        """One sequence: ``tokens (T,)`` -> ``(carry, logits (T, V))``."""
        k_body = None if key is None else key
        _, x = embed.apply(params["embed"], tokens)
        carry, h = body.apply(params["body"], x, carry=carry, reset=reset, key=k_body)
        return carry, head.apply(params["head"], h)[1]

    def loss_fn(params, batch, key):
        inputs, targets = batch
        keys = jax.random.split(key, inputs.shape[0]) if key is not None else None
        _, logits = jax.vmap(lambda t, k: apply(params, t, key=k))(inputs, keys)
        loss = cross_entropy(logits, targets)
        return loss, {"bpc": loss / math.log(2)}

    # Held-out text as fixed windows, evaluated in one jitted batch.
    count = min(VAL_WINDOWS, (len(val_ids) - 1) // seq_len)
    val_in = val_ids[: count * seq_len].reshape(count, seq_len)
    val_out = val_ids[1 : count * seq_len + 1].reshape(count, seq_len)
    freq = np.bincount(train_ids, minlength=V) + 1.0  # add-one unigram: the trivial baseline
    unigram_bpc = float(-np.mean(np.log2((freq / freq.sum())[val_out])))

    @jax.jit
    def evaluate(params):
        loss, metrics = loss_fn(params, (val_in, val_out), None)
        return {"loss": loss, "bpc": metrics["bpc"], "baseline_bpc": unigram_bpc}

    def generate(params, prompt=PROMPT, length=300, temperature=0.8, top_k=None, top_p=1.0, seed=0):
        """``prompt`` and ``length`` characters sampled after it. Without a prompt (None or
        empty) the sample starts where the text does: its first character, then ``length``."""
        prompt = prompt or train_text[0]
        out = sample(
            apply_tokens, params, jnp.asarray(vocab.encode(prompt)), length,
            key=jax.random.key(seed), temperature=temperature, top_k=top_k, top_p=top_p,
        )  # fmt: skip
        return prompt + vocab.decode(out)

    def apply_tokens(params, tokens, carry):
        return apply(params, tokens, carry)

    def report(params, run_dir):
        val = evaluate(params)
        return [
            f"held-out bits per character: {float(val['bpc']):.3f} "
            f"(unigram baseline {unigram_bpc:.3f})",
            "sample (temperature 0.8):",
            generate(params, length=300, seed=config["seed"]),
        ]

    task = Task(
        params=params, loss_fn=loss_fn, train_data=None, evaluate=evaluate, metric="bpc",
        report=report,
        generate=lambda params, o: generate(
            params, o.prompt, o.length, o.temperature, o.top_k, o.top_p, o.seed
        ),
        info={"vocab_size": V, "train_chars": len(train_text), "val_chars": len(val_text)},
    )  # fmt: skip

    if not config["tbptt"]:

        def train_data(step):
            rng = np.random.default_rng([config["seed"], step])
            starts = rng.integers(0, len(train_ids) - seq_len - 1, batch_size)
            windows = train_ids[starts[:, None] + np.arange(seq_len + 1)]
            return windows[:, :-1], windows[:, 1:]

        task.train_data = train_data
        return task

    # Truncated BPTT: batch_size contiguous streams, k characters per step.
    k = config["tbptt"]
    per_row = (len(train_ids) - 1) // batch_size
    chunks = per_row // k
    if chunks < 1:
        raise DataError(
            f"--tbptt {k} is longer than each of {batch_size} streams ({per_row} chars)"
        )
    rows = train_ids[: batch_size * per_row + 1]

    def stream_data(step):
        c = step % chunks
        starts = np.arange(batch_size) * per_row + c * k
        window = rows[starts[:, None] + np.arange(k + 1)]
        reset = np.zeros((batch_size, k), bool)
        reset[:, 0] = c == 0  # a stream wrapped around: its carry does not continue
        return window[:, :-1], window[:, 1:], reset

    def chunk_loss(params, carry, chunk, key):
        inputs, targets, reset = chunk
        keys = jax.random.split(key, inputs.shape[0])
        carry, logits = jax.vmap(lambda t, c, r, kk: apply(params, t, c, reset=r, key=kk))(
            inputs, carry, reset, keys
        )
        loss = cross_entropy(logits, targets)
        return loss, carry, {"bpc": loss / math.log(2)}

    initial = jax.eval_shape(lambda p: apply(p, jnp.zeros(1, jnp.int32))[0], params)
    task.carry = jax.tree.map(lambda s: jnp.zeros((batch_size, *s.shape), s.dtype), initial)
    task.train_data = stream_data
    task.step = lambda opt, clip: stream_step(tbptt_step(chunk_loss, opt, clip_norm=clip))
    return task
