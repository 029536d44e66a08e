"""The ``rnnjax`` command: train, generate, evaluate, info, bench.

One module per command, each with ``add_parser(subparsers, ...)`` and ``main(args) -> exit
status``; ``rnnjax train`` and ``rnnjax generate`` also take the flags of one task, which the
task's module declares (:mod:`rnnjax.tasks.flags`). Bad input exits with status 2 and one line
on stderr, never a traceback, and never removes anything a run directory already held.

>>> parse(["train", "--task", "charlm", "--tbptt", "8"]).tbptt
8
>>> parse(["train", "--task", "adding", "--tbptt", "8"])
Traceback (most recent call last):
...
rnnjax.cli.errors.CLIError: --tbptt is a flag of the charlm task, not of adding: drop it ...
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from rnnjax import tasks
from rnnjax.cli import bench, evaluate, generate, info, train
from rnnjax.cli.errors import CLIError, Parser
from rnnjax.tasks.flags import owners

__all__ = ["CLIError", "main", "parse", "parser"]

COMMANDS = {
    "train": train.main, "generate": generate.main, "evaluate": evaluate.main, "info": info.main,
    "bench": bench.main,
}  # fmt: skip


def parser(argv: Sequence[str] = (), *, task: str | None = None) -> Parser:
    """The command's parser, for ``argv``. ``train`` and ``generate`` take the flags of one
    task: ``task`` if given, else the one ``argv`` names (train: ``--task``, or the run
    ``--resume`` continues; generate: the ``--run``'s), else charlm for train and none for
    generate."""
    argv = list(argv)
    command = argv[0] if argv else None
    top = Parser(prog="rnnjax", description="Recurrent sequence models for JAX.")
    sub = top.add_subparsers(dest="command", required=True, parser_class=Parser)
    train_task = run_task = task
    if task is None:
        train_task = train.task_of(argv[1:]) if command == "train" else tasks.NAMES[0]
        run_task = generate.task_of(argv[1:]) if command == "generate" else None
    train.add_parser(sub, train_task)
    generate.add_parser(sub, run_task)
    evaluate.add_parser(sub)
    info.add_parser(sub)
    bench.add_parser(sub)
    return top


def parse(argv: Sequence[str]) -> argparse.Namespace:
    """``argv`` parsed; a flag of another task than the one ``argv`` trains or generates from is
    refused naming the task it belongs to."""
    argv = list(argv)
    args, extra = parser(argv).parse_known_args(argv)
    if extra:
        raise CLIError(_unknown(args, extra))
    return args


def _unknown(args: argparse.Namespace, extra: list[str]) -> str:
    kind = args.command if args.command in ("train", "generate") else None
    for item in extra if kind else ():
        flag = item.split("=", 1)[0]
        if not flag.startswith("--") or not (owned := owners(flag, kind)):
            continue
        task = args.flags_of
        if kind == "train":
            return (
                f"{flag} is a flag of the {' and '.join(owned)} task, not of {task}: "
                f"drop it (rnnjax train --task {task} --help lists the flags {task} takes)"
            )
        return (
            f"{flag} is a flag of {' and '.join(owned)} runs, not of this {task} run: "
            f"drop it (rnnjax generate --run {args.run} --help lists the flags it takes)"
        )
    return f"rnnjax {args.command}: unrecognized arguments: {' '.join(extra)}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``rnnjax ARGV`` (default: ``sys.argv[1:]``) and return its exit status."""
    try:
        args = parse(sys.argv[1:] if argv is None else argv)
        return COMMANDS[args.command](args)
    except CLIError as e:
        message = str(e)
        print(
            message if message.startswith("rnnjax") else f"rnnjax: error: {message}",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print("rnnjax: interrupted; resume with --resume --out RUN_DIR", file=sys.stderr)
        return 130
