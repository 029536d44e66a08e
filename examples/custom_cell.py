"""Write your own cell: a peephole LSTM in ~20 lines, run through scan, layers, training,
checkpoints and the gradient diagnostics unchanged.

A cell is three pure functions over one example, ``rj.Cell(init, initial_carry, step)``;
everything else in rnnjax (``rj.scan``, ``rj.layers``, ``rnnjax.train``, ``rnnjax.diagnostics``)
takes any cell. The peephole LSTM (Gers & Schmidhuber 2000) lets the gates see the cell state
through diagonal weights: the input and forget gates see ``c_{t-1}``, the output gate ``c_t``.
Here it learns the adding problem (predict the sum of two marked values; always answering 1
scores an MSE of 0.167), checkpoints with orbax and restores the checkpoint into a fresh state.

    python examples/custom_cell.py                       # ~400 steps, T=50, into runs/custom_cell
    python examples/custom_cell.py --steps 800           # again: resumes from the checkpoint
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

import rnnjax as rj
from rnnjax.core import check_step_input
from rnnjax.data import ADDING_BASELINE_MSE, adding
from rnnjax.diagnostics import hidden_gradients
from rnnjax.train import Checkpoints, fit, init_state, make_step, mse


def peephole_lstm(hidden_size: int) -> rj.Cell:
    """Params ``w_i (I, 4H)``, ``w_h (H, 4H)``, ``b (4H,)`` (gates i, f, g, o, as rj.cells.lstm)
    and peepholes ``p (3, H)`` for i, f, o; carry ``LSTMState(h, c)``; output ``h``."""

    def init(key, input_size):
        k_i, k_h = jax.random.split(key)
        return {
            "w_i": jax.nn.initializers.lecun_normal()(k_i, (input_size, 4 * hidden_size)),
            "w_h": jax.nn.initializers.orthogonal()(k_h, (hidden_size, 4 * hidden_size)),
            "b": jnp.zeros(4 * hidden_size).at[hidden_size : 2 * hidden_size].set(1.0),
            "p": jnp.zeros((3, hidden_size)),
        }

    def initial_carry(params):
        zeros = jnp.zeros(params["w_h"].shape[0])
        return rj.LSTMState(h=zeros, c=zeros)

    def step(params, carry, x, *, recurrent_mask=None):  # recurrent_mask: recurrent dropout
        check_step_input("peephole_lstm", x, params["w_i"].shape[0])  # shape errors in Python
        h = carry.h if recurrent_mask is None else carry.h * recurrent_mask
        i, f, g, o = jnp.split(x @ params["w_i"] + h @ params["w_h"] + params["b"], 4)
        p_i, p_f, p_o = params["p"]
        forget, write = jax.nn.sigmoid(f + p_f * carry.c), jax.nn.sigmoid(i + p_i * carry.c)
        c = forget * carry.c + write * jnp.tanh(g)
        h = jax.nn.sigmoid(o + p_o * c) * jnp.tanh(c)
        return rj.LSTMState(h, c), h

    return rj.Cell(init, initial_carry, step)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--length", type=int, default=50, help="sequence length T")
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--recurrent-dropout", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/custom_cell"))
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    cell = peephole_lstm(args.hidden)
    k_model, k_train, k_data, k_val = jax.random.split(jax.random.key(args.seed), 4)

    # 1. One step, then a whole sequence with rj.scan: the same as stepping by hand.
    cell_params = cell.init(k_model, 2)
    xs = adding(k_val, 1, args.length)[0][0]  # (T, 2), one example
    carry, ys = rj.scan(cell, cell_params, xs)
    by_hand = cell.initial_carry(cell_params)
    for x in xs:
        by_hand, _ = cell.step(cell_params, by_hand, x)
    assert jnp.allclose(carry.h, by_hand.h, atol=1e-5) and ys.shape == (args.length, args.hidden)

    # 2. Layers: the cell in a stack with a readout, batched by vmap (one dropout mask per
    # example); the prediction is the readout at the last step.
    model = rj.layers.batched(
        rj.layers.stack(
            rj.layers.rnn(cell, recurrent_dropout=args.recurrent_dropout), rj.layers.dense(1)
        )
    )

    def loss_fn(params, batch, key):  # key: dropout while training, None when evaluating
        xs, targets = batch
        _, ys = model.apply(params, xs, key=key)  # (B, T, 1)
        return mse(ys[:, -1, 0], targets)

    # 3. Training: optax, a clipped step, fit with evaluation and orbax checkpoints.
    optimizer = optax.adam(args.lr)
    state = init_state(model.init(k_model, 2), optimizer, k_train)
    val = adding(k_val, 512, args.length)
    evaluate = jax.jit(lambda params: {"loss": loss_fn(params, val, None)})

    def train_data(step):  # batch i is a function of i, so a resumed run sees the same batches
        return adding(jax.random.fold_in(k_data, step), args.batch_size, args.length)

    every = max(1, args.steps // 4)
    result = fit(
        make_step(loss_fn, optimizer, clip_norm=1.0), state, train_data,
        steps=args.steps, eval_fn=evaluate, eval_every=every, checkpoint_every=every,
        out_dir=args.out, progress=not args.no_progress,
    )  # fmt: skip
    trained = float(evaluate(result.state.params)["loss"])

    # 4. Restore the last checkpoint into a fresh state (the template), as a new process would.
    with Checkpoints(args.out / "checkpoints") as checkpoints:
        step = checkpoints.latest_step()
        restored = checkpoints.restore(state, step)
    mse_restored = float(evaluate(restored.params)["loss"])
    assert mse_restored == trained, (mse_restored, trained)

    # 5. Diagnostics work on the new cell too: the gradient from the loss reaching each step.
    cell_params, head = restored.params
    x0, y0 = val[0][0], val[1][0]

    def example_loss(ys, carry):
        return (ys[-1] @ head["w"][:, 0] + head["b"][0] - y0) ** 2

    norms = hidden_gradients(cell, cell_params, x0, example_loss)
    marked = jnp.flatnonzero(x0[:, 1] > 0, size=2)

    print(
        f"peephole LSTM, adding problem T={args.length}: validation MSE {trained:.4f} after "
        f"{int(result.state.step)} steps (baseline {ADDING_BASELINE_MSE:.3f})"
    )
    print(
        f"restored step {step} from {args.out / 'checkpoints'}: validation MSE {mse_restored:.4f}"
    )
    print(
        "||dLoss/dh_t|| at the marked steps "
        + ", ".join(f"t={int(t)}: {float(norms[t]):.2e}" for t in marked)
        + f"; at the last step {float(norms[-1]):.2e}"
    )
    return trained


if __name__ == "__main__":
    main()
