"""Recurrent cells: ``Cell(init, initial_carry, step)`` over one example."""

from rnnjax.cells._common import Initializer
from rnnjax.cells.elman import elman
from rnnjax.cells.gru import gru
from rnnjax.cells.lstm import LSTMState, lstm

__all__ = ["Initializer", "LSTMState", "elman", "gru", "lstm"]
