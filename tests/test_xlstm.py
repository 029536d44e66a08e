"""xLSTM's sLSTM and mLSTM (Beck et al. 2024): the paper's equations written out in numpy, the
stabiliser at large pre-activations, mLSTM's chunkwise form against its step form, the sLSTM's
recurrent mask, float64 finite differences, errors, and parity with the NX-AI ``xlstm``
package's plain PyTorch code where it is installed."""

import contextlib
import io
import re

import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import rnnjax as rj

T, I, H, HEADS = 7, 3, 4, 2

# Three examples: a reset at a padded step (example 0, t=4), one all real, one all padding.
MASKS = np.array([[1, 1, 0, 1, 0, 1, 1], [1] * 7, [0] * 7], bool)
RESETS = np.array([[0, 0, 1, 0, 1, 0, 0], [1, 0, 0, 1, 0, 0, 1], [0, 1, 0, 0, 0, 1, 0]], bool)
LENGTHS = np.array([5, 7, 0])


def perturbed_params(cell, seed=0, dtype=jnp.float32, scale=0.4):
    params = cell.init(jax.random.key(seed), I)
    keys = iter(jax.random.split(jax.random.key(seed + 1), len(params)))
    return {
        name: (a + scale * jax.random.normal(next(keys), a.shape)).astype(dtype)
        for name, a in params.items()
    }


def random_carry(cell, params, seed, dtype=jnp.float32):
    """A finite starting carry: any (c, n, m) is a valid stabilised state."""
    zero = cell.initial_carry(params)
    keys = iter(jax.random.split(jax.random.key(seed), len(zero)))
    return type(zero)(*(jax.random.normal(next(keys), a.shape, dtype) for a in zero))


# The paper's equations, unstabilised, in float64 numpy (no rnnjax code).


def sigmoid(a):
    return 1 / (1 + np.exp(-a))


def numpy_mlstm(p, xs, heads, forget_gate, c0=None, n0=None, dtype=np.float64):
    """Paper eqs. (19)-(27): ``C_t = f C + i v k^T``, ``h~ = C q / max(|n^T q|, 1)``."""
    p = {k: np.asarray(v, dtype) for k, v in p.items()}
    size = p["w_q"].shape[1]
    d = size // heads
    big_c = np.zeros((heads, d, d), dtype) if c0 is None else np.array(c0, dtype)
    n = np.zeros((heads, d), dtype) if n0 is None else np.array(n0, dtype)
    ys = []
    for x in np.asarray(xs, dtype):
        y = np.zeros(size, dtype)
        for h in range(heads):
            cols = slice(h * d, (h + 1) * d)
            q, k, v, o = (x @ p[f"w_{g}"][:, cols] + p[f"b_{g}"][cols] for g in "qkvo")
            k = k / np.sqrt(dtype(d))
            i = np.exp(x @ p["w_i"][:, h] + p["b_i"][h])
            f_pre = x @ p["w_f"][:, h] + p["b_f"][h]
            f = sigmoid(f_pre) if forget_gate == "sigmoid" else np.exp(f_pre)
            big_c[h] = f * big_c[h] + i * np.outer(v, k)
            n[h] = f * n[h] + i * k
            y[cols] = sigmoid(o) * (big_c[h] @ q) / np.maximum(np.abs(n[h] @ q), 1)
        ys.append(y)
    return np.stack(ys), big_c, n


def numpy_slstm(p, xs, heads, forget_gate, dtype=np.float64):
    """Paper eqs. (7)-(14): ``c = f c + i z``, ``n = f n + i``, ``h = o c / n``, with
    ``i = exp(i~)`` and R block-diagonal (one ``(d, d)`` block per head and gate)."""
    p = {k: np.asarray(v, dtype) for k, v in p.items()}
    size = p["w_i"].shape[1] // 4
    d = size // heads
    h, c, n = (np.zeros(size, dtype) for _ in range(3))
    ys = []
    for x in np.asarray(xs, dtype):
        pre = (x @ p["w_i"]).reshape(4, size)
        for head in range(heads):
            cols = slice(head * d, (head + 1) * d)
            for gate in range(4):
                pre[gate, cols] += h[cols] @ p["w_h"][cols, gate, :] + p["b"][head, gate]
        f = sigmoid(pre[1]) if forget_gate == "sigmoid" else np.exp(pre[1])
        c = f * c + np.exp(pre[0]) * np.tanh(pre[2])
        n = f * n + np.exp(pre[0])
        h = sigmoid(pre[3]) * c / n
        ys.append(h)
    return np.stack(ys), c, n


def mlstm_cells(**kw):
    cell = rj.cells.mlstm(H, HEADS, **kw)
    return cell, cell._replace(sequence=None)


@pytest.mark.parametrize("forget_gate", ["sigmoid", "exp"])
def test_cells_follow_the_papers_equations(forget_gate):
    xs = np.asarray(jax.random.normal(jax.random.key(3), (T, I)))
    mlstm = rj.cells.mlstm(H, HEADS, forget_gate=forget_gate, eps=0.0, chunk_size=3)
    slstm = rj.cells.slstm(H, HEADS, forget_gate=forget_gate)
    p_m, p_s = perturbed_params(mlstm), perturbed_params(slstm)
    carry = random_carry(mlstm, p_m, seed=5)

    @jax.jit
    def run(p_m, p_s, xs, carry):
        """The mLSTM chunkwise and stepped from a given carry, the sLSTM from its own."""
        return [
            *(rj.scan(cell, p_m, xs, carry) for cell in (mlstm, mlstm._replace(sequence=None))),
            rj.scan(slstm, p_s, xs),
        ]

    results = run(p_m, p_s, xs, carry)
    # The given carry and the final states in the paper's units: C = exp(m) c^T, n = exp(m) n.
    m0 = np.exp(np.asarray(carry.m, np.float64))
    c0 = np.swapaxes(np.asarray(carry.c), 1, 2) * m0[:, None, None]
    ys, big_c, n = numpy_mlstm(p_m, xs, HEADS, forget_gate, c0, carry.n * m0[:, None])
    for final, got in results[:2]:
        scale = np.exp(np.asarray(final.m, np.float64))
        np.testing.assert_allclose(got, ys, rtol=2e-5, atol=2e-6)
        np.testing.assert_allclose(np.swapaxes(final.c, 1, 2) * scale[:, None, None], big_c, 2e-5)
        np.testing.assert_allclose(final.n * scale[:, None], n, rtol=2e-5)
    ys, c, n = numpy_slstm(p_s, xs, HEADS, forget_gate)
    for final, got in results[2:]:
        scale = np.exp(np.asarray(final.m, np.float64))
        np.testing.assert_allclose(got, ys, rtol=2e-5, atol=2e-6)
        np.testing.assert_allclose(final.c * scale, c, rtol=2e-5, atol=1e-6)
        np.testing.assert_allclose(final.n * scale, n, rtol=2e-5)
        np.testing.assert_allclose(final.h, ys[-1], rtol=2e-5, atol=2e-6)


def large_preactivations(cell, forget_gate):
    """Params whose input gates swing over about [-100, 100] and, for the exponential forget
    gate, forget pre-activations near 40: exp overflows float32 (past ~88) at every step."""
    params = perturbed_params(cell, seed=11)
    if "w_q" in params:  # mLSTM
        params["w_i"] = 40.0 * jnp.sign(params["w_i"] + 1e-3)
        params["b_i"] = params["b_i"] + 60.0
        if forget_gate == "exp":
            params["b_f"] = params["b_f"] + 40.0
        return params
    w_i = params["w_i"].at[:, :H].set(40.0 * jnp.sign(params["w_i"][:, :H]))
    b = params["b"].at[:, 0].add(60.0)
    if forget_gate == "exp":
        b = b.at[:, 1].add(40.0)
    return {**params, "w_i": w_i, "b": b}


@pytest.mark.parametrize("forget_gate", ["sigmoid", "exp"])
def test_the_stabiliser_keeps_large_preactivations_finite_and_exact(forget_gate):
    xs = np.asarray(jax.random.normal(jax.random.key(4), (T, I)))
    cells = {
        "mlstm": mlstm_cells(forget_gate=forget_gate, eps=0.0, chunk_size=3),
        "slstm": (rj.cells.slstm(H, HEADS, forget_gate=forget_gate),),
    }
    for name, group in cells.items():
        reference = numpy_mlstm if name == "mlstm" else numpy_slstm
        params = large_preactivations(group[0], forget_gate)
        ys = reference(params, xs, HEADS, forget_gate)[0]
        assert np.isfinite(ys).all()
        # The same equations unstabilised in float32 overflow: the stabiliser is what helps.
        with np.errstate(all="ignore"):
            assert not np.isfinite(
                reference(params, xs, HEADS, forget_gate, dtype=np.float32)[0]
            ).all()
        both = jax.jit(lambda p, x: [rj.scan(c, p, x)[1] for c in group])  # noqa: B023
        for got in both(params, xs):
            assert np.isfinite(got).all(), name
            np.testing.assert_allclose(got, ys, rtol=1e-4, atol=1e-5, err_msg=name)


# Each mode: (mask, reset, length) of one example -> rnnjax.scan keyword arguments.
MODES = {
    "reset_mask": lambda m, r, n: {"reset": r, "mask": m},
    "remat4_reverse_reset_length": lambda m, r, n: {
        "remat": 4,
        "reverse": True,
        "reset": r,
        "length": n,
    },
}


def values_and_gradients(cell, mode, **override):
    """Jitted ``(params, xs, carries, weights) ->`` the final carries, outputs and the
    gradient of a loss on both w.r.t. params, inputs and starting carries, over the batch
    (example 0 from ``initial_carry``, the others from the given carries)."""

    def loss(params, xs, carries, weights):
        fresh = cell.initial_carry(params)
        carries = jax.tree.map(lambda a, b: a.at[0].set(b), carries, fresh)

        def one(x, carry, m, r, n):
            return rj.scan(cell, params, x, carry, **{**MODES[mode](m, r, n), **override})

        final, ys = jax.vmap(one)(xs, carries, MASKS, RESETS, LENGTHS)
        total = jnp.sum(jnp.sin(ys) * weights[0])
        for leaf, w in zip(final, weights[1:], strict=True):
            total = total + jnp.sum(leaf * w)
        return total, (final, ys)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


def close(a, b, rtol, atol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_mlstm_chunkwise_equals_its_steps_values_and_gradients(mode):
    fast, steps = mlstm_cells(chunk_size=2)
    params = perturbed_params(fast)
    kwargs = MODES[mode](MASKS, RESETS, LENGTHS[:, None])
    real = kwargs.get("mask", np.arange(T) < kwargs.get("length", T))
    # NaN padding reaches neither a value nor a derivative.
    xs = jnp.where(real[..., None], jax.random.normal(jax.random.key(8), (3, T, I)), jnp.nan)
    carries = jax.vmap(lambda s: random_carry(fast, params, s))(jnp.arange(3))
    leaves = (jnp.zeros((3, T, H)), *jax.tree.leaves(carries))
    keys = jax.random.split(jax.random.key(9), len(leaves))
    weights = [jax.random.normal(k, a.shape) for k, a in zip(keys, leaves, strict=True)]
    args = (params, xs, carries, weights)
    (_, got), grads = values_and_gradients(fast, mode)(*args)
    # remat changes no value: the reference is the step scan without it.
    (_, want), want_grads = values_and_gradients(steps, mode, remat=False)(*args)
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves((got, grads)))
    close(got, want, 2e-5, 2e-6)
    close(grads, want_grads, 1e-4, 1e-5)
    ys = np.asarray(got[1])
    assert np.all(ys[~real] == 0) and np.all(ys[real] != 0)


def test_mlstm_every_chunk_size_equals_its_steps():
    cells = [rj.cells.mlstm(H, HEADS, chunk_size=k) for k in (1, 3, 64)]
    params = perturbed_params(cells[0])
    xs = jax.random.normal(jax.random.key(2), (T, I))
    carry = random_carry(cells[0], params, seed=1)
    cells.append(cells[0]._replace(sequence=None))
    run = jax.jit(lambda p, x, c: [rj.scan(cell, p, x, c, mask=MASKS[0]) for cell in cells])
    *results, want = run(params, xs, carry)
    for got in results:
        close(got, want, 2e-5, 2e-6)


def test_slstm_recurrent_mask_meets_h_where_it_meets_the_recurrent_weights():
    cell = rj.cells.slstm(H, HEADS)
    params = perturbed_params(cell)
    xs = jax.random.normal(jax.random.key(8), (T, I))
    keep = jnp.array([1.0, 0.0, 1.0, 0.0])
    no_r = {**params, "w_h": params["w_h"] * keep[:, None, None]}
    masked = cell._replace(step=lambda p, c, x: cell.step(p, c, x, recurrent_mask=keep))
    run = jax.jit(lambda: [rj.scan(masked, params, xs)[1], rj.scan(cell, no_r, xs)[1]])
    got, want = run()
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    layer = rj.layers.rnn(cell, recurrent_dropout=0.5)  # sizes its mask by w_h's first axis
    _, ys = jax.jit(layer.apply)(params, xs, key=jax.random.key(0))
    assert ys.shape == (T, H) and np.isfinite(ys).all()


def test_mlstm_a_non_finite_carry_stops_at_a_reset():
    fast, steps = mlstm_cells(chunk_size=4)
    params = perturbed_params(fast)
    xs = jax.random.normal(jax.random.key(8), (T, I))
    nan = jax.tree.map(lambda a: jnp.full_like(a, jnp.nan), fast.initial_carry(params))
    reset = jnp.arange(T) == 2  # mid-chunk

    run = jax.jit(lambda p, x, c: [rj.scan(cell, p, x, c, reset=reset) for cell in (fast, steps)])
    got, want = run(params, xs, nan)
    assert np.isnan(got[1][:2]).all() and np.isnan(want[1][:2]).all()
    close(got[0], want[0], 2e-5, 2e-6)
    close(got[1][2:], want[1][2:], 2e-5, 2e-6)
    assert np.isfinite(got[1][2:]).all()


def stored_by_bptt(cell, remat):
    """Elements of the arrays BPTT stores that the mLSTM's code made (not its arguments)."""
    params = perturbed_params(cell)
    xs = jax.random.normal(jax.random.key(1), (16, I))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        jax.ad_checkpoint.print_saved_residuals(
            lambda p: jnp.sum(rj.scan(cell, p, xs, remat=remat)[1] ** 2), params
        )
    shapes = re.findall(r"f32\[([\d,]*)\] output of .*rnnjax/cells/xlstm/", out.getvalue())
    return sum(int(np.prod([int(d) for d in s.split(",") if d])) for s in shapes)


def test_mlstm_remat_stores_less():
    cell = rj.cells.mlstm(8, HEADS, chunk_size=4)
    stored = {remat: stored_by_bptt(cell, remat) for remat in (False, True, 8, 16)}
    # Without remat every chunk's (L x L) weights stay; with it only the carry every chunk,
    # every two chunks (remat=8), or once (remat=16 = T).
    assert stored[False] > stored[True] > stored[8] > stored[16] > 0, stored


@pytest.mark.parametrize("name", ["mlstm", "slstm"])
def test_gradients_pass_check_grads_float64(name):
    with jax.enable_x64(True):
        kw = {"chunk_size": 3, "forget_gate": "exp"} if name == "mlstm" else {}
        cell = getattr(rj.cells, name)(H, HEADS, dtype=jnp.float64, **kw)
        params = perturbed_params(cell, seed=3, dtype=jnp.float64)
        xs = jax.random.normal(jax.random.key(4), (T, I), jnp.float64)
        carry = random_carry(cell, params, seed=6, dtype=jnp.float64)
        if name == "slstm":
            carry = carry._replace(n=jnp.abs(carry.n) + 0.5)  # a normaliser is positive
        mask, reset = jnp.asarray(MASKS[0]), jnp.asarray(RESETS[1])

        def loss(params, xs, carry):
            last, ys = rj.scan(cell, params, xs, carry, mask=mask, reset=reset, reverse=True)
            return jnp.sum(jnp.sin(ys)) + sum(jnp.sum(jnp.cos(leaf)) for leaf in last)

        # Reverse mode against central differences, at eps=1e-6: at check_grads' default step
        # the difference's own error (it falls as eps^2) exceeds 1e-6 on these exponentials.
        args = (params, xs, carry)
        check_grads(jax.jit(loss), args, 1, modes=("rev",), atol=1e-6, rtol=1e-6, eps=1e-6)


def test_errors_say_what_to_fix():
    for make in (rj.cells.mlstm, rj.cells.slstm):
        with pytest.raises(
            ValueError,
            match=r"hidden_size divisible by num_heads, got hidden_siz"
            r"e=6 and num_heads=4: .* use num_heads in \[1, 2, 3, 6\]",
        ):
            make(6, num_heads=4)
        with pytest.raises(ValueError, match="forget_gate must be one of 'sigmoid', 'exp'"):
            make(4, forget_gate="tanh")
        with pytest.raises(ValueError, match="num_heads to be a positive int, got 0"):
            make(4, num_heads=0)
        cell = make(4, 2)
        params = cell.init(jax.random.key(0), 3)
        name = make.__name__
        with pytest.raises(
            ValueError, match=rf"{name}.step expects x of shape \(3,\), got \(2, 3\)"
        ):
            cell.step(params, cell.initial_carry(params), jnp.ones((2, 3)))
        where = "mlstm.sequence expects xs of shape \\(T, 3\\), got \\(5, 2\\)"
        if name == "slstm":  # stepped
            where = "slstm.step expects x of shape \\(3,\\), got \\(2,\\): the params were made for"
        with pytest.raises(ValueError, match=where):
            rj.scan(cell, params, jnp.ones((5, 2)))
    with pytest.raises(ValueError, match="chunk_size to be a positive int, got 0"):
        rj.cells.mlstm(4, chunk_size=0)
    with pytest.raises(TypeError, match="recurrent_dropout needs a cell whose step accepts"):
        rj.layers.rnn(rj.cells.mlstm(4), recurrent_dropout=0.5)


def test_mlstm_equals_the_xlstm_packages_pytorch_backends():
    # the test extra installs torch and xlstm: a missing one fails here, never skips
    import torch
    from xlstm.blocks.mlstm import backends

    cell = rj.cells.mlstm(H, HEADS)  # eps=1e-6, as the reference backends
    params = perturbed_params(cell, seed=21)
    xs = np.asarray(jax.random.normal(jax.random.key(22), (T, I)))
    p = {k: np.asarray(v) for k, v in params.items()}

    def heads(a):  # (T, H) or (T, heads) -> (1, heads, T, d or 1)
        return torch.tensor(a.reshape(T, HEADS, -1).transpose(1, 0, 2)[None].copy())

    q, k, v = (heads(xs @ p[f"w_{g}"] + p[f"b_{g}"]) for g in "qkv")
    i_pre, f_pre = (heads(xs @ p[f"w_{g}"] + p[f"b_{g}"]) for g in "if")
    d = H // HEADS
    c, n, m = torch.zeros(1, HEADS, d, d), torch.zeros(1, HEADS, d, 1), torch.zeros(1, HEADS, 1, 1)
    stepped = []
    with torch.no_grad():
        for t in range(T):
            at = lambda a: a[:, :, t : t + 1].clone()  # noqa: E731, B023
            h, (c, n, m) = backends.recurrent_step_stabilized_simple(
                c, n, m, at(q), at(k), at(v), at(i_pre), at(f_pre)
            )
            stepped.append(h[0, :, 0].numpy().reshape(-1))
        parallel = backends.parallel_stabilized_simple(q, k, v, i_pre, f_pre)
    gate = 1 / (1 + np.exp(-(xs @ p["w_o"] + p["b_o"])))
    stepped = gate * np.stack(stepped)
    parallel = gate * parallel[0].numpy().transpose(1, 0, 2).reshape(T, H)
    both = jax.jit(lambda p, x: [rj.scan(c, p, x) for c in (cell, cell._replace(sequence=None))])
    for final, ys in both(params, xs):
        np.testing.assert_allclose(ys, stepped, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(final.c, c[0].numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(final.n, n[0, :, :, 0].numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(final.m, m[0, :, 0, 0].numpy(), rtol=1e-6)
        # The parallel backend stabilises without the zero state's m = 0, which moves only
        # where eps meets the denominator.
        np.testing.assert_allclose(ys, parallel, rtol=1e-4, atol=1e-5)


def test_slstm_equals_the_xlstm_packages_vanilla_cell():
    import torch
    from xlstm.blocks.slstm import cell as reference

    cell = rj.cells.slstm(H, HEADS)
    params = perturbed_params(cell, seed=23)
    xs = np.asarray(jax.random.normal(jax.random.key(24), (T, I)))
    config = reference.sLSTMCellConfig(
        hidden_size=H, num_heads=HEADS, backend="vanilla", dtype="float32"
    )
    module = reference.sLSTMCell_vanilla(config)
    d = H // HEADS
    w_h = torch.tensor(np.asarray(params["w_h"]).reshape(HEADS, d, 4, d))
    module._recurrent_kernel_.data = module._recurrent_kernel_ext2int(w_h)
    module._bias_.data = module._bias_ext2int(torch.tensor(np.asarray(params["b"])))
    with torch.no_grad():
        out, state = module(torch.tensor(xs @ np.asarray(params["w_i"]))[None])
    want = out[0].numpy().transpose(1, 0, 2).reshape(T, H)  # (heads, T, d) -> (T, H)
    final, ys = jax.jit(lambda p, x: rj.scan(cell, p, x))(params, xs)
    np.testing.assert_allclose(ys, want, rtol=1e-5, atol=1e-6)
    for got, ref in zip(final, state[:, 0].numpy(), strict=True):  # (h, c, n, m)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
