"""adding: the adding problem (Hochreiter & Schmidhuber 1997), many-to-one regression.

Each example is ``--seq-len`` steps of (value, marker) pairs, values U(0, 1) and two markers,
one in each half; the target is the sum of the two marked values
(:func:`rnnjax.data.synthetic.adding`). The model reads the sequence with
:func:`~rnnjax.tasks.base.recurrent_layers` and a ``dense(1)`` reads out its final state; the
loss is the MSE. Always answering 1 scores 1/6, the variance of the target.

Batch ``step`` is generated from ``fold_in(key, step)``, so a resumed run sees the same batches;
the validation set is fixed by the seed.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from rnnjax.data.synthetic import ADDING_BASELINE_MSE, adding
from rnnjax.tasks.base import Task, check_generated, many_to_one, split_keys
from rnnjax.train import mse

DEFAULTS = {
    "hidden": 64,
    "steps": 1500,
    "batch_size": 64,
    "seq_len": 50,
    "lr": 3e-3,
    "checkpoint_every": 500,
    "eval_every": 250,
}
VAL_SIZE = 1024


def build(config: dict, run_dir: Path) -> Task:
    check_generated(config)
    seq_len, batch_size = config["seq_len"], config["batch_size"]
    init, apply = many_to_one(config, 1, 2)
    k_params, k_data, k_val = split_keys(config, 3)
    params = init(k_params)
    generate = jax.jit(adding, static_argnums=(1, 2))

    def predict(params, xs, key=None):
        keys = None if key is None else jax.random.split(key, xs.shape[0])
        return jax.vmap(lambda x, k: apply(params, x, key=k)[0])(xs, keys)

    def loss_fn(params, batch, key):
        xs, targets = batch
        loss = mse(predict(params, xs, key), targets)
        return loss, {"mse": loss}

    def train_data(step):
        return generate(jax.random.fold_in(k_data, step), batch_size, seq_len)

    val_xs, val_ys = generate(k_val, VAL_SIZE, seq_len)
    baseline_val = float(jnp.mean((val_ys - 1.0) ** 2))

    @jax.jit
    def validate(params):
        """The metrics on the validation set, and the first predictions for the report."""
        pred = predict(params, val_xs)
        loss = mse(pred, val_ys)
        metrics = {
            "loss": loss,
            "mse": loss,
            "baseline_mse": ADDING_BASELINE_MSE,
            "baseline_mse_val": baseline_val,
        }
        return metrics, pred[:3]

    def report(params, run_dir):
        metrics, pred = validate(params)
        val = float(metrics["mse"])
        first = np.asarray(val_xs[:3])
        marked = [x[x[:, 1] > 0, 0].tolist() for x in first]
        examples = ", ".join(
            f"{a:.2f} + {b:.2f} = {a + b:.2f} -> {float(p):.2f}"
            for (a, b), p in zip(marked, pred, strict=True)
        )
        return [
            f"validation MSE {val:.4f} vs {ADDING_BASELINE_MSE:.4f} for always answering 1 "
            f"({baseline_val:.4f} on this set): {val / baseline_val:.1%} of the baseline's error",
            f"examples (marked values, sum -> prediction): {examples}",
        ]

    return Task(
        params=params, loss_fn=loss_fn, train_data=train_data, evaluate=lambda p: validate(p)[0],
        metric="mse", report=report, info={"val_size": VAL_SIZE},
    )  # fmt: skip
