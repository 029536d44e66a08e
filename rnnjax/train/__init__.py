"""Training: state, steps, losses, truncated BPTT, regularizers, checkpoints, the fit loop."""

from rnnjax.train.state import TrainState, init_state

__all__ = ["TrainState", "init_state"]
