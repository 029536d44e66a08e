"""How a cell's whole sequence reaches the kernels: whether they can run (:func:`ready`,
:func:`check_native`, :func:`explain`), the :func:`recurrence` whose derivative is the tangent
and backward primitives, and the per-cell entry points (:func:`lstm_sequence`,
:func:`gru_sequence`, :func:`sequence_fn`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from rnnjax import _native
from rnnjax.cells._native.lowering import register_native_lowerings
from rnnjax.cells._native.primitives import GRU, LSTM, Kernels
from rnnjax.cells._native.thresholds import is_workspace
from rnnjax.core import check_step_input

available = _native.available
unavailable_reason = _native.unavailable_reason


def float32(*arrays) -> bool:
    """Whether every array is float32 (the only dtype the kernels take)."""
    return all(jnp.result_type(a) == jnp.float32 for a in arrays)


def explain(cell_name: str, *arrays) -> None:
    """Raise why ``<cell>(native=True)`` cannot run here (arrays: inputs, carry, params)."""
    if not float32(*arrays):
        dtypes = sorted({jnp.result_type(a).name for a in arrays})
        raise TypeError(
            f"{cell_name}(native=True) runs float32 only, got inputs/params of dtypes {dtypes}: "
            "cast them to float32 or use native=None"
        )
    if jax.default_backend() != "cpu":
        raise RuntimeError(
            f"{cell_name}(native=True): the native kernels are CPU kernels and JAX's default "
            f"backend is {jax.default_backend()!r}; use native=None"
        )
    raise RuntimeError(
        f"{cell_name}(native=True): the native CPU kernels are unavailable: {unavailable_reason()}"
    )


def ready() -> bool:
    """Whether the native kernels can run here: loaded, and JAX's default backend is the CPU."""
    if not _native.available() or jax.default_backend() != "cpu":
        return False
    register_native_lowerings()
    return True


# ----------------------------------------------------------------------------- the recurrence


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 2, 3, 4))
def recurrence(kernels: Kernels, args: tuple, reverse: bool, dense: bool, checkpoint: int):
    """``(ys, *state_last)`` of a cell over ``args = (x (B, T, I), *weights, *state0, mask)``;
    ``dense``: the mask is all True and oneDNN may run the passes (:func:`uses_onednn`);
    ``checkpoint`` k > 0: differentiated, the forward pass keeps the carry every k steps only
    and the backward pass recomputes each k-step segment (rnnjax's own loops)."""
    out = kernels.forward.bind(*args, reverse=reverse, save=False, dense=dense, checkpoint=0)
    return tuple(out[: 1 + kernels.n_state])


@recurrence.defjvp
def _recurrence_jvp(kernels, reverse, dense, checkpoint, primals, tangents):
    (args,), (dargs,) = primals, tangents
    out = kernels.forward.bind(
        *args, reverse=reverse, save=True, dense=dense, checkpoint=checkpoint
    )
    n = 1 + kernels.n_state
    # Only oneDNN's backward reads the forward's outputs; for rnnjax's loops an empty stand-in
    # for ys lets XLA free ys once the loss has read it (and write its cotangent in place).
    given = list(out)
    if not is_workspace(out[-1]):
        given[0] = jnp.zeros((args[0].shape[0], 0), args[0].dtype)
    tangent_out = kernels.tangent.bind(
        *dargs[:-1], *args, *given, reverse=reverse, checkpoint=checkpoint
    )
    return tuple(out[:n]), tuple(tangent_out)


def _dense(xs, w_h, real) -> bool:
    """Whether oneDNN may run this sequence: no mask and no empty axis, on kernels built with
    oneDNN (and ``RNNJAX_ONEDNN`` not 0); :func:`uses_onednn` decides by size."""
    return real is None and min(*xs.shape, w_h.shape[0]) > 0 and _native.onednn()


def _run(kernels, weights, xs, state0, real, reverse, remat):
    from rnnjax.scan import _segment_steps

    w_i = weights[0]
    name = kernels.name
    check_step_input(name, jax.ShapeDtypeStruct(xs.shape[1:], xs.dtype), w_i.shape[0])
    dense = _dense(xs, weights[2], real)
    mask = jnp.ones(xs.shape[:1], bool) if real is None else real
    if real is not None:  # padding never reaches a value or a derivative (as in rnnjax.scan):
        # the weight gradients' x^T dz over all rows would make NaN of NaN padding times 0
        xs = jnp.where(real[:, None], xs, jnp.zeros_like(xs))
    args = (xs[None], *weights, *(s[None] for s in state0), mask[None])
    checkpoint = _segment_steps(remat, xs.shape[0]) or 0
    return [o[0] for o in recurrence(kernels, args, bool(reverse), dense, checkpoint)]


def lstm_sequence(params: dict, xs, h0, c0, real, *, reverse: bool, remat=False):
    """One example: ``xs (T, I)`` -> ``(ys (T, H), h_last, c_last)``; ``real`` is the ``(T,)``
    mask of real steps or None; ``remat`` as :func:`rnnjax.scan`'s."""
    weights = (params["w_i"], params["b"], params["w_h"])
    return tuple(_run(LSTM, weights, xs, (h0, c0), real, reverse, remat))


def gru_sequence(params: dict, xs, h0, real, *, reverse: bool, remat=False):
    """One example of the reset-after GRU: ``xs (T, I)`` -> ``(ys (T, H), h_last)``."""
    weights = (params["w_i"], params["b_i"], params["w_h"], params["b_h"])
    return tuple(_run(GRU, weights, xs, (h0,), real, reverse, remat))


# ----------------------------------------------------------------------------- cells


def check_native(cell_name: str, native, blockers: list[tuple[bool, str]]) -> bool:
    """Whether a cell gets the native sequence path: ``native`` is the cell's argument,
    ``blockers`` the ``(applies, "option=value")`` options the kernels do not cover."""
    if native is not None and not isinstance(native, bool):
        raise TypeError(f"{cell_name} expects native to be None, True or False, got {native!r}")
    blocked = [why for hit, why in blockers if hit]
    if native is True:
        if blocked:
            raise ValueError(
                f"{cell_name}(native=True) with {', '.join(blocked)}: the native kernels run the "
                f"plain float32 {cell_name} only; drop those options or use native=None"
            )
        if not available():
            raise RuntimeError(
                f"{cell_name}(native=True): the native CPU kernels are unavailable: "
                f"{unavailable_reason()}"
            )
    return native is not False and not blocked


def sequence_fn(cell_name: str, step_cell, native, run: Callable) -> Callable:
    """A cell's ``sequence``: ``run(params, xs, carry, real, reverse, remat) -> (carry, ys)`` on
    the kernels when they can run, else the ``lax.scan`` of ``step_cell.step`` under ``remat``
    (with ``native=True``, an error saying why, unless recurrent dropout asked for the step)."""

    def sequence(params, xs, carry, real, *, reverse=False, unroll=1, recurrent_mask=None,
                 remat=False):  # fmt: skip
        arrays = (xs, *jax.tree.leaves(carry), *jax.tree.leaves(params))
        if recurrent_mask is None and ready() and float32(*arrays):
            return run(params, xs, carry, real, reverse, remat)
        if native is True and recurrent_mask is None:
            explain(cell_name, *arrays)
        from rnnjax.scan import scan_steps

        cell = step_cell
        if recurrent_mask is not None:
            step = functools.partial(step_cell.step, recurrent_mask=recurrent_mask)
            cell = step_cell._replace(step=step)
        return scan_steps(
            cell, params, xs, carry, real, reverse=reverse, unroll=unroll, remat=remat
        )

    return sequence
