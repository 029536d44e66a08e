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

#: The built-in cells by name, as the CLI's ``--cell`` and ``rnnjax bench`` name them.
BY_NAME = {
    "lstm": lstm, "gru": gru, "elman": elman, "mingru": mingru, "minlstm": minlstm,
    "indrnn": indrnn, "rglru": rglru, "lru": lru, "slstm": slstm, "mlstm": mlstm,
}  # fmt: skip
#: The built-in cells whose input size must equal their hidden size.
SQUARE = ("rglru", "lru")

__all__ = [
    "BY_NAME",
    "SQUARE",
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
