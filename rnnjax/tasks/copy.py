"""copy: the copy-memory task (Hochreiter & Schmidhuber 1997; Arjovsky et al. 2016), many-to-many.

An example (:func:`rnnjax.data.synthetic.copy_memory`) is S = 10 symbols from an alphabet of
K = 8, then a delay of T = ``--seq-len`` steps (T - 1 blanks and a delimiter), then S blanks:
T + 2S steps in all. The model reads the one-hot tokens and at every step predicts one of K + 1
classes: blank, or the symbol to write out. The target is blank for the first T + S steps and
the S symbols, in order, for the last S.

The loss is the cross-entropy over all T + 2S steps (the standard); the metric is the accuracy
on the S copied symbols (chance: 1/K). The memoryless baseline predicts blank until the
delimiter and then the uniform distribution over the K symbols, which scores

    S log(K) / (T + 2S) nats per step

(0.1733 at the paper's T = 100). ``evaluate`` reports that formula (``baseline_loss``) and, as
a check, the same baseline measured on the validation set (``baseline_loss_val``: the
cross-entropy of predicting, at every position, the frequencies of the targets there).
"""

from __future__ import annotations

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import rnnjax as rj
from rnnjax.data.synthetic import copy_baseline, copy_memory
from rnnjax.tasks.base import Task, check_generated, recurrent_layers, recurrent_size, split_keys
from rnnjax.train import accuracy, cross_entropy

DEFAULTS = {
    "hidden": 256,
    "steps": 3000,
    "batch_size": 32,
    "seq_len": 20,
    "lr": 3e-3,
    "checkpoint_every": 1000,
    "eval_every": 500,
}
SYMBOLS = 10  # S, the symbols to remember
ALPHABET = 8  # K
VAL_SIZE = 512


def model(config: dict):
    """``init(key) -> params`` and ``apply(params, tokens (T,), key=None) -> logits (T, K + 1)``."""
    body = recurrent_layers(config)
    head = rj.layers.dense(ALPHABET + 1)
    vocab = ALPHABET + 2  # blank, K symbols, delimiter

    def init(key):
        k_body, k_head = jax.random.split(key)
        return {
            "body": body.init(k_body, vocab),
            "head": head.init(k_head, recurrent_size(config)),
        }

    def apply(params, tokens, key=None):
        _, h = body.apply(params["body"], jax.nn.one_hot(tokens, vocab), key=key)
        return head.apply(params["head"], h)[1]

    return init, apply


def positional_baseline(targets: np.ndarray, classes: int) -> float:
    """Cross-entropy per step (nats) of predicting, at each position, the frequencies of the
    targets at that position in ``targets (B, T)``: the best a model without memory of the
    symbols can do on this set.

    >>> positional_baseline(np.array([[0, 1], [0, 2]]), 3)  # position 1: two classes, 1/2 each
    0.34657359027997264
    """
    counts = np.stack([np.bincount(col, minlength=classes) for col in targets.T])  # (T, C)
    probs = counts / counts.sum(axis=1, keepdims=True)
    picked = np.take_along_axis(probs, targets.T, axis=1)  # (T, B)
    return float(-np.log(picked).mean())


def build(config: dict, run_dir: Path) -> Task:
    check_generated(config)
    delay, batch_size = config["seq_len"], config["batch_size"]
    init, apply = model(config)
    k_params, k_data, k_val = split_keys(config, 3)
    params = init(k_params)
    generate = jax.jit(copy_memory, static_argnums=(1, 2), static_argnames=("symbols", "alphabet"))

    def logits_of(params, tokens, key=None):
        keys = None if key is None else jax.random.split(key, tokens.shape[0])
        return jax.vmap(lambda t, k: apply(params, t, key=k))(tokens, keys)

    def score(logits, targets):
        copied = slice(-SYMBOLS, None)  # the steps that write out the symbols
        return {
            "accuracy": accuracy(logits[:, copied], targets[:, copied]),
            "copy_loss": cross_entropy(logits[:, copied], targets[:, copied]),
        }

    def loss_fn(params, batch, key):
        tokens, targets = batch
        logits = logits_of(params, tokens, key)
        return cross_entropy(logits, targets), score(logits, targets)

    def train_data(step):
        key = jax.random.fold_in(k_data, step)
        return generate(key, batch_size, delay, symbols=SYMBOLS, alphabet=ALPHABET)

    val_tokens, val_targets = generate(k_val, VAL_SIZE, delay, symbols=SYMBOLS, alphabet=ALPHABET)
    baseline = copy_baseline(delay, SYMBOLS, ALPHABET)
    baseline_val = positional_baseline(np.asarray(val_targets), ALPHABET + 1)

    @jax.jit
    def validate(params):
        """The metrics on the validation set, and what the model writes out for the report."""
        logits = logits_of(params, val_tokens)
        metrics = {
            "loss": cross_entropy(logits, val_targets),
            **score(logits, val_targets),
            "baseline_loss": baseline,
            "baseline_loss_val": baseline_val,
            "baseline_accuracy": 1.0 / ALPHABET,
        }
        return metrics, jnp.argmax(logits[0, -SYMBOLS:], axis=-1)

    def report(params, run_dir):
        metrics, written = validate(params)
        val = {k: float(v) for k, v in metrics.items()}
        return [
            f"copied symbols after a delay of {delay}: accuracy {val['accuracy']:.3f} "
            f"(chance {1 / ALPHABET:.3f}), cross-entropy {val['copy_loss']:.4f} nats "
            f"(chance log {ALPHABET} = {math.log(ALPHABET):.4f})",
            f"cross-entropy per step {val['loss']:.4f} nats vs the memoryless baseline "
            f"{baseline:.4f} = {SYMBOLS} log {ALPHABET} / ({delay} + 2*{SYMBOLS}) "
            f"({baseline_val:.4f} on this set)",
            f"example: symbols {np.asarray(val_tokens[0, :SYMBOLS]).tolist()}, "
            f"written out {written.tolist()}",
        ]

    return Task(
        params=params, loss_fn=loss_fn, train_data=train_data, evaluate=lambda p: validate(p)[0],
        metric="accuracy", report=report,
        info={"symbols": SYMBOLS, "alphabet": ALPHABET, "val_size": VAL_SIZE},
    )  # fmt: skip
