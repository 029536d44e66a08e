"""xLSTM's cells (Beck et al. 2024, arXiv 2405.04517): :func:`slstm`, scalar memory with
exponential gating and block-diagonal recurrence, and :func:`mlstm`, a matrix memory per head
with a chunkwise-parallel form over whole sequences."""

from rnnjax.cells.xlstm.mlstm import MLSTMState, mlstm
from rnnjax.cells.xlstm.slstm import SLSTMState, slstm

__all__ = ["MLSTMState", "SLSTMState", "mlstm", "slstm"]
