"""classify: many-to-one classification of variable-length sequences, padded and masked.

The data are generated (no installed package ships labelled sequences to read offline): a fixed
set of sequences (:func:`rnnjax.data.synthetic.majority`) with lengths uniform in
``[seq_len // 4, seq_len]`` over 3 symbols, each labelled with its most frequent symbol (ties
are never drawn), so the label depends on every real step and a model must count.

Training batches hold sequences of similar length (:func:`~rnnjax.data.batching.bucket_indices`),
right-padded to a multiple of ``ceil(seq_len / 4)`` steps: at most 4 batch shapes, so at most 4
compilations. The lengths go to the layers (``apply(..., length=n)`` under ``vmap``): padded
steps keep the carry, so they cannot change a prediction, and a bidirectional layer's backward
direction starts at the last real step. The classifier reads the final state
(:func:`rnnjax.tasks.base.readout`). The baseline always answers the training set's most
frequent class.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from rnnjax.data.batching import bucket_indices, pad
from rnnjax.data.synthetic import majority
from rnnjax.tasks.base import Task, check_generated, many_to_one, split_keys
from rnnjax.train import accuracy, cross_entropy

DEFAULTS = {
    "hidden": 64,
    "steps": 1500,
    "batch_size": 32,
    "seq_len": 100,
    "lr": 3e-3,
    "checkpoint_every": 500,
    "eval_every": 250,
}
SYMBOLS = 3  # also the number of classes
TRAIN_SIZE = 10_000
VAL_SIZE = 1_000
DATA_TAG = 0xC1A55  # seeds the data sets: np.random.default_rng([seed, DATA_TAG, split])


def model(config: dict):
    """``init(key) -> params`` and ``apply(params, tokens (T,), length=None, key=None) ->
    logits (SYMBOLS,)``; steps at and after ``length`` are padding."""
    init, apply = many_to_one(config, SYMBOLS, SYMBOLS)

    def logits(params, tokens, length=None, key=None):
        return apply(params, jax.nn.one_hot(tokens, SYMBOLS), length=length, key=key)

    return init, logits


def build(config: dict, run_dir: Path) -> Task:
    check_generated(config)
    seq_len, batch_size, seed = config["seq_len"], config["batch_size"], config["seed"]
    min_len = max(seq_len // 4, 1)
    multiple = -(-seq_len // 4)
    # The tag keeps these streams apart from bucket_indices' [seed, epoch(, 1)] shuffles.
    train_seqs, train_labels = majority(
        np.random.default_rng([seed, DATA_TAG, 1]), TRAIN_SIZE, min_len, seq_len, symbols=SYMBOLS
    )
    val_seqs, val_labels = majority(
        np.random.default_rng([seed, DATA_TAG, 2]), VAL_SIZE, min_len, seq_len, symbols=SYMBOLS
    )
    train_lengths = np.array([len(s) for s in train_seqs])
    val_tokens, val_lengths = pad(val_seqs, length=seq_len)
    majority_class = int(np.bincount(train_labels, minlength=SYMBOLS).argmax())
    baseline = float(np.mean(val_labels == majority_class))

    init, apply = model(config)
    (k_params,) = split_keys(config, 1)
    params = init(k_params)

    def logits_of(params, tokens, lengths, key=None):
        keys = None if key is None else jax.random.split(key, tokens.shape[0])
        return jax.vmap(lambda t, n, k: apply(params, t, n, key=k))(tokens, lengths, keys)

    def loss_fn(params, batch, key):
        tokens, lengths, labels = batch
        logits = logits_of(params, tokens, lengths, key)
        return cross_entropy(logits, labels), {"accuracy": accuracy(logits, labels)}

    def train_data(step):
        idx = bucket_indices(train_lengths, batch_size, step, seed=seed)
        tokens, lengths = pad([train_seqs[i] for i in idx], multiple=multiple)
        return tokens, lengths, train_labels[idx]

    @jax.jit
    def validate(params):
        """The metrics on the validation set, and which examples were right (for the report)."""
        logits = logits_of(params, val_tokens, val_lengths)
        metrics = {
            "loss": cross_entropy(logits, val_labels),
            "accuracy": accuracy(logits, val_labels),
            "baseline_accuracy": baseline,
        }
        return metrics, jnp.argmax(logits, axis=-1) == val_labels

    def report(params, run_dir):
        metrics, right = validate(params)
        right = np.asarray(right)
        edges = np.linspace(min_len, seq_len + 1, 4).astype(int)
        by_length = ", ".join(
            f"{lo}-{hi - 1}: {right[(val_lengths >= lo) & (val_lengths < hi)].mean():.3f}"
            for lo, hi in zip(edges[:-1], edges[1:], strict=True)
            if ((val_lengths >= lo) & (val_lengths < hi)).any()
        )
        return [
            f"validation accuracy {float(metrics['accuracy']):.3f} vs {baseline:.3f} for always "
            f"answering the majority class {majority_class}; by length {by_length}",
        ]

    return Task(
        params=params, loss_fn=loss_fn, train_data=train_data, evaluate=lambda p: validate(p)[0],
        metric="accuracy", report=report,
        info={"train_size": TRAIN_SIZE, "val_size": VAL_SIZE, "pad_multiple": multiple},
    )  # fmt: skip
