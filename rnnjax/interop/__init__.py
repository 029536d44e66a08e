"""Bridges to other frameworks' recurrent modules.

``rnnjax.interop.torch``: ``torch.nn.RNN``/``LSTM``/``GRU`` to an rnnjax layer and params, and
back. Importing it does not import PyTorch; only ``from_torch`` and ``to_torch`` need it.
"""

from rnnjax.interop import torch

__all__ = ["torch"]
