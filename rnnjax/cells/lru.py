"""The Linear Recurrent Unit (Orvieto et al. 2023): a complex diagonal linear recurrence whose
whole-sequence form runs through :func:`rnnjax.linear_scan`."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from rnnjax.cells._common import check_size, decay_sequence, sequence_matmul
from rnnjax.core import Cell, check_step_input
from rnnjax.linear import linear_scan


def _real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"lru expects {name} to be a number, got {value!r}")
    return float(value)


def _lambda(params) -> jax.Array:
    """The diagonal ``lambda = exp(-exp(nu_log) + i exp(theta_log))``, ``(N,)``."""
    return jnp.exp(jax.lax.complex(-jnp.exp(params["nu_log"]), jnp.exp(params["theta_log"])))


def _input(params, x: jax.Array, mm=jnp.matmul) -> jax.Array:
    """``(B exp(gamma_log)) x`` for ``x (..., H)``: ``(..., N)`` complex. Written as two real
    matmuls ``mm`` (half the work of a complex one with a real operand), the rows' scale after."""
    scale = jnp.exp(params["gamma_log"])
    return jax.lax.complex(mm(x, params["B_re"].T) * scale, mm(x, params["B_im"].T) * scale)


def _output(params, h: jax.Array, x: jax.Array, mm=jnp.matmul) -> jax.Array:
    """``Re(C h) + D x`` for ``h (..., N)``, ``x (..., H)``, as real matmuls ``mm``."""
    return mm(h.real, params["C_re"].T) - mm(h.imag, params["C_im"].T) + params["D"] * x


def lru(
    hidden_size: int,
    state_size: int | None = None,
    *,
    r_min: float = 0.0,
    r_max: float = 1.0,
    max_phase: float = 2 * math.pi,
    dtype: jnp.dtype = jnp.float32,
) -> Cell:
    """The LRU layer's recurrence, as the paper's reference code and memax's ``LRU``.

    Input and output size ``H = hidden_size``, state size ``N = state_size`` (``None``: ``H``,
    as memax's layer is usually built). Params (the
    reference names): ``nu_log, theta_log, gamma_log (N,)``, ``B_re, B_im (N, H)``,
    ``C_re, C_im (H, N)``, ``D (H,)``. Carry: the complex state ``h (N,)``::

        lambda = exp(-exp(nu_log) + i exp(theta_log))
        h_t = lambda * h_{t-1} + ((B_re + i B_im) * exp(gamma_log)[:, None]) x_t
        y_t = Re((C_re + i C_im) h_t) + D * x_t

    Init, the paper's ring: ``|lambda|^2`` uniform in ``[r_min^2, r_max^2]`` and its phase
    uniform in ``[0, max_phase]``; ``gamma_log = log sqrt(1 - |lambda|^2)`` (the
    normalisation); ``B ~ N(0, 1 / (2H))`` per part, ``C ~ N(0, 1 / N)`` per part,
    ``D ~ N(0, 1)``. ``dtype`` is the params' (the carry is its complex counterpart).

    ``sequence`` is the parallel form, the input map of every step at once and the complex
    recurrence through :func:`rnnjax.linear_scan`; it takes ``reset=`` (zeroing the carry) and
    ``remat=`` (any mode: there are no per-step carries to checkpoint; it stores only ``xs``
    and recomputes the rest in the backward pass). There is no ``recurrent_mask``: a dropout
    mask scaled by ``1/(1-p)`` would push ``|lambda|`` above 1.

    >>> import jax, jax.numpy as jnp, rnnjax as rj
    >>> cell = rj.cells.lru(4, state_size=6)
    >>> params = cell.init(jax.random.key(0), 4)
    >>> params["B_re"].shape, cell.initial_carry(params).dtype
    ((6, 4), dtype('complex64'))
    >>> h, ys = rj.scan(cell, params, jnp.ones((5, 4)))
    >>> h.shape, ys.shape, ys.dtype
    ((6,), (5, 4), dtype('float32'))
    """
    check_size("lru", "hidden_size", hidden_size)
    state_size = hidden_size if state_size is None else state_size
    check_size("lru", "state_size", state_size)
    r_min, r_max = _real("r_min", r_min), _real("r_max", r_max)
    max_phase = _real("max_phase", max_phase)
    if not 0.0 <= r_min < r_max <= 1.0:
        raise ValueError(
            f"lru expects 0 <= r_min < r_max <= 1 (the ring |lambda| starts on), got "
            f"r_min={r_min} and r_max={r_max}"
        )
    hs, ns = hidden_size, state_size

    def init(key: jax.Array, input_size: int) -> dict[str, jax.Array]:
        check_size("lru.init", "input_size", input_size)
        if input_size != hs:
            raise ValueError(
                f"lru.init expects input_size == hidden_size = {hs}, got {input_size}: the "
                "LRU's skip term D * x is elementwise; project the input to hidden_size first"
            )
        k_b_re, k_b_im, k_c_re, k_c_im, k_d, k_nu, k_theta = jax.random.split(key, 7)
        u1 = jax.random.uniform(k_nu, (ns,))
        u2 = jax.random.uniform(k_theta, (ns,))
        nu_log = jnp.log(-0.5 * jnp.log(u1 * (r_max**2 - r_min**2) + r_min**2))
        theta_log = jnp.log(max_phase * u2)
        # |lambda| = exp(-exp(nu_log)): 1 - |lambda|^2 without cancellation near the unit circle.
        gamma_log = 0.5 * jnp.log(-jnp.expm1(-2.0 * jnp.exp(nu_log)))
        normal = jax.random.normal
        params = {
            "nu_log": nu_log,
            "theta_log": theta_log,
            "gamma_log": gamma_log,
            "B_re": normal(k_b_re, (ns, hs)) / math.sqrt(2 * hs),
            "B_im": normal(k_b_im, (ns, hs)) / math.sqrt(2 * hs),
            "C_re": normal(k_c_re, (hs, ns)) / math.sqrt(ns),
            "C_im": normal(k_c_im, (hs, ns)) / math.sqrt(ns),
            "D": normal(k_d, (hs,)),
        }
        return jax.tree.map(lambda a: a.astype(dtype), params)

    def initial_carry(params: dict[str, jax.Array]) -> jax.Array:
        complex_dtype = jnp.result_type(params["nu_log"].dtype, jnp.complex64)
        return jnp.zeros(params["nu_log"].shape, complex_dtype)

    def step(params, h, x):
        check_step_input("lru", x, params["D"].shape[0])
        with jax.named_scope("lru"):
            h = _lambda(params) * h + _input(params, x)
        return h, _output(params, h, x)

    def outputs(params, xs, h, real, reset, *, reverse):
        if real is not None:
            # Padded steps (a = 1, b = 0) keep the carry; their inputs reach nothing.
            xs = jnp.where(real[:, None], xs, jnp.zeros_like(xs))
        b = _input(params, xs, sequence_matmul)
        a = jnp.broadcast_to(_lambda(params), b.shape)
        if real is not None:
            a = jnp.where(real[:, None], a, jnp.ones_like(a))
        states = linear_scan(a, b, h, reverse=reverse, reset=reset)
        ys = _output(params, states, xs, sequence_matmul)
        if real is not None:
            ys = jnp.where(real[:, None], ys, jnp.zeros_like(ys))
        if states.shape[0] == 0:
            return h, ys
        return (states[0] if reverse else states[-1]), ys

    sequence = decay_sequence("lru", outputs)
    return Cell(init, initial_carry, step, sequence)
