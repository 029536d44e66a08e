"""Data: generated tasks here; text corpora in :mod:`rnnjax.data.text`, time series in
:mod:`rnnjax.data.series`, windows, padding and normalisation in :mod:`rnnjax.data.batching`."""

from rnnjax.data.synthetic import ADDING_BASELINE_MSE, adding, copy_baseline, copy_memory, majority

__all__ = ["ADDING_BASELINE_MSE", "adding", "copy_baseline", "copy_memory", "majority"]
