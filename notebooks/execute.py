"""Run notebooks top to bottom in a fresh kernel and save them with their outputs, as committed.

    python notebooks/execute.py                       # every notebook, full size, in place
    python notebooks/execute.py 03_char_language_model 05_scan_vs_unrolled
    python notebooks/execute.py --small --no-save     # what the tests do: tiny sizes, check only

Each notebook runs in a temporary working directory, so nothing it writes lands in the checkout.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent


def execute(path: Path, *, small: bool, timeout: int) -> nbformat.NotebookNode:
    """The notebook at ``path``, executed top to bottom in a fresh kernel (not saved). Raises
    ``nbclient.exceptions.CellExecutionError``, naming the cell, on the first cell error."""
    nb = nbformat.read(path, as_version=4)
    env = dict(os.environ)
    env.pop("RNNJAX_NOTEBOOK_SMALL", None)
    if small:
        env["RNNJAX_NOTEBOOK_SMALL"] = "1"
    with tempfile.TemporaryDirectory() as work:
        client = NotebookClient(
            nb,
            timeout=timeout,
            kernel_name="python3",
            record_timing=False,
            resources={"metadata": {"path": work}},
        )
        client.execute(env=env)  # the kernel's environment
    return nb


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help="notebook names (default: all)")
    parser.add_argument("--small", action="store_true", help="tiny sizes, as in the tests")
    parser.add_argument("--no-save", dest="save", action="store_false", help="do not write back")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    args = parser.parse_args(argv)
    paths = [HERE / f"{Path(n).stem}.ipynb" for n in args.names] or sorted(HERE.glob("*.ipynb"))
    for path in paths:
        if not path.exists():
            print(f"execute.py: no notebook {path}", file=sys.stderr)
            return 2
    for path in paths:
        start = time.perf_counter()
        nb = execute(path, small=args.small, timeout=args.timeout)
        seconds = time.perf_counter() - start
        if args.save:
            nbformat.write(nb, path)
        print(f"{path.name}: ran in {seconds:.1f} s" + (", saved" if args.save else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
