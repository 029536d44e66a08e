"""What the differential tests share: the fast paths, their references, the programs that run
both, hypothesis strategies for their inputs, and the comparison of the results.

A fast path is a cell whose ``sequence`` hook replaces the ``lax.scan`` of its ``step``; its
reference is ``cell._replace(sequence=None)``. Both run in one jitted program per static
configuration (cell, size, reverse, mask kind, remat), cached here, so that hypothesis varies
the arrays (values, special values, masks, lengths, carries) without recompiling.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import strategies as st

import rnnjax as rj

#: Values a fast path must treat exactly as the reference does (subnormals: 1e-40).
SPECIALS = (np.nan, np.inf, -np.inf, 1e30, -1e30, -0.0, 0.0, 1e-40, -1e-40)


def _plain(make):
    return lambda h: make(h)._replace(sequence=None)


_lstm, _gru = rj.cells.lstm, rj.cells.gru
_elman = functools.partial(rj.cells.elman, activation="tanh")
_bf16 = jnp.bfloat16

#: fast path name -> (its cell, the reference cell, tolerance): hidden size -> Cell; the
#: tolerance is relative to each array's largest finite magnitude. The kernels sum in another
#: order than XLA. ``compute_dtype`` stands in for float32 arithmetic: its reference is the
#: float32 cell, within bfloat16's rounding.
FAST_PATHS = {
    "lstm": (_lstm, _plain(_lstm), 2e-5),
    "gru": (_gru, _plain(_gru), 2e-5),
    "lstm_fused": (functools.partial(_lstm, fused=True), _plain(_lstm), 2e-5),
    "gru_fused": (functools.partial(_gru, fused=True), _plain(_gru), 2e-5),
    "elman_fused": (functools.partial(_elman, fused=True), _plain(_elman), 2e-5),
    "lstm_bf16": (functools.partial(_lstm, compute_dtype=_bf16), _plain(_lstm), 3e-2),
    "gru_bf16": (functools.partial(_gru, compute_dtype=_bf16), _plain(_gru), 3e-2),
}


class Config(NamedTuple):
    """What one compiled program fixes: the fast path, the sizes and the scan's options."""

    path: str
    batch: int
    steps: int
    inputs: int
    hidden: int
    reverse: bool = False
    masking: str = "none"  # "none", "length" or "mask"
    remat: bool | int | str = False
    variant: str = ""  # what else the trace depends on (a threshold a test lowered), or ""


def cell_of(config: Config, *, reference: bool):
    fast, plain, _ = FAST_PATHS[config.path]
    return (plain if reference else fast)(config.hidden)


def _runner(cell, config: Config):
    """``(params, xs, carry, lengths, mask) -> (final, ys)`` over a batch under ``vmap``."""

    def run(params, xs, carry, lengths, mask):
        def one(x, n, m):
            kw = {"length": n} if config.masking == "length" else {}
            if config.masking == "mask":
                kw = {"mask": m}
            return rj.scan(cell, params, x, carry, reverse=config.reverse, remat=config.remat, **kw)

        return jax.vmap(one)(xs, lengths, mask)

    return run


def _loss(run):
    """A linear loss of every output: its gradient is the VJP of a fixed random cotangent
    (``weights``, drawn with the arrays). Linear, so that huge finite values (1e30) reach the
    backward pass as they are: a loss like sum(sin(ys)) would turn the last ulp of a 1e30 into
    an arbitrary cotangent."""

    def loss(params, xs, carry, lengths, mask, weights):
        final, ys = run(params, xs, carry, lengths, mask)
        outs = (ys, *jax.tree.leaves(final))
        return sum(jnp.sum(o * w) for o, w in zip(outs, weights, strict=True))

    return loss


@functools.cache
def program(config: Config, *, reference: bool):
    """A jitted ``(args, tangent, weights) -> {"forward", "grad", "jvp"}``: the inference pass,
    the gradient of a linear loss of every output (a training pass: forward saving, then
    backward) and forward-mode tangents, w.r.t. ``args[:3] = (params, xs, carry)``."""
    run = _runner(cell_of(config, reference=reference), config)
    loss = _loss(run)

    @jax.jit
    def all_passes(args, tangent, weights):
        params, xs, carry, lengths, mask = args

        def primal(p, x, c):
            return run(p, x, c, lengths, mask)

        return {
            "forward": run(*args),
            # the loss too: a checkpointed pass then recomputes ys (the replay)
            "grad": jax.value_and_grad(loss, (0, 1, 2))(*args, weights),
            "jvp": jax.jvp(primal, (params, xs, carry), tangent)[1],
        }

    return all_passes


@functools.cache
def inference(config: Config, *, reference: bool):
    """A jitted inference pass alone, ``args -> (final, ys)``."""
    return jax.jit(lambda args: _runner(cell_of(config, reference=reference), config)(*args))


def base_arrays(config: Config, seed: int):
    """``(params, xs, carry)``, a tangent of them and the loss's cotangents of the outputs
    (``ys``, then the final carry's leaves): finite numpy arrays, every weight moved off its
    init (so biases and each block matter), a nonzero starting carry."""
    cell = cell_of(config, reference=True)
    rng = np.random.default_rng(seed)

    def normal(a, scale=1.0, shift=0.0):
        return (shift + scale * rng.standard_normal(np.shape(a))).astype(np.float32)

    params = cell.init(jax.random.key(seed % 1000), config.inputs)
    params = jax.tree.map(lambda a: np.asarray(a) + normal(a, 0.2), params)
    xs = normal(np.zeros((config.batch, config.steps, config.inputs)))
    carry = jax.tree.map(lambda a: normal(a, 0.3, 0.1), cell.initial_carry(params))
    tangent = jax.tree.map(lambda a: normal(a), (params, xs, carry))
    final = jax.tree.leaves(carry)
    weights = (normal(np.zeros((config.batch, config.steps, config.hidden))),
               *(normal(np.zeros((config.batch, *np.shape(c)))) for c in final))  # fmt: skip
    return (params, xs, carry), tangent, weights


@st.composite
def pokes(draw, max_pokes: int = 3):
    """Where special values go: ``[(target, leaf index, flat position, value)]`` with target
    one of "x", "carry", "params"; positions are taken modulo the leaf's size later."""
    n = draw(st.integers(0, max_pokes))
    return [
        (
            draw(st.sampled_from(("x", "x", "carry", "params"))),
            draw(st.integers(0, 7)),
            draw(st.integers(0, 1 << 20)),
            draw(st.sampled_from(SPECIALS)),
        )
        for _ in range(n)
    ]


def poke(arrays, where):
    """``arrays = (params, xs, carry)`` with the special values of ``where`` written in."""
    params, xs, carry = jax.tree.map(np.array, arrays)
    groups = {"params": params, "x": xs, "carry": carry}
    for target, leaf, position, value in where:
        leaves = jax.tree.leaves(groups[target])
        a = leaves[leaf % len(leaves)]
        if a.size:
            a.reshape(-1)[position % a.size] = value
    return params, xs, carry


@st.composite
def masks(draw, batch: int, steps: int):
    """``(lengths (B,), mask (B, T))``: lengths anywhere in [0, T] (0 and T drawn often) and an
    arbitrary mask."""
    lengths = draw(
        st.lists(
            st.sampled_from(sorted({0, steps, steps // 2, 1 % (steps + 1)}))
            | st.integers(0, steps),
            min_size=batch,
            max_size=batch,
        )
    )
    bits = draw(st.lists(st.booleans(), min_size=batch * steps, max_size=batch * steps))
    mask = np.array(bits, bool).reshape(batch, steps)
    return np.array(lengths, np.int32), mask


def draw_args(data, config: Config):
    """Every array of one example: ``(args, tangent, weights)`` for :func:`program`.

    Not drawn: a non-finite weight beside padded steps, the one place where the reference is
    not the standard. A padded step's dropped result still gets JAX's gradient, 0 times the
    step's Jacobian at that weight (with the step's zero carry, 0 * inf = NaN there); the
    kernels never run a padded step, and their gradient is the real steps' alone."""
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    arrays, tangent, weights = base_arrays(config, seed)
    arrays = poke(arrays, data.draw(pokes(), label="special values"))
    lengths, mask = data.draw(masks(config.batch, config.steps), label="lengths, mask")
    hypothesis.assume(all_finite(arrays[0]) or not padded_steps(config, lengths, mask))
    return (*arrays, lengths, mask), tangent, weights


def compare(got: dict, want: dict, args, config: Config) -> None:
    """:func:`assert_same` on every pass of :func:`program` at the path's tolerance.

    With 1e30 in the inputs a derivative is a sum of terms of 1e30 times a saturated gate's
    f (1 - f), whose float32 rounding leaves the reference itself without a correct digit:
    there only where the values are finite is compared. For bfloat16, the loss (a sum of
    B*T*H rounded products) has no 8-bit tolerance; its gradient is compared."""
    tol = FAST_PATHS[config.path][2]
    overflow = may_overflow(args)
    for name in ("forward", "grad", "jvp"):
        a, b = got[name], want[name]
        if name == "grad" and tol > 1e-3:
            a, b = a[1], b[1]
        values = not overflow or name == "forward"
        assert_same(a, b, tol, f"{config} {name}", overflow=overflow, values=values)


def assert_same(
    actual, expected, tol: float, what: str = "", *, overflow: bool = False, values: bool = True
) -> None:
    """Equal pytrees: NaN exactly where ``expected`` has NaN, +inf and -inf likewise, and the
    finite values within ``tol`` of each array's largest finite magnitude (at least 1).

    ``overflow``: the inputs hold huge finite values, so a non-finite value of ``expected`` may
    be an overflow of its own arithmetic (1e30 * 1e30), whose order the fast path need not
    share: there any ``actual`` is accepted (inf - inf may be NaN in one order and not in
    another). Where ``expected`` is finite, ``actual`` must still be finite and close (and
    with ``values`` False only finite)."""
    assert jax.tree.structure(actual) == jax.tree.structure(expected), what
    paths = jax.tree_util.tree_flatten_with_path(expected)[0]
    for (path, b), a in zip(paths, jax.tree.leaves(actual), strict=True):
        a = np.asarray(a, np.float32)
        b = np.asarray(b, np.float32)
        name = f"{what}{jax.tree_util.keystr(path)}"
        assert a.shape == b.shape, f"{name}: shape {a.shape} != {b.shape}"
        for kind, test in (("NaN", np.isnan), ("+inf", np.isposinf), ("-inf", np.isneginf)):
            differ = test(a) != test(b)
            if overflow:  # any non-finite value where the reference overflowed
                differ &= np.isfinite(b)
            assert not differ.any(), (
                f"{name}: {kind} at {np.argwhere(differ)[:4].tolist()} in one and not the "
                f"other (fast path {a[differ][:4]}, reference {b[differ][:4]})"
            )
        finite = np.isfinite(b) & np.isfinite(a)
        if values and finite.any():
            scale = max(1.0, float(np.abs(b[finite]).max()))
            err = np.abs(a[finite] - b[finite]).max() / scale
            assert err <= tol, f"{name}: error {err:.3g} (relative to {scale:.3g}) > {tol}"


def may_overflow(tree) -> bool:
    """Whether some finite value is so large (1e30) that products of it overflow float32."""
    return any(
        (np.abs(np.where(np.isfinite(a), a, 0)) >= 1e20).any()
        for a in map(np.asarray, jax.tree.leaves(tree))
        if np.issubdtype(a.dtype, np.floating)
    )


def all_finite(tree) -> bool:
    return all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(tree))


def padded_steps(config: Config, lengths, mask) -> bool:
    """Whether some example of the batch has a padded step."""
    if config.masking == "length":
        return bool((np.asarray(lengths) < config.steps).any())
    if config.masking == "mask":
        return not bool(np.asarray(mask).all())
    return False
