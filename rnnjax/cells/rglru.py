"""The RG-LRU (De et al. 2024, Griffin / RecurrentGemma): a gated, real, diagonal linear
recurrence whose whole-sequence form runs through :func:`rnnjax.linear_scan`."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from rnnjax.cells._common import check_size, decay_sequence
from rnnjax.core import Cell, check_step_input
from rnnjax.linear import linear_scan

# recurrentgemma's constants: the gate's exponent scale c, the ring A starts on, and the bound
# on d sqrt(u) / du that keeps the normalisation's gradient finite where 1 - a^2 -> 0.
C = 8.0
MIN_RAD, MAX_RAD = 0.9, 0.999
MAX_SQRT_GRADIENT = 1000.0


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def sqrt_bound_derivative(u: jax.Array, max_gradient: float) -> jax.Array:
    """``sqrt(u)`` whose derivative is that at ``max(u, 1 / (4 max_gradient^2))``, so at most
    ``max_gradient`` (recurrentgemma's ``sqrt_bound_derivative``)."""
    return jnp.sqrt(u)


def _sqrt_fwd(u, max_gradient):
    return jnp.sqrt(u), u


def _sqrt_bwd(max_gradient, u, g):
    floor = jnp.maximum(u, 1.0 / (4.0 * max_gradient**2))
    return (g * 0.5 / jnp.sqrt(floor),)


sqrt_bound_derivative.defvjp(_sqrt_fwd, _sqrt_bwd)


def _block_diagonal(x: jax.Array, layer: dict[str, jax.Array]) -> jax.Array:
    """recurrentgemma's ``BlockDiagonalLinear`` over ``x (..., H)``: head ``h`` maps its slice
    of ``H/n`` features by ``w[h] (H/n, H/n)`` and adds ``b[h]``."""
    heads, width, _ = layer["w"].shape
    blocks = x.reshape(*x.shape[:-1], heads, width)
    y = jnp.einsum("...hi,hij->...hj", blocks, layer["w"]) + layer["b"]
    return y.reshape(*x.shape[:-1], heads * width)


def _decay_and_input(params, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(a, b)`` of ``h = a h_prev + b`` for inputs ``x (..., H)``."""
    gate_x = jax.nn.sigmoid(_block_diagonal(x, params["input_gate"]))
    gate_a = jax.nn.sigmoid(_block_diagonal(x, params["a_gate"]))
    log_a = -C * gate_a * jax.nn.softplus(params["a_param"])
    # 1 - a^2 as -expm1(2 log a): exact where a is near 1, where 1 - exp(.) cancels.
    multiplier = sqrt_bound_derivative(-jnp.expm1(2.0 * log_a), MAX_SQRT_GRADIENT)
    return jnp.exp(log_a), multiplier * (gate_x * x)


def a_param_init(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
    """recurrentgemma's ``rnn_real_param_init(min_rad=0.9, max_rad=0.999)``: ``a_param`` is
    ``softplus^-1(-log rho)`` with ``rho^2`` uniform in ``[0.9^2, 0.999^2]`` (uniform by area on
    the ring), so the decay is ``a_t = rho^(8 r_t)``: ``rho^8`` where the gate is open."""
    unif = jax.random.uniform(key, shape)
    log_r = 0.5 * jnp.log(unif * (MAX_RAD**2 - MIN_RAD**2) + MIN_RAD**2 + 1e-8)
    return jnp.log(jnp.exp(-log_r) - 1.0).astype(dtype)


def rglru(hidden_size: int, num_heads: int = 1, *, dtype: jnp.dtype = jnp.float32) -> Cell:
    """The Real-Gated Linear Recurrent Unit, recurrentgemma's ``RGLRU`` (``only_real=True``).

    Input size, carry and output are ``H = hidden_size``. Params, exactly recurrentgemma's
    variables: ``a_param (H,)``, ``input_gate: {w (n, H/n, H/n), b (n, H/n)}`` and ``a_gate``
    (the same), block-diagonal over ``n = num_heads`` heads (``BD(x)`` below)::

        i_t = sigmoid(BD_input_gate(x_t))        r_t = sigmoid(BD_a_gate(x_t))
        a_t = exp(-8 r_t softplus(a_param))
        h_t = a_t h_{t-1} + sqrt(1 - a_t^2) (i_t x_t)      output h_t

    The normalisation ``sqrt(1 - a_t^2)`` applies at every step, the first included, and its
    derivative is bounded by 1000 (recurrentgemma's ``sqrt_bound_derivative``). recurrentgemma
    skips it at a segment's position 0 and restarts there; here sequences inside a stream
    restart through ``reset=`` of :func:`rnnjax.scan` (its results equal recurrentgemma's with
    positions counted from 1). Init as recurrentgemma's: gate weights normal with variance
    ``1 / H`` (flax's ``variance_scaling(1, "fan_in")`` on ``(n, H/n, H/n)``), zero biases,
    ``a_param`` on the ring (:func:`a_param_init`).

    ``sequence`` is the parallel form, the gates of every step at once and the recurrence
    through :func:`rnnjax.linear_scan`; it takes ``reset=`` (zeroing the carry) and ``remat=``
    (any mode: there are no per-step carries to checkpoint; it stores only ``xs`` and
    recomputes the gates and the recurrence in the backward pass). There is no
    ``recurrent_mask``: a dropout mask scaled by ``1/(1-p)`` would push the decay above 1.

    >>> import jax, jax.numpy as jnp, rnnjax as rj
    >>> cell = rj.cells.rglru(8, num_heads=2)
    >>> params = cell.init(jax.random.key(0), 8)
    >>> params["input_gate"]["w"].shape, params["a_param"].shape
    ((2, 4, 4), (8,))
    >>> h, ys = rj.scan(cell, params, jnp.ones((5, 8)))
    >>> ys.shape, bool(jnp.allclose(h, ys[-1]))
    ((5, 8), True)
    """
    check_size("rglru", "hidden_size", hidden_size)
    check_size("rglru", "num_heads", num_heads)
    if hidden_size % num_heads:
        raise ValueError(
            f"rglru expects hidden_size divisible by num_heads, got hidden_size={hidden_size} "
            f"and num_heads={num_heads}: each head takes hidden_size / num_heads features"
        )
    hs, width = hidden_size, hidden_size // num_heads

    def init(key: jax.Array, input_size: int) -> dict:
        check_size("rglru.init", "input_size", input_size)
        if input_size != hs:
            raise ValueError(
                f"rglru.init expects input_size == hidden_size = {hs}, got {input_size}: the "
                "RG-LRU gates its input elementwise; project the input to hidden_size first"
            )
        k_a, k_input, k_gate = jax.random.split(key, 3)
        weight = jax.nn.initializers.variance_scaling(1.0, "fan_in", "normal")

        def gate(k):
            return {
                "w": weight(k, (num_heads, width, width), dtype),
                "b": jnp.zeros((num_heads, width), dtype),
            }

        return {
            "a_param": a_param_init(k_a, (hs,), dtype),
            "input_gate": gate(k_input),
            "a_gate": gate(k_gate),
        }

    def initial_carry(params: dict) -> jax.Array:
        return jnp.zeros_like(params["a_param"])

    def step(params, h, x):
        check_step_input("rglru", x, params["a_param"].shape[0])
        with jax.named_scope("rglru"):
            a, b = _decay_and_input(params, x)
            h = a * h + b
        return h, h

    def states(params, xs, h, real, reset, *, reverse):
        if real is not None:
            # Padded steps (a = 1, b = 0) keep the carry; their inputs reach nothing.
            xs = jnp.where(real[:, None], xs, jnp.zeros_like(xs))
        a, b = _decay_and_input(params, xs)
        if real is not None:
            a = jnp.where(real[:, None], a, jnp.ones_like(a))
            b = jnp.where(real[:, None], b, jnp.zeros_like(b))
        return linear_scan(a, b, h, reverse=reverse, reset=reset)

    def outputs(params, xs, h, real, reset, *, reverse):
        hs_ = states(params, xs, h, real, reset, reverse=reverse)
        if hs_.shape[0] == 0:
            return h, hs_
        last = hs_[0] if reverse else hs_[-1]
        return last, hs_ if real is None else jnp.where(real[:, None], hs_, jnp.zeros_like(hs_))

    sequence = decay_sequence("rglru", outputs)
    return Cell(init, initial_carry, step, sequence)
