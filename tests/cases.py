"""The cells every contract test runs over, at one small shape so each compiles a few times."""

import rnnjax as rj

T, I, H = 6, 3, 4


CELLS = {
    "elman_tanh": lambda **kw: rj.cells.elman(H, activation="tanh", **kw),
    "elman_relu": lambda **kw: rj.cells.elman(H, activation="relu", **kw),
    "lstm": lambda **kw: rj.cells.lstm(H, **kw),
    "gru": lambda **kw: rj.cells.gru(H, **kw),
    "gru_reset_before": lambda **kw: rj.cells.gru(H, reset_after=False, **kw),
}
