"""A/B in one process: rnnjax's AVX-512 loops against what the kernels run without them.

For rnnjax's default LSTM/GRU layers, each shape, three programs: the forward pass of an
unpadded batch (inference), of a padded one (a ``length`` per example), and forward+backward of
``sum(ys ** 2)`` w.r.t. the params (training). Each compiled program runs twice per round:

- ``avx512``: as it is by default where the kernels were compiled for an AVX-512 CPU: the
  AVX-512 loops run inference, and training's forward pass at steps of 4096 units or more;
- ``without``: the same compiled program with ``RNNJAX_AVX512=0`` (read by the kernels at every
  call): oneDNN's RNN primitive for unpadded inference of 1024 (LSTM) / 2048 (GRU) units or
  more, rnnjax's loops otherwise (with oneDNN's matmul from 4096 units), as before them.

The timing is ``rnnjax.bench``'s (interleaved rounds, each sample after an untimed settle of
the same program, median).

    python benchmarks/ab/avx512.py [ROUNDS] [CELL,...] [BxTxIxH ...]
        # default: 9 rounds, lstm,gru, the peers benchmark's shapes; one line per program
"""

import os
import sys

import jax
import jax.numpy as jnp
from _layers import layer, with_env

from rnnjax import _native
from rnnjax.bench._harness import measure
from rnnjax.bench.peers import SHAPES as PEER_SHAPES


def with_avx512(setting, program, *args):
    return with_env("RNNJAX_AVX512", setting, program, *args)


def programs(cell_name, batch, steps, inputs, hidden):
    """The three programs at one shape, each with its arguments."""
    params, xs, lengths, dense, padded = layer(cell_name, batch, steps, inputs, hidden)
    train = jax.grad(lambda p, x: jnp.sum(dense(p, x) ** 2))
    return {
        "fwd": (jax.jit(dense), (params, xs)),
        "padded fwd": (jax.jit(padded), (params, xs, lengths)),
        "fwd+bwd": (jax.jit(train), (params, xs)),
    }


def main(rounds, cells, shapes):
    if not _native.avx512():
        sys.exit("rnnjax's kernels here have no AVX-512 loops (rnnjax._native.avx512())")
    for cell_name in cells:
        for shape in shapes:
            named = programs(cell_name, *shape)
            runs = {}
            for mode, (program, args) in named.items():
                runs[mode, "avx512"] = with_avx512("1", program, *args)
                runs[mode, "without"] = with_avx512("0", program, *args)
            stats = measure(runs, repeats=rounds)
            for mode in named:
                a, b = (stats[mode, way]["time_s"] * 1e3 for way in ("avx512", "without"))
                print(
                    f"{cell_name} {'x'.join(map(str, shape))} {mode}: avx512 {a:.3g} ms, "
                    f"without {b:.3g} ms, ratio {a / b:.2f}",
                    flush=True,
                )
    os.environ.pop("RNNJAX_AVX512", None)


if __name__ == "__main__":
    argv = sys.argv[1:]
    n = int(argv[0]) if argv else 9
    names = argv[1].split(",") if len(argv) > 1 else ["lstm", "gru"]
    given = [tuple(map(int, s.split("x"))) for s in argv[2:]]
    main(n, names, given or list(PEER_SHAPES))
