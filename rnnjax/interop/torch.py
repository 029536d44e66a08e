"""PyTorch's ``nn.RNN``, ``nn.LSTM`` and ``nn.GRU`` as rnnjax layers, and the way back.

::

    layer, params = from_torch(module)              # torch.nn.RNN / LSTM / GRU, any config
    carry, ys = layer.apply(params, x, length=n)    # ONE example: x (T, input_size)
    h_n = final_states(carry)                       # torch's h_n, or (h_n, c_n) for an LSTM
    to_torch(params, module)                        # rnnjax params into a module's state dict

Importing this module does not import PyTorch: :func:`from_state_dict` and
:func:`to_state_dict` work on plain dicts of numpy arrays (what
``{k: v.numpy() for k, v in module.state_dict().items()}`` gives), so exported weights load
where torch is not installed. Only :func:`from_torch` and :func:`to_torch` import it.

The layer is always ``rj.layers.stack`` of ``num_layers`` layers (also for one layer), each
``rj.layers.rnn(cell)`` or, for a bidirectional module, ``rj.layers.bidirectional(rnn(cell),
rnn(cell), merge="concat")``. So ``params[l]`` is layer ``l``'s cell params
(``{"fwd": ..., "bwd": ...}`` when bidirectional), and the carry is a tuple with one entry
per layer (a ``(fwd, bwd)`` pair when bidirectional); :func:`final_states` lays it out as
torch's ``(num_layers * num_directions, [B,] H)`` and :func:`initial_carry` goes the other way.

Batches and ``batch_first``: like every rnnjax layer, the layer takes one example
``(T, input_size)``, and a batch is ``jax.vmap``. ``batch_first`` only says how the module
reads its input: vmap over axis 0 of a batch-first ``(B, T, I)`` tensor and over axis 1 of a
``(T, B, I)`` one (``jax.vmap(f, in_axes=1)``); the params are the same either way. Variable
lengths: ``length=n`` per example gives what ``pack_padded_sequence`` gives torch, including
zero outputs at the padded steps (``pad_packed_sequence``'s padding) and the states after each
sequence's last real step in ``h_n``/``c_n``.

Parameters, per layer ``l`` and direction (PyTorch's suffix ``_l{l}`` or ``_l{l}_reverse``):
``w_i = weight_ih.T``, ``w_h = weight_hh.T``, and ``w_p = weight_hr.T`` for an LSTM with
``proj_size``. Biases: the GRU keeps both, ``b_i = bias_ih`` and ``b_h = bias_hh``; the Elman
and LSTM cells have one bias, ``b = bias_ih + bias_hh``. On the way back that ``b`` goes into
``bias_ih`` and ``bias_hh`` is zero: a different state dict with the same outputs (up to float
rounding). A module with ``bias=False`` gives zero biases.

Dropout: the module's ``dropout`` becomes ``rj.layers.stack(dropout=...)``, which, as torch
does, drops the outputs of every layer but the last; it only acts when ``apply`` gets a
``key`` (torch: in ``train()`` mode), and its masks are JAX's, not torch's.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import rnnjax.layers as rl
from rnnjax.cells import LSTMState, elman, gru, lstm
from rnnjax.core import Cell, Layer, check_option

if TYPE_CHECKING:
    import torch

GATES = {"RNN": 1, "LSTM": 4, "GRU": 3}
NONLINEARITIES = ("tanh", "relu")
_KEY = re.compile(r"(weight|bias)_(ih|hh|hr)_l(\d+)(_reverse)?")


class _Config(NamedTuple):
    mode: str
    input_size: int
    hidden_size: int
    num_layers: int
    bidirectional: bool
    bias: bool
    proj_size: int
    nonlinearity: str
    dropout: float

    @property
    def gates(self) -> int:
        return GATES[self.mode]

    @property
    def directions(self) -> tuple[str, ...]:
        return ("", "_reverse") if self.bidirectional else ("",)

    @property
    def h_size(self) -> int:
        """The size of the hidden state h: the output, and what meets ``weight_hh``."""
        return self.proj_size or self.hidden_size

    def describe(self) -> str:
        parts = [
            f"mode={self.mode!r}",
            f"input_size={self.input_size}",
            f"hidden_size={self.hidden_size}",
            f"num_layers={self.num_layers}",
            f"bidirectional={self.bidirectional}",
            f"bias={self.bias}",
        ]
        if self.mode == "LSTM":
            parts.append(f"proj_size={self.proj_size}")
        if self.mode == "RNN":
            parts.append(f"nonlinearity={self.nonlinearity!r}")
        return ", ".join(parts)


def _config(
    where: str,
    *,
    mode: str,
    input_size: int,
    hidden_size: int,
    num_layers: int = 1,
    bidirectional: bool = False,
    bias: bool = True,
    proj_size: int = 0,
    nonlinearity: str = "tanh",
    dropout: float = 0.0,
) -> _Config:
    check_option(f"{where} mode", mode, GATES)
    for name, value in (
        ("input_size", input_size),
        ("hidden_size", hidden_size),
        ("num_layers", num_layers),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{where} expects {name} to be a positive int, got {value!r}")
    for name, value in (("bidirectional", bidirectional), ("bias", bias)):
        if not isinstance(value, bool):
            raise TypeError(f"{where} expects {name} to be True or False, got {value!r}")
    if isinstance(proj_size, bool) or not isinstance(proj_size, int) or proj_size < 0:
        raise ValueError(
            f"{where} expects proj_size to be an int >= 0 (0: no projection), got {proj_size!r}"
        )
    if proj_size and mode != "LSTM":
        raise ValueError(
            f"{where}: proj_size is only for mode='LSTM' (as in PyTorch), got proj_size="
            f"{proj_size} with mode={mode!r}"
        )
    if proj_size >= hidden_size:
        raise ValueError(
            f"{where} expects proj_size < hidden_size (as PyTorch does), got proj_size="
            f"{proj_size} and hidden_size={hidden_size}"
        )
    check_option(f"{where} nonlinearity", nonlinearity, NONLINEARITIES)
    if nonlinearity != "tanh" and mode != "RNN":
        raise ValueError(
            f"{where}: nonlinearity is only for mode='RNN' (LSTM and GRU have fixed ones), got "
            f"nonlinearity={nonlinearity!r} with mode={mode!r}"
        )
    if isinstance(dropout, bool) or not isinstance(dropout, int | float):
        raise ValueError(f"{where} expects dropout in [0, 1), got {dropout!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"{where} expects dropout in [0, 1), got {dropout!r}")
    return _Config(
        mode, input_size, hidden_size, num_layers, bidirectional, bias, proj_size,
        nonlinearity, float(dropout),
    )  # fmt: skip


# ------------------------------------------------------------------------ state dict layout


def _expected_keys(cfg: _Config) -> dict[str, tuple[int, ...]]:
    """Every key of the module's state dict and its shape, in PyTorch's order."""
    rows, h = cfg.gates * cfg.hidden_size, cfg.h_size
    keys: dict[str, tuple[int, ...]] = {}
    for layer in range(cfg.num_layers):
        in_size = cfg.input_size if layer == 0 else len(cfg.directions) * h
        for suffix in cfg.directions:
            keys[f"weight_ih_l{layer}{suffix}"] = (rows, in_size)
            keys[f"weight_hh_l{layer}{suffix}"] = (rows, h)
            if cfg.bias:
                keys[f"bias_ih_l{layer}{suffix}"] = (rows,)
                keys[f"bias_hh_l{layer}{suffix}"] = (rows,)
            if cfg.proj_size:
                keys[f"weight_hr_l{layer}{suffix}"] = (cfg.proj_size, cfg.hidden_size)
    return keys


def _layout_hint(cfg: _Config, keys: list[str]) -> str:
    """What the keys themselves say about the config, where it differs from ``cfg``."""
    found = [m for m in map(_KEY.fullmatch, keys) if m]
    unknown = [k for k in keys if not _KEY.fullmatch(k)]
    hints = []
    prefixed = [k for k in unknown if _KEY.fullmatch(k.rsplit(".", 1)[-1])]
    if prefixed:
        prefix = prefixed[0].rsplit(".", 1)[0] + "."
        hints.append(
            f"keys like {prefixed[0]!r} come from a parent module's state dict; strip the "
            f"prefix {prefix!r} (or pass the recurrent submodule's own state_dict())"
        )
    elif unknown:
        hints.append(
            f"{unknown[0]!r} is not a key of torch.nn.RNN, LSTM or GRU, whose keys are "
            "weight_ih_l{k}, weight_hh_l{k}, bias_ih_l{k}, bias_hh_l{k} and (LSTM with "
            "proj_size) weight_hr_l{k}, with '_reverse' for the backward direction"
        )
    if found:
        said = {
            "num_layers": 1 + max(int(m.group(3)) for m in found),
            "bidirectional": any(m.group(4) for m in found),
            "bias": any(m.group(1) == "bias" for m in found),
        }
        wrong = [f"{k}={v}" for k, v in said.items() if getattr(cfg, k) != v]
        has_proj = any(m.group(2) == "hr" for m in found)
        if has_proj and not cfg.proj_size:
            wrong.append("proj_size > 0 (an LSTM with a projection)")
        if cfg.proj_size and not has_proj:
            wrong.append("proj_size=0 (no projection)")
        if wrong:
            hints.append("the keys say " + ", ".join(wrong) + "; pass that")
    return "; ".join(hints)


def _shape_hint(cfg: _Config, key: str, got: tuple[int, ...]) -> str:
    """A likely cause of a misshapen entry, from which dimension disagrees."""
    m = _KEY.fullmatch(key)
    kind, layer = m.group(2), int(m.group(3))
    want = _expected_keys(cfg)[key]
    if len(got) != len(want):
        return "weights are 2-D and biases 1-D, as in the module's state_dict()"
    if kind == "hr":
        said = f"proj_size={got[0]}" if got[0] != want[0] else f"hidden_size={got[1]}"
        return f"weight_hr is (proj_size, hidden_size), so it says {said}"
    if got[0] != want[0]:
        others = [
            f"mode={mode!r} ({n} x {cfg.hidden_size} = {n * cfg.hidden_size})"
            for mode, n in GATES.items()
            if n * cfg.hidden_size == got[0] and mode != cfg.mode
        ]
        said = f"hidden_size={got[0] // cfg.gates}" if got[0] % cfg.gates == 0 else ""
        return (
            f"the rows are {cfg.gates} gate(s) x hidden_size for mode={cfg.mode!r}; "
            f"{got[0]} rows means " + " or ".join(filter(None, [said, *others]))
        )
    if kind == "hh":
        fix = f"pass proj_size={got[1]}" if cfg.mode == "LSTM" and got[1] < cfg.hidden_size else ""
        return "the columns are the size of h (hidden_size, or proj_size with a projection)" + (
            f": {fix}" if fix else ""
        )
    if layer == 0:
        return f"the columns are the input features: pass input_size={got[1]}"
    return (
        f"layer {layer}'s input is layer {layer - 1}'s output, num_directions x "
        f"{'proj_size' if cfg.proj_size else 'hidden_size'} = {want[1]}: check bidirectional "
        "and proj_size"
    )


def _check_state_dict(cfg: _Config, arrays: Mapping[str, Any], where: str) -> None:
    expected = _expected_keys(cfg)
    missing = [k for k in expected if k not in arrays]
    extra = [k for k in arrays if k not in expected]
    if missing or extra:
        problems = []
        if missing:
            names = ", ".join(f"{k!r} (expected shape {expected[k]})" for k in missing[:4])
            more = f" and {len(missing) - 4} more" if len(missing) > 4 else ""
            problems.append(f"is missing {names}{more}")
        if extra:
            names = ", ".join(f"{k!r} {tuple(np.shape(arrays[k]))}" for k in extra[:4])
            more = f" and {len(extra) - 4} more" if len(extra) > 4 else ""
            problems.append(f"has unexpected keys {names}{more}")
        hint = _layout_hint(cfg, list(arrays))
        raise ValueError(
            f"{where}({cfg.describe()}): the state dict "
            + "; it ".join(problems)
            + (f": {hint}" if hint else "")
        )
    for key, want in expected.items():
        got = tuple(np.shape(arrays[key]))
        if got != want:
            raise ValueError(
                f"{where}({cfg.describe()}): state_dict[{key!r}] has shape {got}, expected "
                f"{want}: {_shape_hint(cfg, key, got)}"
            )


# ------------------------------------------------------------------------ layers and params


def _cell(cfg: _Config) -> Cell:
    if cfg.mode == "RNN":
        return elman(cfg.hidden_size, activation=cfg.nonlinearity)
    if cfg.mode == "LSTM":
        return lstm(cfg.hidden_size, proj_size=cfg.proj_size or None)
    return gru(cfg.hidden_size)


def _batch_fix(batch_first: bool | None) -> str:
    if batch_first is None:
        return (
            "vmap over the batch axis: jax.vmap(f)(x) for a batch-first (B, T, I) x, "
            "jax.vmap(f, in_axes=1)(x) for a (T, B, I) one"
        )
    if batch_first:
        return "vmap over the batch axis: the module is batch_first, so x is (B, T, I): jax.vmap(f)"
    return (
        "vmap over the batch axis: the module is not batch_first, so x is (T, B, I): "
        "jax.vmap(f, in_axes=1)"
    )


def _layer(cfg: _Config, batch_first: bool | None) -> Layer:
    one = rl.rnn(_cell(cfg))
    if cfg.bidirectional:
        one = rl.bidirectional(one, one, merge="concat")
    net = rl.stack(*[one] * cfg.num_layers, dropout=cfg.dropout)

    def apply(params, xs, **kwargs):
        shape = tuple(np.shape(xs))
        if len(shape) != 2 or shape[-1] != cfg.input_size:
            if len(shape) == 3 and shape[-1] == cfg.input_size:
                fix = "rnnjax layers take one example; " + _batch_fix(batch_first)
            elif len(shape) < 2:
                fix = "a sequence is (T, input_size), one feature vector per step"
            else:
                fix = f"the module takes input_size={cfg.input_size} features per step"
            raise ValueError(
                f"this {cfg.mode} layer (from PyTorch) expects xs of shape "
                f"(T, {cfg.input_size}), got {shape}: {fix}"
            )
        return net.apply(params, xs, **kwargs)

    return Layer(net.init, apply)


def _direction_params(cfg: _Config, arrays: Mapping[str, Any], name: str) -> dict[str, jax.Array]:
    """One direction's cell params; ``name`` is the key suffix, e.g. ``l1_reverse``."""

    def get(kind: str) -> np.ndarray:
        return np.asarray(arrays[f"{kind}_{name}"])

    w_ih = get("weight_ih")
    zeros = np.zeros(w_ih.shape[:1], w_ih.dtype)
    b_ih = get("bias_ih") if cfg.bias else zeros
    b_hh = get("bias_hh") if cfg.bias else zeros
    params = {"w_i": w_ih.T, "w_h": get("weight_hh").T}
    if cfg.mode == "GRU":
        params |= {"b_i": b_ih, "b_h": b_hh}
    else:
        params["b"] = b_ih + b_hh
    if cfg.proj_size:
        params["w_p"] = get("weight_hr").T
    return {k: jnp.asarray(v) for k, v in params.items()}


def _from_arrays(
    cfg: _Config, arrays: Mapping[str, Any], where: str, batch_first: bool | None
) -> tuple[Layer, tuple]:
    if not isinstance(arrays, Mapping):
        raise TypeError(
            f"{where} expects a dict of arrays (a module's state_dict()), got "
            f"{type(arrays).__name__}: for a torch module use from_torch(module)"
        )
    _check_state_dict(cfg, arrays, where)
    params = []
    for layer in range(cfg.num_layers):
        dirs = [_direction_params(cfg, arrays, f"l{layer}{s}") for s in cfg.directions]
        params.append(dirs[0] if len(dirs) == 1 else {"fwd": dirs[0], "bwd": dirs[1]})
    return _layer(cfg, batch_first), tuple(params)


def from_state_dict(
    state_dict: Mapping[str, Any],
    *,
    mode: str,
    input_size: int,
    hidden_size: int,
    num_layers: int = 1,
    bidirectional: bool = False,
    bias: bool = True,
    proj_size: int = 0,
    nonlinearity: str = "tanh",
    dropout: float = 0.0,
) -> tuple[Layer, tuple]:
    """An rnnjax layer and its params from a PyTorch RNN/LSTM/GRU state dict; no torch needed.

    Args:
      state_dict: ``{key: array}`` as ``module.state_dict()`` has it (numpy arrays, or anything
        ``np.asarray`` takes): exactly the module's keys, e.g. ``weight_ih_l0``,
        ``bias_hh_l1_reverse``, ``weight_hr_l0``.
      mode: ``"RNN"``, ``"LSTM"`` or ``"GRU"``, the torch class.
      input_size, hidden_size, num_layers, bidirectional, bias, proj_size, nonlinearity,
        dropout: the module's constructor arguments, with PyTorch's defaults (``proj_size=0``:
        no projection; ``nonlinearity`` only for ``"RNN"``).

    Returns:
      ``(layer, params)``: ``layer.apply(params, xs (T, input_size), length=n)`` gives
      ``(carry, ys (T, num_directions * H_out))`` for one example, ``H_out`` being
      ``proj_size`` or ``hidden_size``; see the module docstring for the layout and
      :func:`final_states` for torch's ``h_n``.

    Raises ValueError naming the key and both shapes when the state dict does not fit the
    config, with what its keys say the config is.

    >>> import numpy as np, jax.numpy as jnp
    >>> from rnnjax.interop.torch import from_state_dict, final_states
    >>> rng = np.random.default_rng(0)
    >>> shapes = {"weight_ih_l0": (12, 3), "weight_hh_l0": (12, 4),
    ...           "bias_ih_l0": (12,), "bias_hh_l0": (12,)}
    >>> state_dict = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    >>> layer, params = from_state_dict(state_dict, mode="GRU", input_size=3, hidden_size=4)
    >>> carry, ys = layer.apply(params, jnp.ones((5, 3)), length=4)
    >>> ys.shape, final_states(carry).shape, sorted(params[0])
    ((5, 4), (1, 4), ['b_h', 'b_i', 'w_h', 'w_i'])
    """
    cfg = _config(
        "from_state_dict", mode=mode, input_size=input_size, hidden_size=hidden_size,
        num_layers=num_layers, bidirectional=bidirectional, bias=bias, proj_size=proj_size,
        nonlinearity=nonlinearity, dropout=dropout,
    )  # fmt: skip
    return _from_arrays(cfg, state_dict, "from_state_dict", batch_first=None)


def _param_shapes(cfg: _Config, layer: int) -> dict[str, tuple[int, ...]]:
    rows, h = cfg.gates * cfg.hidden_size, cfg.h_size
    in_size = cfg.input_size if layer == 0 else len(cfg.directions) * h
    shapes = {"w_i": (in_size, rows), "w_h": (h, rows)}
    if cfg.mode == "GRU":
        shapes |= {"b_i": (rows,), "b_h": (rows,)}
    else:
        shapes["b"] = (rows,)
    if cfg.proj_size:
        shapes["w_p"] = (cfg.hidden_size, cfg.proj_size)
    return shapes


def _state_dict(cfg: _Config, params: Any, where: str) -> dict[str, np.ndarray]:
    if not isinstance(params, tuple | list) or len(params) != cfg.num_layers:
        got = type(params).__name__ + (
            f" of length {len(params)}" if isinstance(params, tuple | list) else ""
        )
        raise TypeError(
            f"{where} expects params as from_torch/from_state_dict give them, a tuple with one "
            f"entry per layer ({cfg.num_layers} for {cfg.describe()}), got {got}"
        )
    out: dict[str, np.ndarray] = {}
    for layer, entry in enumerate(params):
        if cfg.bidirectional:
            if not isinstance(entry, Mapping) or set(entry) != {"fwd", "bwd"}:
                got = sorted(entry) if isinstance(entry, Mapping) else type(entry).__name__
                raise TypeError(
                    f"{where}: params[{layer}] of a bidirectional module must be a dict with "
                    f"keys ['bwd', 'fwd'], got {got}"
                )
            dirs = [(entry["fwd"], "", "['fwd']"), (entry["bwd"], "_reverse", "['bwd']")]
        else:
            dirs = [(entry, "", "")]
        want = _param_shapes(cfg, layer)
        for p, suffix, path in dirs:
            path = f"params[{layer}]{path}"
            if not isinstance(p, Mapping) or set(p) != set(want):
                got = sorted(p) if isinstance(p, Mapping) else type(p).__name__
                raise TypeError(
                    f"{where}: {path} must be {cfg.mode} cell params with keys "
                    f"{sorted(want)} for {cfg.describe()}, got {got}"
                )
            arr = {k: np.array(v) for k, v in p.items()}
            for k, shape in want.items():
                if arr[k].shape != shape:
                    raise ValueError(
                        f"{where}: {path}[{k!r}] has shape {arr[k].shape}, expected {shape} "
                        f"for {cfg.describe()}"
                    )
            name = f"l{layer}{suffix}"
            b_ih, b_hh = (arr["b_i"], arr["b_h"]) if cfg.mode == "GRU" else (arr["b"], None)
            if not cfg.bias:
                for k in ("b_i", "b_h", "b"):
                    if k in arr and np.any(arr[k] != 0):
                        raise ValueError(
                            f"{where}: the module has bias=False but {path}[{k!r}] is nonzero; "
                            "make the module with bias=True (the outputs would differ)"
                        )
            out[f"weight_ih_{name}"] = arr["w_i"].T.copy()
            out[f"weight_hh_{name}"] = arr["w_h"].T.copy()
            if cfg.bias:
                out[f"bias_ih_{name}"] = b_ih
                out[f"bias_hh_{name}"] = np.zeros_like(b_ih) if b_hh is None else b_hh
            if cfg.proj_size:
                out[f"weight_hr_{name}"] = arr["w_p"].T.copy()
    return out


def to_state_dict(
    params: Any,
    *,
    mode: str,
    input_size: int,
    hidden_size: int,
    num_layers: int = 1,
    bidirectional: bool = False,
    bias: bool = True,
    proj_size: int = 0,
    nonlinearity: str = "tanh",
) -> dict[str, np.ndarray]:
    """A PyTorch state dict of numpy arrays from the params of :func:`from_state_dict`.

    The inverse of :func:`from_state_dict` (same config arguments), keys in PyTorch's order.
    Elman and LSTM params have one bias ``b``; it goes into ``bias_ih`` and ``bias_hh`` is
    zero, which gives the same outputs as the original ``(bias_ih, bias_hh)`` pair (up to
    float rounding) but not the same state dict. With ``bias=False`` the biases must be zero.

    >>> import jax, numpy as np
    >>> import rnnjax as rj
    >>> from rnnjax.interop.torch import to_state_dict
    >>> params = (rj.cells.lstm(4, proj_size=2).init(jax.random.key(0), 3),)
    >>> sd = to_state_dict(params, mode="LSTM", input_size=3, hidden_size=4, proj_size=2)
    >>> {k: v.shape for k, v in sd.items()}  # doctest: +NORMALIZE_WHITESPACE
    {'weight_ih_l0': (16, 3), 'weight_hh_l0': (16, 2), 'bias_ih_l0': (16,),
     'bias_hh_l0': (16,), 'weight_hr_l0': (2, 4)}
    """
    cfg = _config(
        "to_state_dict", mode=mode, input_size=input_size, hidden_size=hidden_size,
        num_layers=num_layers, bidirectional=bidirectional, bias=bias, proj_size=proj_size,
        nonlinearity=nonlinearity,
    )  # fmt: skip
    return _state_dict(cfg, params, "to_state_dict")


# ------------------------------------------------------------------------ torch modules


def _import_torch(where: str):
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"{where} needs PyTorch, which is not installed: pip install torch (or "
            "'rnnjax[torch]'); from_state_dict and to_state_dict work on numpy arrays without it"
        ) from e
    return torch


def _module_config(module: Any, where: str) -> _Config:
    torch = _import_torch(where)
    nn = torch.nn
    if isinstance(module, nn.LSTM):
        mode = "LSTM"
    elif isinstance(module, nn.GRU):
        mode = "GRU"
    elif isinstance(module, nn.RNN):
        mode = "RNN"
    else:
        kind = type(module)
        got = f"{kind.__module__}.{kind.__qualname__}"
        if isinstance(module, nn.RNNCellBase):
            fix = (
                "a single cell's weights map to rnnjax.cells (w_i = weight_ih.T, "
                "w_h = weight_hh.T; see its docstring)"
            )
        elif isinstance(module, Mapping):
            fix = "for a state dict use from_state_dict(state_dict, mode=..., ...)"
        elif isinstance(module, nn.Module):
            fix = "pass the recurrent submodule itself (e.g. model.lstm)"
        else:
            fix = "pass the module object"
        raise TypeError(
            f"{where} expects a torch.nn.RNN, torch.nn.LSTM or torch.nn.GRU, got {got}: {fix}"
        )
    return _config(
        where, mode=mode, input_size=module.input_size, hidden_size=module.hidden_size,
        num_layers=module.num_layers, bidirectional=module.bidirectional, bias=module.bias,
        proj_size=getattr(module, "proj_size", 0),
        nonlinearity=getattr(module, "nonlinearity", "tanh"), dropout=module.dropout,
    )  # fmt: skip


def from_torch(module: torch.nn.Module) -> tuple[Layer, tuple]:
    """An rnnjax layer and params that compute what ``module`` computes.

    ``module`` is a ``torch.nn.RNN`` (tanh or relu), ``LSTM`` (with or without ``proj_size``)
    or ``GRU``, with any ``num_layers``, ``bidirectional``, ``bias`` and ``batch_first``; a thin
    wrapper over :func:`from_state_dict` with the module's config. The layer takes ONE example
    ``(T, input_size)``: vmap over axis 0 of a batch-first input and axis 1 otherwise.
    ``layer.apply(params, x, length=n)`` gives torch's output (padded steps zero, as with
    ``pack_padded_sequence``) and a carry that :func:`final_states` turns into ``h_n``
    (``(h_n, c_n)`` for an LSTM). The weights are copied; later changes to the module do not
    reach ``params``. On NVIDIA GPUs with TF32 (Ampere and later) JAX's default float32
    matmuls round their inputs to 10-bit mantissas; to match torch to float32 tolerance there,
    set ``jax.config.update("jax_default_matmul_precision", "highest")``.

    >>> import jax, jax.numpy as jnp, numpy as np, torch
    >>> from rnnjax.interop.torch import from_torch, final_states
    >>> _ = torch.manual_seed(0)
    >>> module = torch.nn.LSTM(3, 4, num_layers=2, batch_first=True)
    >>> x = torch.randn(2, 5, 3)                               # (B, T, I): batch first
    >>> out, (h_n, c_n) = module(x)
    >>> layer, params = from_torch(module)
    >>> carry, ys = jax.vmap(lambda x: layer.apply(params, x))(jnp.asarray(x.numpy()))
    >>> h, c = final_states(carry)                             # (num_layers, B, H) each
    >>> close = lambda a, b: bool(np.allclose(a, b.detach().numpy(), atol=1e-5))
    >>> close(ys, out), close(h, h_n), close(c, c_n)
    (True, True, True)
    """
    cfg = _module_config(module, "from_torch")
    arrays = {k: _to_numpy(v) for k, v in module.state_dict().items()}
    return _from_arrays(cfg, arrays, "from_torch", batch_first=module.batch_first)


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    import torch

    t = tensor.detach().cpu()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16; JAX's (ml_dtypes) does
        return t.float().numpy().astype(jnp.bfloat16)
    return t.numpy()


def to_torch(params: Any, module: torch.nn.Module) -> torch.nn.Module:
    """Write rnnjax ``params`` (as :func:`from_torch` gives them) into ``module``'s weights.

    ``module`` must have the config the params were made for (the same class, sizes,
    ``num_layers``, ``bidirectional``, ``bias`` and ``proj_size``); values are cast to its
    dtype and device. Returns ``module``. The GRU's state dict comes back exactly; for
    ``RNN``/``LSTM`` rnnjax keeps one bias ``b = bias_ih + bias_hh``, so ``bias_ih`` becomes
    ``b`` and ``bias_hh`` zero: a different state dict with the same outputs.

    >>> import torch
    >>> from rnnjax.interop.torch import from_torch, to_torch
    >>> _ = torch.manual_seed(0)
    >>> module = torch.nn.GRU(3, 4, bidirectional=True)
    >>> _, params = from_torch(module)
    >>> fresh = to_torch(params, torch.nn.GRU(3, 4, bidirectional=True))
    >>> all(torch.equal(v, fresh.state_dict()[k]) for k, v in module.state_dict().items())
    True
    """
    torch = _import_torch("to_torch")
    cfg = _module_config(module, "to_torch")
    arrays = _state_dict(cfg, params, "to_torch")
    own = module.state_dict()
    tensors = {}
    for key, value in arrays.items():
        if value.dtype not in (np.float16, np.float32, np.float64):
            value = value.astype(np.float32)  # e.g. bfloat16, which torch.from_numpy lacks
        tensors[key] = torch.from_numpy(value).to(dtype=own[key].dtype, device=own[key].device)
    module.load_state_dict(tensors)
    return module


# ------------------------------------------------------------------------ states


def final_states(carry: tuple) -> jax.Array | tuple[jax.Array, jax.Array]:
    """torch's ``h_n`` (``(h_n, c_n)`` for an LSTM) from the carry of a :func:`from_torch` layer.

    ``carry`` is what ``layer.apply`` returns, one example or a batch of them (from
    ``jax.vmap``, leaves ``(B, H)``). The result is ``(num_layers * num_directions, [B,] H)``,
    index ``layer * num_directions + direction`` as in torch, with ``H`` the size of ``h``
    (``proj_size`` for a projected LSTM) and of ``c`` (``hidden_size``).

    >>> import jax.numpy as jnp
    >>> from rnnjax.interop.torch import final_states
    >>> carry = ((jnp.zeros(4), jnp.ones(4)), (jnp.full(4, 2.0), jnp.full(4, 3.0)))
    >>> final_states(carry)[:, 0]        # 2 layers x 2 directions
    Array([0., 1., 2., 3.], dtype=float32)
    """
    if not isinstance(carry, tuple | list) or isinstance(carry, LSTMState) or not carry:
        raise TypeError(
            "final_states expects the carry of a from_torch layer, a tuple with one entry per "
            f"layer, got {type(carry).__name__}: pass the carry that layer.apply returned"
        )
    states = []
    for layer, entry in enumerate(carry):
        if isinstance(entry, tuple | list) and not isinstance(entry, LSTMState):
            if len(entry) != 2:
                raise TypeError(
                    f"final_states: carry[{layer}] is a tuple of {len(entry)}; a bidirectional "
                    "layer's carry is a (fwd, bwd) pair"
                )
            states.extend(entry)
        else:
            states.append(entry)
    lstm_states = [isinstance(s, LSTMState) for s in states]
    if all(lstm_states):
        return jnp.stack([s.h for s in states]), jnp.stack([s.c for s in states])
    if any(lstm_states):
        raise TypeError("final_states: the carry mixes LSTM states with plain hidden states")
    return jnp.stack(states)


def initial_carry(
    h_0: jax.typing.ArrayLike, c_0: jax.typing.ArrayLike | None = None, *, bidirectional=False
) -> tuple:
    """The carry for ``layer.apply(..., carry=)`` from torch's initial states.

    ``h_0`` (and ``c_0`` for an LSTM) are laid out as torch's ``hx``:
    ``(num_layers * num_directions, [B,] H)``. With a batch axis the carry's leaves are
    ``(B, H)``: vmap over them with ``in_axes=0``. The inverse of :func:`final_states`.

    >>> import jax.numpy as jnp
    >>> from rnnjax.interop.torch import final_states, initial_carry
    >>> h_0, c_0 = jnp.ones((4, 5)), jnp.zeros((4, 6))    # 2 layers x 2 directions, P=5, H=6
    >>> carry = initial_carry(h_0, c_0, bidirectional=True)
    >>> len(carry), carry[1][0].h.shape, carry[1][0].c.shape
    (2, (5,), (6,))
    >>> [bool((a == b).all()) for a, b in zip(final_states(carry), (h_0, c_0))]
    [True, True]
    """
    if not isinstance(bidirectional, bool):
        raise TypeError(f"initial_carry expects bidirectional True or False, got {bidirectional!r}")
    n_dir = 2 if bidirectional else 1
    h_0 = jnp.asarray(h_0)
    if h_0.ndim not in (2, 3) or h_0.shape[0] % n_dir:
        raise ValueError(
            f"initial_carry expects h_0 of shape (num_layers * {n_dir}, [B,] H) as torch lays "
            f"it out, got {h_0.shape}"
        )
    if c_0 is not None:
        c_0 = jnp.asarray(c_0)
        if c_0.shape[:-1] != h_0.shape[:-1]:
            raise ValueError(
                f"initial_carry expects c_0 of shape {h_0.shape[:-1]} + (hidden_size,) to go "
                f"with h_0 {h_0.shape}, got {c_0.shape}"
            )

    def state(i: int):
        return h_0[i] if c_0 is None else LSTMState(h_0[i], c_0[i])

    layers = range(h_0.shape[0] // n_dir)
    if bidirectional:
        return tuple((state(2 * i), state(2 * i + 1)) for i in layers)
    return tuple(state(i) for i in layers)
