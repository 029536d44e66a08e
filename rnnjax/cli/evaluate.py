"""``rnnjax evaluate --run DIR``: the validation metrics of a run's latest checkpoint."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rnnjax.cli import runs


def add_parser(sub) -> None:
    """Add ``evaluate`` to ``sub``."""
    p = sub.add_parser("evaluate", help="validation metrics of a run's latest checkpoint")
    p.add_argument(
        "--run", type=Path, required=True, metavar="DIR",
        help="the run directory, as rnnjax train wrote it (required)",
    )  # fmt: skip
    p.add_argument(
        "--json", action="store_true",
        help="print one JSON object, at full precision (default: off: a table)",
    )  # fmt: skip


def main(args: argparse.Namespace) -> int:
    config = runs.load_config(args.run)
    task = runs.build(config, args.run)
    state = runs.restore(task, config, args.run)
    metrics = {k: float(v) for k, v in task.evaluate(state.params).items()}
    metrics["step"] = int(state.step)
    if args.json:
        print(json.dumps(metrics))
    else:
        width = max(map(len, metrics))
        for name, value in metrics.items():
            print(f"{name:>{width}}  {value:.6g}")
    return 0
