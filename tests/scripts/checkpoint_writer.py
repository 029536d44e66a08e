"""Saves step 1 of a small state, then step 2 of a large one: test_checkpoint kills it mid-save.

Usage: python checkpoint_writer.py DIRECTORY. Prints "saved 1", then "saving 2" just before the
save of ~300 MB of float32 that takes about a second.
"""

import sys

import jax
import jax.numpy as jnp

from rnnjax.train.checkpoint import Checkpoints


def small_state() -> dict:
    """The exact state saved as step 1 (a typed key included)."""
    return {
        "w": jnp.arange(12, dtype=jnp.float32).reshape(3, 4) / 7,
        "b": (jnp.array([1, -2], jnp.int32), jnp.ones(3, jnp.bfloat16)),
        "key": jax.random.split(jax.random.key(7))[1],
    }


def main(directory: str) -> None:
    with Checkpoints(directory) as ckpt:
        ckpt.save(1, small_state(), metrics={"loss": 1.0}, extra={"epoch": 1})
        print("saved 1", flush=True)
        # Random, so orbax cannot compress it away: 3 x 25M float32 = 300 MB.
        big = [jax.random.uniform(jax.random.key(i), (25_000_000,)) for i in range(3)]
        jax.block_until_ready(big)
        print("saving 2", flush=True)
        ckpt.save(2, {"big": big})
        print("saved 2", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
