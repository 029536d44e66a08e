"""Training: state, steps, losses, truncated BPTT, regularizers, checkpoints, the fit loop."""

from rnnjax.train.checkpoint import Checkpoints
from rnnjax.train.fit import EarlyStopping, FitResult, TrainingDiverged, fit, plot_losses
from rnnjax.train.losses import (
    accuracy,
    cross_entropy,
    last_step,
    length_mask,
    masked_mean,
    mse,
    next_token_cross_entropy,
)
from rnnjax.train.state import TrainState, init_state
from rnnjax.train.step import make_step, split_chunks, stream_step, tbptt, tbptt_step

__all__ = [
    "Checkpoints",
    "EarlyStopping",
    "FitResult",
    "TrainState",
    "TrainingDiverged",
    "accuracy",
    "cross_entropy",
    "fit",
    "init_state",
    "last_step",
    "length_mask",
    "make_step",
    "masked_mean",
    "mse",
    "next_token_cross_entropy",
    "plot_losses",
    "split_chunks",
    "stream_step",
    "tbptt",
    "tbptt_step",
]
