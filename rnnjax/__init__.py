"""rnnjax: recurrent sequence models for JAX.

Cells are pure functions over one example, stepped over time with ``jax.lax.scan``; layers map a
sequence to a sequence; batching is ``jax.vmap``, BPTT is ``jax.grad``.
"""

from rnnjax import cells, diagnostics, interop, layers
from rnnjax.cells import LSTMState
from rnnjax.core import Cell, Layer, output_size
from rnnjax.linear import linear_scan
from rnnjax.scan import loop, scan

__version__ = "0.1.0.dev0"

__all__ = [
    "Cell",
    "LSTMState",
    "Layer",
    "cells",
    "diagnostics",
    "interop",
    "layers",
    "linear_scan",
    "loop",
    "output_size",
    "scan",
]
