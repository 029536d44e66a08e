"""The cell zoo: every cell beyond the classic three, for the generic contract of test_zoo.py.

One line per cell: name -> ``(make, input_size)`` with ``make()`` the cell at the zoo's small
hidden size ``H`` (cells whose input is their hidden size, like the RG-LRU and the LRU, say
``input_size = H``). Cell-specific checks (the paper's equations, parity with a peer's module)
live in each cell's own test file.
"""

import rnnjax as rj

T, I, H = 6, 3, 4

ZOO = {
    "mingru": (lambda: rj.cells.mingru(H), I),
    "mingru_log": (lambda: rj.cells.mingru(H, log_space=True), I),
    "minlstm": (lambda: rj.cells.minlstm(H), I),
    "indrnn": (lambda: rj.cells.indrnn(H), I),
    "lstm_layer_norm": (lambda: rj.cells.lstm(H, layer_norm=True), I),
    "lstm_peephole": (lambda: rj.cells.lstm(H, peephole=True), I),
    "gru_layer_norm": (lambda: rj.cells.gru(H, layer_norm=True), I),
    "rglru": (lambda: rj.cells.rglru(H, num_heads=2), H),
    "lru": (lambda: rj.cells.lru(H, state_size=3), H),
    "slstm": (lambda: rj.cells.slstm(H, num_heads=2), I),
    "mlstm": (lambda: rj.cells.mlstm(H, num_heads=2, chunk_size=4), I),  # 2 chunks at T=6
}

#: Fast paths whose derivatives may carry a non-finite input across a reset inside one chunk:
#: mLSTM's chunkwise form multiplies a chunk's keys and queries as matrices, where a NaN row
#: meets the other steps through 0 * NaN (its docstring says so; values stay exact).
CROSSES_RESET = {"mlstm"}

#: Fast paths whose derivatives at +-inf inputs may be NaN where the step scan's are finite:
#: minGRU's log-space form takes logarithms of the gates, and its derivatives at an infinite
#: pre-activation are inf - inf there (values stay exact).
INF_GRADIENTS = {"mingru_log"}
