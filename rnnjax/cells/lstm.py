"""The LSTM cell (Hochreiter & Schmidhuber 1997, with forget gate), PyTorch's layout, its
projected form (LSTMP, Sak et al. 2014; PyTorch's ``proj_size``), layer normalisation (Ba et al.
2016) and peepholes (Gers & Schmidhuber 2000)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from rnnjax.cells import _native as native_kernels
from rnnjax.cells._common import (
    Initializer,
    check_compute_dtype,
    check_flag,
    check_fused,
    check_size,
    default_bias_init,
    default_input_init,
    default_recurrent_init,
    gate_blocks,
    matmul,
    native_blockers,
)
from rnnjax.cells._common import layer_norm as normalise
from rnnjax.cells._fused import lstm_sequence
from rnnjax.core import Cell, check_step_input


class LSTMState(NamedTuple):
    """The LSTM carry: hidden state ``h (H,)`` (``(P,)`` with a projection) and cell state
    ``c (H,)``."""

    h: jax.Array
    c: jax.Array


def lstm(
    hidden_size: int,
    *,
    proj_size: int | None = None,
    forget_bias: float = 1.0,
    layer_norm: bool = False,
    peephole: bool = False,
    input_init: Initializer = default_input_init,
    recurrent_init: Initializer = default_recurrent_init,
    bias_init: Initializer = default_bias_init,
    dtype: jnp.dtype = jnp.float32,
    compute_dtype: jnp.dtype | None = None,
    fused: bool = False,
    native: bool | None = None,
) -> Cell:
    """An LSTM cell, PyTorch's ``nn.LSTM`` step.

    Params: ``w_i (I, 4H)``, ``w_h (H, 4H)``, ``b (4H,)`` with gates fused in the order
    i, f, g, o. Carry: ``LSTMState(h, c)``. Output: ``h``. PyTorch's ``weight_ih_l0`` is
    ``w_i.T``, ``weight_hh_l0`` is ``w_h.T`` and ``b = bias_ih_l0 + bias_hh_l0``.

    With ``proj_size=P`` (LSTMP, Sak et al. 2014; PyTorch's ``nn.LSTM(proj_size=P)``) the
    hidden state is projected down to ``P`` units before it is output and fed back: params gain
    ``w_p (H, P)`` (PyTorch's ``weight_hr_l0`` is ``w_p.T``), ``w_h`` is ``(P, 4H)``, the carry
    is ``LSTMState(h (P,), c (H,))`` and the output ``h = (o * tanh(c)) @ w_p``, ``(P,)``.
    A ``recurrent_mask=`` passed to ``step`` then has shape ``(P,)``.

    ``layer_norm=True`` (Ba et al. 2016, Sec. 3.1 and their LN-LSTM equations, as Keras'
    ``LayerNormLSTMCell``) normalises the input and the recurrent pre-activations separately,
    each over its 4H units, and the cell state before the output tanh; the carry keeps the
    unnormalised ``c``, as in Ba et al. (Keras carries the normalised one). With
    ``LN(v) = (v - mean(v)) / sqrt(var(v) + 1e-5) * scale + bias``::

        i, f, g, o = split(LN_i(x W_i) + LN_h(h W_h) + b)
        c' = sigmoid(f) * c + sigmoid(i) * tanh(g)        h' = sigmoid(o) * tanh(LN_c(c'))

    Params gain ``ln_i_scale, ln_i_bias, ln_h_scale, ln_h_bias (4H,)`` and ``ln_c_scale,
    ln_c_bias (H,)`` (scales start at one, biases at zero).

    ``peephole=True`` (Gers & Schmidhuber 2000; Gers et al. 2002) adds diagonal peephole
    weights ``p_i, p_f, p_o (H,)`` (zero at init: the plain LSTM): ``i`` and ``f`` read
    ``c_{t-1}``, ``o`` reads the new ``c_t``::

        i += p_i * c      f += p_f * c      ...      o += p_o * c'

    Both options take the ``lax.scan`` of ``step`` (the native kernels and the fused path do
    not cover them; ``native=True`` or ``fused=True`` with them raises) and combine with each
    other and with ``proj_size``.

    Args:
      hidden_size: H, the size of the cell state and the gates.
      proj_size: P, the size of the projected hidden state (``None``: no projection). As in
        PyTorch it must be smaller than ``hidden_size``. ``w_p`` is initialised with
        ``input_init`` (it is a plain dense map from the H units to P).
      forget_bias: added to the forget gate's bias at init (Jozefowicz et al. 2015), on top of
        ``bias_init``.
      input_init, recurrent_init, bias_init: ``(key, shape, dtype) -> array`` initializers; the
        weight initializers are called once per gate block of shape ``(I, H)`` / ``(H, H)``.
      dtype: dtype of the params and the initial carry.
      compute_dtype: run the matmuls in this dtype (e.g. ``jnp.bfloat16``) with the products
        accumulated in ``dtype``; params, gates and the carry stay in ``dtype`` (mixed
        precision). ``None``: compute in ``dtype``. On a CPU with AMX/AVX512-BF16 units this
        measured 1.15-2.0x faster forward and 1.08-1.2x faster forward+backward, growing with
        size (BENCHMARKS.md); the backward pass keeps float32 matmuls (see ``_common.matmul``).
      fused: attach the whole-sequence fast path (``rnnjax.cells._fused``): same values and
        derivatives, with the weight-gradient matmuls moved out of the BPTT loop. Off by
        default because on CPU it measured slower than the step scan (BENCHMARKS.md).
        There is no fast path for a projected LSTM: ``proj_size`` with ``fused=True`` raises.
      native: run whole sequences (``rnnjax.scan``, ``rnnjax.layers.rnn``) with rnnjax's
        compiled CPU kernels. ``None`` (the default): whenever they can, that is when they are
        compiled and loaded (``rnnjax._native.available()``), JAX's default backend is the CPU,
        params, carry and inputs are float32 and the cell has no ``proj_size``,
        ``compute_dtype`` or ``fused``; otherwise the ``lax.scan`` of ``step`` runs. ``True``:
        require them: such an option raises here, and a call they cannot run raises saying
        why. ``False``: always the ``lax.scan`` of ``step``. Sequences with ``reset`` flags or
        recurrent dropout take the ``lax.scan`` of ``step`` in every mode. Values and
        derivatives (``grad``, ``jvp``, ``vmap``, ``remat=``) equal those of the reference
        ``cell._replace(sequence=None)`` within float32 rounding, NaN and inf propagating as
        there. Which kernel runs which pass, and the environment switches: docs/native.md.

    >>> import jax, jax.numpy as jnp, rnnjax as rj
    >>> cell = rj.cells.lstm(4)
    >>> params = cell.init(jax.random.key(0), 3)
    >>> carry, y = cell.step(params, cell.initial_carry(params), jnp.ones(3))
    >>> carry.c.shape, y.shape, params["b"][4:8]
    ((4,), (4,), Array([1., 1., 1., 1.], dtype=float32))
    >>> cell = rj.cells.lstm(4, proj_size=2)
    >>> params = cell.init(jax.random.key(0), 3)
    >>> carry, y = cell.step(params, cell.initial_carry(params), jnp.ones(3))
    >>> params["w_h"].shape, params["w_p"].shape, carry.h.shape, carry.c.shape, y.shape
    ((2, 16), (4, 2), (2,), (4,), (2,))
    """
    check_size("lstm", "hidden_size", hidden_size)
    hs = hidden_size
    if proj_size is not None:
        if isinstance(proj_size, bool) or not isinstance(proj_size, int) or proj_size < 1:
            raise ValueError(
                f"lstm expects proj_size to be None or a positive int, got {proj_size!r}: "
                "use proj_size=None for no projection (PyTorch's proj_size=0)"
            )
        if proj_size >= hidden_size:
            raise ValueError(
                f"lstm expects proj_size < hidden_size (as PyTorch does), got proj_size="
                f"{proj_size} and hidden_size={hidden_size}: a projection maps the {hidden_size} "
                "units down to fewer; use a smaller proj_size or proj_size=None"
            )
    compute_dtype = check_compute_dtype("lstm", compute_dtype, check_fused(fused))
    normed, peep = (
        check_flag("lstm", "layer_norm", layer_norm),
        check_flag("lstm", "peephole", peephole),
    )
    if fused and (normed or peep):
        raise ValueError(
            f"lstm(layer_norm={normed}, peephole={peep}) has no fused fast path: the fused "
            "kernel runs the plain LSTM; use fused=False (the default) with these options"
        )
    if fused and proj_size is not None:
        raise ValueError(
            f"lstm(proj_size={proj_size}) has no fused fast path: the fused kernel feeds back "
            "the unprojected h; use fused=False (the default) with a projection"
        )
    rows = hs if proj_size is None else proj_size  # the size of h, which meets W_h
    use_native = native_kernels.check_native(
        "lstm",
        native,
        native_blockers(
            compute_dtype,
            fused,
            dtype,
            (proj_size, "proj_size"),
            (True if normed else None, "layer_norm"),
            (True if peep else None, "peephole"),
        ),
    )

    def init(key: jax.Array, input_size: int) -> dict[str, jax.Array]:
        check_size("lstm.init", "input_size", input_size)
        ki, kh, kb, *kp = jax.random.split(key, 3 if proj_size is None else 4)
        b = bias_init(kb, (4 * hs,), dtype)
        params = {
            "w_i": gate_blocks(ki, input_init, input_size, hs, 4, dtype),
            "w_h": gate_blocks(kh, recurrent_init, rows, hs, 4, dtype),
            "b": b.at[hs : 2 * hs].add(jnp.asarray(forget_bias, dtype)),
        }
        if proj_size is not None:
            params["w_p"] = gate_blocks(kp[0], input_init, hs, proj_size, 1, dtype)
        if normed:
            for name, size in (("ln_i", 4 * hs), ("ln_h", 4 * hs), ("ln_c", hs)):
                params[f"{name}_scale"] = jnp.ones((size,), dtype)
                params[f"{name}_bias"] = jnp.zeros((size,), dtype)
        if peep:
            params.update({name: jnp.zeros((hs,), dtype) for name in ("p_i", "p_f", "p_o")})
        return params

    def initial_carry(params: dict[str, jax.Array]) -> LSTMState:
        w_h = params["w_h"]
        h = jnp.zeros(w_h.shape[:1], w_h.dtype)
        return LSTMState(h, jnp.zeros((w_h.shape[1] // 4,), w_h.dtype))

    def step(params, carry: LSTMState, x, *, recurrent_mask=None):
        check_step_input("lstm", x, params["w_i"].shape[0])
        with jax.named_scope("lstm"):
            h_in = carry.h if recurrent_mask is None else carry.h * recurrent_mask
            zx = matmul(x, params["w_i"], compute_dtype)
            zh = matmul(h_in, params["w_h"], compute_dtype)
            if normed:
                zx = normalise(zx, params["ln_i_scale"], params["ln_i_bias"])
                zh = normalise(zh, params["ln_h_scale"], params["ln_h_bias"])
            i, f, g, o = jnp.split(zx + zh + params["b"], 4, axis=-1)
            if peep:
                i, f = i + params["p_i"] * carry.c, f + params["p_f"] * carry.c
            c = jax.nn.sigmoid(f) * carry.c + jax.nn.sigmoid(i) * jnp.tanh(g)
            if peep:
                o = o + params["p_o"] * c
            c_out = normalise(c, params["ln_c_scale"], params["ln_c_bias"]) if normed else c
            h = jax.nn.sigmoid(o) * jnp.tanh(c_out)
            if proj_size is not None:
                h = matmul(h, params["w_p"], compute_dtype)
        return LSTMState(h, c), h

    if not use_native:
        return Cell(init, initial_carry, step, lstm_sequence if fused else None)

    def run(params, xs, carry, real, reverse, remat):
        ys, h, c = native_kernels.lstm_sequence(
            params, xs, carry.h, carry.c, real, reverse=reverse, remat=remat
        )
        return LSTMState(h, c), ys

    sequence = native_kernels.sequence_fn("lstm", Cell(init, initial_carry, step), native, run)
    return Cell(init, initial_carry, step, sequence)
