"""``rnnjax train``: train a task's model into a run directory, or resume one.

The parser is built for one task (``--task``, or the run ``--resume`` continues; charlm when
neither says), so each flag's help states that task's default, and the task's own flags
(:mod:`rnnjax.tasks.flags`) follow the common groups: task and data, model, optimisation, run
directory. Bad input exits with status 2 and one line, and leaves nothing behind; a run
directory that already holds a run is never written into without ``--resume``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from rnnjax import tasks
from rnnjax.cli import runs
from rnnjax.cli.errors import CLIError, Parser
from rnnjax.tasks.flags import add_flags, number, rate

# Flags a resumed run may change; every other flag describes the model or its data.
#: Task metrics for which larger is better (``--stop-at`` waits for them to rise).
HIGHER_IS_BETTER = ("accuracy", "exact_match")
RESUMABLE = ("steps", "checkpoint_every", "eval_every", "precision", "stop_at")
EPILOG = """\
The defaults shown are those of the task the flags name (charlm when none); another task may set
its own. rnnjax train --task NAME --help shows the defaults and own flags of task NAME, and
rnnjax train --resume --out DIR --help those of the run in DIR."""


def task_of(argv: list[str]) -> str:
    """The task whose flags ``rnnjax train ARGV`` takes: ``--task``, else that of the run
    ``--resume --out DIR`` continues, else the first of :data:`rnnjax.tasks.NAMES`.

    >>> task_of(["--task", "adding", "--steps", "3"]), task_of(["--hidden", "8"])
    ('adding', 'charlm')
    """
    pre = Parser(add_help=False)  # what this cannot read, the full parser reports
    pre.add_argument("--task")
    pre.add_argument("--out", type=Path)
    pre.add_argument("--resume", action="store_true")
    try:
        known, _ = pre.parse_known_args(argv)
    except CLIError:
        return tasks.NAMES[0]
    if known.task is not None:
        return known.task if known.task in tasks.NAMES else tasks.NAMES[0]
    if known.resume and known.out is not None:
        try:
            return runs.load_config(known.out)["task"]
        except CLIError:  # reported by train itself, after parsing
            pass
    return tasks.NAMES[0]


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return "none" if value is None else str(value)


def add_parser(sub, task: str) -> None:
    """Add ``train``, with the common flags and those of task ``task``, to ``sub``."""
    from rnnjax.tasks.base import CELL_OPTIONS, CELLS, COMMON_DEFAULTS, PRECISIONS

    own = tasks.module(task).DEFAULTS
    config = runs.defaults(task)

    def default(name: str) -> str:
        if name in own and own[name] != COMMON_DEFAULTS.get(name):
            return f"(default: the task's ({task}: {_show(config[name])}))"
        return f"(default: {_show(config[name])})"

    p = sub.add_parser(
        "train", help="train a model on a task (default: charlm)", epilog=EPILOG,
        description=f"Train a recurrent model on a task (here: {task}) into a run directory. "
        "Every flag has a working default.",
    )  # fmt: skip

    def flag(group, option: str, text: str, **kwargs) -> None:
        # The parser's default is None: the task's defaults fill in what was not given, and a
        # resumed run can tell a flag that was given from one that was not.
        group.add_argument(option, help=f"{text} {default(option[2:].replace('-', '_'))}", **kwargs)

    g = p.add_argument_group("task and data")
    g.add_argument(
        "--task", choices=tasks.NAMES, help=f"the problem to train on (default: {tasks.NAMES[0]})"
    )
    g.add_argument(
        "--data", metavar="FILE",
        help="the task's data file: UTF-8 text (charlm) or CSV (forecast); the other tasks "
        "generate their data (default: none: charlm reads the installed standard library's "
        "docstrings, forecast generates a series)",
    )  # fmt: skip
    flag(g, "--seq-len", "sequence length: the window (charlm, forecast), the sequence "
         "(adding), the delay (copy), the longest sequence (classify) or source 'A+B' "
         "(seq2seq)", type=number(int, 2), metavar="T")  # fmt: skip
    g = p.add_argument_group("model")
    flag(g, "--cell", "the recurrent cell (rglru and lru read their input through a dense "
         "projection to --hidden)", choices=tuple(CELLS))  # fmt: skip
    flag(g, "--hidden", "hidden units per layer", type=number(int, 1), metavar="H")
    flag(g, "--layers", "stacked recurrent layers", type=number(int, 1), metavar="N")
    flag(g, "--bidirectional", "each layer reads the sequence forwards and backwards; not for "
         "charlm and forecast, which predict the next step", action="store_const",
         const=True)  # fmt: skip
    flag(g, "--dropout", "dropout between layers", type=rate, metavar="RATE")
    flag(g, "--recurrent-dropout", "variational dropout on h inside each layer", type=rate,
         metavar="RATE")  # fmt: skip
    flag(g, "--precision", "the cells' matmuls (lstm, gru, elman); bfloat16 keeps params and "
         "state float32", choices=tuple(PRECISIONS))  # fmt: skip

    def cells(key: str) -> str:
        return f"({', '.join(CELL_OPTIONS[key][1])})"

    flag(g, "--heads", f"heads of the cell {cells('heads')}; must divide --hidden",
         type=number(int, 1), metavar="N")  # fmt: skip
    flag(g, "--state-size", f"the LRU's complex state size {cells('state_size')}; none: --hidden",
         type=number(int, 1), metavar="N")  # fmt: skip
    flag(g, "--layer-norm", f"layer normalisation inside the cell {cells('layer_norm')}",
         action="store_const", const=True)  # fmt: skip
    flag(g, "--peephole", f"peephole connections {cells('peephole')}", action="store_const",
         const=True)  # fmt: skip
    flag(g, "--log-space", f"the parallel scan in log space {cells('log_space')}",
         action="store_const", const=True)  # fmt: skip
    g = p.add_argument_group("optimisation")
    flag(g, "--steps", "training steps in all; a resumed run may raise it",
         type=number(int, 1), metavar="N")  # fmt: skip
    flag(g, "--batch-size", "sequences per step", type=number(int, 1), metavar="B")
    flag(g, "--lr", "Adam learning rate", type=number(float, 0.0, inclusive=False))
    flag(g, "--clip", "global gradient-norm clip; 0 is off", type=number(float, 0.0),
         metavar="NORM")  # fmt: skip
    flag(g, "--seed", "seeds the params, the data and dropout", type=number(int, 0))
    flag(g, "--stop-at", "stop once the task's metric on validation reaches this value (at or "
         "below it; at or above for accuracy), checked every --eval-every steps",
         type=_finite, metavar="VALUE")  # fmt: skip
    g = p.add_argument_group("run directory")
    g.add_argument(
        "--out", type=Path, metavar="DIR",
        help="where the run is written (default: runs/TASK, or runs/TASK-2, ... if taken)",
    )  # fmt: skip
    g.add_argument(
        "--resume", action="store_true",
        help="continue the run in --out from its latest checkpoint, with its model and data "
        "(default: off: a new run)",
    )  # fmt: skip
    flag(g, "--checkpoint-every", "steps between checkpoints; 0: only at the end",
         type=number(int, 0), metavar="N")  # fmt: skip
    flag(g, "--eval-every", "steps between validations; 0: only at the end",
         type=number(int, 0), metavar="N")  # fmt: skip
    g.add_argument(
        "--no-progress", action="store_true", help="no progress bar (default: off: a progress bar)"
    )
    add_flags(p, task, "train")
    p.set_defaults(flags_of=task)  # which task's flags these are, for the error messages


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def config_of(args: argparse.Namespace) -> dict[str, Any]:
    """The run configuration: the task's defaults, then every flag that was given."""
    config = runs.defaults(args.task or tasks.NAMES[0])
    for name in config:
        value = getattr(args, name, None)
        if value is not None and name != "task":
            config[name] = value
    if config["data"] is not None:
        config["data"] = str(Path(config["data"]).absolute())
    return config


def given(args: argparse.Namespace, config: dict) -> dict[str, Any]:
    """The flags of ``config``'s keys that were given."""
    return {n: getattr(args, n) for n in config if getattr(args, n, None) is not None}


def check_cell(config: dict[str, Any], args: argparse.Namespace) -> None:
    """Refuse a cell flag that was given but does not apply to ``config["cell"]`` (also one
    given at its default value), and ``--precision bfloat16`` for a cell without it.

    >>> from rnnjax import cli
    >>> args = cli.parse(["train", "--cell", "lru", "--heads", "1"])
    >>> check_cell(config_of(args), args)
    Traceback (most recent call last):
    ...
    rnnjax.cli.errors.CLIError: --heads does not apply to the lru cell; it applies to rglru, ...
    """
    from rnnjax.data.text import DataError
    from rnnjax.tasks.base import CELL_OPTIONS, check_cell_options

    try:
        check_cell_options(config, given=set(CELL_OPTIONS) & set(given(args, config)))
    except DataError as e:
        raise CLIError(str(e)) from None


def main(args: argparse.Namespace) -> int:
    if args.resume:
        if args.out is None:
            raise CLIError("--resume needs --out DIR, the run directory to continue")
        run = args.out
        config = runs.load_config(run)
        for name, value in given(args, config).items():
            if name == "data" and str(Path(value).absolute()) == config["data"]:
                continue  # the same file, named from another directory
            if name in RESUMABLE:
                config[name] = value
            elif config.get(name) != value:
                raise CLIError(
                    f"--{name.replace('_', '-')} {value} differs from the run's "
                    f"{config.get(name)}: a resumed run keeps its model and data (drop the flag, "
                    "or train into a new --out)"
                )
        created = False
    else:
        config = config_of(args)
        run = args.out or runs.fresh_dir(config["task"])
        if run.exists() and any(run.iterdir()):
            raise CLIError(
                f"{run} already holds a run; pass --resume to continue it or choose another --out"
            )
        created = not run.exists()
        run.mkdir(parents=True, exist_ok=True)
    try:
        check_cell(config, args)
        task = runs.build(config, run)
    except BaseException:
        if created:  # only what this command made: an empty directory and derived files
            shutil.rmtree(run, ignore_errors=True)
        raise
    (run / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    from rnnjax.train import EarlyStopping, TrainingDiverged, fit

    state, optimizer = runs.initial_state(task, config)
    step = task.make_step(optimizer, config["clip"] or None)
    print(f"rnnjax train: task {config['task']}, {config['cell']} x{config['layers']} "
          f"hidden {config['hidden']}, {config['steps']} steps -> {run}", flush=True)  # fmt: skip
    stop = None
    if config.get("stop_at") is not None:
        mode = "max" if task.metric in HIGHER_IS_BETTER else "min"
        stop = EarlyStopping(patience=None, metric=task.metric, mode=mode, target=config["stop_at"])
    started = time.perf_counter()
    try:
        result = fit(
            step, state, task.train_data, steps=config["steps"], eval_fn=task.evaluate,
            eval_every=config["eval_every"], out_dir=run,
            checkpoint_every=config["checkpoint_every"], resume=args.resume,
            progress=not args.no_progress, early_stopping=stop,
        )  # fmt: skip
    except TrainingDiverged as e:
        print(f"rnnjax train: stopped: {e}", file=sys.stderr)
        return 1
    except ValueError as e:
        if "does not match the model" in str(e):
            raise CLIError(f"{run}: {e}") from None
        raise
    elapsed = time.perf_counter() - started
    val = task.evaluate(result.state.params)
    summary = ", ".join(f"{k} {float(v):.4f}" for k, v in val.items())
    print(f"trained to step {int(result.state.step)} in {elapsed:.0f} s; validation: {summary}")
    if result.stopped == "early_stopping":
        print(f"stopped early: validation {task.metric} reached --stop-at {config['stop_at']:g}")
    if result.skipped_steps:
        print(f"skipped {result.skipped_steps} steps with a non-finite loss or gradient")
    for line in task.report(result.state.params, run):
        print(line)
    print(f"run directory: {run}  (metrics.jsonl, checkpoints/, loss.png)")
    return 0
