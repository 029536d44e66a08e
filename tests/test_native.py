"""rnnjax's compiled CPU LSTM and GRU kernels (rnnjax/_native, rnnjax.cells._native).

``rj.cells.lstm`` and ``rj.cells.gru`` run whole sequences with them by default on the CPU; the
same cell with ``native=False`` is the plain step-by-step ``lax.scan``, itself checked against
stepping by hand, PyTorch and finite differences elsewhere (``tests/test_reference.py`` compares
the default, native, cells with PyTorch's ``nn.LSTM``/``nn.GRU`` on packed and reversed
batches). Here: the kernels are built and taken, values and every kind of derivative equal the
step scan's, batching in all its forms, the fallbacks, PyTorch, and errors.

An install without the kernels (no C++ compiler, or ``RNNJAX_NATIVE_BUILD=0``: setup.py warns
and builds nothing) has nothing here to test: the tests that need them skip and say why
(``rnnjax._native.unavailable_reason()``), except test_the_kernels_are_built_and_loaded, which
fails where the kernels are expected (``RNNJAX_EXPECT_NATIVE=1``: CI's README install, .ci/run).
"""

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from cases import batched_scan, derivatives, perturbed

import rnnjax as rj
from rnnjax import _native
from rnnjax.cells import _native as native_kernels

T, I, H, B = 6, 3, 5, 4
LENGTHS = np.array([T, 2, 0, 5])
MODES = {
    "full": {},
    "reverse": {"reverse": True},
    "length": {"length": True},
    "reverse_length": {"reverse": True, "length": True},
    "mask": {"mask": np.array([True, False, True, True, False, True])},
    # remat: checkpointed kernels (the carry every k steps, segments recomputed)
    "length_remat": {"length": True, "remat": 4},
    "reverse_remat": {"reverse": True, "remat": "sqrt"},
}
TOL = 2e-5  # float32: the kernels sum in another order than XLA
CELLS = {"lstm": rj.cells.lstm, "gru": rj.cells.gru}
EXPECTED = os.environ.get("RNNJAX_EXPECT_NATIVE") == "1"  # CI's README install (.ci/run)
needs_kernels = pytest.mark.skipif(
    not _native.available(), reason=f"no native kernels here: {_native.unavailable_reason()}"
)


@pytest.fixture(params=["own", "onednn"])
def path(request, monkeypatch):
    """Which kernels run unmasked sequences: rnnjax's loops (the tests' small sizes are below
    oneDNN's thresholds) or oneDNN's primitives (thresholds lowered to 0)."""
    if request.param == "own":
        yield "own"
        return
    if not _native.onednn():
        pytest.skip(f"rnnjax was built without oneDNN here: {_native.unavailable_reason()}")
    for key in native_kernels.ONEDNN_MIN_UNITS:
        monkeypatch.setitem(native_kernels.ONEDNN_MIN_UNITS, key, 0)
    jax.clear_caches()  # no program traced under the other thresholds is reused
    yield "onednn"
    jax.clear_caches()


def setup(seed=0, name="lstm"):
    cell = CELLS[name](H)
    return cell, *perturbed(cell, B, T, I, seed=seed)


def batched_run(cell, mode):
    kw = dict(MODES[mode])
    return batched_scan(cell, LENGTHS, use_length=kw.pop("length", False), **kw)


def loss_of(run):
    def loss(params, xs, carry):
        final, ys = run(params, xs, carry)
        return jnp.sum(jnp.sin(ys)) + sum(jnp.sum(jnp.cos(c) * c) for c in jax.tree.leaves(final))

    return loss


def assert_close(a, b, tol=TOL):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        scale = max(1.0, float(np.abs(np.asarray(y)).max(initial=0.0)))
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=tol * scale, rtol=0)


def test_the_kernels_are_built_and_loaded():
    """The README's install compiles them; CI must exercise them, not the fallback: where
    RNNJAX_EXPECT_NATIVE=1 (.ci/run) this fails without them, elsewhere it skips."""
    if not EXPECTED and not _native.available():
        pytest.skip(f"no native kernels here: {_native.unavailable_reason()}")
    assert _native.available(), _native.unavailable_reason()
    assert _native.library_path() is not None
    assert native_kernels.ready()


def _hlo(fn, *args):
    return jax.jit(fn).lower(*args).compile().as_text()


@needs_kernels
def test_the_default_lstm_runs_the_kernels_forward_and_backward():
    cell, params, xs, carry = setup()
    run = batched_run(cell, "length")
    hlo = _hlo(jax.grad(loss_of(run)), params, xs, carry)
    assert 'custom_call_target="rnnjax_lstm_forward"' in hlo
    assert 'custom_call_target="rnnjax_lstm_backward"' in hlo
    assert "while" not in hlo  # no XLA loop left: the recurrence is native both ways
    plain = batched_run(rj.cells.lstm(H, native=False), "length")
    plain_hlo = _hlo(jax.grad(loss_of(plain)), params, xs, carry)
    assert "rnnjax_lstm" not in plain_hlo and "while" in plain_hlo


@needs_kernels
def test_large_steps_pick_their_loop():
    """A masked forward pass alone with batch * hidden >= INFERENCE_MAX_UNITS runs the kernels'
    loop where they do their matmuls with oneDNN, and XLA's loop where they would use OpenBLAS
    (measured faster there); its gradient runs the kernels either way. Unmasked, inference
    is lowered for oneDNN's RNN primitive (when built with it; the AVX-512 loops take it
    instead where built: test_avx512_loops_equal_the_other_loops_and_the_reference) and
    training for rnnjax's loops, never the primitive (ONEDNN_MIN_UNITS). Values agree in every
    case."""
    b, h = 128, native_kernels.INFERENCE_MAX_UNITS // 128
    cell = rj.cells.lstm(h)
    params = cell.init(jax.random.key(0), I)
    xs = jax.random.normal(jax.random.key(1), (b, 2, I))
    lengths = jnp.full((b,), 2)

    def run(params, xs, lengths):
        return jax.vmap(lambda x, n: rj.scan(cell, params, x, length=n)[1])(xs, lengths)

    def loss(params, xs, lengths):
        return jnp.sum(run(params, xs, lengths) ** 2)

    forward = _hlo(run, params, xs, lengths)
    assert ("rnnjax_lstm_forward" in forward) == _native.onednn()
    assert ("while" in forward) == (not _native.onednn())
    assert "rnnjax_lstm_forward" in _hlo(jax.grad(loss), params, xs, lengths)
    step = jax.vmap(lambda x: rj.scan(cell._replace(sequence=None), params, x)[1])(xs)
    assert_close(jax.jit(run)(params, xs, lengths), step)

    def unmasked(params, xs):
        return jax.vmap(lambda x: rj.scan(cell, params, x)[1])(xs)

    dense = _hlo(unmasked, params, xs)
    assert ("rnnjax_lstm_forward" in dense) == _native.onednn()
    assert ("dense = true" in dense) == _native.onednn()
    assert_close(jax.jit(unmasked)(params, xs), step)
    grad = _hlo(jax.grad(lambda p, x: jnp.sum(unmasked(p, x) ** 2)), params, xs)
    assert "rnnjax_lstm_backward" in grad and "dense = true" not in grad


@needs_kernels
def test_which_cells_get_the_native_path():
    assert rj.cells.gru(H).sequence is not None
    assert rj.cells.gru(H, native=False).sequence is None
    assert rj.cells.gru(H, reset_after=False).sequence is None
    assert rj.cells.elman(H).sequence is None
    assert rj.cells.lstm(H).sequence is not None
    assert rj.cells.lstm(H, native=False).sequence is None
    assert rj.cells.lstm(H, native=True).sequence is not None
    # Options the kernels do not cover keep their own paths.
    assert rj.cells.lstm(H, proj_size=2).sequence is None
    assert rj.cells.lstm(H, compute_dtype=jnp.bfloat16).sequence is None
    fused = rj.cells.lstm(H, fused=True)
    _, params, xs, carry = setup()
    text = str(jax.make_jaxpr(batched_run(fused, "length"))(params, xs, carry))
    assert "rnnjax_lstm" not in text


@needs_kernels
@pytest.mark.parametrize(
    ("name", "mode", "path"),
    [(n, m, "own") for n in CELLS for m in MODES]
    # oneDNN runs unmasked sequences only
    + [(n, m, "onednn") for n in CELLS for m in ("full", "reverse")],
    indirect=["path"],
)
def test_native_equals_step_scan_to_second_order(name, mode, path):
    cell, args, tangent = second_order_operands(name)
    run = batched_run(cell, mode)
    fast = derivatives(run, loss_of(run))(args, tangent)
    assert_close(fast, step_scan_second_order(name, mode))


def second_order_operands(name):
    cell, params, xs, carry = setup(name=name)
    args = (params, xs, carry)
    tangent = jax.tree.map(lambda a: jnp.cos(jnp.arange(a.size).reshape(a.shape)), args)
    return cell, args, tangent


@functools.cache
def step_scan_second_order(name, mode):
    """The step scan's derivatives, computed once for both kernel paths (it runs no kernel)."""
    cell, args, tangent = second_order_operands(name)
    step = batched_run(cell._replace(sequence=None), mode)
    return jax.device_get(derivatives(step, loss_of(step))(args, tangent))


@needs_kernels
@pytest.mark.parametrize("name", list(CELLS))
def test_per_example_gradients_and_nested_vmap(name, path):
    """vmap of grad (per-example weight gradients: the kernels' summed weight gradients do not
    apply, the references run) and a vmap of a vmap (folded into one batch)."""
    cell, params, xs, carry = setup(name=name)

    def per_example(cell):
        def one(x, n):
            return jax.grad(lambda p: jnp.sum(jnp.sin(rj.scan(cell, p, x, carry, length=n)[1])))(
                params
            )

        return jax.jit(jax.vmap(one))(xs, jnp.asarray(LENGTHS))

    assert_close(per_example(cell), per_example(cell._replace(sequence=None)))

    def nested(cell):
        def run(p, x):
            return jax.vmap(jax.vmap(lambda x: rj.scan(cell, p, x)[1]))(x)

        def loss(p, x):
            return jnp.sum(jnp.sin(run(p, x)))

        x2 = xs.reshape(2, 2, T, I)
        return jax.jit(run)(params, x2), jax.jit(jax.grad(loss))(params, x2)

    assert_close(nested(cell), nested(cell._replace(sequence=None)))


@needs_kernels
@pytest.mark.parametrize("name", list(CELLS))
def test_vmap_over_params_falls_back_to_the_references(name):
    """An ensemble (vmap over params): per-example weights have no kernel; same results."""
    cell, params, xs, carry = setup(name=name)
    ensemble = jax.tree.map(lambda a: jnp.stack([a, 0.5 * a]), params)

    def run(cell):
        f = lambda p: jnp.sum(jnp.tanh(rj.scan(cell, p, xs[0], carry)[1]))  # noqa: E731
        return jax.jit(jax.vmap(jax.value_and_grad(f)))(ensemble)

    assert_close(run(cell), run(cell._replace(sequence=None)))


def kernel_operands(name, b, h, *, seed, dense, scale=0.4):
    """A cell's primitives and random operands for them over ``b`` rows of ``h`` units, T steps
    of I inputs: x, the weights (w_i, b, w_h, ...; w_h's entries ``scale`` times standard
    normal ones), the initial state and the mask (all True when ``dense``, else about 30% of
    steps padding). The primitives lower to the kernels from here on (``ready`` registers that
    lowering; before it, they lower to their references). Drawn with NumPy: JAX's eager draws
    compile a program per new shape, a third of the AVX-512 test's time over its 20 shapes."""
    assert native_kernels.ready()
    kernels = native_kernels.LSTM if name == "lstm" else native_kernels.GRU
    g = 4 if name == "lstm" else 3
    rng = np.random.default_rng(seed)

    def normal(*shape, std=1.0):
        return jnp.asarray(np.float32(std) * rng.standard_normal(shape, np.float32))

    x = normal(b, T, I)
    w_i = normal(I, g * h, std=0.5)
    w_h = normal(h, g * h, std=scale)
    biases = [normal(g * h, std=0.1) for _ in range(kernels.n_weights - 2)]
    weights = (w_i, biases[0], w_h, *biases[1:])
    state = tuple(normal(b, h) for _ in range(kernels.n_state))
    mask = jnp.asarray(np.ones((b, T), bool) if dense else rng.uniform(size=(b, T)) > 0.3)
    return kernels, x, weights, state, mask


@needs_kernels
@pytest.mark.parametrize("checkpoint", [0, 4], ids=["all_steps", "checkpoint4"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("name", list(CELLS))
def test_kernels_equal_the_reference_primitives(name, reverse, checkpoint, path):
    """The C++ forward and backward against the pure-JAX references they are tested by
    (the same functions are the lowering off the CPU), and the backward is the transpose of
    the tangent. On the oneDNN path (no mask) the saved workspace is opaque: the references
    recompute the forward pass instead of reading it. Checkpointed passes (``checkpoint=4``,
    remat's: the carry every 4 steps of T = 6, so the last segment is short) run rnnjax's
    loops even where oneDNN would run (no mask, thresholds 0), save the checkpoints, and their
    backward equals the one that saved every step."""
    dense = path == "onednn"
    kernels, x, weights, state, mask = kernel_operands(name, B, H, seed=3, dense=dense)
    args = (x, *weights, *state, mask)
    modes = {"reverse": reverse, "checkpoint": checkpoint}

    def forward(*a, checkpoint=checkpoint):
        return kernels.forward.bind(*a, save=True, reverse=reverse, dense=dense,
                                    checkpoint=checkpoint)  # fmt: skip

    out = tuple(jax.jit(forward)(*args))
    expected = native_kernels.reference(kernels.forward)(*args, dense=dense, **modes)
    assert [o.shape for o in out] == [e.shape for e in expected]
    onednn = dense and not checkpoint
    assert native_kernels._workspace(out[-1]) == onednn  # which residuals were saved
    if checkpoint:  # the carry entering steps 0 and 4 of the pass, for each example
        assert out[-1].shape == (B, -(-T // checkpoint), kernels.n_state * H)
    kept = 1 + kernels.n_state if onednn else len(out)  # the workspace is oneDNN's business
    assert_close(out[:kept], tuple(expected)[:kept])
    cts = (jnp.sin(out[0]), *(0.3 * s for s in state))
    rest = (*args, *out)
    bwd = jax.jit(lambda *a: kernels.backward.bind(*a, need_dx=True, **modes))
    got = tuple(bwd(*cts, *rest))
    backward = native_kernels.reference(kernels.backward)
    assert_close(got, tuple(backward(*cts, *rest, need_dx=True, **modes)))
    if checkpoint:
        every_step = (*args, *jax.jit(functools.partial(forward, checkpoint=0))(*args))
        plain = jax.jit(lambda *a: kernels.backward.bind(*a, need_dx=True, reverse=reverse))
        assert_close(got, tuple(plain(*cts, *every_step)))

    def tangent(*d):
        return native_kernels.reference(kernels.tangent)(*d, *rest, **modes)

    transpose = jax.linear_transpose(tangent, x, *weights, *state)
    assert_close(got, tuple(transpose(cts)))


@needs_kernels
@pytest.mark.parametrize("name", list(CELLS))
def test_loops_with_onednn_matmul_equal_openblas_and_the_references(name, monkeypatch):
    """With a step of 4096 units or more (batch rows x hidden units) rnnjax's loops do their
    matmuls with oneDNN (weights packed once per pass, the gates on all cores, on the oneDNN
    thread); below, and with RNNJAX_ONEDNN_MATMUL=0 (read per call), OpenBLAS's sgemm. Both
    ways give the references' values for the forward pass (saving every step, checkpoints, or
    nothing), the backward pass and the replay of a remat scan, on padded sequences, both
    directions."""
    if not _native.onednn():
        pytest.skip(f"rnnjax was built without oneDNN here: {_native.unavailable_reason()}")
    monkeypatch.setenv("RNNJAX_AVX512", "0")  # the loops' forward passes, not the AVX-512 ones
    b, h = 512, 8  # 4096 units
    kernels, x, weights, state, mask = kernel_operands(name, b, h, seed=5, dense=False)
    args = (x, *weights, *state, mask)

    def both(fn, *a):
        """fn's outputs with oneDNN's matmul, after checking they equal OpenBLAS's."""
        monkeypatch.setenv("RNNJAX_ONEDNN_MATMUL", "0")
        blas = tuple(fn(*a))
        monkeypatch.delenv("RNNJAX_ONEDNN_MATMUL")
        dnnl = tuple(fn(*a))
        assert_close(dnnl, blas)
        return dnnl

    for reverse in (False, True):
        for save, checkpoint in ((True, 0), (True, 4), (False, 0)):
            modes = {"reverse": reverse, "checkpoint": checkpoint}
            forward = jax.jit(functools.partial(
                kernels.forward.bind, save=save, dense=False, **modes))  # fmt: skip
            out = both(forward, *args)
            expected = native_kernels.reference(kernels.forward)(*args, save=save, dense=False,
                                                                 **modes)  # fmt: skip
            assert_close(out, tuple(expected))
            if not save:
                continue
            cts = (jnp.sin(out[0]), *(0.3 * s for s in state))
            bwd = jax.jit(functools.partial(kernels.backward.bind, need_dx=True, **modes))
            got = both(bwd, *cts, *args, *out)
            backward = native_kernels.reference(kernels.backward)
            assert_close(got, tuple(backward(*cts, *args, *out, need_dx=True, **modes)))

    cell = CELLS[name](h)
    params = cell.init(jax.random.key(6), I)
    lengths = jnp.asarray(np.arange(b) % (T + 1))

    def loss(cell, params, x):
        ys = jax.vmap(lambda x, n: rj.scan(cell, params, x, length=n, remat="sqrt")[1])(x, lengths)
        return jnp.sum(jnp.sin(ys))

    value_and_grad = jax.jit(jax.value_and_grad(functools.partial(loss, cell), (0, 1)))
    hlo = value_and_grad.lower(params, x).compile().as_text()
    assert f"rnnjax_{name}_replay" in hlo
    plain = functools.partial(loss, cell._replace(sequence=None))
    step = jax.jit(jax.value_and_grad(plain, (0, 1)))
    assert_close(both(value_and_grad, params, x), tuple(step(params, x)))


# (batch rows, hidden units) for the AVX-512 loops, covering how they split a pass (fused.cc:
# FusedThreads, FusedByRows on a 2-core machine) and every row-tile height 1-6: one thread
# (below 256 units), by rows (H <= 128, or 2 x 6 rows per thread), by panels (H > 128 and few
# rows), hidden sizes that are not a multiple of 16 (a partial panel). The last two have steps
# of 4096 units or more, where training's forward pass runs them too (with oneDNN).
AVX512_SHAPES = [(1, 5), (3, 20), (12, 16), (16, 20), (40, 20), (2, 200), (4, 150), (30, 130)]
AVX512_SHAPES += [(256, 20), (8, 520)]


def cpu_has_avx512() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return " avx512f" in f.read()
    except OSError:
        return False


def forward_references(kernels, every, args):
    """The reference forward pass over ``args`` in each of the ``every`` modes, as one program:
    one compile, not one per mode (the same values as separate calls)."""
    reference = native_kernels.reference(kernels.forward)
    return jax.jit(lambda *a: [reference(*a, **modes) for modes in every])(*args)


@needs_kernels
@pytest.mark.parametrize("name", list(CELLS))
def test_avx512_loops_equal_the_other_loops_and_the_reference(name, monkeypatch):
    """Forward passes that save nothing (inference) or every step (training, not
    checkpointed, steps of 4096 units or more, with oneDNN) run the AVX-512 loops where the
    kernels were compiled for such a CPU (the default build on this one; the kernels count the
    passes they run); with RNNJAX_AVX512=0 (read per call) the same compiled program runs what
    ran before: oneDNN's RNN primitive for unmasked inference (in builds with oneDNN), rnnjax's
    loops otherwise. Both equal the reference primitive, outputs, final carry and saved
    residuals, for every way the loops split their work, both directions, padded and
    unpadded."""
    if not cpu_has_avx512() or os.environ.get("RNNJAX_NATIVE_CFLAGS"):
        pytest.skip("the AVX-512 loops are compiled for CPUs with AVX-512 (-march=native)")
    assert _native.avx512()
    monkeypatch.delenv("RNNJAX_AVX512", raising=False)
    for b, h in AVX512_SHAPES:
        for dense in (True, False):
            # w_h at most 2 / sqrt(h): pre-activations of a few units, as initializers make them
            # (at 0.4, those of 520 units summed 523 terms of ~9 and differed by 8e-5)
            kernels, x, weights, state, mask = kernel_operands(
                name, b, h, seed=b, dense=dense, scale=min(0.4, 2 / h**0.5)
            )
            args = (x, *weights, *state, mask)
            every = []
            for reverse, save in ((False, False), (True, False), (not dense, True)):
                modes = {"reverse": reverse, "save": save, "checkpoint": 0}
                modes["dense"] = dense and not save and _native.onednn()
                every.append(modes)
            references = forward_references(kernels, every, args)
            for modes, expected in zip(every, references, strict=True):
                save = modes["save"]
                forward = jax.jit(functools.partial(kernels.forward.bind, **modes))
                passes = _native.avx512_passes()
                fused = tuple(jax.block_until_ready(forward(*args)))
                fused_ran = not save or (b * h >= 4096 and _native.onednn())
                assert _native.avx512_passes() == passes + fused_ran
                monkeypatch.setenv("RNNJAX_AVX512", "0")
                other = tuple(jax.block_until_ready(forward(*args)))
                monkeypatch.delenv("RNNJAX_AVX512")
                assert _native.avx512_passes() == passes + fused_ran
                assert fused[0].shape == (b, T, h)
                assert_close(fused, tuple(expected))
                assert_close(other, tuple(expected))


@needs_kernels
@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_matches_torch_with_packed_lengths(kind):
    """Forward, final states and BPTT gradients against nn.LSTM / nn.GRU."""
    b, t, i, h = 3, 11, 7, 33
    torch.manual_seed(0)
    module = getattr(torch.nn, kind)(i, h, batch_first=True)
    layer, params = rj.interop.torch.from_torch(module)
    x = np.random.default_rng(0).normal(size=(b, t, i)).astype(np.float32)
    lengths = np.array([11, 4, 7])
    xt = torch.tensor(x, requires_grad=True)
    packed = torch.nn.utils.rnn.pack_padded_sequence(
        xt, lengths, batch_first=True, enforce_sorted=False
    )
    out, state = module(packed)
    hn = state[0] if kind == "LSTM" else state
    yt, _ = torch.nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=t)
    (torch.sin(yt).sum() + (hn**2).sum()).backward()

    def loss(params, x):
        carry, ys = jax.vmap(lambda x, n: layer.apply(params, x, length=n))(x, lengths)
        h_last = carry[0].h if kind == "LSTM" else carry[0]
        return jnp.sum(jnp.sin(ys)) + jnp.sum(h_last**2), ys

    (_, ys), (gp, gx) = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(params, x)
    assert_close(ys, yt.detach().numpy(), tol=1e-5)
    assert_close(gx, xt.grad.numpy(), tol=1e-5)
    assert_close(gp[0]["w_h"], module.weight_hh_l0.grad.numpy().T, tol=1e-5)
    assert_close(gp[0]["w_i"], module.weight_ih_l0.grad.numpy().T, tol=1e-5)
    if kind == "LSTM":
        assert_close(gp[0]["b"], module.bias_ih_l0.grad.numpy(), tol=1e-5)
    else:
        assert_close(gp[0]["b_i"], module.bias_ih_l0.grad.numpy(), tol=1e-5)
        assert_close(gp[0]["b_h"], module.bias_hh_l0.grad.numpy(), tol=1e-5)
    assert f"rnnjax_{kind.lower()}_forward" in str(jax.make_jaxpr(loss)(params, x))


@needs_kernels
@pytest.mark.parametrize("name", list(CELLS))
def test_layers_bidirectional_stack_and_fallbacks_agree(name):
    """A bidirectional stack with dropout (recurrent dropout and remat fall back to the step
    scan inside the same model) equals the model built from native=False cells."""
    _, params, xs, _ = setup()

    def model(native):
        cell = lambda: CELLS[name](H, native=native)  # noqa: E731
        return rj.layers.stack(
            rj.layers.bidirectional(rj.layers.rnn(cell()), rj.layers.rnn(cell())),
            rj.layers.rnn(cell(), recurrent_dropout=0.3),
            rj.layers.rnn(cell(), remat="sqrt"),
        )

    fast, slow = model(None), model(False)
    p = fast.init(jax.random.key(4), I)
    key = jax.random.key(6)

    def loss(layer):
        def f(p):
            ys = jax.vmap(lambda x, n, k: layer.apply(p, x, length=n, key=k)[1])(
                xs, jnp.asarray(LENGTHS), jax.random.split(key, B)
            )
            return jnp.sum(jnp.sin(ys))

        return jax.jit(jax.value_and_grad(f))

    assert_close(loss(fast)(p), loss(slow)(p))
    assert f"rnnjax_{name}_forward" in str(jax.make_jaxpr(loss(fast))(p))


@needs_kernels
@pytest.mark.parametrize("name", list(CELLS))
def test_empty_sequence_and_batch(name):
    cell, params, _, carry = setup(name=name)
    final, ys = rj.scan(cell, params, jnp.zeros((0, I)), carry)
    assert ys.shape == (0, H)
    assert_close(final, carry)
    ys = jax.vmap(lambda x: rj.scan(cell, params, x)[1])(jnp.zeros((0, T, I)))
    assert ys.shape == (0, T, H)


def test_errors_name_what_was_expected():
    with pytest.raises(TypeError, match="native to be None, True or False, got 'yes'"):
        rj.cells.lstm(H, native="yes")
    with pytest.raises(ValueError, match=r"gru\(native=True\) with reset_after=False"):
        rj.cells.gru(H, native=True, reset_after=False)
    for kw, what in [
        ({"proj_size": 2}, "proj_size=2"),
        ({"compute_dtype": jnp.bfloat16}, "compute_dtype=bfloat16"),
        ({"fused": True}, "fused=True"),
        ({"dtype": jnp.float16}, "dtype=float16"),
    ]:
        with pytest.raises(ValueError, match=rf"lstm\(native=True\) with {what}"):
            rj.cells.lstm(H, native=True, **kw)
    cell, params, _, _ = setup()
    with pytest.raises(ValueError, match=r"lstm.step expects x of shape \(3,\), got \(5,\)"):
        rj.scan(cell, params, jnp.ones((T, 5)))


@needs_kernels
def test_float64_runs_the_step_scan_and_native_true_refuses_it():
    """float64 params and inputs cannot run on float32 kernels: native=True says so, the
    default falls back to the step scan."""
    _, params, _, _ = setup()
    with jax.enable_x64(True):
        x64 = jnp.ones((T, I), jnp.float64)
        p64 = jax.tree.map(lambda a: a.astype(jnp.float64), params)
        with pytest.raises(TypeError, match=r"runs float32 only, got .*float64"):
            rj.scan(rj.cells.lstm(H, native=True), p64, x64)
        _, ys = rj.scan(rj.cells.lstm(H), p64, x64)
        assert ys.dtype == jnp.float64


def test_switched_off_by_the_environment():
    """RNNJAX_NATIVE=0 (in a real subprocess): unavailable with the reason, default cells run
    the step scan, native=True refuses."""
    code = (
        "import jax, jax.numpy as jnp, rnnjax as rj\n"
        "from rnnjax import _native\n"
        "print(_native.available(), _native.unavailable_reason())\n"
        "cell = rj.cells.lstm(4)\n"
        "p = cell.init(jax.random.key(0), 3)\n"
        "run = lambda p: rj.scan(cell, p, jnp.ones((5, 3)))\n"
        "print('rnnjax_lstm' in str(jax.make_jaxpr(run)(p)))\n"
        "try:\n"
        "    rj.cells.lstm(4, native=True)\n"
        "except RuntimeError as err:\n"
        "    print(err)\n"
    )
    env = {**os.environ, "RNNJAX_NATIVE": "0", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "False switched off by RNNJAX_NATIVE=0"
    assert lines[1] == "False"
    assert "native CPU kernels are unavailable: switched off by RNNJAX_NATIVE=0" in lines[2]
