"""Vanishing and exploding gradients, measured: why a recurrent network does or does not learn
long-range structure (Bengio et al. 1994; Pascanu et al. 2013).

For any :class:`rnnjax.Cell` over one example (batch with ``jax.vmap``):

- :func:`hidden_gradients`: ``||dLoss/dh_t||`` for every step ``t``, from one backward pass
  (:func:`carry_gradients` gives the gradient vectors themselves);
- :func:`step_jacobians`: the step Jacobians ``dh_t/dh_{t-1}`` along the trajectory, summarized by
  :func:`jacobian_norms` (spectral norms), :func:`spectral_radii` and :func:`product_norms`
  (``||dh_{T-1}/dh_t||``);
- :func:`hidden_stats`: mean, spread, norm and saturation of the hidden state over time;
- :func:`plot_gradient_norms`, :func:`plot_jacobian_norms`, :func:`plot_hidden_stats`.

Conventions. ``h_t`` is the carry after step ``t``, the step that reads ``xs[t]``
(``t = 0 .. T-1``). The *hidden state* is one leaf of the carry: the first leaf
(``jax.tree.leaves(carry)[0]``) unless ``leaf=`` names another, by position or by field name.
For the built-in cells the first leaf is ``h``: the carry itself for ``elman`` and ``gru``,
``LSTMState(h, c).h`` for ``lstm`` (``leaf="c"`` reports the cell state; when the loss reads
only outputs, its gradient at the last step is exactly 0, since the last cell state feeds no later
step, so ratios against it are infinite: compare against ``T-2`` or use ``h``). A custom cell with a
pytree carry should put ``h`` first or pass ``leaf=``. Step Jacobians are taken over the whole
carry, flattened in leaf order (``[h, c]``, ``2H`` wide, for an LSTM): the whole carry is what
takes a gradient from one step back to the previous one.

Why these numbers explain learning: backpropagation through time multiplies the gradient by one
transposed step Jacobian per step, ``dLoss/dh_t = J_{t+1}^T dLoss/dh_{t+1}`` (plus the loss's
direct dependence on ``h_t``), so ``||dLoss/dh_t||`` shrinks by at most ``||J_{t+1}||`` per step.
With step-Jacobian norms below 1 (an Elman RNN with small recurrent weights, or a saturated
tanh) the signal from a loss ``k`` steps away decays like ``||J||^k``: an Elman RNN cannot learn
the adding problem at T=100. An LSTM's cell state passes through ``c_t = f * c_{t-1} + ...``
whose Jacobian is ``diag(f)``, near 1 with a forget bias of 1, so its gradients survive.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.flatten_util import ravel_pytree

from rnnjax.core import Carry, Cell, Params, check_carry
from rnnjax.scan import _prepare, _sequence_length, step_mask

Leaf = int | str


def _check_leaf(leaf: Any, where: str) -> None:
    if isinstance(leaf, bool) or not isinstance(leaf, int | str):
        raise TypeError(f"{where} expects leaf to be an int or a field name, got {leaf!r}")


def _select(tree: Any, leaf: Leaf, where: str) -> jax.Array:
    """The hidden-state leaf of a carry (or of a pytree shaped like one): ``leaf`` is a position
    in ``jax.tree.leaves`` or a field name (NamedTuple attribute or dict key)."""
    _check_leaf(leaf, where)
    leaves = jax.tree.leaves(tree)
    if isinstance(leaf, int):
        if not -len(leaves) <= leaf < len(leaves):
            raise ValueError(
                f"{where}: leaf={leaf} is out of range for a carry with {len(leaves)} leaves"
            )
        return leaves[leaf]
    if isinstance(tree, dict) and leaf in tree:
        return tree[leaf]
    fields = getattr(tree, "_fields", None)
    if fields is not None and leaf in fields:
        return getattr(tree, leaf)
    names = list(tree) if isinstance(tree, dict) else list(fields or ())
    raise ValueError(
        f"{where}: the carry has no field {leaf!r}"
        + (f"; its fields are {names}" if names else "; it has no named fields, pass an int")
    )


def carry_gradients(
    cell: Cell,
    params: Params,
    xs: Any,
    loss_fn: Callable[[jax.Array, Carry], jax.Array],
    *,
    carry: Carry = None,
    length: Any = None,
    mask: Any = None,
) -> Carry:
    """``dLoss/dh_t`` for every step ``t``: a pytree shaped like the carry, each leaf with a
    leading ``T`` axis.

    Computed in one backward pass: a zero perturbation ``eps_t`` is added to the carry after
    each step ``t`` (``lax.scan`` over ``(xs, eps)``) and ``jax.grad`` is taken with respect to
    all the ``eps`` at once. ``h_t`` is perturbed wherever it is used: in the next step and, when
    the step's output *is* a leaf of its new carry (``y_t = h_t``, as in every built-in cell), in
    the output ``y_t`` too. A custom cell whose output is computed separately gets only the path
    through later steps. At padded steps (``length``/``mask``) the gradient is zero.

    Args:
      cell, params: the cell and its params.
      xs: ``(T, input_size)``, one example.
      loss_fn: ``(ys, carry) -> scalar``, with ``ys`` the ``(T, output_size)`` outputs (zero at
        padded steps) and ``carry`` the final carry; e.g. a loss on ``ys[-1]`` only.
      carry: the starting carry (default ``cell.initial_carry(params)``).
      length, mask: real steps, as in :func:`rnnjax.scan`.

    >>> import jax, jax.numpy as jnp, rnnjax as rj
    >>> cell = rj.cells.lstm(4)
    >>> params = cell.init(jax.random.key(0), 2)
    >>> g = carry_gradients(cell, params, jnp.ones((6, 2)), lambda ys, c: c.c.sum())
    >>> g.h.shape, g.c.shape, g.c[-1].tolist()
    ((6, 4), (6, 4), [1.0, 1.0, 1.0, 1.0])
    """
    where = "rnnjax.diagnostics.carry_gradients"
    step_mask(length, mask, _sequence_length(xs, where), where)  # range checks need concrete values
    core = jax.jit(functools.partial(_carry_gradients, cell, loss_fn))
    return core(params, xs, carry, length, mask)


# The cores run under a jit made for each call: called eagerly (a notebook) that is one XLA
# compilation instead of one per scan and per op, 2-3x faster. Not one cached jit with the cell
# and loss_fn static: that would keep the arrays a loss_fn reads from globals as they were at
# the first call. Under a caller's jit they are simply inlined.


def _carry_gradients(cell, loss_fn, params, xs, carry, length, mask):
    where = "rnnjax.diagnostics.carry_gradients"
    start, (xs, real, _), steps = _prepare(cell, params, xs, carry, length, mask, None, where)
    if not all(jnp.issubdtype(jnp.result_type(c), jnp.inexact) for c in jax.tree.leaves(start)):
        raise TypeError(f"{where} needs a carry of floating-point arrays to differentiate")
    eps = jax.tree.map(lambda c: jnp.zeros((steps, *jnp.shape(c)), jnp.result_type(c)), start)

    def body(carry, inputs):
        x, r, e = inputs
        new, y = cell.step(params, carry, x)
        leaves, tree = jax.tree.flatten(new)
        deltas = jax.tree.leaves(e)
        # When the output is a leaf of the new carry (y_t = h_t), it is perturbed with it.
        y = next((y + d for leaf, d in zip(leaves, deltas, strict=True) if y is leaf), y)
        new = tree.unflatten([a + d for a, d in zip(leaves, deltas, strict=True)])
        if r is not None:
            new = jax.tree.map(lambda a, b: jnp.where(r, a, b), new, carry)
            y = jax.tree.map(lambda a: jnp.where(r, a, jnp.zeros_like(a)), y)
        return new, y

    def loss(eps):
        final, ys = lax.scan(body, start, (xs, real, eps))
        value = loss_fn(ys, final)
        if jnp.shape(value) != ():
            raise ValueError(
                f"{where} expects loss_fn(ys, carry) to return a scalar, got shape "
                f"{jnp.shape(value)}: reduce over the outputs (e.g. a mean), and vmap the "
                "diagnostic over a batch"
            )
        return value

    return jax.grad(loss)(eps)


def hidden_gradients(
    cell: Cell,
    params: Params,
    xs: Any,
    loss_fn: Callable[[jax.Array, Carry], jax.Array],
    *,
    carry: Carry = None,
    length: Any = None,
    mask: Any = None,
    leaf: Leaf = 0,
) -> jax.Array:
    """``||dLoss/dh_t||`` for every step ``t``, shape ``(T,)``; zero at padded steps.

    The gradient with respect to the hidden state after step ``t`` (:func:`carry_gradients`,
    one backward pass for all ``t``); ``leaf`` picks the hidden state in the carry (default the
    first leaf: ``h``; ``leaf="c"`` for an LSTM's cell state). Arguments as in
    :func:`carry_gradients`. Over a batch, vmap and look at the mean of the logs or the median.

    The textbook picture, an Elman RNN with recurrent weights of spectral norm 0.5 and a loss on
    its last output: the gradient shrinks at least twofold with every step away from the loss.

    >>> import jax, jax.numpy as jnp, rnnjax as rj
    >>> cell = rj.cells.elman(8)
    >>> params = cell.init(jax.random.key(0), 2)
    >>> params["w_h"] = 0.5 * params["w_h"]                # orthogonal at init: norm 1 -> 0.5
    >>> xs = jax.random.normal(jax.random.key(1), (4, 20, 2))  # a batch of 4
    >>> norms = jax.vmap(lambda x: hidden_gradients(
    ...     cell, params, x, lambda ys, carry: ys[-1].sum()))(xs)
    >>> norms.shape, bool((norms[:, :-1] <= 0.5 * norms[:, 1:]).all())
    ((4, 20), True)
    """
    where = "rnnjax.diagnostics.hidden_gradients"
    _select(jax.eval_shape(cell.initial_carry, params), leaf, where)  # a bad leaf fails first
    grads = carry_gradients(cell, params, xs, loss_fn, carry=carry, length=length, mask=mask)
    g = _select(grads, leaf, where)
    return jnp.linalg.norm(g.reshape(g.shape[0], -1), axis=-1)


def step_jacobians(cell: Cell, params: Params, xs: Any, *, carry: Carry = None) -> jax.Array:
    """The step Jacobians along the trajectory: ``J[t] = dh_t / dh_{t-1}``, ``(T, S, S)``.

    ``h`` here is the whole carry flattened in leaf order (``S = H`` for elman and gru,
    ``2H`` for lstm: ``[h, c]``); ``h_{-1}`` is the starting carry. ``J[t][i, j]`` is the
    derivative of entry ``i`` of the carry after step ``t`` with respect to entry ``j`` of the
    carry before it (``jax.jacfwd`` of the step, vmapped over ``t``). Backpropagation multiplies
    by the transposes: ``dLoss/dh_{t-1} = J[t]^T dLoss/dh_t`` where the loss does not read
    ``h_{t-1}`` directly. All ``T`` steps are real: for a padded example pass ``xs[:length]``.

    >>> import jax, jax.numpy as jnp, rnnjax as rj
    >>> cell = rj.cells.elman(3, activation=lambda z: z)    # linear: J[t] = w_h^T every step
    >>> params = cell.init(jax.random.key(0), 2)
    >>> jacs = step_jacobians(cell, params, jnp.ones((5, 2)))
    >>> jacs.shape, bool(jnp.allclose(jacs[2], params["w_h"].T))
    ((5, 3, 3), True)
    """
    return jax.jit(functools.partial(_step_jacobians, cell))(params, xs, carry)


def _step_jacobians(cell, params, xs, carry):
    where = "rnnjax.diagnostics.step_jacobians"
    _sequence_length(xs, where)
    if carry is None:
        carry = cell.initial_carry(params)
    else:
        check_carry(carry, jax.eval_shape(cell.initial_carry, params), where)
    flat, unravel = ravel_pytree(carry)

    def step(c, x):
        return ravel_pytree(cell.step(params, unravel(c), x)[0])[0]

    def before(c, x):  # collect the carry entering each step
        return step(c, x), c

    _, entering = lax.scan(before, flat, xs)
    return jax.vmap(jax.jacfwd(step))(entering, xs)


def _check_square(jacobians: Any, where: str) -> jax.Array:
    shape = tuple(np.shape(jacobians))
    if len(shape) < 2 or shape[-1] != shape[-2]:
        raise ValueError(
            f"{where} expects square Jacobians of shape (..., S, S), got {shape}: "
            "pass what step_jacobians returns"
        )
    return jnp.asarray(jacobians)


def jacobian_norms(jacobians: jax.Array) -> jax.Array:
    """Spectral norms (largest singular values) of ``(..., S, S)`` Jacobians, shape ``(...)``.

    ``||dLoss/dh_{t-1}|| <= jacobian_norms(J)[t] * ||dLoss/dh_t||`` where the loss does not read
    ``h_{t-1}`` directly: norms below 1 at every step mean vanishing gradients.

    >>> import jax.numpy as jnp
    >>> jacobian_norms(jnp.stack([jnp.diag(jnp.array([0.5, 0.2])), 3 * jnp.eye(2)])).tolist()
    [0.5, 3.0]
    """
    jacobians = _check_square(jacobians, "rnnjax.diagnostics.jacobian_norms")
    return jnp.linalg.norm(jacobians, ord=2, axis=(-2, -1))


def spectral_radii(jacobians: jax.Array) -> jax.Array:
    """Spectral radii (largest ``|eigenvalue|``) of ``(..., S, S)`` Jacobians, shape ``(...)``.

    Never larger than the spectral norm; the two are equal for normal matrices. The radius
    governs the growth of long products of one repeated Jacobian (``||J^k|| ~ radius^k``); the
    norm bounds every single step. On GPU the eigenvalues are computed by LAPACK on the host.

    >>> import jax.numpy as jnp
    >>> nilpotent = jnp.array([[0.0, 5.0], [0.0, 0.0]])    # norm 5, radius 0
    >>> spectral_radii(nilpotent).tolist(), jacobian_norms(nilpotent).tolist()
    (0.0, 5.0)
    """
    jacobians = _check_square(jacobians, "rnnjax.diagnostics.spectral_radii")
    return jnp.abs(jnp.linalg.eigvals(jacobians)).max(axis=-1)


def product_norms(jacobians: jax.Array) -> jax.Array:
    """``||dh_{T-1}/dh_t|| = ||J[T-1] ... J[t+1]||`` for every ``t``, shape ``(T,)``.

    The spectral norm of the Jacobian from the state after step ``t`` to the last state; 1 at
    ``t = T-1`` (the identity). For a loss on the last state only,
    ``||dLoss/dh_t|| <= product_norms(J)[t] * ||dLoss/dh_{T-1}||``. It can overflow to ``inf``
    for exploding dynamics over long sequences.

    >>> import jax.numpy as jnp
    >>> product_norms(jnp.stack([2 * jnp.eye(2)] * 4)).tolist()
    [8.0, 4.0, 2.0, 1.0]
    """
    jacobians = _check_square(jacobians, "rnnjax.diagnostics.product_norms")
    if jacobians.ndim != 3:
        raise ValueError(
            f"rnnjax.diagnostics.product_norms expects (T, S, S) Jacobians of one example, got "
            f"{jacobians.shape}: vmap over the batch axis"
        )

    return _product_norms(jacobians)


@jax.jit
def _product_norms(jacobians):
    def back(product, jac):  # from t = T-1 down: emit ||P_t||, then P_{t-1} = P_t J[t]
        return product @ jac, jnp.linalg.norm(product, ord=2)

    eye = jnp.eye(jacobians.shape[-1], dtype=jacobians.dtype)
    return lax.scan(back, eye, jacobians, reverse=True)[1]


class HiddenStats(NamedTuple):
    """Statistics of the hidden state after every step, each of shape ``(T,)``.

    Attributes:
      mean: mean over the units.
      std: standard deviation over the units.
      norm: Euclidean norm (grows without bound in an exploding relu RNN).
      saturated: fraction of units with ``|h| > threshold``, where a tanh has a derivative near
        zero (``1 - 0.99**2 < 0.02``): saturated units pass almost no gradient.
    """

    mean: jax.Array
    std: jax.Array
    norm: jax.Array
    saturated: jax.Array


def hidden_stats(
    cell: Cell,
    params: Params,
    xs: Any,
    *,
    carry: Carry = None,
    leaf: Leaf = 0,
    threshold: float = 0.99,
) -> HiddenStats:
    """Mean, std, norm and saturated fraction of the hidden state after every step
    (:class:`HiddenStats`, fields of shape ``(T,)``). ``leaf`` picks the hidden state in the
    carry (see the module docstring); ``threshold`` is for tanh-bounded states. Over a batch,
    vmap and average.

    >>> import jax, jax.numpy as jnp, rnnjax as rj
    >>> cell = rj.cells.elman(16)
    >>> params = cell.init(jax.random.key(0), 2)
    >>> xs = jax.random.normal(jax.random.key(1), (30, 2))
    >>> weak = hidden_stats(cell, params, xs)
    >>> strong = hidden_stats(cell, {**params, "w_h": 4 * params["w_h"]}, xs)  # saturates tanh
    >>> weak.saturated.shape, float(weak.saturated.mean()) < 0.1 < float(strong.saturated.mean())
    ((30,), True)
    """
    core = jax.jit(functools.partial(_hidden_stats, cell, leaf))
    return core(params, xs, carry, threshold)


def _hidden_stats(cell, leaf, params, xs, carry, threshold):
    where = "rnnjax.diagnostics.hidden_stats"
    _sequence_length(xs, where)
    if carry is None:
        carry = cell.initial_carry(params)
    else:
        check_carry(carry, jax.eval_shape(cell.initial_carry, params), where)

    def body(c, x):
        new = cell.step(params, c, x)[0]
        return new, _select(new, leaf, where).reshape(-1)

    hs = lax.scan(body, carry, xs)[1]
    return HiddenStats(
        mean=hs.mean(axis=-1),
        std=hs.std(axis=-1),
        norm=jnp.linalg.norm(hs, axis=-1),
        saturated=(jnp.abs(hs) > threshold).mean(axis=-1),
    )


# Plots: matplotlib's object API (no pyplot), so they work headless without choosing a backend
# and a notebook shows the returned figure once.


def _axes(ax: Any, panels: int = 1) -> tuple[Any, list]:
    if ax is None:
        from matplotlib.figure import Figure

        fig = Figure(figsize=(6.5, 3.5 * panels), dpi=100, layout="constrained")
        return fig, list(fig.subplots(panels, 1, squeeze=False)[:, 0])
    axes = list(np.ravel(ax)) if isinstance(ax, list | tuple | np.ndarray) else [ax]
    if len(axes) != panels:
        raise ValueError(f"this plot draws {panels} panels; got {len(axes)} axes")
    return axes[0].figure, axes


def _check_series(series_by_name: Any, where: str) -> dict[str, np.ndarray]:
    if not isinstance(series_by_name, Mapping) or not series_by_name:
        raise TypeError(
            f"{where} expects a non-empty dict of name -> values over time, got "
            f"{type(series_by_name).__name__}: e.g. {{'elman': norms_elman, 'lstm': norms_lstm}}"
        )
    out = {}
    for name, values in series_by_name.items():
        values = np.asarray(values, dtype=np.float64)
        if values.ndim not in (1, 2):
            raise ValueError(
                f"{where} expects each entry to be (T,) or a batch (B, T), got {name!r} with "
                f"shape {values.shape}"
            )
        out[str(name)] = values
    return out


def _draw_lines(ax: Any, series: dict[str, np.ndarray], ylabel: str, log: bool) -> None:
    """One line per name; a batch ``(B, T)`` is drawn as its median with a 10-90% band."""
    for name, values in series.items():
        t = np.arange(values.shape[-1])
        if values.ndim == 1:
            ax.plot(t, values, label=name)
            continue
        (line,) = ax.plot(t, np.median(values, axis=0), label=f"{name} (median of {len(values)})")
        low, high = np.percentile(values, [10, 90], axis=0)
        ax.fill_between(t, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    if log:
        ax.set_yscale("log")
        low, high = ax.get_ylim()
        if high < 100 * low:  # under two decades: plain numbers, not 1.05 x 10^0
            from matplotlib.ticker import FormatStrFormatter

            ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
            ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
    ax.set_xlabel("step t")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="both")
    ax.legend()


def _finish(fig: Any, path: Any) -> Any:
    if path is not None:
        fig.savefig(path)
    return fig


def plot_gradient_norms(norms_by_name: Mapping[str, Any], path: Any = None, ax: Any = None):
    """Plot ``||dLoss/dh_t||`` against ``t`` (log scale), one line per name; returns the figure.

    ``norms_by_name`` maps a name to :func:`hidden_gradients` output, ``(T,)`` or a vmapped
    batch ``(B, T)`` (drawn as the median and a 10-90% band). ``path``: also save it there
    (PNG, PDF, SVG by suffix). ``ax``: draw into these matplotlib axes instead of a new figure.

    >>> import numpy as np
    >>> fig = plot_gradient_norms({"decaying": 0.5 ** np.arange(10)[::-1]})
    >>> fig.axes[0].get_yscale()
    'log'
    """
    series = _check_series(norms_by_name, "plot_gradient_norms")
    fig, (ax,) = _axes(ax)
    _draw_lines(ax, series, "||dLoss / dh_t||", log=True)
    ax.set_title("gradient reaching each step")
    return _finish(fig, path)


def plot_jacobian_norms(norms_by_name: Mapping[str, Any], path: Any = None, ax: Any = None):
    """Plot step-Jacobian norms (or radii) against ``t`` (log scale) with a line at 1, the edge
    between vanishing and exploding; returns the figure. Arguments as in
    :func:`plot_gradient_norms`, with :func:`jacobian_norms` or :func:`spectral_radii` output.

    >>> import numpy as np
    >>> fig = plot_jacobian_norms({"elman": np.full(10, 0.5), "lstm": np.full(10, 1.1)})
    >>> len(fig.axes[0].get_lines())
    3
    """
    series = _check_series(norms_by_name, "plot_jacobian_norms")
    fig, (ax,) = _axes(ax)
    ax.axhline(1.0, color="gray", linestyle="--", linewidth=1)
    _draw_lines(ax, series, "||dh_t / dh_{t-1}||", log=True)
    ax.set_title("step Jacobians")
    return _finish(fig, path)


def plot_hidden_stats(stats_by_name: Mapping[str, HiddenStats], path: Any = None, ax: Any = None):
    """Plot :func:`hidden_stats` over time, two panels: mean with a +-std band, and the
    saturated fraction; returns the figure. A vmapped batch (fields ``(B, T)``) is averaged
    over ``B``. ``ax``: two matplotlib axes to draw into.

    >>> import numpy as np
    >>> stats = HiddenStats(np.zeros(5), np.ones(5), np.ones(5), np.linspace(0, 1, 5))
    >>> len(plot_hidden_stats({"elman": stats}).axes)
    2
    """
    where = "plot_hidden_stats"
    if not isinstance(stats_by_name, Mapping) or not stats_by_name:
        raise TypeError(f"{where} expects a non-empty dict of name -> HiddenStats")
    fig, (top, bottom) = _axes(ax, panels=2)
    for name, stats in stats_by_name.items():
        if not isinstance(stats, HiddenStats):
            raise TypeError(
                f"{where} expects HiddenStats values (from hidden_stats), got "
                f"{type(stats).__name__} for {name!r}"
            )
        mean, std, _, saturated = (
            np.asarray(f, np.float64).reshape(-1, np.shape(f)[-1]).mean(axis=0) for f in stats
        )
        t = np.arange(mean.shape[0])
        (line,) = top.plot(t, mean, label=str(name))
        top.fill_between(t, mean - std, mean + std, color=line.get_color(), alpha=0.2, lw=0)
        bottom.plot(t, saturated, label=str(name), color=line.get_color())
    top.set_ylabel("hidden state: mean +- std")
    bottom.set_ylabel("saturated fraction")
    bottom.set_ylim(-0.02, 1.02)
    for a in (top, bottom):
        a.set_xlabel("step t")
        a.grid(alpha=0.3)
        a.legend()
    return _finish(fig, path)
