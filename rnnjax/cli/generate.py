"""``rnnjax generate --run DIR``: what a trained run generates (a sample of text, an answer, a
forecast), with the flags its task declares (:mod:`rnnjax.tasks.flags`).

The parse takes two steps: ``--run`` names the run, its ``config.json`` names the task, and the
task's generate flags complete the parser. ``rnnjax generate --help`` without a run lists every
task's flags.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rnnjax import tasks
from rnnjax.cli import runs
from rnnjax.cli.errors import CLIError, Parser
from rnnjax.tasks.flags import add_flags, generates

DESCRIPTION = """\
Generate from the latest checkpoint of a run that rnnjax train wrote. What the run generates
and the flags that say how are its task's: rnnjax generate --run DIR --help lists them."""


def task_of(argv: list[str]) -> str | None:
    """The task of the run ``rnnjax generate ARGV`` names with ``--run``; None if it names
    none. A run that cannot be read is an error here, before its flags are parsed, unless
    ARGV asks for help.

    >>> task_of(["--prompt", "The"]) is None
    True
    """
    pre = Parser(add_help=False)
    pre.add_argument("--run", type=Path)
    try:
        known, _ = pre.parse_known_args(argv)
    except CLIError:  # the full parser says what is wrong
        return None
    if known.run is None:
        return None
    try:
        return runs.load_config(known.run)["task"]
    except CLIError:
        if "-h" in argv or "--help" in argv:
            return None
        raise


def _task_flags(name: str) -> str:
    """Task ``name``'s generate flags as ``--help`` shows them."""
    p = argparse.ArgumentParser(prog="rnnjax generate", usage=argparse.SUPPRESS, add_help=False)
    add_flags(p, name, "generate")
    return p.format_help().strip("\n")


def add_parser(sub, task: str | None) -> None:
    """Add ``generate`` to ``sub``: ``--run``, and the flags of task ``task`` (None: every
    task's flags, listed in the help)."""
    epilog = None
    if task is None:
        sections = [_task_flags(n) for n in tasks.NAMES if generates(n)]
        epilog = "\n\n".join(["The flags of each task's runs:", *sections])
    p = sub.add_parser(
        "generate", help="generate from a trained run: text, an answer, a forecast",
        description=DESCRIPTION, epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument(
        "--run", type=Path, required=True, metavar="DIR",
        help="the run directory, as rnnjax train wrote it (required); its task decides what is "
        "generated and the other flags",
    )  # fmt: skip
    if task is not None:
        add_flags(p, task, "generate")
    p.set_defaults(flags_of=task)  # which task's flags these are, for the error messages


def main(args: argparse.Namespace) -> int:
    from rnnjax.data.text import DataError

    config = runs.load_config(args.run)
    name = config["task"]
    if not generates(name):
        raise CLIError(
            f"the {name} task does not generate; rnnjax evaluate --run {args.run} reports its "
            "metrics"
        )
    task = runs.build(config, args.run)
    state = runs.restore(task, config, args.run)
    try:
        out = task.generate(state.params, args)
    except DataError as e:
        raise CLIError(str(e)) from None
    print(out)
    return 0
