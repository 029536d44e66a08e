"""The adding problem with rnnjax.train.fit: checkpoints, resume, early stopping, logs, a plot.

A recurrent model reads T steps of (value, marker) pairs and must output the sum of the two
marked values; always answering 1 scores an MSE of 0.167. LSTM and GRU solve it at lengths where
an Elman RNN stays at the baseline (Hochreiter & Schmidhuber 1997).

    python examples/adding_problem.py --cell lstm --length 50 --steps 2000 --out runs/adding
    python examples/adding_problem.py ... --out runs/adding      # again: resumes where it stopped

The run directory gets metrics.jsonl, checkpoints/ (orbax), loss.png and final_params.npz.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import numpy as np
import optax

import rnnjax as rj
from rnnjax.data import ADDING_BASELINE_MSE, adding
from rnnjax.train import EarlyStopping, fit, init_state, make_step, mse

CELLS = {"lstm": rj.cells.lstm, "gru": rj.cells.gru, "elman": rj.cells.elman}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cell", choices=sorted(CELLS), default="lstm")
    parser.add_argument("--length", type=int, default=50, help="sequence length T")
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--checkpoint-every", type=int, default=200)
    parser.add_argument("--eval-every", type=int, default=200)
    parser.add_argument("--patience", type=int, default=0, help="early stopping; 0 is off")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    encoder = rj.layers.rnn(CELLS[args.cell](args.hidden))
    head = rj.layers.dense(1)
    k_enc, k_head, k_train, k_data, k_val = jax.random.split(jax.random.key(args.seed), 5)
    params = {"encoder": encoder.init(k_enc, 2), "head": head.init(k_head, args.hidden)}

    def predict(params, xs):
        def one(x):
            carry, ys = encoder.apply(params["encoder"], x)
            return head.apply(params["head"], ys[-1:])[1][0, 0]

        return jax.vmap(one)(xs)

    def loss_fn(params, batch, key):
        xs, targets = batch
        return mse(predict(params, xs), targets)

    optimizer = optax.adam(args.lr)
    step = make_step(loss_fn, optimizer, clip_norm=args.clip)
    state = init_state(params, optimizer, k_train)

    def train_data(step):  # the batch is a function of the step: resumable by construction
        return adding(jax.random.fold_in(k_data, step), args.batch_size, args.length)

    val_batch = adding(k_val, 512, args.length)
    evaluate = jax.jit(lambda params: {"loss": loss_fn(params, val_batch, None)})

    result = fit(
        step, state, train_data,
        steps=args.steps, eval_fn=evaluate, eval_every=args.eval_every, out_dir=args.out,
        checkpoint_every=args.checkpoint_every,
        early_stopping=EarlyStopping(args.patience) if args.patience else None,
        progress=not args.no_progress,
    )  # fmt: skip
    val = float(evaluate(result.state.params)["loss"])
    print(
        f"{args.cell} T={args.length}: validation MSE {val:.4f} after {int(result.state.step)} "
        f"steps (baseline {ADDING_BASELINE_MSE:.4f}, stopped by {result.stopped})"
    )
    if args.out is not None:
        leaves = jax.tree.leaves_with_path(result.state.params)
        np.savez(
            args.out / "final_params.npz",
            **{jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves},
        )
    return val


if __name__ == "__main__":
    main()
