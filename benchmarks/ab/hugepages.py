"""A/B of RNNJAX_HUGEPAGES in one process: rnnjax's default LSTM/GRU layers at the peers
benchmark's shapes, forward and forward+backward (loss sum(ys ** 2)), with the native kernels'
huge-page advice off and on in alternation.

Each of 21 rounds runs the program once per setting, each timed call after one untimed call
of the same setting; the figure is the median per setting. The kernels read RNNJAX_HUGEPAGES
at every call, so one compiled program serves both settings.

    python benchmarks/ab/hugepages.py            # prints one line per shape
"""

import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import rnnjax as rj
from rnnjax.bench.peers import SHAPES as PEER_SHAPES

# The peers benchmark's shapes (rnnjax bench peers), each cell.
SHAPES = [(cell, shape) for cell in ("lstm", "gru") for shape in PEER_SHAPES]
ROUNDS = 21


def layer_programs(cell_name, batch, steps, inputs, hidden):
    cell = getattr(rj.cells, cell_name)(hidden)
    params = cell.init(jax.random.key(0), inputs)
    xs = jnp.asarray(np.random.default_rng(0).standard_normal((batch, steps, inputs), np.float32))

    def run(p, x):
        return jax.vmap(lambda x: rj.scan(cell, p, x)[1])(x)

    fwd = jax.jit(run)
    fwd_bwd = jax.jit(jax.grad(lambda p, x: jnp.sum(run(p, x) ** 2)))
    return params, xs, {"fwd": fwd, "fwd+bwd": fwd_bwd}


def main():
    for cell_name, shape in SHAPES:
        params, xs, programs = layer_programs(cell_name, *shape)
        parts = []
        for mode, program in programs.items():
            for _ in range(3):
                jax.block_until_ready(program(params, xs))
            times = {"0": [], "1": []}
            for _ in range(ROUNDS):
                for setting in times:
                    os.environ["RNNJAX_HUGEPAGES"] = setting
                    jax.block_until_ready(program(params, xs))  # settle
                    start = time.perf_counter()
                    jax.block_until_ready(program(params, xs))
                    times[setting].append(time.perf_counter() - start)
            off, on = (statistics.median(times[s]) * 1e3 for s in ("0", "1"))
            parts.append(f"{mode} off {off:.3g} ms, on {on:.3g} ms ({off / on:.2f}x)")
        print(f"{cell_name} {'x'.join(map(str, shape))}: " + " | ".join(parts), flush=True)
    os.environ.pop("RNNJAX_HUGEPAGES")


if __name__ == "__main__":
    main()
