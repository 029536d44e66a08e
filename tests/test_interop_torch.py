"""rnnjax.interop.torch against torch.nn.RNN, LSTM and GRU, and the LSTM projection it needs.

Ten torch modules are drawn at random (seeded) over the kinds (RNN tanh, RNN relu, LSTM, LSTM
with ``proj_size``, GRU), ``num_layers`` 1-3, ``bidirectional``, ``bias``, ``batch_first``,
inter-layer ``dropout`` and a given or default initial state; for each, ``from_torch``'s layer
must give torch's outputs and final states over a full-length batch and over a packed batch of
variable lengths (one full, one short, one of length 1), and ``to_torch`` must round-trip.
Each configuration compiles one jitted vmap, used for both batches.
"""

from __future__ import annotations

import random
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import rnnjax as rj
from rnnjax.interop.torch import (
    final_states,
    from_state_dict,
    from_torch,
    initial_carry,
    to_state_dict,
    to_torch,
)

B, T, I = 3, 6, 3
LENGTHS = np.array([3, T, 1])  # unsorted: pack_padded_sequence(enforce_sorted=False) reorders
ATOL = 1e-5
KINDS = ["rnn_tanh", "rnn_relu", "lstm", "lstm_proj", "gru"]
pytestmark = pytest.mark.filterwarnings(  # torch falls back from oneDNN; nothing to act on
    "ignore:LSTM with projections is not supported with oneDNN:UserWarning"
)


def _draw(n: int = 10, seed: int = 9) -> list[dict]:
    """``n`` module configurations, every kind twice; the rest drawn with ``seed``."""
    rng = random.Random(seed)
    configs = []
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        hidden = rng.choice([4, 5])
        layers = rng.randint(1, 3)
        configs.append(
            {
                "kind": kind,
                "hidden_size": hidden,
                "num_layers": layers,
                "bidirectional": rng.random() < 0.5,
                "bias": rng.random() < 0.6,
                "batch_first": rng.random() < 0.5,
                "proj_size": rng.randint(1, hidden - 1) if kind == "lstm_proj" else 0,
                "dropout": 0.25 if layers > 1 and rng.random() < 0.5 else 0.0,
                "given_h0": rng.random() < 0.5,
            }
        )
    return configs


CONFIGS = _draw()


def _id(c: dict) -> str:
    flags = [c["kind"], f"L{c['num_layers']}", f"H{c['hidden_size']}"]
    flags += [name for name in ("bidirectional", "batch_first", "given_h0") if c[name]]
    flags += [] if c["bias"] else ["nobias"]
    flags += [f"P{c['proj_size']}"] if c["proj_size"] else []
    return "-".join(flags)


def _module(c: dict, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    kw = {
        "input_size": I,
        "hidden_size": c["hidden_size"],
        "num_layers": c["num_layers"],
        "bias": c["bias"],
        "batch_first": c["batch_first"],
        "bidirectional": c["bidirectional"],
        "dropout": c["dropout"],
    }
    if c["kind"].startswith("rnn"):
        module = torch.nn.RNN(nonlinearity=c["kind"][4:], **kw)
    elif c["kind"].startswith("lstm"):
        module = torch.nn.LSTM(proj_size=c["proj_size"], **kw)
    else:
        module = torch.nn.GRU(**kw)
    return module.eval()  # eval: torch's inter-layer dropout off, as rnnjax's without a key


def _config_kwargs(c: dict) -> dict:
    """from_state_dict/to_state_dict's arguments for a configuration."""
    mode = {"rnn": "RNN", "lstm": "LSTM", "gru": "GRU"}[c["kind"].split("_")[0]]
    kw = {"mode": mode, "input_size": I, "hidden_size": c["hidden_size"]}
    kw |= {k: c[k] for k in ("num_layers", "bidirectional", "bias", "proj_size")}
    if mode == "RNN":
        kw["nonlinearity"] = c["kind"][4:]
    return kw


def _close(actual, desired, what):
    actual, desired = np.asarray(actual), np.asarray(desired)
    assert actual.shape == desired.shape, f"{what}: shape {actual.shape} != {desired.shape}"
    assert np.abs(desired).max() > 1e-3, f"{what}: reference is ~0, the check would be vacuous"
    assert_allclose(actual, desired, rtol=1e-5, atol=ATOL, err_msg=what)


def test_draw_covers_every_option():
    """The seeded draw exercises every value of every option (else pick another seed)."""
    for key, values in [
        ("kind", KINDS),
        ("num_layers", [1, 2, 3]),
        ("bidirectional", [False, True]),
        ("bias", [False, True]),
        ("batch_first", [False, True]),
        ("given_h0", [False, True]),
        ("hidden_size", [4, 5]),
    ]:
        assert sorted({c[key] for c in CONFIGS}) == sorted(values), key
    assert any(c["dropout"] for c in CONFIGS)
    assert any(c["kind"] == "lstm_proj" and c["num_layers"] > 1 for c in CONFIGS)
    assert any(c["bidirectional"] and c["num_layers"] > 1 for c in CONFIGS)
    assert {c["kind"] for c in CONFIGS if c["bidirectional"]} == set(KINDS)


def _torch_run(module, x, hx, lengths):
    """Torch's output in batch-first layout and its final states, packed when lengths given."""
    bf = module.batch_first
    x_in = x if bf else x.transpose(0, 1)
    with torch.no_grad():
        if lengths is None:
            out, state = module(x_in, hx)
        else:
            packed = pack_padded_sequence(
                x_in, torch.tensor(lengths), batch_first=bf, enforce_sorted=False
            )
            out, state = module(packed, hx)
            out, _ = pad_packed_sequence(out, batch_first=bf, total_length=T)
    out = out if bf else out.transpose(0, 1)
    states = state if isinstance(state, tuple) else (state,)
    return out.numpy(), [s.numpy() for s in states]


@pytest.mark.parametrize("c", CONFIGS, ids=_id)
def test_from_torch_matches_torch(c):
    module = _module(c, seed=CONFIGS.index(c))
    layer, params = from_torch(module)
    directions = 2 if c["bidirectional"] else 1
    h_out = c["proj_size"] or c["hidden_size"]
    gen = torch.Generator().manual_seed(100)
    x = torch.randn(B, T, I, generator=gen)
    hx, carry0 = None, None
    if c["given_h0"]:
        shape = (c["num_layers"] * directions, B)
        h_0 = 0.5 * torch.randn(*shape, h_out, generator=gen)
        c_0 = 0.5 * torch.randn(*shape, c["hidden_size"], generator=gen)
        hx = (h_0, c_0) if c["kind"].startswith("lstm") else h_0
        is_lstm = isinstance(hx, tuple)
        carry0 = initial_carry(
            h_0.numpy(), c_0.numpy() if is_lstm else None, bidirectional=c["bidirectional"]
        )

    # The batch is fed in torch's own layout: vmap over axis 0 if batch_first, else axis 1.
    x_axis = 0 if c["batch_first"] else 1
    x_feed = x.numpy() if c["batch_first"] else x.transpose(0, 1).numpy()

    @jax.jit
    def run(params, xs, lengths, carry):
        def one(x, n, c0):
            return layer.apply(params, x, length=n, carry=c0)

        in_axes = (x_axis, 0, None if carry is None else 0)
        carry, ys = jax.vmap(one, in_axes=in_axes)(xs, lengths, carry)
        return ys, final_states(carry)

    for lengths in (None, LENGTHS):
        want_out, want_states = _torch_run(module, x, hx, lengths)
        n = np.full(B, T) if lengths is None else lengths  # the same dtype: one compile
        ys, states = run(params, x_feed, n, carry0)
        states = states if isinstance(states, tuple) else (states,)
        what = f"{_id(c)} {'packed' if lengths is not None else 'full'}"
        assert ys.shape == (B, T, directions * h_out)
        _close(ys, want_out, f"{what} outputs")
        assert len(states) == len(want_states)
        for name, got, want in zip(("h_n", "c_n"), states, want_states, strict=False):
            _close(got, want, f"{what} {name}")
        if lengths is not None:  # torch pads with zeros, and so must rnnjax, exactly
            for b, m in enumerate(lengths):
                assert np.all(np.asarray(ys)[b, m:] == 0.0), f"{what}: row {b} pads not zero"
    assert run._cache_size() == 1, "the full and the packed batch should share one compile"


@pytest.mark.parametrize("c", CONFIGS, ids=_id)
def test_to_torch_round_trip(c):
    seed = CONFIGS.index(c)
    module = _module(c, seed)
    _, params = from_torch(module)
    fresh = to_torch(params, _module(c, seed + 1000))
    original, back = module.state_dict(), fresh.state_dict()
    assert list(back) == list(original)
    for key, value in original.items():
        if key.startswith("bias") and c["kind"] != "gru":
            continue  # elman/lstm hold b = bias_ih + bias_hh: checked below
        assert torch.equal(back[key], value), key
    if c["bias"] and c["kind"] != "gru":
        for key in (k for k in original if k.startswith("bias_ih")):
            hh = key.replace("bias_ih", "bias_hh")
            assert torch.equal(back[key], original[key] + original[hh]), key
            assert torch.equal(back[hh], torch.zeros_like(original[hh])), hh
        # A different state dict, the same function: compare the modules' outputs.
        x = torch.randn(B, T, I, generator=torch.Generator().manual_seed(1))
        for lengths in (None, LENGTHS):
            out, states = _torch_run(module, x, None, lengths)
            out_back, states_back = _torch_run(fresh, x, None, lengths)
            _close(out_back, out, f"{_id(c)} outputs after the round trip")
            for got, want in zip(states_back, states, strict=True):
                _close(got, want, f"{_id(c)} states after the round trip")


@pytest.mark.parametrize("c", CONFIGS, ids=_id)
def test_state_dict_of_numpy_arrays(c):
    """from_state_dict on plain numpy arrays gives from_torch's params; to_state_dict inverts it
    into the state dict to_torch writes."""
    module = _module(c, seed=CONFIGS.index(c))
    _, params = from_torch(module)
    arrays = {k: v.numpy() for k, v in module.state_dict().items()}
    _, params_np = from_state_dict(arrays, dropout=c["dropout"], **_config_kwargs(c))
    assert jax.tree.structure(params_np) == jax.tree.structure(params)
    for got, want in zip(jax.tree.leaves(params_np), jax.tree.leaves(params), strict=True):
        assert got.dtype == want.dtype == jnp.float32
        np.testing.assert_array_equal(got, want)
    exported = to_state_dict(params_np, **_config_kwargs(c))
    written = to_torch(params, _module(c, seed=99)).state_dict()
    assert list(exported) == list(written)
    for key, value in exported.items():
        assert isinstance(value, np.ndarray) and value.flags.writeable
        np.testing.assert_array_equal(value, written[key].numpy(), err_msg=key)


def test_dropout_is_carried_into_the_stack():
    """torch's inter-layer dropout rate becomes the stack's: active with a key, off without."""
    torch.manual_seed(0)
    layer, params = from_torch(torch.nn.GRU(I, 4, num_layers=2, dropout=0.5))
    layer_0, params_0 = from_torch(torch.nn.GRU(I, 4, num_layers=2))
    xs = jax.random.normal(jax.random.key(0), (T, I))

    @jax.jit
    def run(params, params_0, key):
        return (
            layer.apply(params, xs)[1],
            layer.apply(params, xs, key=key)[1],
            layer_0.apply(params_0, xs)[1],
            layer_0.apply(params_0, xs, key=key)[1],
        )

    plain, dropped, plain_0, keyed_0 = run(params, params_0, jax.random.key(1))
    assert not np.allclose(plain, dropped)
    np.testing.assert_array_equal(plain_0, keyed_0)


def test_import_without_torch():
    """``import rnnjax.interop.torch`` and from_state_dict work where torch is missing."""
    code = """
import sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
import jax, jax.numpy as jnp, numpy as np
from rnnjax.interop.torch import from_state_dict, from_torch
rng = np.random.default_rng(0)
shapes = {"weight_ih_l0": (4, 3), "weight_hh_l0": (4, 4)}
sd = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
layer, params = from_state_dict(sd, mode="RNN", input_size=3, hidden_size=4, bias=False)
ys = jax.eval_shape(lambda p: layer.apply(p, jnp.ones((5, 3)))[1], params)
assert ys.shape == (5, 4), ys
try:
    from_torch(object())
except ImportError as e:
    print(e)
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    assert "from_torch needs PyTorch, which is not installed" in out
    assert "from_state_dict" in out


# ------------------------------------------------------------------------ LSTM projection


def test_lstm_projection_shapes_and_step():
    cell = rj.cells.lstm(5, proj_size=2)
    params = cell.init(jax.random.key(0), I)
    assert {k: v.shape for k, v in params.items()} == {
        "w_i": (I, 20), "w_h": (2, 20), "b": (20,), "w_p": (5, 2),
    }  # fmt: skip
    carry = cell.initial_carry(params)
    assert (carry.h.shape, carry.c.shape) == ((2,), (5,))
    x = jnp.arange(I, dtype=jnp.float32)
    carry = rj.LSTMState(jnp.array([0.3, -0.7]), jnp.linspace(-1, 1, 5))
    new, y = cell.step(params, carry, x)
    # By hand: the plain LSTM step on h, then the projection.
    z = x @ params["w_i"] + carry.h @ params["w_h"] + params["b"]
    i, f, g, o = jnp.split(z, 4)
    c = jax.nn.sigmoid(f) * carry.c + jax.nn.sigmoid(i) * jnp.tanh(g)
    h = (jax.nn.sigmoid(o) * jnp.tanh(c)) @ params["w_p"]
    np.testing.assert_allclose(new.c, c, atol=1e-6)
    np.testing.assert_allclose(y, h, atol=1e-6)
    np.testing.assert_array_equal(new.h, y)
    # The recurrent mask (P,) multiplies h where it meets W_h, and nowhere else.
    mask = jnp.array([0.0, 2.0])
    masked, _ = cell.step(params, carry, x, recurrent_mask=mask)
    by_hand, _ = cell.step(params, rj.LSTMState(carry.h * mask, carry.c), x)
    np.testing.assert_allclose(masked.h, by_hand.h, atol=1e-6)
    np.testing.assert_allclose(masked.c, by_hand.c, atol=1e-6)


def test_lstm_projection_with_recurrent_dropout_layer():
    layer = rj.layers.rnn(rj.cells.lstm(4, proj_size=3), recurrent_dropout=0.5)
    params = layer.init(jax.random.key(0), I)
    xs = jnp.ones((T, I))
    carry, ys = jax.jit(lambda p, k: layer.apply(p, xs, length=4, key=k))(params, jax.random.key(1))
    assert ys.shape == (T, 3) and carry.h.shape == (3,) and carry.c.shape == (4,)
    np.testing.assert_array_equal(carry.h, ys[3])


def test_lstm_without_projection_is_unchanged():
    params = rj.cells.lstm(4).init(jax.random.key(0), I)
    assert sorted(params) == ["b", "w_h", "w_i"] and params["w_h"].shape == (4, 16)
    ref = rj.cells.lstm(4, proj_size=None).init(jax.random.key(0), I)
    for k in params:
        np.testing.assert_array_equal(params[k], ref[k])


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"proj_size": 4}, r"proj_size < hidden_size.*got proj_size=4 and hidden_size=4"),
        ({"proj_size": 0}, r"None or a positive int, got 0: use proj_size=None"),
        ({"proj_size": 2.0}, r"None or a positive int, got 2\.0"),
        ({"proj_size": 2, "fused": True}, r"lstm\(proj_size=2\) has no fused.*fused=False"),
    ],
    ids=["too_big", "zero", "float", "fused"],
)
def test_lstm_projection_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        rj.cells.lstm(4, **kw)


# ------------------------------------------------------------------------ errors


def _sd(module) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in module.state_dict().items()}


LSTM_KW = {"mode": "LSTM", "input_size": I, "hidden_size": 4}


def test_from_torch_rejects_other_modules():
    with pytest.raises(TypeError, match=r"GRU, got torch\.nn\.modules\.linear\.Linear.*submodule"):
        from_torch(torch.nn.Linear(3, 4))
    with pytest.raises(TypeError, match=r"got torch\.nn\.modules\.rnn\.LSTMCell.*rnnjax\.cells"):
        from_torch(torch.nn.LSTMCell(3, 4))
    with pytest.raises(TypeError, match=r"got builtins\.dict: for a state dict use from_state"):
        from_torch({"weight_ih_l0": np.zeros((16, 3))})
    with pytest.raises(TypeError, match=r"to_torch expects a torch\.nn\.RNN.*got .*Sequential"):
        to_torch((), torch.nn.Sequential())


def test_state_dict_missing_key():
    sd = _sd(torch.nn.LSTM(I, 4))
    del sd["bias_hh_l0"]
    with pytest.raises(ValueError, match=r"missing 'bias_hh_l0' \(expected shape \(16,\)\)"):
        from_state_dict(sd, **LSTM_KW)
    sd = _sd(torch.nn.LSTM(I, 4, bias=False))
    with pytest.raises(ValueError, match=r"missing 'bias_ih_l0'.*the keys say bias=False"):
        from_state_dict(sd, **LSTM_KW)
    sd = _sd(torch.nn.LSTM(I, 4, num_layers=2))
    with pytest.raises(ValueError, match=r"missing 'weight_ih_l2'.*the keys say num_layers=2"):
        from_state_dict(sd, **LSTM_KW, num_layers=3)


def test_state_dict_extra_keys():
    sd = _sd(torch.nn.LSTM(I, 4, bidirectional=True))
    with pytest.raises(
        ValueError,
        match=r"unexpected keys 'weight_ih_l0_reverse' \(16, 3\).*the keys say bidirectional=True",
    ):
        from_state_dict(sd, **LSTM_KW)
    sd = _sd(torch.nn.LSTM(I, 4, proj_size=2))
    with pytest.raises(ValueError, match=r"unexpected keys 'weight_hr_l0' \(2, 4\).*proj_size > 0"):
        from_state_dict(sd, **LSTM_KW)
    sd = {"encoder." + k: v for k, v in _sd(torch.nn.LSTM(I, 4)).items()}
    with pytest.raises(ValueError, match=r"strip the prefix 'encoder\.'"):
        from_state_dict(sd, **LSTM_KW)
    sd = _sd(torch.nn.LSTM(I, 4)) | {"running_mean": np.zeros(3)}
    with pytest.raises(ValueError, match=r"'running_mean' is not a key of torch\.nn\.RNN"):
        from_state_dict(sd, **LSTM_KW)


def test_state_dict_misshapen():
    sd = _sd(torch.nn.LSTM(I, 4))
    with pytest.raises(
        ValueError,
        match=r"state_dict\['weight_ih_l0'\] has shape \(16, 3\), expected \(16, 5\).*"
        r"pass input_size=3",
    ):
        from_state_dict(sd, mode="LSTM", input_size=5, hidden_size=4)
    sd = _sd(torch.nn.GRU(I, 4))
    with pytest.raises(
        ValueError, match=r"has shape \(12, 3\), expected \(16, 3\).*hidden_size=3 or mode='GRU'"
    ):
        from_state_dict(sd, **LSTM_KW)
    sd = _sd(torch.nn.LSTM(I, 4, proj_size=2))
    with pytest.raises(
        ValueError,
        match=r"'weight_hh_l0'\] has shape \(16, 2\), expected \(16, 3\).*pass proj_size=2",
    ):
        from_state_dict(sd, **LSTM_KW, proj_size=3)
    sd["weight_hr_l0"] = np.zeros((2, 5), np.float32)
    with pytest.raises(
        ValueError, match=r"'weight_hr_l0'\] has shape \(2, 5\), expected \(2, 4\).*hidden_size=5"
    ):
        from_state_dict(sd, **LSTM_KW, proj_size=2)
    with pytest.raises(TypeError, match=r"expects a dict of arrays.*got LSTM.*from_torch"):
        from_state_dict(torch.nn.LSTM(I, 4), **LSTM_KW)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"mode": "lstm"}, r"mode must be one of 'RNN', 'LSTM', 'GRU'; got 'lstm'"),
        ({"mode": "GRU", "proj_size": 2}, r"proj_size is only for mode='LSTM'.*mode='GRU'"),
        ({"proj_size": 4}, r"proj_size < hidden_size.*proj_size=4 and hidden_size=4"),
        ({"nonlinearity": "relu"}, r"nonlinearity is only for mode='RNN'"),
        ({"mode": "RNN", "nonlinearity": "gelu"}, r"nonlinearity must be one of 'tanh', 'relu'"),
        ({"num_layers": 0}, r"num_layers to be a positive int, got 0"),
        ({"dropout": 1.0}, r"dropout in \[0, 1\), got 1\.0"),
    ],
)
def test_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        from_state_dict({}, **(LSTM_KW | kw))


@pytest.mark.parametrize("batch_first", [False, True])
def test_batched_input_to_the_layer_says_how_to_vmap(batch_first):
    layer, params = from_torch(torch.nn.GRU(I, 4, batch_first=batch_first))
    fix = r"jax\.vmap\(f\)" if batch_first else r"\(T, B, I\): jax\.vmap\(f, in_axes=1\)"
    with pytest.raises(ValueError, match=r"expects xs of shape \(T, 3\), got \(2, 6, 3\).*" + fix):
        layer.apply(params, jnp.ones((2, T, I)))
    with pytest.raises(ValueError, match=r"got \(6, 5\): the module takes input_size=3"):
        layer.apply(params, jnp.ones((T, 5)))


def test_to_torch_errors():
    _, params = from_torch(torch.nn.LSTM(I, 4))
    with pytest.raises(TypeError, match=r"entry per layer \(2 for mode='LSTM'.*tuple of length 1"):
        to_torch(params, torch.nn.LSTM(I, 4, num_layers=2))
    with pytest.raises(ValueError, match=r"\[0\]\['w_i'\] has shape \(3, 16\), expected \(5, 16\)"):
        to_torch(params, torch.nn.LSTM(5, 4))
    with pytest.raises(TypeError, match=r"params\[0\] .*bidirectional.*keys \['bwd', 'fwd'\]"):
        to_torch(params, torch.nn.LSTM(I, 4, bidirectional=True))
    with pytest.raises(TypeError, match=r"\[0\] must be GRU cell params with keys \['b_h', 'b_i'"):
        to_torch(params, torch.nn.GRU(I, 4))
    with pytest.raises(ValueError, match=r"bias=False but params\[0\]\['b'\] is nonzero"):
        to_torch(params, torch.nn.LSTM(I, 4, bias=False))


def test_state_helper_errors():
    with pytest.raises(TypeError, match=r"final_states expects the carry of a from_torch layer"):
        final_states(jnp.zeros(4))
    with pytest.raises(TypeError, match=r"carry\[0\] is a tuple of 3"):
        final_states(((jnp.zeros(4),) * 3,))
    with pytest.raises(ValueError, match=r"h_0 of shape \(num_layers \* 2, \[B,\] H\).*\(3, 4\)"):
        initial_carry(jnp.zeros((3, 4)), bidirectional=True)
    with pytest.raises(ValueError, match=r"c_0 of shape \(2, 5\) \+ \(hidden_size,\)"):
        initial_carry(jnp.zeros((2, 5, 4)), jnp.zeros((2, 4)))
