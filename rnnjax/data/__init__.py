"""Data: generated tasks (and later text, time series, padding and batching)."""

from rnnjax.data.synthetic import ADDING_BASELINE_MSE, adding, copy_baseline, copy_memory, majority

__all__ = ["ADDING_BASELINE_MSE", "adding", "copy_baseline", "copy_memory", "majority"]
