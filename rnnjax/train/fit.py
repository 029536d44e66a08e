"""The training loop: jitted steps, evaluation, early stopping, checkpoints, logs and a plot.

Batches are addressed by step: ``train_data(step) -> batch``. That makes the data position part
of the step counter, so a run restored from a checkpoint sees exactly the batches the
uninterrupted run would have seen, and continues the same trajectory bit for bit.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import jax
import numpy as np

from rnnjax.core import check_option
from rnnjax.train.checkpoint import Checkpoints
from rnnjax.train.state import TrainState


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


@dataclass
class EarlyStopping:
    """Stop when a validation metric has not improved for ``patience`` evaluations, or once it
    reaches ``target`` (at or below it for ``mode="min"``, at or above for ``"max"``); either
    rule may be None, not both.

    >>> stop = EarlyStopping(patience=2, metric="loss")
    >>> [stop.update(v, step) for step, v in enumerate([3.0, 2.0, 2.5, 2.1])]
    [True, True, False, False]
    >>> stop.should_stop, stop.best, stop.best_step
    (True, 2.0, 1)
    >>> solved = EarlyStopping(patience=None, metric="mse", target=0.01)
    >>> [(solved.update(v, step), solved.should_stop) for step, v in enumerate([0.2, 0.01])]
    [(True, False), (True, True)]
    """

    patience: int | None
    metric: str = "loss"
    mode: str = "min"
    min_delta: float = 0.0
    target: float | None = None
    best: float | None = None
    best_step: int | None = None
    waited: int = 0
    reached: bool = False

    def __post_init__(self):
        check_option("EarlyStopping mode", self.mode, ("min", "max"))
        patience = self.patience
        if patience is not None and (
            isinstance(patience, bool) or not isinstance(patience, int) or patience < 1
        ):
            raise ValueError(f"EarlyStopping expects patience >= 1 or None, got {self.patience!r}")
        if self.target is not None and not math.isfinite(self.target):
            raise ValueError(f"EarlyStopping expects a finite target, got {self.target!r}")
        if self.patience is None and self.target is None:
            raise ValueError("EarlyStopping needs a patience, a target or both; got neither")

    def update(self, value: float, step: int) -> bool:
        """Record one evaluation; True if it is a new best."""
        value = float(value)
        sign = 1.0 if self.mode == "min" else -1.0
        improved = self.best is None or sign * (self.best - value) > self.min_delta
        if improved:
            self.best, self.best_step, self.waited = value, step, 0
        else:
            self.waited += 1
        if self.target is not None and sign * (value - self.target) <= 0:
            self.reached = True
        return improved

    @property
    def should_stop(self) -> bool:
        return self.reached or (self.patience is not None and self.waited >= self.patience)


@dataclass
class FitResult:
    """What :func:`fit` returns: the final state, why it stopped, and counts."""

    state: TrainState
    stopped: str  # "steps", "early_stopping"
    skipped_steps: int = 0
    history: list[dict] = field(default_factory=list)


def _scalars(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}


def plot_losses(metrics_path: str | Path, png_path: str | Path) -> None:
    """Plot train and validation loss from a ``metrics.jsonl`` file into a PNG. Where a resumed
    run logged a step twice, the later line wins."""
    # Figure, not pyplot: no global backend switch (inline plots in notebooks keep working)
    from matplotlib.figure import Figure

    series: dict[str, dict[int, float]] = {}
    for line in Path(metrics_path).read_text().splitlines():
        row = json.loads(line)
        if "split" in row and "loss" in row and math.isfinite(row["loss"]):
            series.setdefault(row["split"], {})[row["step"]] = row["loss"]
    fig = Figure(figsize=(6, 3.5), dpi=100)
    ax = fig.subplots()
    for split, points in sorted(series.items()):
        steps = sorted(points)
        ax.plot(
            steps, [points[s] for s in steps], label=split, marker="." if split != "train" else None
        )
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path)


def fit(
    step_fn: Callable[[TrainState, Any], tuple[TrainState, dict]],
    state: TrainState,
    train_data: Callable[[int], Any],
    *,
    steps: int,
    eval_fn: Callable[[Any], dict] | None = None,
    eval_every: int = 0,
    out_dir: str | Path | None = None,
    checkpoint_every: int = 0,
    keep_last: int = 3,
    keep_best: int = 1,
    early_stopping: EarlyStopping | None = None,
    max_bad_steps: int = 10,
    log_every: int = 10,
    resume: bool = True,
    progress: bool = True,
) -> FitResult:
    """Train ``state`` with ``step_fn`` until ``state.step == steps``.

    Args:
      step_fn: a pure step, e.g. from :func:`rnnjax.train.make_step`; fit jits it.
      state: the starting state; with ``resume`` and a checkpoint in ``out_dir`` it is only the
        template the checkpoint is restored into.
      train_data: ``step -> batch``, deterministic in the step (the data position).
      steps: the total number of steps of the run (not the number still to do).
      eval_fn: ``params -> {"loss": ..., ...}`` on validation data, run every ``eval_every``
        steps and at the end; its ``loss`` (or ``early_stopping.metric``) picks the best
        checkpoint.
      out_dir: the run directory: ``metrics.jsonl`` (appended: one JSON object per line with
        ``step``, ``split`` and the metrics), ``events.jsonl`` (resumes, skipped steps),
        ``checkpoints/`` (orbax) and ``loss.png``.
      checkpoint_every: save every N steps (and always at the end) when ``out_dir`` is set.
      keep_last, keep_best: checkpoints to keep, the latest and the best by validation metric.
      early_stopping: an :class:`EarlyStopping`; checked after each evaluation.
      max_bad_steps: stop with :class:`TrainingDiverged` after this many consecutive steps with
        a non-finite loss or gradient (each one is skipped by the step function).
      log_every: write a train line to ``metrics.jsonl`` every N steps.
      resume: continue from the latest checkpoint in ``out_dir`` if there is one.
      progress: show a progress bar with step, loss and speed.
    """
    if eval_fn is not None and eval_every < 0:
        raise ValueError(f"fit expects eval_every >= 0, got {eval_every}")
    metric = early_stopping.metric if early_stopping else "loss"
    mode = early_stopping.mode if early_stopping else "min"
    out = Path(out_dir) if out_dir is not None else None
    ckpt = None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        ckpt = Checkpoints(
            out / "checkpoints", keep_last=keep_last, keep_best=keep_best,
            best_metric=metric, best_mode=mode,
        )  # fmt: skip
    history: list[dict] = []

    def append(name: str, row: dict) -> None:
        if out is not None:
            with (out / name).open("a") as f:
                f.write(json.dumps(row) + "\n")

    def record(row: dict) -> None:
        """A metrics line: step, split, loss and the rest."""
        history.append(row)
        append("metrics.jsonl", row)

    def event(row: dict) -> None:
        """Something that happened to the run (resumed, skipped a step): kept out of the
        metrics so every metrics line has the same shape."""
        append("events.jsonl", {**row, "time": time.time()})

    skipped = bad_streak = 0
    if ckpt is not None and resume and ckpt.latest_step() is not None:
        state = ckpt.restore(state)
        extra = ckpt.restore_extra() or {}
        skipped = extra.get("skipped_steps", 0)
        if early_stopping is not None and extra.get("early_stopping"):
            # the progress comes back; the rule (patience, target, metric) is the caller's
            for name, value in extra["early_stopping"].items():
                if name in ("best", "best_step", "waited", "reached"):
                    setattr(early_stopping, name, value)
        event({"event": "resume", "step": int(state.step)})

    def save(val: dict | None) -> None:
        if ckpt is None or int(state.step) in ckpt.steps():
            return
        if not all(np.isfinite(x).all() for x in jax.tree.leaves(state.params)):
            return  # never write non-finite params (the step guard should make this unreachable)
        extra = {"skipped_steps": skipped}
        if early_stopping is not None:
            extra["early_stopping"] = asdict(early_stopping)
        ckpt.save(int(state.step), state, metrics=val, extra=extra)

    evaluated: dict[int, dict] = {}

    def evaluate() -> dict:
        step = int(state.step)
        if step not in evaluated:
            evaluated[step] = _scalars(eval_fn(state.params))
            record({"step": step, "split": "val", **evaluated[step]})
        return evaluated[step]

    jitted = jax.jit(step_fn)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=int(state.step), unit="step", dynamic_ncols=True)
    stopped, last_time, last_step = "steps", time.perf_counter(), int(state.step)
    try:
        while int(state.step) < steps:
            step = int(state.step)
            state, metrics = jitted(state, train_data(step))
            done = step + 1
            m = _scalars(metrics)
            if m.get("finite", 1.0):
                bad_streak = 0
            else:
                skipped += 1
                bad_streak += 1
                event({"event": "skipped_nonfinite", "step": done})
                if bad_streak >= max_bad_steps:
                    good = ckpt.latest_step() if ckpt is not None else None
                    where = f"{ckpt.directory / str(good)}" if good is not None else "none"
                    raise TrainingDiverged(
                        f"{bad_streak} consecutive steps with a non-finite loss or gradient, "
                        f"steps {done - bad_streak + 1}..{done}; every one was skipped, so params "
                        f"are those of step {done - bad_streak}. Last good checkpoint: {where}. "
                        "Lower the learning rate, set clip_norm, or check the data at those steps."
                    )
            if done % log_every == 0 or done == steps:
                now = time.perf_counter()
                rate = (done - last_step) / max(now - last_time, 1e-9)
                last_time, last_step = now, done
                record({"step": done, "split": "train", **m, "steps_per_s": rate})
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{m['loss']:.4f}", refresh=False)
            val = None
            if eval_fn is not None and eval_every and done % eval_every == 0:
                val = evaluate()
                if early_stopping is not None:
                    early_stopping.update(val[metric], done)
            # Periodic saves wait out a run of non-finite steps: the last checkpoint then holds
            # the state from before the trouble, the one to resume from with a lower rate.
            if (
                checkpoint_every
                and done % checkpoint_every == 0
                and done != steps
                and not bad_streak
            ):
                save(val)
            if early_stopping is not None and early_stopping.should_stop:
                stopped = "early_stopping"
                break
        final_val = evaluate() if eval_fn is not None else None
        save(final_val)
    finally:
        if bar is not None:
            bar.close()
        if ckpt is not None:
            ckpt.close()
    if out is not None:
        plot_losses(out / "metrics.jsonl", out / "loss.png")
    return FitResult(state, stopped, skipped, history)
