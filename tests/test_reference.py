"""Numerical agreement of rnnjax cells with references nobody here wrote.

* PyTorch: ``nn.RNN`` (tanh, relu), ``nn.LSTM`` and ``nn.GRU`` against ``elman``, ``lstm`` and
  ``gru`` (reset-after): outputs, final states and BPTT gradients, over full-length batches,
  packed variable-length batches (``pack_padded_sequence``) and the backward direction of a
  bidirectional module (``reverse=True``).
* The original GRU of Cho et al. 2014 (``gru(reset_after=False)``, which PyTorch lacks) against a
  float64 numpy transcription of the paper's equations.
* Flax linen: ``LSTMCell`` and ``GRUCell`` run by ``flax.linen.RNN``, with and without
  ``seq_lengths``, after converting their params to rnnjax's fused layouts.

Every run uses a nonzero initial state, nonzero biases and one shape, (B, T, D, H) below, so JAX
compiles few distinct programs.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import rnnjax as rj

B, T, D, H = 3, 7, 5, 6  # batch, time, input features, hidden units
# Unsorted (enforce_sorted=False must reorder), one full-length row and one single-step row.
LENGTHS = np.array([4, 7, 1], dtype=np.int32)
FWD_ATOL = 1e-5
GRAD_ATOL = 1e-4
KINDS = ["tanh", "relu", "lstm", "gru"]


def _close(actual, desired, atol, what):
    """assert_allclose, plus a guard that the reference is not trivially zero (no vacuous pass)."""
    actual, desired = np.asarray(actual), np.asarray(desired)
    assert actual.shape == desired.shape, f"{what}: shape {actual.shape} != {desired.shape}"
    assert np.abs(desired).max() > 1e-3, f"{what}: reference is ~0, the check would be vacuous"
    assert_allclose(actual, desired, rtol=0, atol=atol, err_msg=what)


def _data(seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs, initial states and the fixed weights R, S of the scalar loss."""
    k = jax.random.split(jax.random.key(seed), 6)
    normal = jax.random.normal
    return {
        "x": np.asarray(normal(k[0], (B, T, D))),
        "h0": np.asarray(0.5 * normal(k[1], (B, H))),
        "c0": np.asarray(0.5 * normal(k[2], (B, H))),
        "r": np.asarray(normal(k[3], (B, T, H))),
        "s_h": np.asarray(normal(k[4], (B, H))),
        "s_c": np.asarray(normal(k[5], (B, H))),
    }


# ---------------------------------------------------------------------------------------------
# PyTorch
# ---------------------------------------------------------------------------------------------


def _rj_cell(kind: str) -> rj.Cell:
    if kind in ("tanh", "relu"):
        return rj.cells.elman(H, activation=kind)
    if kind == "lstm":
        return rj.cells.lstm(H)
    return rj.cells.gru(H)


def _torch_module(kind: str, bidirectional: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    kw = {
        "input_size": D,
        "hidden_size": H,
        "num_layers": 1,
        "batch_first": True,
        "bidirectional": bidirectional,
    }
    if kind in ("tanh", "relu"):
        module = torch.nn.RNN(nonlinearity=kind, **kw)
    elif kind == "lstm":
        module = torch.nn.LSTM(**kw)
    else:
        module = torch.nn.GRU(**kw)
    return module.float()


def _params_from_torch(kind: str, module: torch.nn.Module, suffix: str) -> dict[str, jax.Array]:
    """rnnjax params from one direction of a torch module (suffix "" or "_reverse")."""

    def get(name):
        return jnp.asarray(getattr(module, name + suffix).detach().numpy())

    params = {"w_i": get("weight_ih_l0").T, "w_h": get("weight_hh_l0").T}
    if kind == "gru":
        params["b_i"] = get("bias_ih_l0")
        params["b_h"] = get("bias_hh_l0")
    else:
        params["b"] = get("bias_ih_l0") + get("bias_hh_l0")
    return params


def _torch_run(kind, module, data, lengths, direction):
    """Forward + backward through torch; results for one direction (0 fwd, 1 bwd) only.

    The loss only reads that direction's outputs and final state, so the input gradient is that
    direction's alone.
    """
    dirs = 2 if module.bidirectional else 1
    x = torch.tensor(data["x"], requires_grad=True)
    h0 = torch.tensor(np.stack([data["h0"]] * dirs), requires_grad=True)
    c0 = torch.tensor(np.stack([data["c0"]] * dirs), requires_grad=True)
    hx = (h0, c0) if kind == "lstm" else h0
    if lengths is None:
        out, state = module(x, hx)
    else:
        packed = pack_padded_sequence(
            x, torch.tensor(lengths, dtype=torch.int64), batch_first=True, enforce_sorted=False
        )
        out, state = module(packed, hx)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=T)
    h_n, c_n = state if kind == "lstm" else (state, None)
    out_d = out[..., direction * H : (direction + 1) * H]
    loss = (out_d * torch.tensor(data["r"])).sum() + (
        h_n[direction] * torch.tensor(data["s_h"])
    ).sum()
    if kind == "lstm":
        loss = loss + (c_n[direction] * torch.tensor(data["s_c"])).sum()
    loss.backward()

    suffix = "_reverse" if direction else ""

    def grad(name):
        return getattr(module, name + suffix).grad.numpy()

    res = {
        "out": out_d.detach().numpy(),
        "h": h_n[direction].detach().numpy(),
        "loss": loss.item(),
        "d_x": x.grad.numpy(),
        "d_h0": h0.grad[direction].numpy(),
        "d_w_i": grad("weight_ih_l0").T,
        "d_w_h": grad("weight_hh_l0").T,
        "d_bias_ih": grad("bias_ih_l0"),
        "d_bias_hh": grad("bias_hh_l0"),
    }
    if kind == "lstm":
        res["c"] = c_n[direction].detach().numpy()
        res["d_c0"] = c0.grad[direction].numpy()
    return res


def _rj_run(kind, params, data, lengths, reverse):
    """The same loss through ``jax.vmap`` of ``rj.scan``; value, aux outputs and gradients."""
    cell = _rj_cell(kind)
    is_lstm = kind == "lstm"
    r, s_h, s_c = (jnp.asarray(data[k]) for k in ("r", "s_h", "s_c"))

    def loss_fn(params, x, carry0):
        def one(x, c, n):
            return rj.scan(cell, params, x, c, length=n, reverse=reverse)

        carry, ys = jax.vmap(one)(x, carry0, lengths)
        h = carry.h if is_lstm else carry
        loss = jnp.sum(ys * r) + jnp.sum(h * s_h)
        if is_lstm:
            loss = loss + jnp.sum(carry.c * s_c)
        return loss, (carry, ys)

    h0, c0 = jnp.asarray(data["h0"]), jnp.asarray(data["c0"])
    carry0 = rj.LSTMState(h0, c0) if is_lstm else h0
    grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1, 2), has_aux=True)
    (loss, (carry, ys)), (d_p, d_x, d_carry0) = grad_fn(params, jnp.asarray(data["x"]), carry0)
    res = {"loss": float(loss), "out": np.asarray(ys), "d_x": np.asarray(d_x)}
    res.update({f"d_{k}": np.asarray(v) for k, v in d_p.items()})
    if is_lstm:
        res.update(h=np.asarray(carry.h), c=np.asarray(carry.c))
        res.update(d_h0=np.asarray(d_carry0.h), d_c0=np.asarray(d_carry0.c))
    else:
        res.update(h=np.asarray(carry), d_h0=np.asarray(d_carry0))
    return res


def _compare_with_torch(kind, got, want, lengths):
    # Forward: outputs (torch pads with zeros after pad_packed_sequence) and final states.
    _close(got["out"], want["out"], FWD_ATOL, f"{kind} outputs")
    _close(got["h"], want["h"], FWD_ATOL, f"{kind} final h")
    if kind == "lstm":
        _close(got["c"], want["c"], FWD_ATOL, f"{kind} final c")
    _close(got["loss"], want["loss"], 1e-4, f"{kind} loss")
    if lengths is not None:
        for b, n in enumerate(lengths):
            assert np.all(got["out"][b, n:] == 0.0), f"{kind}: row {b} padded outputs not zero"
            assert np.all(got["d_x"][b, n:] == 0.0), f"{kind}: row {b} padded d_x not zero"
    # Gradients, mapped back to torch's layout.
    for name in ("d_x", "d_h0", "d_w_i", "d_w_h") + (("d_c0",) if kind == "lstm" else ()):
        _close(got[name], want[name], GRAD_ATOL, f"{kind} {name}")
    if kind == "gru":
        _close(got["d_b_i"], want["d_bias_ih"], GRAD_ATOL, f"{kind} d_b_i vs bias_ih.grad")
        _close(got["d_b_h"], want["d_bias_hh"], GRAD_ATOL, f"{kind} d_b_h vs bias_hh.grad")
    else:  # b = bias_ih + bias_hh, so both torch biases get b's gradient
        _close(got["d_b"], want["d_bias_ih"], GRAD_ATOL, f"{kind} d_b vs bias_ih.grad")
        _close(got["d_b"], want["d_bias_hh"], GRAD_ATOL, f"{kind} d_b vs bias_hh.grad")


@pytest.mark.parametrize("packed", [False, True], ids=["full", "packed"])
@pytest.mark.parametrize("kind", KINDS)
def test_matches_torch_forward_and_grad(kind, packed):
    """Forward values and BPTT gradients vs torch, full length or packed variable lengths."""
    lengths = LENGTHS if packed else None
    data = _data()
    module = _torch_module(kind)
    params = _params_from_torch(kind, module, "")
    want = _torch_run(kind, module, data, lengths, direction=0)
    got = _rj_run(kind, params, data, None if lengths is None else jnp.asarray(lengths), False)
    _compare_with_torch(kind, got, want, lengths)
    if packed:  # h_n is the state after the last real step: the output there
        rows = np.arange(B)
        _close(got["h"], got["out"][rows, LENGTHS - 1], 0.0, f"{kind} h == last real output")


@pytest.mark.parametrize("kind", KINDS)
def test_matches_torch_bidirectional_backward_direction(kind):
    """torch's backward direction (``*_l0_reverse``, second half of the output features) over a
    packed batch is ``rj.scan(..., reverse=True, length=n)`` with outputs in input order."""
    data = _data(seed=1)
    module = _torch_module(kind, bidirectional=True)
    params = _params_from_torch(kind, module, "_reverse")
    want = _torch_run(kind, module, data, LENGTHS, direction=1)
    got = _rj_run(kind, params, data, jnp.asarray(LENGTHS), True)
    _compare_with_torch(kind, got, want, LENGTHS)
    # The reverse pass ends at the first step, so the final state is the output at t = 0.
    _close(got["h"], got["out"][:, 0], 0.0, f"{kind} reverse h == output at t=0")


# ---------------------------------------------------------------------------------------------
# The original GRU (Cho et al. 2014), reset before the recurrent matmul
# ---------------------------------------------------------------------------------------------


def _gru_cho2014_numpy(params, xs, h):
    """Cho et al. 2014 eqs. (5)-(8), in float64, for one example: (final h, outputs)."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}

    def sigmoid(a):
        return 1.0 / (1.0 + np.exp(-a))

    def gate(name, k):  # the k-th (H-wide) gate block: 0 = r, 1 = z, 2 = n
        return p[name][..., k * H : (k + 1) * H]

    w_ir, w_iz, w_in = (gate("w_i", k) for k in range(3))
    w_hr, w_hz, w_hn = (gate("w_h", k) for k in range(3))
    b_ir, b_iz, b_in = (gate("b_i", k) for k in range(3))
    b_hr, b_hz, b_hn = (gate("b_h", k) for k in range(3))
    h = np.asarray(h, np.float64)
    ys = []
    for x in np.asarray(xs, np.float64):
        r = sigmoid(x @ w_ir + b_ir + h @ w_hr + b_hr)
        z = sigmoid(x @ w_iz + b_iz + h @ w_hz + b_hz)
        n = np.tanh(x @ w_in + b_in + (r * h) @ w_hn + b_hn)
        h = (1.0 - z) * n + z * h
        ys.append(h)
    return h, np.stack(ys)


def test_gru_reset_before_matches_cho2014_numpy():
    data = _data(seed=2)
    nonzero_bias = jax.nn.initializers.normal(0.5)
    cell = rj.cells.gru(H, reset_after=False, bias_init=nonzero_bias)
    params = cell.init(jax.random.key(3), D)
    x, h0 = jnp.asarray(data["x"]), jnp.asarray(data["h0"])

    def run(cell):
        return jax.vmap(lambda x, h: rj.scan(cell, params, x, h))(x, h0)

    h_t, ys = run(cell)
    want = [_gru_cho2014_numpy(params, data["x"][b], data["h0"][b]) for b in range(B)]
    want_h = np.stack([w[0] for w in want])
    want_ys = np.stack([w[1] for w in want])
    _close(ys, want_ys, FWD_ATOL, "reset-before outputs")
    _close(h_t, want_h, FWD_ATOL, "reset-before final h")
    # The check can tell the two forms apart: the reset-after cell with these params differs.
    _, ys_after = run(rj.cells.gru(H, reset_after=True))
    assert np.abs(np.asarray(ys_after) - want_ys).max() > 1e-2


# ---------------------------------------------------------------------------------------------
# Flax linen
# ---------------------------------------------------------------------------------------------


def _flax_cell_and_params(kind: str):
    """A flax cell and its params with *every* leaf random (flax inits biases to zero, which
    would hide a wrong bias mapping)."""
    cell = nn.LSTMCell(features=H) if kind == "lstm" else nn.GRUCell(features=H)
    carry = cell.initialize_carry(jax.random.key(1), (B, D))
    params = cell.init(jax.random.key(2), carry, jnp.zeros((B, D)))["params"]
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    leaves = [
        0.5 * jax.random.normal(k, a.shape, a.dtype) for k, a in zip(keys, leaves, strict=True)
    ]
    return cell, jax.tree.unflatten(treedef, leaves)


def _layout(params) -> dict[str, list[str]]:
    return {name: sorted(leaf) for name, leaf in params.items()}


def _rj_params_from_flax(kind: str, p) -> dict[str, jax.Array]:
    """Flax Dense kernels are (in, out), rnnjax's layout; fuse the per-gate blocks."""

    def cat(names, leaf):
        return jnp.concatenate([p[n][leaf] for n in names], axis=-1)

    if kind == "lstm":
        # i = σ(ii(x) + hi(h)), f, g, o likewise; only the h-side Dense layers carry a bias.
        assert _layout(p) == {
            **{n: ["kernel"] for n in ("ii", "if", "ig", "io")},
            **{n: ["bias", "kernel"] for n in ("hi", "hf", "hg", "ho")},
        }
        return {
            "w_i": cat(("ii", "if", "ig", "io"), "kernel"),
            "w_h": cat(("hi", "hf", "hg", "ho"), "kernel"),
            "b": cat(("hi", "hf", "hg", "ho"), "bias"),
        }
    # r = σ(ir(x) + hr(h)), z = σ(iz(x) + hz(h)), n = tanh(in(x) + r * hn(h)): every x-side
    # Dense has a bias (-> b_i); of the h-side ones only hn does, and it sits inside r * (...),
    # exactly where rnnjax's reset-after b_h[2H:] sits; b_h's r and z blocks are zero.
    assert _layout(p) == {
        **{n: ["bias", "kernel"] for n in ("ir", "iz", "in", "hn")},
        **{n: ["kernel"] for n in ("hr", "hz")},
    }
    zeros = jnp.zeros((H,), jnp.float32)
    return {
        "w_i": cat(("ir", "iz", "in"), "kernel"),
        "w_h": cat(("hr", "hz", "hn"), "kernel"),
        "b_i": cat(("ir", "iz", "in"), "bias"),
        "b_h": jnp.concatenate([zeros, zeros, p["hn"]["bias"]]),
    }


@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "seq_lengths"])
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_matches_flax_linen_cell(kind, with_lengths):
    data = _data(seed=4)
    flax_cell, flax_params = _flax_cell_and_params(kind)
    params = _rj_params_from_flax(kind, flax_params)
    x, h0, c0 = (jnp.asarray(data[k]) for k in ("x", "h0", "c0"))
    lengths = jnp.asarray(LENGTHS) if with_lengths else None

    # flax: LSTMCell's carry is (c, h); GRUCell's is h.
    flax_carry0 = (c0, h0) if kind == "lstm" else h0
    flax_carry, flax_ys = nn.RNN(flax_cell, return_carry=True).apply(
        {"params": {"cell": flax_params}}, x, initial_carry=flax_carry0, seq_lengths=lengths
    )
    carry0 = rj.LSTMState(h0, c0) if kind == "lstm" else h0
    cell = rj.cells.lstm(H) if kind == "lstm" else rj.cells.gru(H)
    carry, ys = jax.vmap(lambda x, c, n: rj.scan(cell, params, x, c, length=n))(x, carry0, lengths)

    if kind == "lstm":
        flax_c, flax_h = flax_carry
        _close(carry.c, flax_c, FWD_ATOL, "flax LSTM final c")
        _close(carry.h, flax_h, FWD_ATOL, "flax LSTM final h")
    else:
        _close(carry, flax_carry, FWD_ATOL, f"flax {kind} final h")
    if with_lengths:  # flax leaves padded outputs unspecified; compare the real steps only
        real = np.arange(T)[None, :] < LENGTHS[:, None]
        _close(np.asarray(ys)[real], np.asarray(flax_ys)[real], FWD_ATOL, f"flax {kind} outputs")
        assert np.all(np.asarray(ys)[~real] == 0.0)
    else:
        _close(ys, flax_ys, FWD_ATOL, f"flax {kind} outputs")
