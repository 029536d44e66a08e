"""Sequence tasks, one module each, all runnable from ``rnnjax train --task NAME``.

Each module has ``DEFAULTS`` and ``build(config, run_dir) -> Task`` (see :mod:`rnnjax.tasks.base`)
and may declare its own command-line flags (see :mod:`rnnjax.tasks.flags`). A new task is a new
module and its name in :data:`NAMES`; the ``rnnjax`` command needs nothing else.

>>> module("adding").DEFAULTS["hidden"]
64
"""

from __future__ import annotations

import importlib
from types import ModuleType

#: Every task, in the order ``rnnjax train --help`` lists them; the first is the default.
NAMES = ("charlm", "forecast", "adding", "copy", "classify", "seq2seq")


def module(name: str) -> ModuleType:
    """The module of task ``name`` (one of :data:`NAMES`)."""
    if name not in NAMES:
        raise ValueError(f"unknown task {name!r}; the tasks are {', '.join(NAMES)}")
    return importlib.import_module(f"rnnjax.tasks.{name}")
