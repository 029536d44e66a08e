"""The cell zoo compared as a researcher would quote it: every cell at about equal parameter
count, trained by ``rnnjax train`` itself on two problems.

- ``charlm``: the character language model (its default data and flags), ``--steps`` equal for
  every cell; the held-out bits per character at the end and the training tokens per second
  (``batch_size * seq_len`` tokens per step, the median rate of the run's ``train`` records
  after the first, which holds the compilation).
- ``adding``: the adding problem at ``--seq-len 200`` (Hochreiter & Schmidhuber 1997); the first
  validation step whose MSE is below 0.01 (answering 1 scores 1/6), where the run stops
  (``--stop-at``), or ``None``: not solved within the steps.

Each cell's ``--hidden`` is the one whose layer has about the LSTM's parameter count at
``reference_hidden``, counted as a layer inside a stack counts them: the cell's params for an
input of its own hidden size (:func:`layer_params`). Matching on a task's own input instead
would let the cells without a recurrent matrix (minGRU, minLSTM, IndRNN) grow to thousands of
units on the adding problem's 2 features. The same hidden size serves both tasks; the
embedding, the input projection of rglru/lru and the readout around the layer differ only by
it. Every run is a real ``python -m rnnjax.cli train`` process
(its command is in the row), one after another, so the rates of different cells come from
different processes: on a shared machine compare them as such.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rnnjax.bench import _harness
from rnnjax.bench._machine import machine_info
from rnnjax.cells import BY_NAME

SUITE = "zoo"
TASKS = ("charlm", "adding")
#: The MSE below which the adding problem counts as solved.
SOLVED_MSE = 0.01


def layer_params(cell: str, hidden: int, heads: int = 1) -> int:
    """The parameter count of ``cell`` at ``hidden`` units reading ``hidden`` features (a layer
    inside a stack), built as ``rnnjax train`` builds it."""
    import jax

    from rnnjax.tasks import base

    config = {**base.COMMON_DEFAULTS, "cell": cell, "heads": heads}
    made = base.make_cell(config, hidden)
    shapes = jax.eval_shape(lambda key: made.init(key, hidden), jax.random.key(0))
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes))


def match_hidden(cell: str, target: int, heads: int = 1) -> tuple[int, int]:
    """``(hidden, params)``: the multiple of ``heads`` whose :func:`layer_params` is closest to
    ``target`` (the smaller hidden on a tie)."""
    # the count grows with hidden: bisect for the first multiple of heads at or above target
    low, high = 1, 1
    while layer_params(cell, high * heads, heads) < target:
        low, high = high, 2 * high
    while low < high:
        mid = (low + high) // 2
        if layer_params(cell, mid * heads, heads) < target:
            low = mid + 1
        else:
            high = mid
    near = [(k * heads, layer_params(cell, k * heads, heads)) for k in (high - 1, high) if k]
    return min(near, key=lambda hn: abs(hn[1] - target))


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _train(args: list[str], run: Path, timeout: float) -> tuple[list[dict], float, str]:
    command = ["rnnjax", "train", *args, "--out", str(run), "--no-progress"]
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "rnnjax.cli", *command[1:]], capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    shown = " ".join(c for c in command if c not in (str(run), "--out", "--no-progress"))
    return _records(run / "metrics.jsonl"), seconds, shown


def _flags(cell: str, hidden: int, heads: int) -> list[str]:
    options = ["--heads", str(heads)] if heads > 1 else []
    return ["--cell", cell, "--hidden", str(hidden), *options]


def zoo(
    *,
    cells: Sequence[str] = tuple(BY_NAME),
    tasks: Sequence[str] = TASKS,
    reference_hidden: int = 128,
    charlm_steps: int = 600,
    adding_steps: int = 3000,
    adding_len: int = 200,
    adding_eval_every: int = 100,
    heads: int = 1,
    seed: int = 0,
    timeout: float = 1800.0,
    runs_dir: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Train every cell in ``cells`` on charlm and the adding problem at matched parameter
    counts; one row per cell and task.

    Args:
      cells: names from :data:`rnnjax.cells.BY_NAME`.
      tasks: among ``"charlm"`` and ``"adding"`` (default: both).
      reference_hidden: the LSTM's hidden size that sets each task's parameter budget.
      charlm_steps, adding_steps: training steps per run; adding_len: the adding problem's T;
        adding_eval_every: validation interval of the adding runs (the resolution of
        ``solved_at``).
      heads: ``--heads`` for the cells that take it (rglru, slstm, mlstm).
      seed: ``--seed`` of every run.
      timeout: seconds per run before it is killed (an error).
      runs_dir: keep the run directories there (default: a temporary directory, removed).

    Returns:
      ``{"suite": "zoo", ..., "results": [...]}``; a row has ``task``, ``cell``, ``hidden``,
      ``layer_params`` (and the LSTM's, ``target_params``), ``command``, ``train_s`` (the
      process's wall time), ``steps``, and for charlm ``bpc``, ``steps_per_s``,
      ``tokens_per_s``; for adding ``solved_at`` (a step or None), ``best_mse``,
      ``final_mse``.
    """
    from rnnjax import tasks as task_modules
    from rnnjax.tasks.base import CELL_OPTIONS

    cells, tasks = list(dict.fromkeys(cells)), list(dict.fromkeys(tasks))
    for task in tasks:
        if task not in TASKS:
            raise ValueError(f"tasks must be among {', '.join(TASKS)}; got {task!r}")
    for cell in cells:
        if cell not in BY_NAME:
            raise ValueError(f"cells must be among {', '.join(BY_NAME)}; got {cell!r}")
    for name, value in (("reference_hidden", reference_hidden), ("charlm_steps", charlm_steps),
                        ("adding_steps", adding_steps), ("adding_len", adding_len),
                        ("adding_eval_every", adding_eval_every), ("heads", heads)):  # fmt: skip
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    config = {
        "cells": cells, "tasks": tasks, "reference_hidden": reference_hidden,
        "charlm_steps": charlm_steps, "adding_steps": adding_steps, "adding_len": adding_len,
        "adding_eval_every": adding_eval_every, "heads": heads, "seed": seed, "timeout": timeout,
    }  # fmt: skip
    say = progress or (lambda _: None)
    rows = []
    target = layer_params("lstm", reference_hidden)
    sizes = {}
    for cell in cells:
        n_heads = heads if cell in CELL_OPTIONS["heads"][1] else 1
        sizes[cell] = (*match_hidden(cell, target, n_heads), n_heads)
    with tempfile.TemporaryDirectory(prefix="rnnjax-zoo-") as scratch:
        root = Path(runs_dir) if runs_dir is not None else Path(scratch)
        for task in tasks:
            for cell in cells:
                hidden, n, n_heads = sizes[cell]
                args = [
                    "--task", task, *_flags(cell, hidden, n_heads), "--seed", str(seed),
                    "--checkpoint-every", "0",
                ]  # fmt: skip
                if task == "charlm":
                    args += ["--steps", str(charlm_steps), "--eval-every", "0"]
                else:
                    # a solved run stops there (--stop-at): the steps after it tell nothing
                    args += ["--steps", str(adding_steps), "--seq-len", str(adding_len),
                             "--eval-every", str(adding_eval_every),
                             "--stop-at", str(SOLVED_MSE)]  # fmt: skip
                say(f"{task} {cell} (hidden {hidden}, {n} layer params)")
                records, seconds, shown = _train(args, root / f"{task}-{cell}", timeout)
                train = [r for r in records if r["split"] == "train"]
                val = [r for r in records if r["split"] == "val"]
                row = {"task": task, "cell": cell, "hidden": hidden, "heads": n_heads,
                       "layer_params": n, "target_params": target, "command": shown,
                       "train_s": seconds, "steps": train[-1]["step"]}  # fmt: skip
                if task == "charlm":
                    rates = [r["steps_per_s"] for r in train[1:]] or [train[-1]["steps_per_s"]]
                    row["steps_per_s"] = statistics.median(rates)
                    defaults = task_modules.module(task).DEFAULTS
                    row["tokens_per_s"] = (
                        row["steps_per_s"] * defaults["batch_size"] * defaults["seq_len"]
                    )
                    row["bpc"] = val[-1]["bpc"]
                else:
                    solved = [r["step"] for r in val if r["mse"] < SOLVED_MSE]
                    row["solved_at"] = solved[0] if solved else None
                    row["best_mse"] = min(r["mse"] for r in val)
                    row["final_mse"] = val[-1]["mse"]
                rows.append(row)
    method = {
        "params": "each cell's --hidden brings its layer's params (the cell reading hidden "
        "features, as inside a stack) closest to the LSTM's at reference_hidden; the same "
        "hidden for both tasks",
        "tokens_per_s": "batch_size * seq_len * the median steps/s of the run's train records "
        "after the first (which holds the compilation)",
        "solved_at": f"the first validation step with MSE < {SOLVED_MSE}",
        "processes": "one rnnjax train process per row, one after another",
    }
    return _harness.document(
        SUITE, command=command or _harness.python_call("zoo", config), config=config,
        machine=machine_info(), method=method, rows=rows,
    )  # fmt: skip


def format_table(result: dict[str, Any]) -> str:
    """The README's table: one line per cell, both tasks."""
    by = {(r["task"], r["cell"]): r for r in result["results"]}
    cells = list(dict.fromkeys(r["cell"] for r in result["results"]))
    config = result["config"]
    lines = []
    for cell in cells:
        lm, add = by.get(("charlm", cell)), by.get(("adding", cell))
        size = lm or add
        line = [cell, f"{size['hidden']} / {size['layer_params']:,}"]
        line += [f"{lm['bpc']:.3f}", f"{lm['tokens_per_s']:,.0f}"] if lm else ["-"] * 2
        if add:
            solved = add["solved_at"]
            line.append(f"{solved:,}" if solved else f"not solved ({add['best_mse']:.3g})")
        else:
            line.append("-")
        lines.append(line)
    header = ["cell", "H / layer params", f"bpc @ {config['charlm_steps']} steps", "tokens/s",
              f"steps to MSE<{SOLVED_MSE} (T={config['adding_len']})"]  # fmt: skip
    return _harness.table(header, lines)


def plot_zoo(result: dict[str, Any], path: str | Path) -> None:
    """Bits per character against tokens per second (charlm), one point per cell."""
    from matplotlib.figure import Figure

    rows = [r for r in result["results"] if r["task"] == "charlm"]
    fig = Figure(figsize=(6.5, 4.5))
    ax = fig.subplots()
    if not rows:
        ax.text(0.5, 0.5, "no charlm runs", ha="center", va="center", transform=ax.transAxes)
    for r in rows:
        ax.scatter(r["tokens_per_s"], r["bpc"])
        ax.annotate(r["cell"], (r["tokens_per_s"], r["bpc"]), fontsize=8,
                    xytext=(3, 3), textcoords="offset points")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("training tokens / s")
    ax.set_ylabel(f"held-out bpc after {result['config']['charlm_steps']} steps")
    ax.grid(True, alpha=0.3)
    ax.set_title(f"charlm, the cells at ~equal params ({result['machine'].get('cpu_model', '?')})",
                 fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=100)
