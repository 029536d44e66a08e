"""Recurrent cells: ``Cell(init, initial_carry, step)`` over one example."""

from rnnjax.cells._common import Initializer
from rnnjax.cells.elman import elman
from rnnjax.cells.gru import gru
from rnnjax.cells.indrnn import indrnn
from rnnjax.cells.lru import lru
from rnnjax.cells.lstm import LSTMState, lstm
from rnnjax.cells.mingru import mingru
from rnnjax.cells.minlstm import minlstm
from rnnjax.cells.rglru import rglru
from rnnjax.cells.xlstm import MLSTMState, SLSTMState, mlstm, slstm

__all__ = [
    "Initializer",
    "LSTMState",
    "elman",
    "gru",
    "indrnn",
    "lru",
    "lstm",
    "mingru",
    "minlstm",
    "rglru",
    "MLSTMState",
    "SLSTMState",
    "mlstm",
    "slstm",
]
