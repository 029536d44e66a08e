"""Sequence tasks, one module each, all runnable from ``rnnjax train --task NAME``.

Each module has ``DEFAULTS`` and ``build(config, run_dir) -> Task`` (see :mod:`rnnjax.tasks.base`).
"""
