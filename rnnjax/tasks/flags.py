"""What a task declares to the ``rnnjax`` command: its own flags, and the value types they use.

Beside ``DEFAULTS`` and ``build``, a task module may define two hooks. Each is given an argparse
argument group, which the command shows under the task's name and only for that task
(``rnnjax train --task NAME --help``, ``rnnjax generate --run DIR --help``):

``add_train_flags(group)``
    ``rnnjax train`` flags that only this task reads. Each has ``default=None`` and a ``dest``
    that is a key of the task's ``DEFAULTS``, the value it takes when not given; a given value
    lands in ``config[dest]`` (so in ``config.json``), and ``--resume`` refuses a changed one.
``add_generate_flags(group)``
    Declares that the task generates (its ``Task.generate`` is set) and adds the flags of
    ``rnnjax generate``, with their defaults; ``Task.generate(params, options)`` reads each as an
    attribute of ``options``.

The command refuses a flag of another task with a line naming the task it belongs to. From
Python, :func:`generate_options` gives the options a task's generate flags describe:

>>> options = generate_options("charlm", length=20)
>>> options.length, options.temperature, options.prompt
(20, 0.8, None)
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from rnnjax.tasks import NAMES, module

KINDS = ("train", "generate")


def number(
    kind: type, low: float, *, inclusive: bool = True, high: float | None = None
) -> Callable[[str], Any]:
    """An argparse ``type``: the text as a ``kind`` (``int`` or ``float``) of at least ``low``
    (above ``low`` when not ``inclusive``) and at most ``high``; anything else is an error that
    says what was expected.

    >>> number(int, 1)("3"), number(float, 0.0, inclusive=False, high=1.0)("0.5")
    (3, 0.5)
    """

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if value < low or (not inclusive and value == low):
            bound = f">= {low}" if inclusive else f"> {low}"
            raise argparse.ArgumentTypeError(f"expected a number {bound}, got {text}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"expected a number <= {high}, got {text}")
        return value

    return parse


def rate(text: str) -> float:
    """An argparse ``type`` for a rate in [0, 1), such as a dropout rate.

    >>> rate("0.25")
    0.25
    """
    value = number(float, 0.0)(text)
    if value >= 1.0:
        raise argparse.ArgumentTypeError(f"expected a rate in [0, 1), got {text}")
    return value


def add_flags(parser: argparse.ArgumentParser, name: str, kind: str):
    """Add task ``name``'s ``kind`` flags (``"train"`` or ``"generate"``) to ``parser`` in an
    argument group of their own, and return the group; None if the task declares none."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}")
    hook = getattr(module(name), f"add_{kind}_flags", None)
    if hook is None:
        return None
    if kind == "train":
        group = parser.add_argument_group(f"{name} task", f"read by --task {name} only")
    else:
        group = parser.add_argument_group(f"{name} runs")
    hook(group)
    return group


def declared(name: str, kind: str) -> list[argparse.Action]:
    """The flags (argparse actions) task ``name`` declares for ``kind``.

    >>> [a.option_strings for a in declared("charlm", "train")]
    [['--tbptt']]
    """
    parser = argparse.ArgumentParser(add_help=False)
    add_flags(parser, name, kind)
    return list(parser._actions)


def owners(flag: str, kind: str) -> list[str]:
    """The tasks that declare ``flag`` (``"--tbptt"``) for ``kind``.

    >>> owners("--column", "train")
    ['forecast']
    """
    return [n for n in NAMES if any(flag in a.option_strings for a in declared(n, kind))]


def generates(name: str) -> bool:
    """Whether task ``name`` generates (declares ``add_generate_flags``)."""
    return hasattr(module(name), "add_generate_flags")


def generate_options(name: str, **overrides: Any) -> argparse.Namespace:
    """What ``rnnjax generate`` passes to task ``name``'s ``Task.generate`` when given no
    flags, with ``overrides`` in place of those defaults."""
    parser = argparse.ArgumentParser(add_help=False)
    if add_flags(parser, name, "generate") is None:
        raise ValueError(f"the {name} task does not generate")
    options = parser.parse_args([])
    unknown = sorted(set(overrides) - set(vars(options)))
    if unknown:
        raise TypeError(
            f"the {name} task's generate has no option {unknown[0]!r}; its options are "
            f"{', '.join(sorted(vars(options)))}"
        )
    for key, value in overrides.items():
        setattr(options, key, value)
    return options
