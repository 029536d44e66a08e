"""What every task provides to the CLI, and the recurrent model they share.

A task module defines ``DEFAULTS`` (its overrides of :data:`COMMON_DEFAULTS`, and the defaults of
the flags it declares itself) and ``build(config, run_dir) -> Task``; it may declare its own
``rnnjax train`` and ``rnnjax generate`` flags (``add_train_flags``, ``add_generate_flags``: see
:mod:`rnnjax.tasks.flags`). ``config`` is the full, JSON-able run configuration (the flags,
saved as ``config.json``); ``run_dir`` is where the task keeps what it derives from data (a
vocabulary, a normalizer) so that ``rnnjax generate``/``evaluate`` rebuild the same model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax

import rnnjax as rj
from rnnjax.core import Layer
from rnnjax.data.text import DataError
from rnnjax.train import make_step

#: The flags every task reads, with defaults that work; a task's DEFAULTS override them.
COMMON_DEFAULTS: dict[str, Any] = {
    "cell": "lstm",
    "hidden": 128,
    "layers": 1,
    "bidirectional": False,
    "dropout": 0.0,
    "recurrent_dropout": 0.0,
    "precision": "float32",
    "steps": 1000,
    "batch_size": 32,
    "seq_len": 50,
    "lr": 3e-3,
    "clip": 1.0,
    "seed": 0,
    "data": None,
    "checkpoint_every": 250,
    "eval_every": 250,
    "stop_at": None,  # stop once the task's validation metric reaches this value
    # the cell options (CELL_OPTIONS): the factories' defaults; state_size None is --hidden
    "heads": 1,
    "state_size": None,
    "layer_norm": False,
    "peephole": False,
    "log_space": False,
}

CELLS: dict[str, Callable[..., rj.Cell]] = dict(rj.cells.BY_NAME)
#: ``--precision``: the cells' ``compute_dtype`` (params and state stay float32).
PRECISIONS: dict[str, Any] = {"float32": None, "bfloat16": jnp.bfloat16}
#: The cells ``--precision bfloat16`` applies to: those whose factory takes ``compute_dtype``.
LOW_PRECISION_CELLS = ("lstm", "gru", "elman")
#: The cell options as flags: config key -> (the factory's keyword, the cells that take it).
#: Their defaults (in :data:`COMMON_DEFAULTS`) are the factories' own, so a run's
#: ``config.json`` written before a key existed reads back as the same model.
CELL_OPTIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "heads": ("num_heads", ("rglru", "slstm", "mlstm")),
    "state_size": ("state_size", ("lru",)),
    "layer_norm": ("layer_norm", ("lstm", "gru")),
    "peephole": ("peephole", ("lstm",)),
    "log_space": ("log_space", ("mingru", "minlstm")),
}
#: Cells whose input size must equal their hidden size: :func:`recurrent_layers` puts a dense
#: projection to ``hidden`` in front of each (see :func:`projected`).
PROJECTED_CELLS = rj.cells.SQUARE


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def check_cell_options(config: dict, given: Any = None) -> None:
    """Refuse a cell option (or ``--precision bfloat16``) that ``config["cell"]`` does not take,
    with a line naming the cells it applies to. ``given`` (names of the flags given) says which
    options were asked for; by default, those that differ from their defaults."""
    cell = config["cell"]
    if cell not in CELLS:
        raise DataError(f"--cell {cell} is not a cell; the cells are {', '.join(CELLS)}")

    def asked(key: str) -> bool:
        if given is not None:
            return key in given
        return config.get(key, COMMON_DEFAULTS[key]) != COMMON_DEFAULTS[key]

    for key, (_, cells) in CELL_OPTIONS.items():
        if cell not in cells and asked(key):
            raise DataError(
                f"{_flag(key)} does not apply to the {cell} cell; it applies to {', '.join(cells)}"
            )
    if cell not in LOW_PRECISION_CELLS and config.get("precision", "float32") != "float32":
        raise DataError(
            f"--precision {config['precision']} does not apply to the {cell} cell, which computes "
            f"in float32; it applies to {', '.join(LOW_PRECISION_CELLS)}"
        )


def make_cell(config: dict, hidden: int) -> rj.Cell:
    """The ``--cell`` the flags name, ``hidden`` units, with the cell options that apply to it
    (:data:`CELL_OPTIONS`), computing in ``--precision`` (runs written before a flag existed
    take its default). An option or precision the cell does not take is a :class:`DataError`."""
    check_cell_options(config)
    name = config["cell"]
    kwargs: dict[str, Any] = {}
    for key, (keyword, cells) in CELL_OPTIONS.items():
        if name in cells:
            kwargs[keyword] = config.get(key, COMMON_DEFAULTS[key])
    if name in LOW_PRECISION_CELLS:
        kwargs["compute_dtype"] = PRECISIONS[config.get("precision", "float32")]
    try:
        return CELLS[name](hidden, **kwargs)
    except ValueError as e:  # e.g. --hidden not a multiple of --heads
        raise DataError(f"--cell {name}: {e}") from None


def projected(layer: Layer, size: int) -> Layer:
    """``layer`` read through a dense projection of its inputs to ``size`` features (for the
    cells whose input size must equal their hidden size, :data:`PROJECTED_CELLS`). Params:
    ``{"proj": dense params, "rnn": layer's params}``; carry and outputs are ``layer``'s."""
    proj = rj.layers.dense(size)

    def init(key, input_size):
        k_proj, k_rnn = jax.random.split(key)
        return {"proj": proj.init(k_proj, input_size), "rnn": layer.init(k_rnn, size)}

    def apply(params, xs, *, length=None, mask=None, reset=None, carry=None, key=None):
        _, x = proj.apply(params["proj"], xs, length=length, mask=mask)
        return layer.apply(
            params["rnn"], x, length=length, mask=mask, reset=reset, carry=carry, key=key
        )

    return Layer(init, apply)


def cell_layer(config: dict, cell: rj.Cell | None = None) -> Layer:
    """One recurrent layer of the flags: ``rnn(cell)`` with ``recurrent_dropout``, behind a
    dense projection to ``hidden`` for :data:`PROJECTED_CELLS`."""
    cell = make_cell(config, config["hidden"]) if cell is None else cell
    try:
        layer = rj.layers.rnn(cell, recurrent_dropout=config["recurrent_dropout"])
    except ValueError as e:  # a cell without recurrent_mask
        raise DataError(
            f"--recurrent-dropout does not apply to the {config['cell']} cell: {e}"
        ) from None
    if config["cell"] in PROJECTED_CELLS:
        layer = projected(layer, config["hidden"])
    return layer


@dataclass
class Task:
    """A sequence problem, ready to train.

    Attributes:
      params: freshly initialised params (seeded by ``config["seed"]``).
      loss_fn: ``(params, batch, key) -> (loss, metrics)``.
      train_data: ``step -> batch``, deterministic in the step.
      evaluate: ``params -> {"loss": ..., metric: ..., baselines...}`` on held-out data.
      metric: the task's own metric name (``bpc``, ``mse``, ``accuracy``, ...).
      report: ``(params, run_dir) -> lines`` printed after training (samples, baselines);
        may write plots into ``run_dir``.
      generate: ``(params, options) -> str``, for tasks that declare ``add_generate_flags``
        (None otherwise): what the run generates (a sample, an answer, a forecast), as printed
        by ``rnnjax generate``. ``options`` has an attribute per declared flag: the parsed
        flags, or :func:`rnnjax.tasks.flags.generate_options` from Python.
      step: ``(optimizer, clip_norm) -> step function``; full BPTT over ``loss_fn`` by default.
      carry: the initial ``TrainState.carry`` (a batch of carries for streaming TBPTT).
    """

    params: Any
    loss_fn: Callable[..., Any]
    train_data: Callable[[int], Any]
    evaluate: Callable[[Any], dict]
    metric: str
    report: Callable[[Any, Path], list[str]]
    generate: Callable[..., str] | None = None
    step: Callable[..., Any] | None = None
    carry: Any = None
    info: dict = field(default_factory=dict)

    def make_step(self, optimizer: optax.GradientTransformation, clip_norm: float | None):
        if self.step is not None:
            return self.step(optimizer, clip_norm)
        return make_step(self.loss_fn, optimizer, clip_norm=clip_norm)


def recurrent_layers(config: dict, *, causal: bool = False) -> Layer:
    """The stack of recurrent layers the flags describe: ``layers`` x ``cell(hidden)`` (each a
    :func:`cell_layer`: rglru and lru read their input through a dense projection to
    ``hidden``), each bidirectional if asked, ``dropout`` between layers and
    ``recurrent_dropout`` inside them.
    ``causal`` tasks (language models, forecasting) refuse ``bidirectional``."""
    if config["bidirectional"] and causal:
        raise DataError(
            f"--bidirectional does not apply to the {config['task']} task: it predicts the next "
            "step, so it must not read the future"
        )

    layers = [
        rj.layers.bidirectional(cell_layer(config), cell_layer(config))
        if config["bidirectional"]
        else cell_layer(config)
        for _ in range(config["layers"])
    ]
    stack = rj.layers.stack(*layers, dropout=config["dropout"])
    # One compiled program for the init: its random draws one by one are dozens of tiny
    # programs, each traced and compiled (about half a second of every run's start).
    return stack._replace(init=jax.jit(stack.init, static_argnums=1))


def recurrent_size(config: dict) -> int:
    """The feature size coming out of :func:`recurrent_layers`."""
    return config["hidden"] * (2 if config["bidirectional"] else 1)


def split_keys(config: dict, n: int) -> list[jax.Array]:
    """``n`` keys derived from the run's seed, for params, data and so on."""
    return list(jax.random.split(jax.random.key(config["seed"]), n))


def check_generated(config: dict) -> None:
    """Refuse ``--data``: the task generates its own data."""
    if config["data"] is not None:
        raise DataError(
            f"--data does not apply to the {config['task']} task: it generates its own data"
        )


def readout(ys: jax.Array, length: Any, bidirectional: bool) -> jax.Array:
    """The final state of :func:`~rnnjax.tasks.base.recurrent_layers`, from the top layer's
    outputs ``ys (T, F)``: the output at the last real step (``length``; None: all ``T`` are
    real), ``(H,)``; for a bidirectional layer that of the forward half, and the backward half's
    at step 0, after it has read back to the start, concatenated, ``(2H,)``. Read from the
    outputs, not the carry, it is the same for every cell: an xLSTM or LRU carry is a state
    that is not the layer's output.

    >>> import jax, jax.numpy as jnp, rnnjax as rj
    >>> body = rj.layers.stack(rj.layers.rnn(rj.cells.lstm(4)))
    >>> params = body.init(jax.random.key(0), 2)
    >>> carry, ys = body.apply(params, jnp.ones((5, 2)), length=3)
    >>> bool((readout(ys, 3, False) == carry[-1].h).all())
    True
    """
    steps = ys.shape[0]
    last = jnp.clip((steps if length is None else jnp.asarray(length)) - 1, 0, steps - 1)
    forward = jnp.take(ys, last, axis=0)
    if not bidirectional:
        return forward
    half = ys.shape[-1] // 2
    return jnp.concatenate([forward[:half], ys[0, half:]], axis=-1)


def many_to_one(config: dict, out_size: int, input_size: int) -> tuple[Callable, Callable]:
    """A many-to-one model: ``init(key) -> params`` and ``apply(params, xs (T, input_size),
    length=None, key=None) -> (out_size,)``, the recurrent layers read out by a dense layer."""
    body = recurrent_layers(config)
    head = rj.layers.dense(out_size)

    def init(key):
        k_body, k_head = jax.random.split(key)
        return {
            "body": body.init(k_body, input_size),
            "head": head.init(k_head, recurrent_size(config)),
        }

    def apply(params, xs, length=None, key=None):
        _, ys = body.apply(params["body"], xs, length=length, key=key)
        features = readout(ys, length, config["bidirectional"])
        return head.apply(params["head"], features[None])[1][0]

    return init, apply
