"""rnnjax inside Flax linen: cells for ``nn.RNN``, layers as modules, params both ways.

- :class:`RNNCell` wraps an rnnjax cell as an ``nn.RNNCellBase``: ``nn.RNN`` and
  ``nn.Bidirectional`` run it unchanged. Its params are the rnnjax cell's, one linen param per
  key (``{"params": {"cell": {"w_i": ..., "w_h": ..., "b": ...}}}`` under ``nn.RNN``).
- :class:`RNNLayer` runs a whole rnnjax layer (``rj.layers.stack(...)``, a bidirectional, ...)
  over a batch, its params one linen param ``"layer"``, dropout keys from the ``"dropout"`` rng
  stream.
- :func:`cell_from_flax`, :func:`from_flax_params` and :func:`to_flax_params` move weights
  between Flax's own ``LSTMCell``, ``OptimizedLSTMCell``, ``GRUCell``, ``SimpleCell`` and the
  rnnjax cell that computes the same function.

Masking differs from rnnjax's (see :class:`RNNCell`): ``nn.RNN`` with ``seq_lengths`` keeps
stepping through the padding, so its outputs there are not zero, and its final carry for a
sequence of length 0 is the carry after the last padded step, not the initial carry.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rnnjax.cells import elman, gru, lstm
from rnnjax.core import Carry, Cell, Layer
from rnnjax.flax._batch import apply_batch

__all__ = ["RNNCell", "RNNLayer", "cell_from_flax", "from_flax_params", "to_flax_params"]


def _abstract_params(cell: Cell, input_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """The cell's params as shapes (tracing only); checks they are a dict keyed by str."""
    shapes = jax.eval_shape(lambda key: cell.init(key, int(input_size)), jax.random.key(0))
    if not isinstance(shapes, Mapping) or not all(isinstance(k, str) for k in shapes):
        raise TypeError(
            "RNNCell expects a cell whose params are a dict with str keys (one linen param per "
            f"key), got {type(shapes).__name__}: wrap the cell as a layer instead, "
            "RNNLayer(rnnjax.layers.rnn(cell)), which stores any params pytree"
        )
    return dict(shapes)


class RNNCell(nn.RNNCellBase):
    """An rnnjax cell as a linen ``RNNCellBase``: ``nn.RNN(RNNCell(cell))`` runs it.

    ``__call__(carry, x) -> (carry, y)`` with ``x`` of shape ``(*batch, I)`` steps every
    example with the rnnjax ``cell.step`` under ``vmap``; the carry keeps rnnjax's type (an
    LSTM carry is ``LSTMState(h, c)`` with leaves ``(*batch, H)``, not Flax's ``(c, h)``).

    Params: one linen param per key of the rnnjax params, same names and shapes, made by one
    call ``cell.init(key, I)`` with ``key`` drawn from the ``"params"`` rng stream; under
    ``nn.RNN`` they sit at ``variables["params"]["cell"]`` and are exactly what ``rj.scan``
    takes. ``initialize_carry(rng, (*batch, I))`` is ``cell.initial_carry(params)`` broadcast
    over the batch (``rng`` is unused); before the params exist (during ``init``) it is
    evaluated on zero params, which gives the built-in cells' zero carry.

    Masking, compared with ``rj.scan(..., length=n)``: ``nn.RNN(..., seq_lengths=lengths)``
    gives the same outputs at real steps and the same final carry (with ``return_carry=True``,
    for ``n >= 1``), but it keeps stepping through the padding, so its outputs at padded steps
    are whatever the cell makes of the padding (rnnjax: zeros), and for ``n = 0`` its carry is
    the one after the last padded step (rnnjax: the initial carry). With ``reverse=True`` and
    ``keep_order=False`` its outputs come back reversed within each real prefix; with
    ``keep_order=True`` they are aligned with the inputs, as rnnjax's always are.

    >>> import jax, jax.numpy as jnp, flax.linen as nn, rnnjax as rj
    >>> from rnnjax.flax.linen import RNNCell
    >>> rnn = nn.RNN(RNNCell(rj.cells.lstm(4)), return_carry=True)
    >>> xs = jnp.ones((2, 5, 3))                               # (B, T, I)
    >>> variables = rnn.init(jax.random.key(0), xs)
    >>> jax.tree.map(jnp.shape, variables["params"]["cell"])
    {'b': (16,), 'w_h': (4, 16), 'w_i': (3, 16)}
    >>> carry, ys = rnn.apply(variables, xs, seq_lengths=jnp.array([5, 3]))
    >>> ys.shape, carry.h.shape
    ((2, 5, 4), (2, 4))
    """

    cell: Cell

    def _params(self, input_size: int) -> dict[str, jax.Array]:
        shapes = _abstract_params(self.cell, input_size)
        made = None
        if not all(self.has_variable("params", name) for name in shapes):
            # One init call for all leaves, so the params are exactly cell.init(key, I).
            made = self.cell.init(self.make_rng("params"), input_size)

        def leaf(rng, name):
            return (self.cell.init(rng, input_size) if made is None else made)[name]

        return {name: self.param(name, leaf, name) for name in shapes}

    @nn.compact
    def __call__(self, carry: Carry, x: jax.Array) -> tuple[Carry, jax.Array]:
        x = jnp.asarray(x)
        if x.ndim < 1:
            raise ValueError(
                f"RNNCell expects x of shape (*batch, input_size), got a scalar {x.shape}"
            )
        params = self._params(x.shape[-1])
        expected = jax.eval_shape(self.cell.initial_carry, params)
        if jax.tree.structure(carry) != jax.tree.structure(expected):
            raise TypeError(
                f"RNNCell expects the rnnjax cell's carry, structured like {expected}, got "
                f"{jax.tree.structure(carry)}: start from initialize_carry (an LSTM's carry is "
                "rnnjax.LSTMState(h, c), not Flax's (c, h))"
            )

        def step(carry, x):
            return self.cell.step(params, carry, x)

        for _ in range(x.ndim - 1):  # one vmap per batch axis
            step = jax.vmap(step)
        return step(carry, x)

    @nn.nowrap
    def initialize_carry(self, rng: jax.Array, input_shape: tuple[int, ...]) -> Carry:
        del rng  # rnnjax carries start from the params, not from a random draw
        *batch, input_size = tuple(input_shape)
        shapes = _abstract_params(self.cell, input_size)
        if self.scope is not None and all(self.has_variable("params", n) for n in shapes):
            params = {n: self.get_variable("params", n) for n in shapes}
        else:
            params = {n: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), s)
                      for n, s in shapes.items()}  # fmt: skip
        carry = self.cell.initial_carry(params)
        return jax.tree.map(lambda a: jnp.broadcast_to(a, (*batch, *a.shape)), carry)

    @property
    def num_feature_axes(self) -> int:
        return 1


class RNNLayer(nn.Module):
    """A whole rnnjax layer as a linen module over a batch.

    ``__call__(xs, seq_lengths=None, *, mask=None, initial_carry=None, deterministic=True)
    -> (carry, ys)`` with ``xs (B, T, I)``, ``seq_lengths (B,)`` (real steps at the front) or
    ``mask (B, T)`` (bool), and ``initial_carry`` the layer's carry with a leading ``B`` axis.
    It returns the layer's final carry (leaves ``(B, ...)``) and outputs ``(B, T, O)``, zero at
    padded steps, exactly ``jax.vmap`` of ``layer.apply``.

    Params: one linen param ``"layer"`` holding the rnnjax params pytree
    (``variables["params"]["layer"]``), made by ``layer.init`` with a key from the ``"params"``
    rng stream. ``deterministic=False`` turns on the layer's dropout (whatever ``key=`` drives
    in ``layer.apply``): one key from the ``"dropout"`` rng stream per call, split into one key
    per example; ``deterministic=True`` (the default) passes ``key=None``, as rnnjax does.

    >>> import jax, jax.numpy as jnp, rnnjax as rj
    >>> from rnnjax.flax.linen import RNNLayer
    >>> net = RNNLayer(rj.layers.stack(
    ...     rj.layers.rnn(rj.cells.gru(8)), rj.layers.dense(2), dropout=0.5))
    >>> xs = jnp.ones((3, 5, 4))
    >>> variables = net.init(jax.random.key(0), xs)
    >>> carry, ys = net.apply(variables, xs, jnp.array([5, 2, 4]), deterministic=False,
    ...                       rngs={"dropout": jax.random.key(1)})
    >>> ys.shape, bool((ys[1, 2:] == 0).all())
    ((3, 5, 2), True)
    """

    layer: Layer

    @nn.compact
    def __call__(
        self,
        xs: jax.Array,
        seq_lengths: jax.Array | None = None,
        *,
        mask: jax.Array | None = None,
        initial_carry: Carry = None,
        deterministic: bool = True,
    ) -> tuple[Carry, jax.Array]:
        if np.ndim(xs) != 3:
            fix = (
                "add a batch axis, xs[None]" if np.ndim(xs) == 2 else "batch, time and feature axes"
            )
            raise ValueError(f"RNNLayer expects xs of shape (B, T, I), got {np.shape(xs)}: {fix}")
        params = self.param("layer", self.layer.init, np.shape(xs)[-1])
        key = None if deterministic else self.make_rng("dropout")
        return apply_batch(self.layer, params, xs, seq_lengths, mask, initial_carry, key)


# ---------------------------------------------------------------------------------------------
# Flax's own cells <-> rnnjax layouts
# ---------------------------------------------------------------------------------------------

# Per Flax cell: the Dense blocks on the input and on the hidden state (in rnnjax's gate order)
# and which of them carry a bias. OptimizedLSTMCell creates LSTMCell's params, names included.
_LSTM = {
    "x": ("ii", "if", "ig", "io"),
    "h": ("hi", "hf", "hg", "ho"),
    "bias": ("hi", "hf", "hg", "ho"),
}
_FLAX_LAYOUTS = {
    nn.LSTMCell: _LSTM,
    nn.OptimizedLSTMCell: _LSTM,
    nn.GRUCell: {
        "x": ("ir", "iz", "in"),
        "h": ("hr", "hz", "hn"),
        "bias": ("ir", "iz", "in", "hn"),
    },
    nn.SimpleCell: {"x": ("i",), "h": ("h",), "bias": ("i",)},
}
_RNNJAX_KEYS = {
    nn.LSTMCell: ("b", "w_h", "w_i"),
    nn.OptimizedLSTMCell: ("b", "w_h", "w_i"),
    nn.GRUCell: ("b_h", "b_i", "w_h", "w_i"),
    nn.SimpleCell: ("b", "w_h", "w_i"),
}


def _flax_type(flax_cell: Any, where: str) -> type:
    cls = flax_cell if isinstance(flax_cell, type) else type(flax_cell)
    for known in _FLAX_LAYOUTS:
        if issubclass(cls, known):
            return known
    names = ", ".join(f"nn.{t.__name__}" for t in _FLAX_LAYOUTS)
    raise TypeError(f"{where} expects one of {names} (a class or an instance), got {cls.__name__}")


def _shape(a: Any) -> tuple[int, ...]:
    return tuple(np.shape(a))


def cell_from_flax(flax_cell: nn.RNNCellBase) -> Cell:
    """The rnnjax cell that computes what the Flax cell ``flax_cell`` computes.

    ``nn.LSTMCell(H)`` and ``nn.OptimizedLSTMCell(H)`` -> ``rj.cells.lstm(H)``;
    ``nn.GRUCell(H)`` -> ``rj.cells.gru(H)`` (Flax's GRU is the reset-after form);
    ``nn.SimpleCell(H)`` -> ``rj.cells.elman(H, activation=...)``. The rnnjax cell's params
    dtype is the Flax cell's ``param_dtype``. Flax's ``dtype`` (a computation dtype) has no
    rnnjax counterpart: rnnjax computes in the params' dtype. Non-default gate or activation
    functions of the LSTM and GRU, and ``SimpleCell(residual=True)``, have no rnnjax cell and
    raise ValueError. Only the function matters here, not the initializers: convert the
    weights with :func:`from_flax_params`.

    >>> import jax, flax.linen as nn
    >>> from rnnjax.flax.linen import cell_from_flax
    >>> cell = cell_from_flax(nn.GRUCell(features=4))
    >>> sorted(cell.init(jax.random.key(0), 3))
    ['b_h', 'b_i', 'w_h', 'w_i']
    """
    if isinstance(flax_cell, type):
        raise TypeError(
            f"cell_from_flax expects a Flax cell instance (it needs the features), got the "
            f"class {flax_cell.__name__}: pass e.g. nn.{flax_cell.__name__}(features=H)"
        )
    kind = _flax_type(flax_cell, "cell_from_flax")
    hidden, dtype = flax_cell.features, flax_cell.param_dtype
    name = type(flax_cell).__name__
    if kind is nn.SimpleCell:
        if flax_cell.residual:
            raise ValueError(
                "cell_from_flax: SimpleCell(residual=True) adds h before the activation; "
                "rnnjax's elman has no such term. Use residual=False"
            )
        act = flax_cell.activation_fn
        activation = {jnp.tanh: "tanh", jax.nn.relu: "relu"}.get(act, act)
        return elman(hidden, activation=activation, dtype=dtype)
    if flax_cell.gate_fn is not jax.nn.sigmoid or flax_cell.activation_fn is not jnp.tanh:
        raise ValueError(
            f"cell_from_flax: {name} with gate_fn={flax_cell.gate_fn!r}, "
            f"activation_fn={flax_cell.activation_fn!r} has no rnnjax cell; rnnjax's use "
            "sigmoid gates and tanh (the Flax defaults)"
        )
    return gru(hidden, dtype=dtype) if kind is nn.GRUCell else lstm(hidden, dtype=dtype)


def _check_flax_params(kind: type, flax_params: Any, where: str) -> None:
    """Check the Flax cell's params: Dense blocks by name, kernel/bias leaves, agreeing shapes."""
    layout = _FLAX_LAYOUTS[kind]
    want = sorted({*layout["x"], *layout["h"]})
    if not isinstance(flax_params, Mapping):
        raise TypeError(
            f"{where} expects the {kind.__name__}'s params, a dict with keys {want}, "
            f"got {type(flax_params).__name__}"
        )
    got = sorted(flax_params)
    if got != want:
        hint = ""
        if "params" in got:
            hint = ": pass variables['params'], not the whole variables dict"
        elif "cell" in got:
            hint = ": under nn.RNN the cell's params are variables['params']['cell']"
        else:
            owners = [
                t.__name__
                for t, lay in _FLAX_LAYOUTS.items()
                if sorted({*lay["x"], *lay["h"]}) == got
            ]
            if owners:
                hint = f": these are {' or '.join(owners)} params"
        missing = sorted(set(want) - set(got))
        extra = sorted(set(got) - set(want))
        raise ValueError(
            f"{where} expects {kind.__name__} params with keys {want}, got {got} "
            f"(missing {missing}, unexpected {extra}){hint}"
        )
    x0 = flax_params[layout["x"][0]]
    if not isinstance(x0, Mapping) or "kernel" not in x0:
        raise ValueError(f"{where}: {layout['x'][0]!r} has no 'kernel'")
    input_size, hidden = (_shape(x0["kernel"]) + (0, 0))[:2]
    for name in want:
        dense = flax_params[name]
        keys = ["bias", "kernel"] if name in layout["bias"] else ["kernel"]
        if not isinstance(dense, Mapping) or sorted(dense) != keys:
            got_keys = sorted(dense) if isinstance(dense, Mapping) else type(dense).__name__
            raise ValueError(f"{where}: {name!r} should hold {keys}, got {got_keys}")
        rows = input_size if name in layout["x"] else hidden
        if _shape(dense["kernel"]) != (rows, hidden):
            raise ValueError(
                f"{where}: {name!r} kernel should be ({rows}, {hidden}) "
                f"(input size {input_size}, features {hidden} from {layout['x'][0]!r}), "
                f"got {_shape(dense['kernel'])}"
            )
        if "bias" in dense and _shape(dense["bias"]) != (hidden,):
            raise ValueError(
                f"{where}: {name!r} bias should be ({hidden},), got {_shape(dense['bias'])}"
            )


def from_flax_params(flax_cell: Any, flax_params: Mapping) -> dict[str, jax.Array]:
    """rnnjax params from a Flax cell's params; the cell is :func:`cell_from_flax`'s.

    ``flax_cell`` is ``nn.LSTMCell``, ``nn.OptimizedLSTMCell``, ``nn.GRUCell`` or
    ``nn.SimpleCell`` (the class or an instance); ``flax_params`` the cell's own params
    (``variables["params"]`` of the cell, ``variables["params"]["cell"]`` under ``nn.RNN``).
    Flax Dense kernels are ``(in, out)`` like rnnjax's weights; the per-gate blocks are
    concatenated in rnnjax's gate order:

    - LSTM: ``w_i = [ii|if|ig|io].kernel``, ``w_h = [hi|hf|hg|ho].kernel``,
      ``b = [hi|hf|hg|ho].bias`` (Flax puts the LSTM bias on the hidden side only).
    - GRU: ``w_i = [ir|iz|in].kernel``, ``w_h = [hr|hz|hn].kernel``,
      ``b_i = [ir|iz|in].bias``, ``b_h = [0|0|hn.bias]``. Flax's
      ``n = tanh(W_in x + b_in + r * (W_hn h + b_hn))`` is rnnjax's reset-after GRU, ``b_hn``
      inside ``r * (...)`` where rnnjax's ``b_h[2H:]`` is; Flax has no ``b_hr``, ``b_hz``.
    - SimpleCell: ``w_i = i.kernel``, ``w_h = h.kernel``, ``b = i.bias``.

    Missing, unexpected or misshapen entries raise ValueError naming them.

    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> from rnnjax.flax.linen import from_flax_params
    >>> cell = nn.LSTMCell(features=4)
    >>> x = jnp.ones((1, 3))
    >>> carry = cell.initialize_carry(jax.random.key(0), x.shape)
    >>> flax_params = cell.init(jax.random.key(1), carry, x)
    >>> params = from_flax_params(cell, flax_params["params"])
    >>> jax.tree.map(jnp.shape, params)
    {'b': (16,), 'w_h': (4, 16), 'w_i': (3, 16)}
    """
    kind = _flax_type(flax_cell, "from_flax_params")
    _check_flax_params(kind, flax_params, "from_flax_params")
    layout = _FLAX_LAYOUTS[kind]

    def cat(names, leaf):
        return jnp.concatenate([jnp.asarray(flax_params[n][leaf]) for n in names], axis=-1)

    params = {"w_i": cat(layout["x"], "kernel"), "w_h": cat(layout["h"], "kernel")}
    if kind is nn.GRUCell:
        b_hn = jnp.asarray(flax_params["hn"]["bias"])
        zeros = jnp.zeros_like(b_hn)
        params["b_i"] = cat(layout["x"], "bias")
        params["b_h"] = jnp.concatenate([zeros, zeros, b_hn])
    else:
        params["b"] = cat(layout["bias"], "bias")
    return params


def to_flax_params(flax_cell: Any, params: Mapping) -> dict[str, dict[str, jax.Array]]:
    """A Flax cell's params from rnnjax params: the inverse of :func:`from_flax_params`.

    ``flax_cell`` picks the layout (``nn.LSTMCell``, ``nn.OptimizedLSTMCell``, ``nn.GRUCell``,
    ``nn.SimpleCell``, class or instance); ``params`` are an rnnjax ``lstm``, reset-after
    ``gru`` or ``elman`` (tanh or relu, matching the Flax cell's activation) cell's. The result
    is the cell's own params: ``{"params": result}`` for the cell,
    ``{"params": {"cell": result}}`` for ``nn.RNN(cell)``.

    The LSTM and Elman layouts convert exactly both ways. The GRU: Flax has no separate
    hidden-side biases for the r and z gates, so ``b_h[:2H]`` is folded into the input-side
    ``ir``/``iz`` biases (the same function; ``from_flax_params`` then gives those sums in
    ``b_i`` and zeros in ``b_h[:2H]``). ``gru(reset_after=False)`` params have no Flax
    counterpart; nothing in the params tells the two forms apart, so that is the caller's
    to avoid.

    >>> import jax, jax.numpy as jnp, flax.linen as nn, rnnjax as rj
    >>> from rnnjax.flax.linen import to_flax_params
    >>> params = rj.cells.elman(4).init(jax.random.key(0), 3)
    >>> jax.tree.map(jnp.shape, to_flax_params(nn.SimpleCell, params))
    {'h': {'kernel': (4, 4)}, 'i': {'bias': (4,), 'kernel': (3, 4)}}
    """
    kind = _flax_type(flax_cell, "to_flax_params")
    layout = _FLAX_LAYOUTS[kind]
    want = sorted(_RNNJAX_KEYS[kind])
    where = f"to_flax_params({kind.__name__})"
    if not isinstance(params, Mapping) or sorted(params) != want:
        got = sorted(params) if isinstance(params, Mapping) else type(params).__name__
        raise ValueError(f"{where} expects rnnjax params with keys {want}, got {got}")
    gates = len(layout["x"])
    w_i, w_h = (jnp.asarray(params[k]) for k in ("w_i", "w_h"))
    if w_h.ndim != 2 or w_h.shape[1] != gates * w_h.shape[0]:
        blocks = {1: "an elman", 3: "a gru", 4: "an lstm"}
        ratio = w_h.shape[1] / w_h.shape[0] if w_h.ndim == 2 and w_h.shape[0] else None
        hint = f": that is {blocks[ratio]} cell's layout" if ratio in blocks else ""
        want_h = "(H, H)" if gates == 1 else f"(H, {gates}H)"
        raise ValueError(f"{where} expects w_h of shape {want_h}, got {w_h.shape}{hint}")
    hidden = w_h.shape[0]
    if w_i.ndim != 2 or w_i.shape[1] != gates * hidden:
        raise ValueError(f"{where} expects w_i of shape (I, {gates * hidden}), got {w_i.shape}")
    for k in want:
        if k.startswith("b") and _shape(params[k]) != (gates * hidden,):
            raise ValueError(
                f"{where} expects {k} of shape ({gates * hidden},), got {_shape(params[k])}"
            )

    def block(a, g):
        return a[..., g * hidden : (g + 1) * hidden]

    out = {name: {"kernel": block(w_i, g)} for g, name in enumerate(layout["x"])}
    out.update({name: {"kernel": block(w_h, g)} for g, name in enumerate(layout["h"])})
    if kind is nn.GRUCell:
        b_i, b_h = jnp.asarray(params["b_i"]), jnp.asarray(params["b_h"])
        for g, name in enumerate(layout["x"]):
            out[name]["bias"] = block(b_i, g) + block(b_h, g) if g < 2 else block(b_i, g)
        out["hn"]["bias"] = block(b_h, 2)
    else:
        b = jnp.asarray(params["b"])
        for g, name in enumerate(layout["bias"]):
            out[name]["bias"] = block(b, g)
    return out
