"""The step sizes (batch rows x hidden units) at which the dispatch changes backend.

The references (to shape the residuals they return) and the lowerings (to pick the kernel
call) read these at trace time, as module attributes: to try another value, set it here
(``rnnjax.cells._native.thresholds.INFERENCE_MAX_UNITS = 0``, or edit the
:data:`ONEDNN_MIN_UNITS` dict in place), then ``jax.clear_caches()``. docs/native.md has the
whole dispatch table.
"""

from __future__ import annotations

# oneDNN's RNN primitives run a dense inference pass (one that saves nothing) when it has at
# least this many units per step (batch rows times hidden units); below, rnnjax's own loops
# measured faster (per-process A/B, 2-core CPU, BENCHMARKS.md): a call of the primitive costs
# ~0.25 ms more (LSTM inference: 4-9% faster at 16 x 64 units, 5-13x slower at 1 x 16).
# Differentiated passes (``save``) never run them (None): since rnnjax's loops do their
# per-step matmuls on weights packed once per pass with oneDNN's matmul (the kernels'
# ``StepGemm``), its training primitives measured slower at every shape tried: forward+backward
# 51 vs 67 ms at LSTM 32x128x64x256, 146 vs 179 ms at 64x64x128x512, 128 vs 169 ms at GRU
# 64x64x128x512 (``benchmarks/ab/onednn_matmul.py``), 148 vs 218 ms at LSTM 4x128x64x1024.
# Setting a value here brings them back (the tests do, to keep that path right).
ONEDNN_MIN_UNITS: dict[tuple[str, bool], int | None] = {
    ("lstm", False): 1024,
    ("lstm", True): None,
    ("gru", False): 2048,
    ("gru", True): None,
}

# Inference (a forward pass that saves nothing) that oneDNN's RNN primitive does not run (a
# padded sequence), with at least this many units per step (batch rows times hidden units),
# runs XLA's loop when the kernels were built without oneDNN: their loops then do the matmuls
# with OpenBLAS and the gate arithmetic on one core, which measured 6-19% slower than XLA's
# loop at 64 x 512 (BENCHMARKS.md). With oneDNN (its matmul, the gates on all cores) the
# kernels' loops measured faster than XLA's at every size: padded LSTM 64x64x128x512 45.2 vs
# 66.2 ms, GRU 37.0 vs 48.3 ms (``benchmarks/ab/onednn_matmul.py``).
INFERENCE_MAX_UNITS = 16384


def uses_onednn(cell: str, batch: int, hidden: int, *, save: bool, dense: bool) -> bool:
    """Whether a forward pass over ``batch`` rows (vmap axes folded in) runs oneDNN's RNN
    primitive: the sequence is dense (no mask, kernels built with oneDNN) and large enough
    (:data:`ONEDNN_MIN_UNITS`)."""
    least = ONEDNN_MIN_UNITS[(cell, save)]
    return dense and least is not None and batch * hidden >= least


def is_workspace(res) -> bool:
    """Whether a saved ``res`` is oneDNN's workspace, ``(B, W)`` (rnnjax's is ``(B, T, .)``)."""
    return res.ndim == 2 and res.shape[1] > 0
