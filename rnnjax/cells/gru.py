"""The GRU cell (Cho et al. 2014) in its reset-after (PyTorch/cuDNN/Keras) and original forms."""

from __future__ import annotations

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
from rnnjax.cells._fused import gru_sequence
from rnnjax.core import Cell, check_step_input


def gru(
    hidden_size: int,
    *,
    reset_after: bool = True,
    layer_norm: bool = False,
    input_init: Initializer = default_input_init,
    recurrent_init: Initializer = default_recurrent_init,
    bias_init: Initializer = default_bias_init,
    dtype: jnp.dtype = jnp.float32,
    compute_dtype: jnp.dtype | None = None,
    fused: bool = False,
    native: bool | None = None,
) -> Cell:
    """A GRU cell, PyTorch's ``nn.GRU`` step when ``reset_after=True``.

    Params: ``w_i (I, 3H)``, ``w_h (H, 3H)``, ``b_i (3H,)``, ``b_h (3H,)`` with gates fused in
    the order r, z, n. Carry and output: ``h (H,)``. With ``gi = x W_i + b_i``::

        r = sigmoid(gi_r + h W_hr + b_hr)        z = sigmoid(gi_z + h W_hz + b_hz)
        n = tanh(gi_n + r * (h W_hn + b_hn))     # reset_after=True  (PyTorch, cuDNN, Keras)
        n = tanh(gi_n + (r * h) W_hn + b_hn)     # reset_after=False (Cho et al. 2014)
        h' = (1 - z) * n + z * h

    PyTorch's ``weight_ih_l0`` is ``w_i.T``, ``weight_hh_l0`` is ``w_h.T``, ``bias_ih_l0`` is
    ``b_i`` and ``bias_hh_l0`` is ``b_h``. Both forms have the same params.

    ``layer_norm=True`` (Ba et al. 2016's recipe for the GRU, as the common PyTorch
    implementations apply it) normalises the input and the recurrent pre-activations
    separately, each over its 3H units, before the biases (reset-after form only: the original
    form has no single recurrent pre-activation to normalise). With
    ``LN(v) = (v - mean(v)) / sqrt(var(v) + 1e-5) * scale + bias``, ``gi = LN_i(x W_i) + b_i``
    and ``gh = LN_h(h W_h) + b_h`` take the place of ``x W_i + b_i`` and ``h W_h + b_h``
    above. Params gain ``ln_i_scale, ln_i_bias, ln_h_scale, ln_h_bias (3H,)`` (scales one,
    biases zero at init). It takes the ``lax.scan`` of ``step`` (``native=True`` or
    ``fused=True`` with it raises).

    ``fused=True`` attaches the whole-sequence fast path (reset-after only) and
    ``compute_dtype=jnp.bfloat16`` runs the matmuls in bfloat16 with float32 state (see
    :func:`rnnjax.cells.lstm`). ``native``: ``None`` (the default) runs whole sequences of the
    float32 reset-after GRU with rnnjax's compiled CPU kernels whenever they can, as
    :func:`rnnjax.cells.lstm` says (``reset_after=False``, ``compute_dtype`` and ``fused`` keep
    the ``lax.scan`` of ``step``); ``True`` requires them (errors say why they cannot run);
    ``False`` never uses them. Values and derivatives equal those of the reference
    ``cell._replace(sequence=None)`` within float32 rounding, NaN and inf propagating as there;
    docs/native.md has the dispatch.

    >>> import jax, jax.numpy as jnp, rnnjax as rj
    >>> cell = rj.cells.gru(4, reset_after=False)
    >>> params = cell.init(jax.random.key(0), 3)
    >>> h, y = cell.step(params, cell.initial_carry(params), jnp.ones(3))
    >>> sorted(params), h.shape
    (['b_h', 'b_i', 'w_h', 'w_i'], (4,))
    """
    check_size("gru", "hidden_size", hidden_size)
    if not isinstance(reset_after, bool):
        raise TypeError(f"gru reset_after must be True or False, got {reset_after!r}")
    normed = check_flag("gru", "layer_norm", layer_norm)
    if normed and not reset_after:
        raise ValueError(
            "gru(layer_norm=True, reset_after=False): layer normalisation normalises the "
            "recurrent pre-activation h W_h, which the original form splits around r * h; use "
            "reset_after=True with layer_norm"
        )
    hs = hidden_size

    def init(key: jax.Array, input_size: int) -> dict[str, jax.Array]:
        check_size("gru.init", "input_size", input_size)
        ki, kh, kbi, kbh = jax.random.split(key, 4)
        params = {
            "w_i": gate_blocks(ki, input_init, input_size, hs, 3, dtype),
            "w_h": gate_blocks(kh, recurrent_init, hs, hs, 3, dtype),
            "b_i": bias_init(kbi, (3 * hs,), dtype),
            "b_h": bias_init(kbh, (3 * hs,), dtype),
        }
        if normed:
            for name in ("ln_i", "ln_h"):
                params[f"{name}_scale"] = jnp.ones((3 * hs,), dtype)
                params[f"{name}_bias"] = jnp.zeros((3 * hs,), dtype)
        return params

    def initial_carry(params: dict[str, jax.Array]) -> jax.Array:
        return jnp.zeros(params["w_h"].shape[:1], params["w_h"].dtype)

    def step(params, h, x, *, recurrent_mask=None):
        check_step_input("gru", x, params["w_i"].shape[0])
        with jax.named_scope("gru"):
            w_h, b_h = params["w_h"], params["b_h"]
            # Variational dropout masks h where it meets W_h, not in the z-interpolation below.
            h_in = h if recurrent_mask is None else h * recurrent_mask
            gi = matmul(x, params["w_i"], compute_dtype)
            if normed:
                gi = normalise(gi, params["ln_i_scale"], params["ln_i_bias"])
            gi_r, gi_z, gi_n = jnp.split(gi + params["b_i"], 3, axis=-1)
            if reset_after:
                gh = matmul(h_in, w_h, compute_dtype)
                if normed:
                    gh = normalise(gh, params["ln_h_scale"], params["ln_h_bias"])
                gh_r, gh_z, gh_n = jnp.split(gh + b_h, 3, axis=-1)
                r = jax.nn.sigmoid(gi_r + gh_r)
                z = jax.nn.sigmoid(gi_z + gh_z)
                n = jnp.tanh(gi_n + r * gh_n)
            else:
                gh_r, gh_z = jnp.split(
                    matmul(h_in, w_h[:, : 2 * hs], compute_dtype) + b_h[: 2 * hs], 2, axis=-1
                )
                r = jax.nn.sigmoid(gi_r + gh_r)
                z = jax.nn.sigmoid(gi_z + gh_z)
                gh_n = matmul(r * h_in, w_h[:, 2 * hs :], compute_dtype)
                n = jnp.tanh(gi_n + gh_n + b_h[2 * hs :])
            h = (1.0 - z) * n + z * h
        return h, h

    compute_dtype = check_compute_dtype("gru", compute_dtype, check_fused(fused))
    if fused and normed:
        raise ValueError(
            "gru(layer_norm=True) has no fused fast path: the fused kernel runs the plain GRU; "
            "use fused=False (the default) with layer_norm"
        )
    if fused and not reset_after:
        raise ValueError(
            "gru(reset_after=False) has no fused fast path: its recurrent matmul takes r * h, "
            "not h; use fused=False or reset_after=True"
        )
    use_native = native_kernels.check_native(
        "gru",
        native,
        native_blockers(
            compute_dtype,
            fused,
            dtype,
            (None if reset_after else False, "reset_after"),
            (True if normed else None, "layer_norm"),
        ),
    )
    if not use_native:
        return Cell(init, initial_carry, step, gru_sequence if fused else None)

    def run(params, xs, h, real, reverse, remat):
        ys, h = native_kernels.gru_sequence(params, xs, h, real, reverse=reverse, remat=remat)
        return h, ys

    sequence = native_kernels.sequence_fn("gru", Cell(init, initial_carry, step), native, run)
    return Cell(init, initial_carry, step, sequence)
