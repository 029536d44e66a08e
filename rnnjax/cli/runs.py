"""Run directories, as ``rnnjax train`` writes them and ``generate``/``evaluate`` read them:
``config.json``, the task's derived files and ``checkpoints/``.

Every failure here is a :class:`~rnnjax.cli.errors.CLIError` that names the directory and what
to do; nothing here writes into a run directory except the task's own ``build``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rnnjax import tasks
from rnnjax.cli.errors import CLIError


def defaults(task: str) -> dict[str, Any]:
    """The full configuration task ``task`` trains with when given no flags.

    >>> defaults("adding")["hidden"], defaults("charlm")["tbptt"]
    (64, 0)
    """
    from rnnjax.tasks.base import COMMON_DEFAULTS

    return {"task": task, **COMMON_DEFAULTS, **tasks.module(task).DEFAULTS}


def load_config(run: Path) -> dict[str, Any]:
    """``run/config.json``, completed with its task's defaults for any key it predates."""
    path = run / "config.json"
    if not path.is_file():
        raise CLIError(
            f"{run} is not a run directory (no config.json); train one with rnnjax train"
        )
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CLIError(f"{path} is not valid JSON ({e})") from None
    task = config.get("task") if isinstance(config, dict) else None
    if task not in tasks.NAMES:
        raise CLIError(
            f"{path} names no known task (got {task!r}; the tasks are {', '.join(tasks.NAMES)})"
        )
    return {**defaults(task), **config}


def fresh_dir(task: str) -> Path:
    """``runs/TASK``, or ``runs/TASK-2``, ``-3``, ... if it is taken."""
    base = Path("runs") / task
    if not base.exists():
        return base
    n = 2
    while (base.parent / f"{task}-{n}").exists():
        n += 1
    return base.parent / f"{task}-{n}"


def build(config: dict, run: Path):
    """The task ``config`` describes, built over ``run`` (its data problems as CLIError)."""
    from rnnjax.data.text import DataError

    try:
        return tasks.module(config["task"]).build(config, run)
    except DataError as e:
        raise CLIError(str(e)) from None


def initial_state(task, config: dict):
    """A fresh ``TrainState`` for ``task`` and the Adam optimizer of ``config["lr"]``."""
    import jax
    import optax

    from rnnjax.train import init_state

    optimizer = optax.adam(config["lr"])
    state = init_state(task.params, optimizer, jax.random.key(config["seed"] + 1), task.carry)
    return state, optimizer


def restore(task, config: dict, run: Path):
    """The ``TrainState`` of ``run``'s latest checkpoint."""
    from rnnjax.train import Checkpoints

    template, _ = initial_state(task, config)
    ckpt = Checkpoints(run / "checkpoints")
    try:
        if ckpt.latest_step() is None:
            raise CLIError(f"{run} has no checkpoint yet; train it (or resume it) first")
        return ckpt.restore(template)
    except ValueError as e:
        raise CLIError(f"{run}: {e}") from None
    finally:
        ckpt.close()
