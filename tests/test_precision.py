"""Mixed precision: ``compute_dtype=jnp.bfloat16`` runs each cell's matmuls in bfloat16, with
products accumulated in float32 and params, gates and state kept in float32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rnnjax as rj

BF16 = jnp.bfloat16


def rounded(a):
    """``a`` rounded to bfloat16 and back: what a bfloat16 matmul operand holds."""
    return a.astype(BF16).astype(jnp.float32)


def draw(cell, input_size=5, key=0):
    k_p, k_h, k_x = jax.random.split(jax.random.key(key), 3)
    params = cell.init(k_p, input_size)
    carry = jax.tree.map(
        lambda c: jax.random.normal(k_h, c.shape, c.dtype), cell.initial_carry(params)
    )
    return params, carry, jax.random.normal(k_x, (input_size,))


@pytest.mark.parametrize("name", ["lstm", "elman"])
def test_one_step_is_the_float32_step_on_bfloat16_operands(name):
    """Where h meets only the matmul, a bfloat16-compute step is exactly the float32 step on
    weights, input and h rounded to bfloat16 (bfloat16 products are exact in float32)."""
    make = getattr(rj.cells, name)
    low, ref = make(6, compute_dtype=BF16), make(6)
    params, carry, x = draw(ref)
    round_weights = {k: rounded(v) if k.startswith("w_") else v for k, v in params.items()}
    ref_carry = carry._replace(h=rounded(carry.h)) if name == "lstm" else rounded(carry)
    got, want = low.step(params, carry, x), ref.step(round_weights, ref_carry, rounded(x))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert a.dtype == jnp.float32
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("reset_after", [True, False])
def test_gru_step_matches_its_formula_with_bfloat16_matmuls(reset_after):
    cell = rj.cells.gru(6, reset_after=reset_after, compute_dtype=BF16)
    params, h, x = draw(cell)
    w_i, w_h, b_i, b_h = (params[k] for k in ("w_i", "w_h", "b_i", "b_h"))
    gi = rounded(x) @ rounded(w_i) + b_i
    if reset_after:
        gh = rounded(h) @ rounded(w_h) + b_h
        r = jax.nn.sigmoid(gi[:6] + gh[:6])
        z = jax.nn.sigmoid(gi[6:12] + gh[6:12])
        n = jnp.tanh(gi[12:] + r * gh[12:])
    else:
        gh = rounded(h) @ rounded(w_h[:, :12]) + b_h[:12]
        r = jax.nn.sigmoid(gi[:6] + gh[:6])
        z = jax.nn.sigmoid(gi[6:12] + gh[6:12])
        n = jnp.tanh(gi[12:] + rounded(r * h) @ rounded(w_h[:, 12:]) + b_h[12:])
    want = (1 - z) * n + z * h
    got, y = cell.step(params, h, x)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got, y)


CELLS = {
    "lstm": lambda **kw: rj.cells.lstm(8, **kw),
    "lstm_proj": lambda **kw: rj.cells.lstm(8, proj_size=4, **kw),
    "gru": lambda **kw: rj.cells.gru(8, **kw),
    "elman_relu": lambda **kw: rj.cells.elman(8, activation="relu", **kw),
}


@pytest.mark.parametrize("name", sorted(CELLS))
def test_sequences_and_gradients_stay_close_to_float32(name):
    """Over a padded batch, bfloat16 compute changes outputs and gradients by bfloat16 rounding
    only, and every output, carry and gradient is float32."""
    low, ref = CELLS[name](compute_dtype=BF16), CELLS[name]()
    params = ref.init(jax.random.key(0), 3)
    xs = jax.random.normal(jax.random.key(1), (4, 12, 3))
    lengths = jnp.array([12, 7, 1, 0])

    def loss(cell):
        def run(params):
            carry, ys = jax.vmap(lambda x, n: rj.scan(cell, params, x, length=n))(xs, lengths)
            return jnp.sum(ys**2) + sum(jnp.sum(c**2) for c in jax.tree.leaves(carry)), (carry, ys)

        return jax.jit(jax.value_and_grad(run, has_aux=True))

    (v_low, (c_low, ys_low)), g_low = loss(low)(params)
    (v_ref, (c_ref, ys_ref)), g_ref = loss(ref)(params)
    for a, b in zip(
        jax.tree.leaves((c_low, ys_low)), jax.tree.leaves((c_ref, ys_ref)), strict=True
    ):
        assert a.dtype == jnp.float32
        np.testing.assert_allclose(a, b, atol=3e-2)
    np.testing.assert_array_equal(ys_low[3], 0.0)  # padding is still exactly zero
    assert abs(float(v_low - v_ref)) < 2e-2 * float(v_ref)
    for key in g_ref:
        a, b = g_low[key], g_ref[key]
        assert a.dtype == jnp.float32 and bool(jnp.isfinite(a).all())
        assert float(jnp.linalg.norm(a - b)) < 5e-2 * float(jnp.linalg.norm(b)), key
    assert float(jnp.abs(ys_low - ys_ref).max()) > 0, "bfloat16 compute must change something"


def test_the_matmuls_really_run_in_bfloat16():
    cell = rj.cells.lstm(8, compute_dtype=BF16)
    params = cell.init(jax.random.key(0), 3)
    assert {v.dtype for v in params.values()} == {jnp.dtype(jnp.float32)}, "params stay float32"
    jaxpr = jax.make_jaxpr(lambda p, x: rj.scan(cell, p, x))(params, jnp.ones((5, 3)))
    dots = list(dot_generals(jaxpr.jaxpr))
    assert len(dots) == 2, jaxpr  # x @ w_i and h @ w_h, inside the scan
    for eqn in dots:
        assert [v.aval.dtype for v in eqn.invars] == [jnp.dtype(BF16)] * 2
        assert eqn.params["preferred_element_type"] == jnp.float32
        assert eqn.outvars[0].aval.dtype == jnp.float32


def dot_generals(jaxpr):
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            yield eqn
        for value in eqn.params.values():
            inner = getattr(value, "jaxpr", value)
            if hasattr(inner, "eqns"):
                yield from dot_generals(inner)


def test_bad_compute_dtypes_are_refused_with_the_fix():
    with pytest.raises(TypeError, match="compute_dtype to be None or a floating dtype.*int32"):
        rj.cells.lstm(4, compute_dtype=jnp.int32)
    with pytest.raises(TypeError, match="compute_dtype to be None or a floating dtype"):
        rj.cells.gru(4, compute_dtype="fast")
    with pytest.raises(ValueError, match="fused fast path computes in the params' dtype"):
        rj.cells.elman(4, compute_dtype=BF16, fused=True)


def test_rnnjax_train_precision_flag_builds_bfloat16_cells(tmp_path):
    """``rnnjax train --precision bfloat16``: the task's cells compute in bfloat16, its params
    stay float32, and a run directory written before the flag existed reads as float32."""
    from rnnjax import cli
    from rnnjax.cli import runs, train

    args = cli.parse(["train", "--task", "adding", "--precision", "bfloat16"])
    config = train.config_of(args)
    assert config["precision"] == "bfloat16"
    task = runs.build(config, tmp_path)
    assert {v.dtype for v in jax.tree.leaves(task.params)} == {jnp.dtype(jnp.float32)}
    batch = task.train_data(0)
    jaxpr = jax.make_jaxpr(lambda p: task.loss_fn(p, batch, None))(task.params)
    dots = list(dot_generals(jaxpr.jaxpr))
    recurrent = [e for e in dots if e.invars[0].aval.dtype == jnp.dtype(BF16)]
    assert len(recurrent) == 2 and len(dots) == 3  # x @ w_i and h @ w_h; the head is float32
    from rnnjax.tasks.base import make_cell

    old = {k: v for k, v in config.items() if k != "precision"}  # from before --precision
    cell = make_cell(old, 4)
    params = cell.init(jax.random.key(0), 2)
    step = jax.make_jaxpr(cell.step)(params, cell.initial_carry(params), jnp.ones(2))
    assert [e.invars[0].aval.dtype for e in dot_generals(step.jaxpr)] == [jnp.float32] * 2
    with pytest.raises(cli.CLIError, match="invalid choice: 'float16'"):
        cli.parse(["train", "--precision", "float16"])


def test_the_derivative_is_the_float32_matmuls_at_the_bfloat16_values():
    """Forward in bfloat16; tangents (and so the backward pass) are those of ``a @ w`` in
    float32, which measured faster on CPU than bfloat16-operand backward matmuls."""
    from rnnjax.cells._common import matmul

    a, w, da, dw = (
        jax.random.normal(jax.random.key(i), s) for i, s in enumerate([(3, 5), (5, 4)] * 2)
    )
    y, dy = jax.jvp(lambda a, w: matmul(a, w, BF16), (a, w), (da, dw))
    np.testing.assert_allclose(y, rounded(a) @ rounded(w), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(dy, da @ w + a @ dw, rtol=1e-6, atol=1e-6)
    g_w = jax.grad(lambda w: jnp.sum(matmul(a, w, BF16) ** 2))(w)  # a is data: no tangent
    np.testing.assert_allclose(g_w, a.T @ (2 * y), rtol=1e-5, atol=1e-5)
