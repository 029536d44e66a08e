"""``rnnjax bench SUITE``: the benchmark suites of :mod:`rnnjax.bench` from the command line.

Each suite's flags have the defaults of its Python function; ``--out`` is refused before any
work if it holds something other than a previous result of the same suite.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from rnnjax.cli.errors import CLIError
from rnnjax.tasks.flags import number

DESCRIPTION = """\
scan-vs-unroll and peers share one method: each group of candidates (one cell and length,
or one shape) runs in a worker process that compiles them one at a time (trace and compile
timed apart; a compile past --compile-timeout is killed and reported as "timed out"), then
times them interleaved (A, B, C, A, B, C, ...): warm-up excluded, every call waited for
(block_until_ready), median of --repeats rounds with min and IQR, ratios to a reference
candidate. Peak memory is XLA's buffer-assignment estimate (compiled.memory_analysis()), not
RSS. Writes OUT/SUITE.json (config, machine, versions, the command, every row) and
OUT/SUITE.png, and prints a table.

  rnnjax bench scan-vs-unroll      lax.scan with unroll 1..16 and True vs a Python loop
  rnnjax bench peers               rnnjax vs Flax linen/nnx, Equinox, PyTorch, memax, ...
  rnnjax bench memory              BPTT peak memory vs T: plain scan, per-step and sqrt remat
  rnnjax bench linear              linear_scan's backends vs T, beside the bandwidth bound
  rnnjax bench zoo                 every cell at ~equal params: charlm bpc, tokens/s, adding
"""


def add_parser(sub) -> None:
    """Add ``bench`` and its suites, each a subcommand, to ``sub``."""
    import importlib  # the modules (rnnjax.bench re-exports functions of the same names)

    svu = importlib.import_module("rnnjax.bench.scan_vs_unroll")
    peers = importlib.import_module("rnnjax.bench.peers")
    memory = importlib.import_module("rnnjax.bench.memory")
    settle_s = importlib.import_module("rnnjax.bench._harness").SETTLE_S
    fmt = argparse.RawDescriptionHelpFormatter
    bench = sub.add_parser(
        "bench", help="benchmarks: scan vs unroll, rnnjax vs peers, BPTT memory, linear_scan, "
        "the cell zoo",
        description=DESCRIPTION, formatter_class=fmt,
    )  # fmt: skip
    suites = bench.add_subparsers(dest="suite", required=True, metavar="SUITE")

    def common(p):
        p.add_argument("--out", type=Path, default=Path("runs/bench"),
                       help="directory for SUITE.json and SUITE.png (default: runs/bench); a "
                       "previous result of the same suite there is replaced")  # fmt: skip
        p.add_argument(
            "--json", action="store_true", help="print the result JSON, not a table (default: off)"
        )

    def timing(p):
        p.add_argument(
            "--repeats",
            type=number(int, 1),
            default=10,
            help="interleaved timing rounds; the median is reported (default: 10)",
        )
        p.add_argument("--compile-timeout", type=number(float, 0.0, inclusive=False),
                       default=60.0, metavar="SECONDS",
                       help="limit on one candidate's trace + compile (default: 60)")  # fmt: skip
        p.add_argument("--settle", type=number(float, 0.0), default=settle_s,
                       metavar="SECONDS",
                       help="untimed running of each candidate before its samples, so that "
                       f"clocks and caches settle (default: {settle_s})")  # fmt: skip

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
        type=_cell_list(svu.BUILTIN_CELLS, svu.check_cells),
        default=svu.CELLS,
        help=f"comma-separated, from {','.join(svu.BUILTIN_CELLS)} or your own as "
        "package.module:function (a function of the hidden size returning an rnnjax.Cell); "
        f"rglru and lru read H features, not I (default: {','.join(svu.CELLS)})",
    )
    p.add_argument(
        "--lengths",
        type=_int_list,
        default=svu.LENGTHS,
        help="sequence lengths T (default: 16,64,256,1024)",
    )
    p.add_argument("--batch", type=number(int, 1), default=16, help="B (default: 16)")
    p.add_argument("--input-size", type=number(int, 1), default=32, help="I (default: 32)")
    p.add_argument("--hidden", type=number(int, 1), default=128, help="H (default: 128)")
    p.add_argument("--unrolls", type=_unroll_list, default=svu.UNROLLS,
                   help="candidates: ints k for scan(unroll=k), full for unroll=True, loop for "
                   "the Python loop (default: 1,2,4,8,16,full,loop)")  # fmt: skip
    timing(p)
    common(p)

    p = suites.add_parser(
        "peers",
        help="rnnjax vs Flax linen and nnx, Equinox, PyTorch, memax, recurrentgemma: forward "
        "and forward+backward",
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
        type=_names(peers.ALL_CELLS),
        default=peers.CELLS,
        help=f"comma-separated, from {','.join(peers.ALL_CELLS)} (default: lstm,gru); rglru "
        "and lru need shapes with I == H",
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
    p.add_argument(
        "--cell", choices=memory.CELLS, default="lstm",
        help="the cell; rglru and lru read --hidden features (default: lstm)",
    )  # fmt: skip
    p.add_argument(
        "--lengths",
        type=_int_list,
        default=(1024, 4096),
        help="sequence lengths T (default: 1024,4096)",
    )
    p.add_argument("--hidden", type=number(int, 1), default=256, help="H (default: 256)")
    p.add_argument("--batch", type=number(int, 1), default=4, help="B (default: 4)")
    p.add_argument("--input-size", type=number(int, 1), default=32, help="I (default: 32)")
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
        type=number(float, 0.0, inclusive=False),
        default=600.0,
        metavar="SECONDS",
        help="limit per measurement (default: 600)",
    )
    common(p)

    linear = importlib.import_module("rnnjax.bench.linear")
    p = suites.add_parser(
        "linear",
        help="linear_scan's backends vs T, forward and fwd+bwd, beside the bandwidth bound",
        description="Per T: rnnjax.linear_scan over (T, width) float32 arrays in each mode, "
        "forward and jax.grad of sum(h * w) w.r.t. a and b, timed interleaved with np.add over "
        "arrays beyond the last-level cache (the bandwidth). Each time is shown beside its "
        "bound: bytes moved (12 per element forward, 32 forward+backward) / that bandwidth.",
    )  # fmt: skip
    p.add_argument(
        "--lengths",
        type=_int_list,
        default=linear.LENGTHS,
        help="sequence lengths T (default: 256,1024,4096,16384,65536)",
    )
    p.add_argument("--width", type=number(int, 1), default=1024, help="N (default: 1024)")
    p.add_argument(
        "--backends",
        type=_names(linear.BACKENDS),
        default=linear.BACKENDS,
        help=f"comma-separated, from {','.join(linear.BACKENDS)} (default: all)",
    )
    p.add_argument(
        "--repeats",
        type=number(int, 1),
        default=5,
        help="interleaved timing rounds; the median is reported (default: 5)",
    )
    p.add_argument(
        "--stream-floats",
        type=number(int, 1),
        default=linear.STREAM_FLOATS,
        help=f"floats per array of the np.add bandwidth measurement; keep it well beyond the "
        f"last-level cache for a true bound (default: {linear.STREAM_FLOATS})",
    )
    p.add_argument("--compile-timeout", type=number(float, 0.0, inclusive=False),
                   default=120.0, metavar="SECONDS",
                   help="limit on one candidate's trace + compile (default: 120)")  # fmt: skip
    common(p)

    zoo = importlib.import_module("rnnjax.bench.zoo")
    p = suites.add_parser(
        "zoo",
        help="every cell at ~equal params: charlm bits per char and tokens/s, adding at T=200",
        description="Each cell's --hidden is chosen so that its layer (reading hidden-size "
        "inputs, as inside a stack) has about the LSTM's parameter count at "
        "--reference-hidden; then real rnnjax train runs, one after "
        "another: charlm for --charlm-steps (held-out bpc, training tokens per second) and the "
        "adding problem at --adding-len (the first validation step with MSE < 0.01).",
    )  # fmt: skip
    p.add_argument(
        "--cells", type=_names(tuple(zoo.BY_NAME)), default=tuple(zoo.BY_NAME),
        help=f"comma-separated, from {','.join(zoo.BY_NAME)} (default: all)",
    )  # fmt: skip
    p.add_argument(
        "--tasks", type=_names(zoo.TASKS), default=zoo.TASKS,
        help=f"comma-separated, from {','.join(zoo.TASKS)} (default: both)",
    )  # fmt: skip
    for flag, default, text in (
        ("--reference-hidden", 128, "the LSTM hidden size that sets the parameter budget"),
        ("--charlm-steps", 600, "training steps of every charlm run"),
        ("--adding-steps", 3000, "training steps of every adding run"),
        ("--adding-len", 200, "T of the adding problem"),
        ("--adding-eval-every", 100, "validation interval of the adding runs"),
        ("--heads", 1, "--heads of rglru, slstm and mlstm"),
    ):
        p.add_argument(flag, type=number(int, 1), default=default, metavar="N",
                       help=f"{text} (default: {default})")  # fmt: skip
    p.add_argument(
        "--seed", type=number(int, 0), default=0, help="--seed of every run (default: 0)"
    )
    p.add_argument("--timeout", type=number(float, 0.0, inclusive=False), default=1800.0,
                   metavar="SECONDS", help="limit per run (default: 1800)")  # fmt: skip
    p.add_argument(
        "--runs-dir", type=Path, metavar="DIR",
        help="keep the run directories there (default: a temporary directory)",
    )  # fmt: skip
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


def _cell_list(builtin: tuple[str, ...], check):
    def parse(text: str) -> tuple[str, ...]:
        bad = [item for item in _items(text) if item not in builtin and ":" not in item]
        if bad:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated cells from {','.join(builtin)} or "
                f"package.module:function, got {text!r} ({bad[0]!r} is neither)"
            )
        cells = tuple(dict.fromkeys(_items(text)))
        try:  # a module that does not import, or a name in it that is not a function
            check(cells)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e).removeprefix("cells: ")) from None
        return cells

    return parse


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


def _flag_text(value) -> str:
    if isinstance(value, tuple | list):
        return ",".join("x".join(map(str, v)) if isinstance(v, tuple) else str(v) for v in value)
    return str(value)


def main(args: argparse.Namespace) -> int:
    from rnnjax.bench import _harness

    if args.out.exists() and not args.out.is_dir():
        raise CLIError(f"--out {args.out} is a file, not a directory")
    try:  # before any work: refuse to replace what is not a previous result of this suite
        _harness.output_paths(args.out, args.suite)
    except FileExistsError as e:
        raise CLIError(str(e)) from None
    skip = {"command", "suite", "json"}
    flags = {k: v for k, v in vars(args).items() if k not in skip and v is not None}
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
            settle_s=args.settle, **timing,
        )  # fmt: skip
        plot, text = plot_scan_vs_unroll, format_table
    elif args.suite == "peers":
        from rnnjax.bench.peers import format_table, peers, plot_peers

        result = peers(
            shapes=args.shapes, cells=args.cells, peers=args.peers,
            compile_timeout=args.compile_timeout, settle_s=args.settle, **timing,
        )  # fmt: skip
        plot, text = plot_peers, format_table
    elif args.suite == "linear":
        from rnnjax.bench.linear import format_table, linear, plot_linear

        result = linear(
            lengths=args.lengths, width=args.width, backends=args.backends,
            stream_floats=args.stream_floats, compile_timeout=args.compile_timeout, **timing,
        )  # fmt: skip
        plot, text = plot_linear, format_table
    elif args.suite == "zoo":
        from rnnjax.bench.zoo import format_table, plot_zoo, zoo

        result = zoo(
            cells=args.cells, tasks=args.tasks, reference_hidden=args.reference_hidden,
            charlm_steps=args.charlm_steps, adding_steps=args.adding_steps,
            adding_len=args.adding_len, adding_eval_every=args.adding_eval_every,
            heads=args.heads, seed=args.seed, timeout=args.timeout, runs_dir=args.runs_dir,
            progress=progress, command=command,
        )  # fmt: skip
        plot, text = plot_zoo, format_table
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
