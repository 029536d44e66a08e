"""What minGRU and minLSTM share (Feng et al. 2024, "Were RNNs All We Needed?"): gates that
read only the input, so a whole sequence is one ``(T, I) x (I, kH)`` matmul and one linear
recurrence ``h_t = a_t * h_{t-1} + b_t``, run by :func:`rnnjax.linear_scan` or, in the
paper's log-space form, by :func:`log_linear_scan`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from rnnjax import linear
from rnnjax._native import minrnn
from rnnjax.cells._common import check_size, gate_blocks, native_matmul_runs, sequence_matmul
from rnnjax.core import Cell, check_option, check_step_input

# (T, kH) projection x W + b -> (a, b), or (log a, log b) in the log-space form.
Coefficients = Callable[[jax.Array], tuple[jax.Array, jax.Array]]


def g(v: jax.Array) -> jax.Array:
    """The paper's positive activation for the candidate state (Appendix B.3):
    ``v + 0.5`` for ``v >= 0``, ``sigmoid(v)`` below; continuous at 0 and always positive, so
    ``h`` stays positive and has a logarithm."""
    return jnp.where(v >= 0, v + 0.5, jax.nn.sigmoid(v))


def log_g(v: jax.Array) -> jax.Array:
    """``log(g(v))`` without forming ``g``: ``log(v + 0.5)`` or ``-softplus(-v)``."""
    return jnp.where(v >= 0, jnp.log(jax.nn.relu(v) + 0.5), -jax.nn.softplus(-v))


def _logaddexp(x: jax.Array, y: jax.Array) -> jax.Array:
    """``log(exp(x) + exp(y))`` whose derivative is zero, not NaN, where both are ``-inf`` (a
    padded step after a reset: ``jnp.logaddexp``'s derivative is NaN there)."""
    m = lax.stop_gradient(jnp.maximum(x, y))
    m = jnp.where(jnp.isfinite(m), m, jnp.zeros_like(m))
    total = jnp.exp(x - m) + jnp.exp(y - m)
    # total == 0, not total > 0: a NaN total must stay NaN (the comparison is False for NaN).
    none = total == 0
    return jnp.where(none, -jnp.inf, m + jnp.log(jnp.where(none, 1.0, total)))


def _log_combine(first, then):
    """Two steps ``h -> exp(la) h + exp(lb)`` composed, ``first`` applied first; a reset in
    ``then`` (its flag ``r``) forgets ``first``. ``first``'s terms are replaced before they are
    combined, not only after, so that a NaN in them reaches no derivative across the reset (a
    ``where`` alone passes its zero cotangent through the unselected branch, 0 * NaN)."""
    la1, lb1, r1 = first
    la2, lb2, r2 = then
    la1 = jnp.where(r2, jnp.zeros_like(la1), la1)
    lb1 = jnp.where(r2, jnp.full_like(lb1, -jnp.inf), lb1)
    la = jnp.where(r2, la2, la1 + la2)
    lb = jnp.where(r2, lb2, _logaddexp(la2 + lb1, lb2))
    return la, lb, r1 | r2


def log_linear_scan(
    log_a: jax.Array,
    log_b: jax.Array,
    h0: jax.Array,
    *,
    reverse: bool = False,
    reset: jax.Array | None = None,
) -> jax.Array:
    """``h_t = exp(log_a_t) * h_{t-1} + exp(log_b_t)`` in log space, ``(T, H)`` arrays.

    The paper's ``parallel_scan_log`` (Appendix B.1, after Heinsen 2023) forms the prefix sums
    ``A_t = cumsum(log_a)`` and ``log h_t = A_t + logcumsumexp(log_b - A)``; this is the same
    prefix as an associative scan of ``(log a, log b)`` pairs, composed two at a time, so no
    term is a difference of two large cumulative sums (float32 loses the low digits of those
    as ``|A_t|`` grows with T). ``h0`` enters linearly, ``h_t = exp(A_t) h0 + exp(LB_t)``, so
    it may be zero or negative (the paper takes ``log h0``). Padded steps are ``log a = 0,
    log b = -inf``: they keep the carry. A ``reset`` replaces the carry by zero: from it on
    nothing before it (``h0`` included, NaN or not) reaches a value or a derivative.
    """
    flags = jnp.zeros(log_a.shape[:1], bool) if reset is None else jnp.asarray(reset)
    flags = jnp.broadcast_to(flags[:, None], log_a.shape)
    log_a = jnp.where(flags, -jnp.inf, log_a)
    big_a, big_b, seen = lax.associative_scan(_log_combine, (log_a, log_b, flags), reverse=reverse)
    # exp(A_t) h0 only where no reset came first (0 * a NaN h0 would be NaN); inputs replaced
    # first, for the derivative (see _log_combine).
    from_h0 = jnp.exp(jnp.where(seen, jnp.zeros_like(big_a), big_a)) * h0
    return jnp.where(seen, jnp.zeros_like(from_h0), from_h0) + jnp.exp(big_b)


def check_log_space(cell_name: str, log_space, scan_mode) -> None:
    if not isinstance(log_space, bool):
        raise TypeError(f"{cell_name} log_space must be True or False, got {log_space!r}")
    check_option(f"{cell_name} scan_mode", scan_mode, linear.MODES)
    if log_space and scan_mode != "auto":
        raise ValueError(
            f"{cell_name}(log_space=True, scan_mode={scan_mode!r}): the log-space form runs its "
            "own log-space scan, not linear_scan's backends; use scan_mode='auto' with it"
        )


def _fused_mode(scan_mode: str, xs, carry) -> bool:
    """Whether the fused native pass stands in for ``linear_scan``: its mode resolves to
    ``"native"`` (``"auto"`` on CPU with the kernels, or ``"native"`` asked for)."""
    return linear.resolve_mode(scan_mode, xs.shape[0], carry.shape[-1], xs.dtype) == "native"


def fused_recurrence(fused, bias, proj, h0, real, reset, *, reverse):
    """``fused(proj, bias, h0, reset, keep, reverse=)``: a cell's gates and recurrence in one
    native pass (minGRU: :func:`rnnjax._native.minrnn.mingru_scan`)."""
    return fused(proj, bias, h0, reset, real, reverse=reverse)


def parallel_sequence(
    cell_name: str,
    plain: Coefficients,
    logs: Coefficients,
    *,
    log_space: bool,
    scan_mode: str,
    fused: Callable | None = None,
):
    """A cell's ``sequence``: the projection ``x W + b`` of every step in one matmul, then
    ``plain``'s coefficients through :func:`rnnjax.linear_scan` (``mode=scan_mode``) or, with
    ``log_space``, ``logs``' through :func:`log_linear_scan`.

    Padded steps keep the carry (``a = 1, b = 0``) and output zero; their inputs are zeroed
    before the matmul, so what they hold reaches no derivative. ``reset`` flags zero the carry
    (``initial_carry`` is zeros). ``remat`` (any mode: there are no per-step carries to
    checkpoint) stores only the projection, ``(T, kH)``, and recomputes the gates and the
    recurrence's forward pass in the backward pass.

    On CPU, float32, with the native kernels: the projection runs on their sgemm, and where a
    cell has a ``fused`` pass (minGRU) and ``linear_scan``'s mode resolves to ``"native"``, the
    gates and the recurrence run as that one pass, which never writes the coefficients."""

    def recurrence(proj, h0, real, reset, *, reverse):
        keep = None if real is None else real[:, None]
        if log_space:
            log_a, log_b = logs(proj)
            if keep is not None:
                log_a = jnp.where(keep, log_a, jnp.zeros_like(log_a))
                log_b = jnp.where(keep, log_b, jnp.full_like(log_b, -jnp.inf))
            return log_linear_scan(log_a, log_b, h0, reverse=reverse, reset=reset)
        a, b = plain(proj)
        if keep is not None:
            a = jnp.where(keep, a, jnp.ones_like(a))
            b = jnp.where(keep, b, jnp.zeros_like(b))
        return linear.linear_scan(a, b, h0, reverse=reverse, reset=reset, mode=scan_mode)

    def sequence(params, xs, carry, real, *, reverse=False, unroll=1, recurrent_mask=None,
                 remat=False, reset=None):  # fmt: skip
        del unroll  # no loop of steps to unroll
        if recurrent_mask is not None:
            raise ValueError(
                f"{cell_name} takes no recurrent_mask: it has no recurrent weight matrix, and a "
                "dropout mask on h_{t-1} scaled by 1/(1-p) would push the decay above 1; use "
                "input dropout or zoneout"
            )
        if real is not None:
            xs = jnp.where(real[:, None], xs, jnp.zeros_like(xs))
        w, bias = params["w"], params["b"]
        native = native_matmul_runs(xs, w)
        if xs.shape[0] == 0:
            return carry, (xs @ w + bias)[:, : carry.shape[0]]
        if fused is not None and native and not log_space and _fused_mode(scan_mode, xs, carry):
            proj = minrnn.matmul(xs, w)  # the bias is added inside the fused pass
            run = functools.partial(fused_recurrence, fused, bias, reverse=bool(reverse))
        else:
            proj = sequence_matmul(xs, w) + bias
            run = functools.partial(recurrence, reverse=bool(reverse))
        if remat is not False:
            run = jax.checkpoint(run)
        h = run(proj, carry, real, reset)
        ys = h if real is None else jnp.where(real[:, None], h, jnp.zeros_like(h))
        return (h[0] if reverse else h[-1]), ys

    return sequence


def min_cell(cell_name: str, hidden_size: int, blocks: int, plain: Coefficients,
             logs: Coefficients, *, log_space: bool, scan_mode: str, input_init, bias_init,
             dtype, fused: Callable | None = None) -> Cell:  # fmt: skip
    """The Cell of minGRU (``blocks=2``) and minLSTM (``blocks=3``): params ``w (I, blocks*H)``
    and ``b (blocks*H,)``, a zero carry ``(H,)``, a step ``h = a h + b`` with ``(a, b) =
    plain(x W + b)``, and :func:`parallel_sequence`."""
    check_size(cell_name, "hidden_size", hidden_size)
    check_log_space(cell_name, log_space, scan_mode)

    def init(key: jax.Array, input_size: int) -> dict[str, jax.Array]:
        check_size(f"{cell_name}.init", "input_size", input_size)
        kw, kb = jax.random.split(key)
        return {
            "w": gate_blocks(kw, input_init, input_size, hidden_size, blocks, dtype),
            "b": bias_init(kb, (blocks * hidden_size,), dtype),
        }

    def initial_carry(params: dict[str, jax.Array]) -> jax.Array:
        return jnp.zeros((params["w"].shape[1] // blocks,), params["w"].dtype)

    def step(params, h, x):
        check_step_input(cell_name, x, params["w"].shape[0])
        with jax.named_scope(cell_name):
            a, b = plain(x @ params["w"] + params["b"])
            h = a * h + b
        return h, h

    sequence = parallel_sequence(
        cell_name, plain, logs, log_space=log_space, scan_mode=scan_mode, fused=fused
    )
    return Cell(init, initial_carry, step, sequence)
