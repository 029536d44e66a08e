"""The two types everything composes around, and the checks they share.

A :class:`Cell` is one time step over one example; a :class:`Layer` maps a whole sequence to a
whole sequence. Both are NamedTuples of pure functions (the optax / stax pattern), and their
params and carries are plain pytrees, so ``jit``, ``grad``, ``vmap``, optax and orbax work on them
with no adapters.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Params = Any
Carry = Any
PRNGKey = jax.Array


class Cell(NamedTuple):
    """One recurrent step over one example (no batch axis; batch with ``jax.vmap``).

    Attributes:
      init: ``(key, input_size) -> params``, a pytree of arrays.
      initial_carry: ``(params) -> carry``, the state before the first step.
      step: ``(params, carry, x) -> (carry, y)`` with ``x`` of shape ``(input_size,)``.
        The built-in cells' step also takes ``recurrent_mask=`` (``(H,)``), multiplied into
        ``h`` where it meets ``W_h``: the hook for variational recurrent dropout.
      sequence: optional whole-sequence fast path, ``(params, xs, carry, real, *, reverse,
        unroll, recurrent_mask=None) -> (carry, ys)`` with ``real`` the ``(T,)`` bool mask of
        real steps or None. It must give exactly what scanning ``step`` gives;
        :func:`rnnjax.scan` uses it when there are no ``reset`` flags unless it takes a
        ``reset=`` keyword (the ``(T,)`` bool flags; then the carry must restart from
        ``initial_carry`` just before each flagged step, as the scan does), and under ``remat``
        only if it takes a ``remat=`` keyword (then it must honour it: what BPTT stores).
        The float32 LSTM and GRU have one by default, rnnjax's compiled CPU kernels
        (``rnnjax.cells._native``), and ``fused=True`` cells another (``rnnjax.cells._fused``);
        ``cell._replace(sequence=None)`` forces the step-by-step scan.
    """

    init: Callable[[PRNGKey, int], Params]
    initial_carry: Callable[[Params], Carry]
    step: Callable[[Params, Carry, jax.Array], tuple[Carry, jax.Array]]
    sequence: Callable[..., tuple[Carry, jax.Array]] | None = None


class Layer(NamedTuple):
    """A whole sequence to a whole sequence, for one example.

    Attributes:
      init: ``(key, input_size) -> params``.
      apply: ``(params, xs, *, length=None, mask=None, reset=None, carry=None, key=None)
        -> (carry, ys)`` with ``xs`` of shape ``(T, input_size)`` and ``ys`` of shape
        ``(T, output_size)``. ``reset`` marks sequence starts inside a stream (see
        :func:`rnnjax.scan`); ``key=None`` means deterministic (no dropout).
    """

    init: Callable[[PRNGKey, int], Params]
    apply: Callable[..., tuple[Carry, jax.Array]]


def check_option(name: str, value: Any, valid: tuple[str, ...] | dict) -> None:
    """Raise ValueError naming the valid choices when ``value`` is not one of them."""
    if value not in valid:
        choices = ", ".join(repr(v) for v in valid)
        raise ValueError(f"{name} must be one of {choices}; got {value!r}")


def check_step_input(cell_name: str, x: jax.Array, input_size: int) -> None:
    """Check that a cell step got one example's features, ``(input_size,)``."""
    shape = tuple(np.shape(x))
    if shape == (input_size,):
        return
    if len(shape) >= 2 and shape[-1] == input_size:
        fix = (
            "a cell steps one example at a time; vmap over the batch axis "
            "(xs for rnnjax.scan is (T, input_size) per example)"
        )
    elif len(shape) == 0:
        fix = "pass a feature vector; rnnjax.scan takes xs of shape (T, input_size)"
    elif len(shape) == 1:
        fix = f"the params were made for input_size={input_size}; re-init with the real size"
    else:
        fix = f"the last axis must hold the {input_size} input features"
    raise ValueError(f"{cell_name}.step expects x of shape ({input_size},), got {shape}: {fix}")


def _describe(tree: Any) -> str:
    leaves = jax.tree.map(lambda a: tuple(np.shape(a)), tree)
    return str(leaves)


def check_carry(carry: Carry, expected: Carry, where: str) -> None:
    """Check ``carry`` has the structure and leaf shapes of ``expected`` (an abstract carry)."""
    s_got, s_want = jax.tree.structure(carry), jax.tree.structure(expected)
    if s_got != s_want:
        raise TypeError(
            f"{where} expects a carry shaped like {_describe(expected)}, got {_describe(carry)}: "
            "start from cell.initial_carry(params) (or pass carry=None)"
        )
    for got, want in zip(jax.tree.leaves(carry), jax.tree.leaves(expected), strict=True):
        if tuple(np.shape(got)) != tuple(want.shape):
            raise ValueError(
                f"{where} expects a carry shaped like {_describe(expected)}, "
                f"got {_describe(carry)}: carries hold one example; vmap over the batch axis "
                "or start from cell.initial_carry(params)"
            )


def output_size(layer: Layer, params: Params, input_size: int) -> int:
    """The feature size of ``layer.apply``'s outputs, found by tracing (no compute): on float
    features ``(1, input_size)``, or, for a layer that reads int tokens ``(T,)`` (such as
    :func:`rnnjax.layers.embed`) and refuses features, on one token."""

    def size(xs):
        return int(jax.eval_shape(lambda p, x: layer.apply(p, x)[1], params, xs).shape[-1])

    try:
        return size(jax.ShapeDtypeStruct((1, input_size), jnp.float32))
    except (TypeError, ValueError) as on_features:
        try:
            return size(jax.ShapeDtypeStruct((1,), jnp.int32))
        except Exception:
            raise on_features from None
