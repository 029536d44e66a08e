"""Every branch of the native kernels' dispatch is reached, and equals the reference there.

docs/native.md has the dispatch table; each row here sets up one branch (a size, a mask, remat,
a switch read per call, a threshold read when tracing), runs hypothesis examples with special
values through it as tests/test_differential.py does, and asserts with the kernels' pass
counters (``rnnjax._native.passes()``) that the branch ran. A test also checks that the rows
name every counter, so a new branch without a row fails.
"""

import contextlib
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from differential import Config, assert_same, compare, draw_args, program
from hypothesis import given, settings
from hypothesis import strategies as st

import rnnjax as rj
from rnnjax import _native
from rnnjax.cells._native import lowering, thresholds

pytestmark = pytest.mark.skipif(
    not _native.available(), reason=f"no native kernels: {_native.unavailable_reason()}"
)


class Branch(NamedTuple):
    """One row of the dispatch table: the sizes and options, the switches (environment
    variables, read per call; ``onednn_training``: oneDNN's primitive for training too, a
    threshold read when tracing), the counters that must move and those that must not."""

    batch: int
    hidden: int
    masking: str = "mask"
    remat: bool | int | str = False
    env: tuple = ()
    moves: tuple = ()
    still: tuple = ()
    needs: str = ""  # "onednn", "avx512", "avx512+onednn": what the branch needs built
    onednn_training: bool = False


OFF = (("RNNJAX_AVX512", "0"),)
# A third of the profile's examples per branch (each branch is also in test_differential's
# draws; here the point is that it runs, and on special values): 2 in CI.
EXAMPLES = max(2, settings.default.max_examples // 3)
BRANCHES = {
    # rnnjax's loops with OpenBLAS: under 4096 units per step (or RNNJAX_ONEDNN_MATMUL=0)
    "loops": Branch(2, 5, env=OFF, moves=("loops_forward", "loops_backward"),
                    still=("avx512", "loops_onednn_matmul")),
    "loops_openblas_by_switch": Branch(64, 64, env=(*OFF, ("RNNJAX_ONEDNN_MATMUL", "0")),
                                       moves=("loops_forward",), still=("loops_onednn_matmul",)),
    # ... with oneDNN's matmul from 4096 units
    "loops_onednn_matmul": Branch(64, 64, env=OFF, needs="onednn",
                                  moves=("loops_forward", "loops_backward", "loops_onednn_matmul")),
    # checkpointed passes (remat) and the replay of ys, with either matmul
    "checkpoints": Branch(3, 5, remat=2, still=("loops_onednn_matmul",),
                          moves=("checkpoint_forward", "checkpoint_backward", "replay")),
    "checkpoints_onednn_matmul": Branch(
        64, 64, remat="sqrt", needs="onednn",
        moves=("checkpoint_forward", "checkpoint_backward", "replay", "loops_onednn_matmul")),
    # the AVX-512 loops: one thread below 256 units, split by rows, split by panels; training's
    # forward pass from 4096 units (with oneDNN)
    "avx512_one_thread": Branch(1, 4, needs="avx512", moves=("avx512", "loops_backward"),
                                still=("avx512_by_rows", "avx512_by_panels")),
    "avx512_by_rows": Branch(16, 20, needs="avx512", moves=("avx512", "avx512_by_rows")),
    "avx512_by_panels": Branch(2, 200, needs="avx512", moves=("avx512", "avx512_by_panels")),
    "avx512_training": Branch(64, 64, needs="avx512+onednn", still=("loops_forward",),
                              moves=("avx512", "loops_backward", "loops_onednn_matmul")),
    # oneDNN's RNN primitive: unmasked inference from ONEDNN_MIN_UNITS, and training where the
    # thresholds say so (by default never)
    "onednn_inference": Branch(32, 64, masking="none", env=OFF, needs="onednn",
                               moves=("onednn_forward",), still=("avx512",)),
    "onednn_training": Branch(32, 64, masking="none", env=OFF, needs="onednn",
                              onednn_training=True, moves=("onednn_forward", "onednn_backward")),
}  # fmt: skip


@contextlib.contextmanager
def switches(env: tuple):
    """The environment switches of a branch (read by the kernels per call), then as before."""
    saved = {k: os.environ.get(k) for k, _ in env}
    os.environ.update(dict(env))
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def skip_unless_built(branch: Branch) -> None:
    if branch.needs == "onednn" and not _native.onednn():
        pytest.skip("the kernels were built without oneDNN here")
    if branch.needs == "avx512" and not _native.avx512():
        pytest.skip("the kernels were built without the AVX-512 loops here (no AVX-512 CPU)")
    if "avx512_by" in " ".join(branch.moves) and (os.cpu_count() or 1) < 2:
        pytest.skip("the AVX-512 loops split a pass over threads only with 2 cores or more")
    if branch.needs == "avx512+onednn" and not (_native.avx512() and _native.onednn()):
        pytest.skip("training's forward pass runs the AVX-512 loops only with oneDNN")


@pytest.fixture(scope="class")
def onednn_training():
    """oneDNN's primitive for training too (a threshold read when tracing: JAX's caches of
    traces made under the other one are cleared before and after)."""
    saved = dict(thresholds.ONEDNN_MIN_UNITS)
    for cell in ("lstm", "gru"):
        thresholds.ONEDNN_MIN_UNITS[(cell, True)] = 0
    jax.clear_caches()
    yield
    thresholds.ONEDNN_MIN_UNITS.update(saved)
    jax.clear_caches()


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("name", [n for n, b in BRANCHES.items() if not b.onednn_training])
@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_every_branch_runs_and_equals_the_reference(name, cell, data):
    check_branch(name, cell, data)


@pytest.mark.usefixtures("onednn_training")
class TestOnednnTraining:
    @pytest.mark.parametrize("cell", ["lstm", "gru"])
    @pytest.mark.parametrize("name", [n for n, b in BRANCHES.items() if b.onednn_training])
    @settings(max_examples=EXAMPLES)
    @given(data=st.data())
    def test_branch_runs_and_equals_the_reference(self, name, cell, data):
        check_branch(name, cell, data)


def check_branch(name: str, cell: str, data) -> None:
    branch = BRANCHES[name]
    skip_unless_built(branch)
    # one program per branch and cell (compiling dominates): the LSTM runs it forward, the GRU
    # in reverse (test_differential draws both directions on every path)
    config = Config(cell, branch.batch, 3, 3, branch.hidden, reverse=cell == "gru",
                    masking=branch.masking, remat=branch.remat, variant=name)  # fmt: skip
    args, tangent, weights = draw_args(data, config)
    with switches(branch.env):
        before = _native.passes()
        got = jax.block_until_ready(program(config, reference=False)(args, tangent, weights))
        after = _native.passes()
    moved = {k for k in after if after[k] > before[k]}
    assert set(branch.moves) <= moved, f"{name}: {sorted(moved)} ran, not all of {branch.moves}"
    assert not set(branch.still) & moved, f"{name}: {sorted(moved)} ran, none of {branch.still}"
    compare(got, program(config, reference=True)(args, tangent, weights), args, config)


def test_the_table_names_every_counter():
    """Each of the kernels' counters is a branch some row above must reach."""
    named = {k for b in BRANCHES.values() for k in b.moves}
    assert named == set(_native.PASSES)


# ---------------------------------------------------------------- branches outside the kernels


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_large_padded_inference_without_onednn_runs_xla_loop(cell, monkeypatch):
    """In builds without oneDNN (here: RNNJAX_ONEDNN=0 when tracing), inference of at least
    INFERENCE_MAX_UNITS units per step runs XLA's loop, not the kernels; values as the
    reference's, NaN included."""
    monkeypatch.setenv("RNNJAX_ONEDNN", "0")
    monkeypatch.setattr(thresholds, "INFERENCE_MAX_UNITS", 64)  # a small step stands in
    config = Config(cell, 16, 3, 3, 5, masking="mask", variant="xla_loop")
    from differential import inference

    x = np.array(jax.random.normal(jax.random.key(0), (16, 3, 3)))
    x[3, 1, 0] = np.nan
    cellf = rj.cells.lstm if cell == "lstm" else rj.cells.gru
    params = cellf(5).init(jax.random.key(1), 3)
    carry = cellf(5).initial_carry(params)
    mask = np.ones((16, 3), bool)
    mask[5, 2] = False
    args = (params, x, carry, np.zeros(16, np.int32), mask)
    before_loops, before = lowering.XLA_LOOPS[cell], _native.passes()
    got = inference(config, reference=False)(args)
    assert lowering.XLA_LOOPS[cell] == before_loops + 1
    assert _native.passes() == before  # no kernel ran
    assert_same(got, inference(config, reference=True)(args), 2e-5, "xla loop")


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_per_example_gradients_and_batched_params_run_the_references(cell):
    """vmap over params (batched weights) and per-example gradients (vmap of grad) run the
    primitives' pure-JAX references instead of the kernels: special values there too."""
    make = rj.cells.lstm if cell == "lstm" else rj.cells.gru
    fast, plain = make(5), make(5)._replace(sequence=None)
    params = fast.init(jax.random.key(0), 3)
    params = jax.tree.map(lambda a: jnp.stack([a, 0.9 * a]), params)  # two models
    x = np.array(jax.random.normal(jax.random.key(1), (2, 4, 3)))
    x[0, 1, 2], x[1, 3, 0] = np.inf, np.nan  # a real step, and a padded one (length 3)
    lengths = jnp.array([4, 3])

    def loss(cell, p, x, n):
        return jnp.sum(rj.scan(cell, p, x, length=n)[1] * 0.7)

    def both(c):
        per_model = jax.vmap(lambda p, x, n: rj.scan(c, p, x, length=n)[1])
        per_example = jax.vmap(jax.grad(lambda p, x, n: loss(c, p, x, n)))
        return jax.jit(lambda p, x, n: (per_model(p, x, n), per_example(p, x, n)))

    before = _native.passes()
    got = both(fast)(params, x, lengths)
    assert_same(got, both(plain)(params, x, lengths), 2e-5, "references")
    moved = {k for k, v in _native.passes().items() if v > before[k]}
    assert not moved & {"loops_backward", "onednn_backward", "checkpoint_backward"}
