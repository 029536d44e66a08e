"""Where minGRU's training time goes, beside the LSTM's, in one process: forward+backward
(``jax.value_and_grad`` of ``sum(out ** 2)``) at the issue's shape B=16, T=2048, I=H=256.

Candidates: rnnjax's LSTM, minGRU, minLSTM and IndRNN layers, and three pieces of minGRU's
parallel form on their own: the input projection's matmul (``x W``, the gradient w.r.t. ``W``),
the matmul with the gates (``sigmoid`` and the combination ``(1 - z) + z h~``), and
``linear_scan`` over (16, 2048, 256) arrays. Each of 7 rounds runs every candidate once after an
untimed call; the figure is the median.

    python benchmarks/ab/mingru_split.py
"""

import statistics
import time

import jax
import jax.numpy as jnp

import rnnjax as rj

B, T, I, H = 16, 2048, 256, 256
ROUNDS = 7


def layer(cell):
    net = rj.layers.rnn(cell)
    params = net.init(jax.random.key(0), I)

    def loss(p, x):
        return jnp.sum(jax.vmap(lambda one: net.apply(p, one)[1])(x) ** 2)

    return jax.jit(jax.value_and_grad(loss)), params


def gates(w, x):
    proj = x.reshape(-1, I) @ w
    z = jax.nn.sigmoid(proj[:, :H])
    return jnp.sum(((1 - z) + z * proj[:, H:]) ** 2)


def main():
    xs = jax.random.normal(jax.random.key(1), (B, T, I))
    w = jax.random.normal(jax.random.key(2), (I, 2 * H)) * 0.05
    a = jax.nn.sigmoid(jax.random.normal(jax.random.key(3), (B, T, H)))
    b = jax.random.normal(jax.random.key(4), (B, T, H))
    scan = jax.vmap(rj.linear_scan)
    candidates = {
        "lstm": layer(rj.cells.lstm(H)),
        "mingru": layer(rj.cells.mingru(H)),
        "minlstm": layer(rj.cells.minlstm(H)),
        "indrnn": layer(rj.cells.indrnn(H)),
        "matmul only": (
            jax.jit(jax.value_and_grad(lambda w, x: jnp.sum((x.reshape(-1, I) @ w) ** 2))),
            w,
        ),
        "matmul + gates": (jax.jit(jax.value_and_grad(gates)), w),
        "linear_scan only": (
            jax.jit(jax.value_and_grad(lambda ab, x: jnp.sum(scan(*ab) ** 2))),
            (a, b),
        ),
    }
    times = {name: [] for name in candidates}
    for f, p in candidates.values():
        jax.block_until_ready(f(p, xs))
    for _ in range(ROUNDS):
        for name, (f, p) in candidates.items():
            jax.block_until_ready(f(p, xs))
            start = time.perf_counter()
            jax.block_until_ready(f(p, xs))
            times[name].append(time.perf_counter() - start)
    lstm = statistics.median(times["lstm"])
    for name, samples in times.items():
        median = statistics.median(samples)
        print(f"{name:18s} {median * 1e3:8.1f} ms   lstm / this {lstm / median:5.2f}")


if __name__ == "__main__":
    main()
