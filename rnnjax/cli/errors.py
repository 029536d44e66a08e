"""How the ``rnnjax`` command fails on bad input: one line, exit status 2, never a traceback.

>>> Parser(prog="rnnjax demo").parse_args(["--nope"])
Traceback (most recent call last):
...
rnnjax.cli.errors.CLIError: rnnjax demo: unrecognized arguments: --nope
"""

from __future__ import annotations

import argparse


class CLIError(Exception):
    """A problem with what the user asked for: printed as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors raise :class:`CLIError` (one line) instead of
    printing the usage and exiting."""

    def error(self, message: str):
        raise CLIError(f"{self.prog}: {message}")
