"""The CPU lowerings of the forward and backward primitives to the kernels' XLA FFI targets
(``rnnjax_{lstm,gru}_{forward,backward,replay}``, registered with XLA by
:mod:`rnnjax._native`), and where a forward pass goes instead to XLA's loop.

The attributes each call carries: ``reverse``; ``save`` (differentiated: write the
residuals); ``dense`` (run oneDNN's RNN primitive; the kernels' AVX-512 loops may run an
inference pass in its place, see docs/native.md); ``checkpoint`` (k > 0: write the carry every
k steps instead of the residuals); the backward's ``need_dx``.
"""

from __future__ import annotations

import functools

import jax
from jax.extend.core import Primitive
from jax.interpreters import mlir

from rnnjax import _native
from rnnjax.cells._native import thresholds
from rnnjax.cells._native.primitives import GRU, LSTM, reference
from rnnjax.cells._native.thresholds import is_workspace, uses_onednn

#: How many inference passes the CPU lowering gave to XLA's loop (the kernels' pass counters,
#: ``rnnjax._native.passes()``, count what the kernels run; this counts what they did not).
XLA_LOOPS = {"lstm": 0, "gru": 0}


def _forward_lowering(cell: str, prim: Primitive, n_weights: int):
    native = jax.ffi.ffi_lowering(prim.name)
    replay = jax.ffi.ffi_lowering(f"rnnjax_{cell}_replay")
    loop = mlir.lower_fun(reference(prim), multiple_results=True)

    def checkpointed(ctx, *args, reverse, checkpoint):
        """A checkpointed forward pass as two calls: the pass that makes the checkpoints, the
        final carry and no ys, then the replay that recomputes ys from the checkpoints as its
        only output (which lets XLA write an elementwise cotangent of ys in place: docs/native.md,
        and the kernels' Replay)."""
        ys = ctx.avals_out[0]
        no_ys = ys.update(shape=(ys.shape[0], 0, ys.shape[2]))
        out = native(
            ctx.replace(avals_out=[no_ys, *ctx.avals_out[1:]]), *args,
            reverse=reverse, save=True, dense=False, checkpoint=checkpoint,
        )  # fmt: skip
        picked = [0, *range(1, 1 + n_weights), len(args) - 1]  # x, weights, mask
        replay_ctx = ctx.replace(
            avals_in=[*(ctx.avals_in[i] for i in picked), ctx.avals_out[-1]], avals_out=[ys]
        )
        (ys_value,) = replay(
            replay_ctx, *(args[i] for i in picked), out[-1],
            reverse=reverse, checkpoint=checkpoint,
        )  # fmt: skip
        return [ys_value, *out[1:]]

    def lowering(ctx, *args, reverse, save, dense, checkpoint=0):
        if save and checkpoint:
            return checkpointed(ctx, *args, reverse=reverse, checkpoint=checkpoint)
        batch, hidden = ctx.avals_in[0].shape[0], ctx.avals_in[3].shape[0]
        if save:  # the abstract evaluation chose, and shaped the residuals accordingly
            onednn = is_workspace(ctx.avals_out[-1])
        else:
            onednn = uses_onednn(cell, batch, hidden, save=save, dense=dense)
        xla_loop = batch * hidden >= thresholds.INFERENCE_MAX_UNITS and not _native.onednn()
        if not save and not onednn and xla_loop:
            XLA_LOOPS[cell] += 1
            return loop(ctx, *args, reverse=reverse, save=save, dense=dense, checkpoint=checkpoint)
        return native(ctx, *args, reverse=reverse, save=save, dense=onednn, checkpoint=checkpoint)

    return lowering


def _backward_lowering(prim: Primitive):
    native = jax.ffi.ffi_lowering(prim.name)

    def lowering(ctx, *args, reverse, need_dx, checkpoint=0):
        onednn = is_workspace(ctx.avals_in[-1])
        return native(
            ctx, *args, reverse=reverse, need_dx=need_dx, dense=onednn, checkpoint=checkpoint
        )

    return lowering


@functools.cache
def register_native_lowerings() -> None:
    for kernels in (LSTM, GRU):
        forward = _forward_lowering(kernels.name, kernels.forward, kernels.n_weights)
        mlir.register_lowering(kernels.forward, forward, platform="cpu")
        mlir.register_lowering(
            kernels.backward, _backward_lowering(kernels.backward), platform="cpu"
        )
