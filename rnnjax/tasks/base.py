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
}

CELLS: dict[str, Callable[..., rj.Cell]] = {
    "lstm": rj.cells.lstm,
    "gru": rj.cells.gru,
    "elman": rj.cells.elman,
}
#: ``--precision``: the cells' ``compute_dtype`` (params and state stay float32).
PRECISIONS: dict[str, Any] = {"float32": None, "bfloat16": jnp.bfloat16}


def make_cell(config: dict, hidden: int) -> rj.Cell:
    """The ``--cell`` the flags name, ``hidden`` units, computing in ``--precision`` (runs
    written before ``--precision`` existed are float32)."""
    compute_dtype = PRECISIONS[config.get("precision", "float32")]
    return CELLS[config["cell"]](hidden, compute_dtype=compute_dtype)


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
    """The stack of recurrent layers the flags describe: ``layers`` x ``cell(hidden)``, each
    bidirectional if asked, ``dropout`` between layers and ``recurrent_dropout`` inside them.
    ``causal`` tasks (language models, forecasting) refuse ``bidirectional``."""
    if config["bidirectional"] and causal:
        raise DataError(
            f"--bidirectional does not apply to the {config['task']} task: it predicts the next "
            "step, so it must not read the future"
        )

    def one():
        cell = make_cell(config, config["hidden"])
        return rj.layers.rnn(cell, recurrent_dropout=config["recurrent_dropout"])

    layers = [
        rj.layers.bidirectional(one(), one()) if config["bidirectional"] else one()
        for _ in range(config["layers"])
    ]
    return rj.layers.stack(*layers, dropout=config["dropout"])


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


def readout(carry: Any, bidirectional: bool) -> jax.Array:
    """The final state of :func:`~rnnjax.tasks.base.recurrent_layers`, from its carry: the top
    layer's ``h`` after the last real step, ``(H,)``; for a bidirectional layer also the backward
    ``h`` after it has read back to step 0, concatenated, ``(2H,)``.

    >>> import jax, jax.numpy as jnp, rnnjax as rj
    >>> body = rj.layers.stack(rj.layers.rnn(rj.cells.lstm(4)))
    >>> params = body.init(jax.random.key(0), 2)
    >>> carry, ys = body.apply(params, jnp.ones((5, 2)), length=3)
    >>> bool((readout(carry, False) == ys[2]).all())
    True
    """
    top = carry[-1]
    parts = top if bidirectional else (top,)
    return jnp.concatenate([c.h if hasattr(c, "h") else c for c in parts], axis=-1)


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
        carry, _ = body.apply(params["body"], xs, length=length, key=key)
        features = readout(carry, config["bidirectional"])
        return head.apply(params["head"], features[None])[1][0]

    return init, apply
