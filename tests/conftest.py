"""Shared fixtures; the cases themselves live in cases.py so tests can import them."""

import os

# XLA compiles dominate this suite's time (small shapes, many programs). LLVM's optimization
# level changes how fast the generated code runs, not what it computes (no fast-math), and
# level 0 cut this suite's time by about a fifth. Set before JAX starts its backend; the CLI
# subprocesses the tests start inherit it. A value the caller set wins.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")

import jax  # noqa: E402
import pytest
from cases import CELLS, I, T
from hypothesis import HealthCheck, settings

# The property-based tests: CI's profile is fixed-seed (the same examples every run) and small,
# since each new shape or option compiles a program; `--hypothesis-profile=long` runs many
# more, freshly drawn, by hand.
_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True)
settings.register_profile("ci", max_examples=6, derandomize=True, database=None, **_COMMON)
settings.register_profile("long", max_examples=400, **_COMMON)
settings.load_profile(os.environ.get("RNNJAX_HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(params=sorted(CELLS))
def cell_name(request):
    return request.param


@pytest.fixture
def cell(cell_name):
    return CELLS[cell_name]()


@pytest.fixture
def params(cell):
    return cell.init(jax.random.key(0), I)


@pytest.fixture
def xs():
    return jax.random.normal(jax.random.key(1), (T, I))
