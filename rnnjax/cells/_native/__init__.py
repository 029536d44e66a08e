"""The LSTM's and GRU's recurrences as compiled CPU kernels (``rnnjax/_native``), with JAX's
rules around them.

A scanned LSTM step is ~45 small XLA thunks on CPU, and its BPTT accumulates the weight
gradients step by step; here each direction of the recurrence is one call. By concern:

- :mod:`.thresholds`: the step sizes (batch rows x hidden units) at which the dispatch changes
  backend, :data:`ONEDNN_MIN_UNITS` and :data:`INFERENCE_MAX_UNITS`;
- :mod:`.references`: the pure-JAX ``lax.scan`` forward pass, tangent and backward pass of
  each cell, which the kernels must equal;
- :mod:`.primitives`: the three primitives per cell (:class:`Kernels`, :data:`LSTM`,
  :data:`GRU`) and their abstract evaluation, batching, forward-mode and transpose rules;
- :mod:`.lowering`: their CPU lowerings to the kernels' XLA FFI targets;
- :mod:`.dispatch`: whether the kernels can run, the differentiable :func:`recurrence` and
  the entry points the cells call (:func:`lstm_sequence`, :func:`gru_sequence`,
  :func:`sequence_fn`, :func:`check_native`).

docs/native.md has the dispatch table (which backend runs which pass), the environment
switches and the pass counter. Values and derivatives equal the step-by-step
:func:`rnnjax.scan` of ``rj.cells.lstm`` and ``rj.cells.gru`` within float32 rounding, and
PyTorch's ``nn.LSTM``/``nn.GRU`` (``tests/test_native.py``, ``tests/test_reference.py``).
"""

from rnnjax.cells._native.dispatch import (
    available,
    check_native,
    explain,
    float32,
    gru_sequence,
    lstm_sequence,
    ready,
    recurrence,
    sequence_fn,
    unavailable_reason,
)
from rnnjax.cells._native.lowering import register_native_lowerings
from rnnjax.cells._native.primitives import GRU, LSTM, Kernels, reference
from rnnjax.cells._native.references import (
    backward_reference,
    checkpoints,
    forward_reference,
    gru_backward_reference,
    gru_forward_reference,
    gru_tangent_reference,
    tangent_reference,
)

# INFERENCE_MAX_UNITS here is a copy for reading: the lowering reads thresholds' own, so set it
# there (ONEDNN_MIN_UNITS is the one dict, edited in place through either name).
from rnnjax.cells._native.thresholds import (
    INFERENCE_MAX_UNITS,
    ONEDNN_MIN_UNITS,
    is_workspace,
    uses_onednn,
)

# The name tests/test_native.py reads.
_workspace = is_workspace

__all__ = [
    "GRU",
    "INFERENCE_MAX_UNITS",
    "LSTM",
    "ONEDNN_MIN_UNITS",
    "Kernels",
    "available",
    "backward_reference",
    "check_native",
    "checkpoints",
    "explain",
    "float32",
    "forward_reference",
    "gru_backward_reference",
    "gru_forward_reference",
    "gru_sequence",
    "gru_tangent_reference",
    "is_workspace",
    "lstm_sequence",
    "ready",
    "recurrence",
    "reference",
    "register_native_lowerings",
    "sequence_fn",
    "tangent_reference",
    "unavailable_reason",
    "uses_onednn",
]
