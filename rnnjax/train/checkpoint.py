"""Checkpoints of a training state on disk: synchronous, atomic, kept by recency and by a metric."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from jax.tree_util import keystr

if TYPE_CHECKING:
    import orbax.checkpoint as ocp

_SHOWN = 5  # mismatched leaves named in one error message


def _ocp():
    """``orbax.checkpoint``, imported on first use: a command that opens no checkpoint (rnnjax
    info, bench, bad input) starts without it (0.15-0.4 s of imports)."""
    import orbax.checkpoint as ocp

    return ocp


class Checkpoints:
    """Numbered checkpoints of a pytree (a :class:`rnnjax.train.TrainState`) in ``directory``.

    Each ``save`` writes step ``<directory>/<step>`` through orbax and returns once it is on disk; a
    save is written to ``<step>.orbax-checkpoint-tmp`` and renamed when complete, so a crash
    leaves the earlier checkpoints loadable. After each save the last ``keep_last`` steps are kept,
    plus the ``keep_best`` steps with the best ``metrics[best_metric]`` (lowest for
    ``best_mode="min"``, highest for ``"max"``); steps saved without that metric, or with a NaN,
    are never best. Typed PRNG keys are stored as their key data and rewrapped on restore. One
    process at a time may save to a directory; any number may read it.

    >>> import tempfile, jax.numpy as jnp
    >>> with tempfile.TemporaryDirectory() as d, Checkpoints(d, keep_last=2) as ckpt:
    ...     for step in (1, 2, 3):
    ...         ckpt.save(step, {"w": jnp.full(2, step, jnp.float32)}, metrics={"loss": 1 / step})
    ...     ckpt.steps(), ckpt.best_step(), ckpt.restore({"w": jnp.zeros(2)})["w"].tolist()
    ([2, 3], 3, [3.0, 3.0])
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        keep_last: int = 3,
        keep_best: int = 0,
        best_metric: str = "loss",
        best_mode: str = "min",
    ):
        if best_mode not in ("min", "max"):
            raise ValueError(f"best_mode must be one of 'min', 'max', got {best_mode!r}")
        if keep_last < 1 or keep_best < 0:
            raise ValueError(
                f"Checkpoints needs keep_last >= 1 (to resume from) and keep_best >= 0, got "
                f"keep_last={keep_last}, keep_best={keep_best}"
            )
        self.directory = Path(directory).absolute()
        self.best_metric, self.best_mode = best_metric, best_mode
        policies = _ocp().checkpoint_managers
        policy = policies.LatestN(n=keep_last)
        if keep_best:
            best = _BestByMetric(best_metric, best_mode, keep_best)
            policy = policies.AnyPreservationPolicy([policy, best])
        self._policy = policy
        self._writing = False
        self._orbax = self._open()

    def _open(self) -> ocp.CheckpointManager:
        ocp = _ocp()
        registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
        for item, args in [("state", ocp.args.StandardSave), ("extra", ocp.args.JsonSave)]:
            registry.add(item, args)
        for item, args in [("state", ocp.args.StandardRestore), ("extra", ocp.args.JsonRestore)]:
            registry.add(item, args)
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=False,
            preservation_policy=self._policy,
            # Orbax writes metrics only when best_fn is set; the policy above does the ranking.
            best_fn=lambda metrics: metrics.get(self.best_metric, math.nan),
            best_mode=self.best_mode,
            # Only a writer creates the directory and removes unfinished saves (`*.orbax-
            # checkpoint-tmp`): a reader must not delete the tmp dir of a save in progress.
            create=self._writing,
            cleanup_tmp_directories=self._writing,
        )
        return ocp.CheckpointManager(self.directory, options=options, handler_registry=registry)

    def save(
        self, step: int, state: Any, *, metrics: dict | None = None, extra: dict | None = None
    ) -> None:
        """Writes ``state`` (any pytree of arrays) as ``step``, then drops checkpoints not kept.

        ``metrics`` maps names to scalars (Python, numpy or jax), stored as floats and used to rank
        ``best_metric``. ``extra`` is any JSON value stored beside the state (early-stopping state,
        counters), read back by :meth:`restore_extra`. Steps must increase.
        """
        step, latest = int(step), self.latest_step()
        if latest is not None and step <= latest:
            raise ValueError(
                f"Checkpoints.save: step {step} is not after the latest step {latest} in "
                f"{self.directory}; steps must increase (use a new directory to start over)"
            )
        floats = {}
        for name, value in (metrics or {}).items():
            if np.ndim(value) != 0:
                raise TypeError(f"metrics[{name!r}] must be a scalar, got shape {np.shape(value)}")
            floats[str(name)] = float(value)
        try:
            json.dumps(extra)
        except (TypeError, ValueError) as e:
            raise TypeError(f"Checkpoints.save: extra must be JSON-serializable: {e}") from None
        if not self._writing:  # reopen as the writer: creates the directory, cleans tmp dirs
            self._orbax.close()
            self._writing = True
            self._orbax = self._open()
        state = jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, state)
        ocp = _ocp()
        items = {"state": ocp.args.StandardSave(state)}
        if extra is not None:
            items["extra"] = ocp.args.JsonSave(extra)
        # metrics={} rather than None: orbax warns about a save without metrics.
        self._orbax.save(step, args=ocp.args.Composite(**items), metrics=floats)

    def steps(self) -> list[int]:
        """All restorable steps, ascending (unfinished saves are not steps)."""
        return sorted(self._orbax.all_steps())

    def latest_step(self) -> int | None:
        """The highest restorable step, or None if there is none."""
        return self._orbax.latest_step()

    def best_step(self) -> int | None:
        """The kept step with the best ``metrics[best_metric]`` (the later on ties), or None."""
        scored = [(_metric(self._orbax.metrics(s), self.best_metric), s) for s in self.steps()]
        scored = [(v if self.best_mode == "max" else -v, s) for v, s in scored if v is not None]
        return max(scored)[1] if scored else None

    def restore(self, template: Any, step: int | None = None) -> Any:
        """The state saved at ``step`` (default: the latest), in the structure of ``template``.

        ``template`` is a pytree like the saved state: arrays or ``jax.ShapeDtypeStruct`` leaves
        (``jax.eval_shape`` of an init function). Every leaf comes back as a ``jax.Array`` of the
        template's shape, dtype and sharding; NamedTuples, tuples and typed keys as in the template.
        Raises FileNotFoundError for a missing step and ValueError, naming each mismatched leaf,
        if the checkpoint's leaves differ from the template's in path, shape or dtype.
        """
        step = self._step(step)
        target = jax.tree.map(_abstract, template)
        self._check(step, target)
        ocp = _ocp()
        args = ocp.args.Composite(state=ocp.args.StandardRestore(target))
        restored = self._orbax.restore(step, args=args)["state"]
        return jax.tree.map(_rewrap, template, restored)

    def restore_extra(self, step: int | None = None) -> Any:
        """The JSON ``extra`` saved with ``step`` (default: the latest), or None if none was."""
        step = self._step(step)
        if "extra" not in (self._orbax.metadata(step).item_handlers or {}):
            return None
        ocp = _ocp()
        args = ocp.args.Composite(extra=ocp.args.JsonRestore())
        return self._orbax.restore(step, args=args)["extra"]

    def close(self) -> None:
        self._orbax.close()

    def __enter__(self) -> Checkpoints:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _step(self, step: int | None) -> int:
        steps = self.steps()
        if (step is None and steps) or step in steps:
            return steps[-1] if step is None else int(step)
        what = "no checkpoints" if step is None else f"no checkpoint for step {step}"
        raise FileNotFoundError(f"{what} in {self.directory}; available steps: {steps or 'none'}")

    def _check(self, step: int, target: Any) -> None:
        metadata = self._orbax.metadata(step).item_metadata["state"]
        saved, wanted = _leaves(getattr(metadata, "tree", metadata)), _leaves(target)
        problems = [
            f"{keystr(path)} is in the checkpoint but not in the template"
            for name, (path, _) in saved.items()
            if name not in wanted
        ] + [
            f"{keystr(path)} is in the template, not the checkpoint"
            if name not in saved
            else f"{keystr(path)} has shape {_describe(saved[name][1])} in the checkpoint, "
            f"the template expects {_describe(want)}"
            for name, (path, want) in wanted.items()
            if name not in saved or _describe(saved[name][1]) != _describe(want)
        ]
        if problems:
            more = f"; and {len(problems) - _SHOWN} more" if len(problems) > _SHOWN else ""
            shown = "; ".join(problems[:_SHOWN])
            raise ValueError(f"checkpoint step {step} does not match the model: {shown}{more}")


@dataclasses.dataclass
class _BestByMetric:
    """Orbax's BestN over the checkpoints with a finite ``metric``; the others are never best."""

    metric: str
    mode: str
    n: int

    def should_preserve(self, checkpoints: Sequence[Any], *, context: Any) -> list[bool]:
        ranked = [
            i for i, c in enumerate(checkpoints) if _metric(c.metrics, self.metric) is not None
        ]
        best = _ocp().checkpoint_managers.BestN(
            get_metric_fn=lambda metrics: metrics[self.metric],
            reverse=self.mode == "min",  # BestN keeps the last n in sorted order
            n=self.n,
            keep_checkpoints_without_metrics=False,
        )
        keep = best.should_preserve([checkpoints[i] for i in ranked], context=context)
        flags = [False] * len(checkpoints)
        for i, kept in zip(ranked, keep, strict=True):
            flags[i] = bool(kept)
        return flags


def _metric(metrics: Any, name: str) -> float | None:
    value = metrics.get(name) if isinstance(metrics, dict) else None
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _abstract(x: Any) -> jax.ShapeDtypeStruct:
    """The leaf orbax restores for ``x``: key data for a key; a sharding, so it is a jax.Array."""
    sharding = getattr(x, "sharding", None) or jax.sharding.SingleDeviceSharding(jax.devices()[0])
    x = np.asarray(x) if not hasattr(x, "dtype") else x
    if _is_key(x):
        x = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(x.shape, x.dtype))
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def _rewrap(template_leaf: Any, restored: jax.Array) -> jax.Array:
    # dtype= rather than impl=key_impl(...): key_impl rejects ShapeDtypeStruct leaves.
    if _is_key(template_leaf):
        return jax.random.wrap_key_data(restored, dtype=template_leaf.dtype)
    return restored


def _leaves(tree: Any) -> dict[tuple[str, ...], tuple[Any, Any]]:
    """Leaves by orbax's name for them (NamedTuple fields and dict keys alike, tuple indices)."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {_ocp().tree.str_keypath(path): (path, leaf) for path, leaf in flat}


def _describe(leaf: Any) -> str:
    return f"{tuple(getattr(leaf, 'shape', ()))} {np.dtype(leaf.dtype).name}"
