"""Train an LSTM classifier on variable-length sequences: the whole rnnjax idea in one script.

Task: each example is a sequence of 1..T numbers (right-padded to T); its label is whether the
real numbers sum to more than zero. A model must read every real step and ignore the padding,
so this exercises masking (``length``), many-to-one readout from the final carry, ``vmap``
batching, BPTT with ``jax.grad``, gradient clipping and an optax optimizer.

    python examples/quickstart.py [--steps 400] [--hidden 32] [--seed 0]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import optax

import rnnjax as rj

T = 24


def make_batch(key, batch_size):
    """``xs (B, T, 1)``, ``lengths (B,)``, ``labels (B,)``; steps past a length are zero."""
    k_x, k_n = jax.random.split(key)
    lengths = jax.random.randint(k_n, (batch_size,), 1, T + 1)
    real = jnp.arange(T)[None, :] < lengths[:, None]
    xs = jnp.where(real, jax.random.normal(k_x, (batch_size, T)), 0.0)
    return xs[..., None], lengths, (xs.sum(axis=1) > 0).astype(jnp.int32)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    encoder = rj.layers.rnn(rj.cells.lstm(args.hidden))
    head = rj.layers.dense(2)
    k_enc, k_head, k_data = jax.random.split(jax.random.key(args.seed), 3)
    params = {"encoder": encoder.init(k_enc, 1), "head": head.init(k_head, args.hidden)}

    def logits(params, xs, length):
        carry, _ = encoder.apply(params["encoder"], xs, length=length)  # one example
        return head.apply(params["head"], carry.h[None])[1][0]  # read out the last real step

    def loss_fn(params, xs, lengths, labels):
        out = jax.vmap(logits, in_axes=(None, 0, 0))(params, xs, lengths)
        loss = optax.softmax_cross_entropy_with_integer_labels(out, labels).mean()
        return loss, (out.argmax(-1) == labels).mean()

    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(args.lr))
    opt_state = optimizer.init(params)

    @jax.jit
    def train_step(params, opt_state, key):
        batch = make_batch(key, args.batch_size)
        (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, *batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, acc

    evaluate = jax.jit(lambda params, key: loss_fn(params, *make_batch(key, 1024)))
    start = time.perf_counter()
    for step, key in enumerate(jax.random.split(k_data, args.steps), start=1):
        params, opt_state, loss, acc = train_step(params, opt_state, key)
        if step % 100 == 0 or step == args.steps:
            print(f"step {step:5d}  loss {float(loss):.4f}  batch accuracy {float(acc):.3f}")
    elapsed = time.perf_counter() - start
    loss, acc = evaluate(params, jax.random.key(args.seed + 1))
    print(f"held-out loss {float(loss):.4f}  accuracy {float(acc):.3f}  (chance 0.5)")
    print(f"{args.steps} steps in {elapsed:.1f} s on {jax.devices()[0].platform}")
    return float(acc)


if __name__ == "__main__":
    main()
