"""The ``rnnjax`` command: train, generate, evaluate, info, bench.

Bad input exits with status 2 and one line on stderr, never a traceback, and never removes
anything a run directory already held.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

TASK_NAMES = ("charlm", "forecast", "adding", "copy", "classify", "seq2seq")
CELL_NAMES = ("lstm", "gru", "elman")
# Flags a resumed run may change; every other flag describes the model or its data.
RESUMABLE = ("steps", "checkpoint_every", "eval_every", "precision")


class CLIError(Exception):
    """A problem with what the user asked for: printed as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not usage + message
        raise CLIError(f"{self.prog}: {message}")


def _number(kind, low, *, inclusive=True, name="value"):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if value < low or (not inclusive and value == low):
            bound = f">= {low}" if inclusive else f"> {low}"
            raise argparse.ArgumentTypeError(f"expected a number {bound}, got {text}")
        return value

    return parse


def _rate(text: str) -> float:
    value = _number(float, 0.0)(text)
    if value >= 1.0:
        raise argparse.ArgumentTypeError(f"expected a rate in [0, 1), got {text}")
    return value


def _train_flags(p: argparse.ArgumentParser) -> None:
    # Defaults are None here: the task's defaults fill in what was not given, and a resumed
    # run can tell a flag that was given from one that was not.
    p.add_argument("--task", choices=TASK_NAMES, default=None, help="default: charlm")
    p.add_argument("--cell", choices=CELL_NAMES, default=None, help="default: the task's")
    p.add_argument("--hidden", type=_number(int, 1), help="hidden units per layer")
    p.add_argument("--layers", type=_number(int, 1), help="stacked recurrent layers")
    p.add_argument("--bidirectional", action="store_const", const=True, default=None)
    p.add_argument("--dropout", type=_rate, help="dropout between layers")
    p.add_argument("--recurrent-dropout", type=_rate, help="variational dropout on h")
    p.add_argument(
        "--precision",
        choices=("float32", "bfloat16"),
        help="the cells' matmuls; bfloat16 keeps params and state float32 (default: float32)",
    )
    p.add_argument("--steps", type=_number(int, 1), help="total training steps")
    p.add_argument("--batch-size", type=_number(int, 1))
    p.add_argument(
        "--seq-len",
        type=_number(int, 2),
        help="length: window (charlm, forecast), delay (copy), maximum (classify)",
    )
    p.add_argument("--tbptt", type=_number(int, 0), help="charlm: truncated BPTT chunk; 0 is off")
    p.add_argument("--lr", type=_number(float, 0.0, inclusive=False), help="Adam learning rate")
    p.add_argument("--clip", type=_number(float, 0.0), help="global-norm clip; 0 is off")
    p.add_argument("--seed", type=_number(int, 0))
    p.add_argument("--data", help="a data file (charlm: UTF-8 text; forecast: CSV)")
    p.add_argument("--column", help="forecast: the CSV column to model")
    p.add_argument("--checkpoint-every", type=_number(int, 0), help="0: only at the end")
    p.add_argument("--eval-every", type=_number(int, 0), help="0: only at the end")
    p.add_argument("--out", type=Path, help="run directory (default: runs/TASK, numbered if taken)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def parser() -> Parser:
    top = Parser(prog="rnnjax", description="Recurrent sequence models for JAX.")
    sub = top.add_subparsers(dest="command", required=True, parser_class=Parser)
    train = sub.add_parser("train", help="train a model on a task (default: charlm)")
    _train_flags(train)
    gen = sub.add_parser("generate", help="sample text from a trained run")
    gen.add_argument("--run", type=Path, required=True)
    gen.add_argument("--prompt", default=None)
    gen.add_argument("--length", type=_number(int, 0), default=300)
    gen.add_argument("--temperature", type=_number(float, 0.0), default=0.8)
    gen.add_argument("--top-k", type=_number(int, 1), default=None)
    gen.add_argument("--top-p", type=_number(float, 0.0, inclusive=False), default=1.0)
    gen.add_argument("--seed", type=_number(int, 0), default=0)
    ev = sub.add_parser("evaluate", help="validation metrics of a run's latest checkpoint")
    ev.add_argument("--run", type=Path, required=True)
    ev.add_argument("--json", action="store_true", help="one JSON object, full precision")
    sub.add_parser("info", help="versions and devices")
    _bench_flags(sub)
    return top


BENCH_DESCRIPTION = """\
scan-vs-unroll and peers share one method: each group of candidates (one cell and length,
or one shape) runs in a worker process that compiles them one at a time (trace and compile
timed apart; a compile past --compile-timeout is killed and reported as "timed out"), then
times them interleaved (A, B, C, A, B, C, ...): warm-up excluded, every call waited for
(block_until_ready), median of --repeats rounds with min and IQR, ratios to a reference
candidate. Peak memory is XLA's buffer-assignment estimate (compiled.memory_analysis()), not
RSS. Writes OUT/SUITE.json (config, machine, versions, the command, every row) and
OUT/SUITE.png, and prints a table.

  rnnjax bench scan-vs-unroll      lax.scan with unroll 1..16 and True vs a Python loop
  rnnjax bench peers               rnnjax vs Flax linen/nnx, Equinox, PyTorch
  rnnjax bench memory              BPTT peak memory vs T: plain scan, per-step and sqrt remat
"""


def _bench_flags(sub) -> None:
    import importlib  # the modules (rnnjax.bench re-exports functions of the same names)

    svu = importlib.import_module("rnnjax.bench.scan_vs_unroll")
    peers = importlib.import_module("rnnjax.bench.peers")
    fmt = argparse.RawDescriptionHelpFormatter
    bench = sub.add_parser(
        "bench", help="benchmarks: scan vs unroll, rnnjax vs peers, BPTT memory",
        description=BENCH_DESCRIPTION, formatter_class=fmt,
    )  # fmt: skip
    suites = bench.add_subparsers(dest="suite", required=True, metavar="SUITE")

    def common(p, out_help=True):
        p.add_argument("--out", type=Path, default=Path("runs/bench"),
                       help="directory for SUITE.json and SUITE.png (default: runs/bench); a "
                       "previous result of the same suite there is replaced")  # fmt: skip
        p.add_argument("--json", action="store_true", help="print the result JSON, not a table")

    def timing(p):
        p.add_argument(
            "--repeats",
            type=_number(int, 1),
            default=10,
            help="interleaved timing rounds; the median is reported (default: 10)",
        )
        p.add_argument("--compile-timeout", type=_number(float, 0.0, inclusive=False),
                       default=60.0, metavar="SECONDS",
                       help="limit on one candidate's trace + compile (default: 60)")  # fmt: skip

    p = suites.add_parser(
        "scan-vs-unroll",
        help="lax.scan unroll 1/2/4/8/16/True vs the Python loop: compile, step time, memory",
        description="For each cell and T: rnnjax.scan with each unroll and rnnjax.loop, batched "
        "with jax.vmap; trace and compile time, forward and forward+backward (grad of sum(ys**2) "
        "w.r.t. params) median step time, XLA peak-memory estimate; ratios to scan(unroll=1). "
        "A candidate that times out at one T is not tried at larger T.",
    )  # fmt: skip
    p.add_argument(
        "--cells",
        type=_names(svu.CELLS),
        default=svu.CELLS,
        help=f"comma-separated, from {','.join(svu.CELLS)} (default: all)",
    )
    p.add_argument(
        "--lengths",
        type=_int_list,
        default=svu.LENGTHS,
        help="sequence lengths T (default: 16,64,256,1024)",
    )
    p.add_argument("--batch", type=_number(int, 1), default=16, help="B (default: 16)")
    p.add_argument("--input-size", type=_number(int, 1), default=32, help="I (default: 32)")
    p.add_argument("--hidden", type=_number(int, 1), default=128, help="H (default: 128)")
    p.add_argument("--unrolls", type=_unroll_list, default=svu.UNROLLS,
                   help="candidates: ints k for scan(unroll=k), full for unroll=True, loop for "
                   "the Python loop (default: 1,2,4,8,16,full,loop)")  # fmt: skip
    timing(p)
    common(p)

    p = suites.add_parser(
        "peers",
        help="rnnjax vs Flax linen and nnx, Equinox, PyTorch: forward and forward+backward",
        description="Per shape and cell, the same inputs through rnnjax (the reference) and each "
        "peer: forward, and forward+backward of sum(h**2) over all outputs w.r.t. all params. "
        "rnnjax/peer below 1 means rnnjax is faster. PyTorch runs in its native time-major "
        "layout, its forward under no_grad. A peer that is not installed is reported as such.",
    )  # fmt: skip
    p.add_argument(
        "--shapes",
        type=_shape_list,
        default=peers.SHAPES,
        help="BxTxIxH,... (default: 16x256x32x64,32x128x64x256,64x64x128x512)",
    )
    p.add_argument(
        "--cells",
        type=_names(peers.CELLS),
        default=peers.CELLS,
        help="comma-separated, from lstm,gru (default: both)",
    )
    p.add_argument(
        "--peers",
        type=_names(tuple(peers.PEERS)),
        default=tuple(peers.PEERS),
        help=f"comma-separated, from {','.join(peers.PEERS)} (default: all)",
    )
    timing(p)
    common(p)

    p = suites.add_parser(
        "memory",
        help="BPTT peak memory vs T: plain scan, per-step remat, sqrt(T) checkpointing",
        description="Peak memory and time of one forward+backward pass per sequence length, for "
        "rnnjax.scan with remat off (none), per step (step) and every k steps (an int k, or "
        "sqrt for k = round(sqrt(T))).",
    )  # fmt: skip
    p.add_argument("--cell", choices=CELL_NAMES, default="lstm", help="default: lstm")
    p.add_argument(
        "--lengths",
        type=_int_list,
        default=(1024, 4096),
        help="sequence lengths T (default: 1024,4096)",
    )
    p.add_argument("--hidden", type=_number(int, 1), default=256, help="H (default: 256)")
    p.add_argument("--batch", type=_number(int, 1), default=4, help="B (default: 4)")
    p.add_argument("--input-size", type=_number(int, 1), default=32, help="I (default: 32)")
    p.add_argument(
        "--modes",
        type=_remat_list,
        default=("none", "step", "sqrt"),
        help="remat modes: none, step, sqrt or an int k (default: none,step,sqrt)",
    )
    p.add_argument(
        "--kernels",
        choices=("native", "scan"),
        default="native",
        help="native: the cell as rj.cells builds it (LSTM/GRU: rnnjax's CPU kernels, "
        "checkpointed under remat; default); scan: the step-by-step lax.scan",
    )
    p.add_argument(
        "--loss",
        choices=("outputs", "outputs_in_scan", "final"),
        default="outputs",
        help="sum(ys**2) from the stacked outputs (default), the same sum accumulated inside "
        "the scan, or sum(h_T**2) of the final state",
    )
    p.add_argument(
        "--timeout",
        type=_number(float, 0.0, inclusive=False),
        default=600.0,
        metavar="SECONDS",
        help="limit per measurement (default: 600)",
    )
    common(p)


def _items(text: str) -> list[str]:
    return [item.strip() for item in text.split(",")]


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = [int(item) for item in _items(text)]
    except ValueError:
        values = [0]
    if min(values) < 1:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive integers like 16,64,256, got {text!r}"
        )
    return tuple(dict.fromkeys(values))


def _names(choices: tuple[str, ...]):
    def parse(text: str) -> tuple[str, ...]:
        bad = [item for item in _items(text) if item not in choices]
        if bad:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated names from {','.join(choices)}, got {text!r} "
                f"({bad[0]!r} is not one)"
            )
        return tuple(dict.fromkeys(_items(text)))

    return parse


def _tokens(text: str, words: tuple[str, ...], expected: str) -> tuple[int | str, ...]:
    values: list[int | str] = []
    for item in _items(text):
        if item in words:
            values.append(item)
        elif item.isdigit() and int(item) >= 1:
            values.append(int(item))
        else:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return tuple(dict.fromkeys(values))


def _unroll_list(text: str) -> tuple[int | str, ...]:
    return _tokens(text, ("full", "loop"), "comma-separated positive ints, full or loop")


def _remat_list(text: str) -> tuple[int | str, ...]:
    return _tokens(text, ("none", "step", "sqrt"), "comma-separated none, step, sqrt or ints")


def _shape_list(text: str) -> tuple[tuple[int, ...], ...]:
    shapes = []
    for item in _items(text):
        parts = item.split("x")
        if len(parts) != 4 or not all(p.isdigit() and int(p) >= 1 for p in parts):
            raise argparse.ArgumentTypeError(
                f"expected comma-separated BxTxIxH shapes of positive ints like 16x256x32x64, "
                f"got {text!r}"
            )
        shapes.append(tuple(map(int, parts)))
    return tuple(dict.fromkeys(shapes))


# ----------------------------------------------------------------------------- helpers


def _task_module(name: str):
    import importlib

    return importlib.import_module(f"rnnjax.tasks.{name}")


def _config(args: argparse.Namespace) -> dict[str, Any]:
    from rnnjax.tasks.base import COMMON_DEFAULTS

    task = args.task or "charlm"
    config = {"task": task, **COMMON_DEFAULTS, **_task_module(task).DEFAULTS}
    for name in COMMON_DEFAULTS:
        value = getattr(args, name, None)
        if value is not None:
            config[name] = value
    if config["data"] is not None:
        config["data"] = str(Path(config["data"]).absolute())
    return config


def _given(args: argparse.Namespace) -> dict[str, Any]:
    from rnnjax.tasks.base import COMMON_DEFAULTS

    names = ["task", *COMMON_DEFAULTS]
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def _fresh_dir(task: str) -> Path:
    base = Path("runs") / task
    if not base.exists():
        return base
    n = 2
    while (base.parent / f"{task}-{n}").exists():
        n += 1
    return base.parent / f"{task}-{n}"


def _load_config(run: Path) -> dict:
    path = run / "config.json"
    if not path.is_file():
        raise CLIError(
            f"{run} is not a run directory (no config.json); train one with rnnjax train"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CLIError(f"{path} is not valid JSON ({e})") from None


def _build(config: dict, run: Path):
    from rnnjax.data.text import DataError

    try:
        return _task_module(config["task"]).build(config, run)
    except DataError as e:
        raise CLIError(str(e)) from None


def _state(task, config: dict):
    import jax
    import optax

    from rnnjax.train import init_state

    optimizer = optax.adam(config["lr"])
    state = init_state(task.params, optimizer, jax.random.key(config["seed"] + 1), task.carry)
    return state, optimizer


def _restore(task, config: dict, run: Path):
    from rnnjax.train import Checkpoints

    template, _ = _state(task, config)
    ckpt = Checkpoints(run / "checkpoints")
    try:
        if ckpt.latest_step() is None:
            raise CLIError(f"{run} has no checkpoint yet; train it (or resume it) first")
        return ckpt.restore(template)
    except ValueError as e:
        raise CLIError(f"{run}: {e}") from None
    finally:
        ckpt.close()


# ----------------------------------------------------------------------------- commands


def train(args: argparse.Namespace) -> int:
    if args.resume:
        if args.out is None:
            raise CLIError("--resume needs --out DIR, the run directory to continue")
        run = args.out
        config = _load_config(run)
        for name, value in _given(args).items():
            if (
                name in RESUMABLE
                or name == "data"
                and str(Path(value).absolute()) == config["data"]
            ):
                config[name] = value
            elif config.get(name) != value:
                raise CLIError(
                    f"--{name.replace('_', '-')} {value} differs from the run's "
                    f"{config.get(name)}: a resumed run keeps its model and data (drop the flag, "
                    "or train into a new --out)"
                )
        created = False
    else:
        config = _config(args)
        run = args.out or _fresh_dir(config["task"])
        if run.exists() and any(run.iterdir()):
            raise CLIError(
                f"{run} already holds a run; pass --resume to continue it or choose another --out"
            )
        created = not run.exists()
        run.mkdir(parents=True, exist_ok=True)
    try:
        task = _build(config, run)
    except BaseException:
        if created:  # only what this command made: an empty directory and derived files
            shutil.rmtree(run, ignore_errors=True)
        raise
    (run / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    from rnnjax.train import TrainingDiverged, fit

    state, optimizer = _state(task, config)
    step = task.make_step(optimizer, config["clip"] or None)
    print(f"rnnjax train: task {config['task']}, {config['cell']} x{config['layers']} "
          f"hidden {config['hidden']}, {config['steps']} steps -> {run}", flush=True)  # fmt: skip
    started = time.perf_counter()
    try:
        result = fit(
            step, state, task.train_data, steps=config["steps"], eval_fn=task.evaluate,
            eval_every=config["eval_every"], out_dir=run,
            checkpoint_every=config["checkpoint_every"], resume=args.resume,
            progress=not args.no_progress,
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
    if result.skipped_steps:
        print(f"skipped {result.skipped_steps} steps with a non-finite loss or gradient")
    for line in task.report(result.state.params, run):
        print(line)
    print(f"run directory: {run}  (metrics.jsonl, checkpoints/, loss.png)")
    return 0


def generate(args: argparse.Namespace) -> int:
    config = _load_config(args.run)
    task = _build(config, args.run)
    if task.generate is None:
        raise CLIError(f"the {config['task']} task does not generate text; try rnnjax evaluate")
    state = _restore(task, config, args.run)
    from rnnjax.data.text import DataError

    try:
        text = task.generate(
            state.params, prompt=args.prompt, length=args.length, temperature=args.temperature,
            top_k=args.top_k, top_p=args.top_p, seed=args.seed,
        )  # fmt: skip
    except DataError as e:
        raise CLIError(str(e)) from None
    print(text)
    return 0


def evaluate(args: argparse.Namespace) -> int:
    config = _load_config(args.run)
    task = _build(config, args.run)
    state = _restore(task, config, args.run)
    metrics = {k: float(v) for k, v in task.evaluate(state.params).items()}
    metrics["step"] = int(state.step)
    if args.json:
        print(json.dumps(metrics))
    else:
        width = max(map(len, metrics))
        for name, value in metrics.items():
            print(f"{name:>{width}}  {value:.6g}")
    return 0


def info(args: argparse.Namespace) -> int:
    import importlib.metadata as md
    import platform

    import jax

    devices = jax.devices()
    gpu = any(d.platform == "gpu" for d in devices)
    versions = {}
    for pkg in ("rnnjax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = "not installed"
    print(f"python {platform.python_version()} on {platform.platform()}")
    for pkg, version in versions.items():
        print(f"{pkg:>17}  {version}")
    print(f"{'backend':>17}  {jax.default_backend()}")
    print(f"{'devices':>17}  {', '.join(str(d) for d in devices)}")
    print(f"{'gpu':>17}  {'yes' if gpu else 'no'}")
    return 0


def _flag_text(value) -> str:
    if isinstance(value, tuple | list):
        return ",".join("x".join(map(str, v)) if isinstance(v, tuple) else str(v) for v in value)
    return str(value)


def bench(args: argparse.Namespace) -> int:
    from rnnjax.bench import _harness

    if args.out.exists() and not args.out.is_dir():
        raise CLIError(f"--out {args.out} is a file, not a directory")
    try:  # before any work: refuse to replace what is not a previous result of this suite
        _harness.output_paths(args.out, args.suite)
    except FileExistsError as e:
        raise CLIError(str(e)) from None
    skip = {"command", "suite", "json"}
    flags = {k: v for k, v in vars(args).items() if k not in skip}
    command = shlex.join(
        ["rnnjax", "bench", args.suite]
        + [f"--{k.replace('_', '-')}={_flag_text(v)}" for k, v in flags.items()]
    )

    def progress(message: str) -> None:
        print(f"rnnjax bench {args.suite}: {message}", file=sys.stderr, flush=True)

    try:
        return _bench(args, command, progress)
    except KeyboardInterrupt:  # the workers are gone (each is killed on the way out)
        print(f"rnnjax bench {args.suite}: interrupted; nothing was written", file=sys.stderr)
        return 130


def _bench(args: argparse.Namespace, command: str, progress) -> int:
    from rnnjax.bench import _harness

    timing = {"repeats": getattr(args, "repeats", None), "progress": progress, "command": command}
    if args.suite == "scan-vs-unroll":
        from rnnjax.bench.scan_vs_unroll import format_table, plot_scan_vs_unroll, scan_vs_unroll

        result = scan_vs_unroll(
            cells=args.cells, lengths=args.lengths, batch=args.batch, input_size=args.input_size,
            hidden=args.hidden, unrolls=args.unrolls, compile_timeout=args.compile_timeout,
            **timing,
        )  # fmt: skip
        plot, text = plot_scan_vs_unroll, format_table
    elif args.suite == "peers":
        from rnnjax.bench.peers import format_table, peers, plot_peers

        result = peers(
            shapes=args.shapes, cells=args.cells, peers=args.peers,
            compile_timeout=args.compile_timeout, **timing,
        )  # fmt: skip
        plot, text = plot_peers, format_table
    else:
        try:
            from rnnjax.bench.memory import memory, plot_memory
        except ImportError as e:
            raise CLIError(f"the memory suite is not available in this version ({e})") from None
        try:
            result = memory(
                cell=args.cell, lengths=args.lengths, hidden=args.hidden, batch=args.batch,
                input_size=args.input_size, modes=args.modes, timeout=args.timeout,
                loss=args.loss, progress=progress, command=command, kernels=args.kernels,
            )  # fmt: skip
        except ValueError as e:
            raise CLIError(str(e)) from None
        plot, text = plot_memory, _rows_table
    json_path, png_path = _harness.write(result, args.out, plot)
    print(json.dumps(result, indent=1) if args.json else text(result))
    if not args.json:
        print(f"wrote {json_path} and {png_path}")
    failed = [r for r in result.get("results", []) if r.get("status") == "error"]
    if failed:
        print(f"rnnjax bench {args.suite}: {len(failed)} measurement(s) failed, e.g. "
              f"{failed[0].get('error')}; see {json_path}", file=sys.stderr)  # fmt: skip
        return 1
    return 0


def _rows_table(result: dict) -> str:
    """Every scalar field of every result row, for a suite without its own table."""
    from rnnjax.bench._harness import table

    rows = result.get("results", [])
    scalar = (str, int, float, bool, type(None))
    header = list(dict.fromkeys(k for r in rows for k, v in r.items() if isinstance(v, scalar)))
    show = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    return table(header, ([show(r.get(k, "")) for k in header] for r in rows))


COMMANDS = {
    "train": train, "generate": generate, "evaluate": evaluate, "info": info, "bench": bench,
}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    try:
        args = parser().parse_args(argv)
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


if __name__ == "__main__":  # python -m rnnjax.cli: run the imported module, not a second copy
    from rnnjax.cli import main as _main

    sys.exit(_main())
