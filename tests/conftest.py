"""Shared fixtures; the cases themselves live in cases.py so tests can import them."""

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from importlib.metadata import PackageNotFoundError, version

import pytest
from hypothesis import HealthCheck, settings

# XLA compiles dominate this suite's time (small shapes, many programs). Two flags change how
# fast the generated code runs and how long it takes to generate, not what it computes (no
# fast-math either way): LLVM's optimization level 0 cut the suite's time by about a fifth, and
# XLA:CPU's older loop emitters instead of its MLIR fusion emitters compile ~2.5x faster again
# (tests/test_zoo.py and test_scan.py: 145 s -> 90 s). XLA aborts on a flag it does not know, so
# a child process tries them first and a jaxlib without the second gets the first alone. Set
# before JAX starts its backend, in the controller, so xdist's workers and the CLI subprocesses
# the tests start inherit it. A value the caller set wins.
_FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"


def _xla_flags():
    try:  # jaxlib 0.10 has both (the probe costs a JAX start, ~2 s, before any test runs)
        if int(version("jaxlib").split(".")[0]) >= 1 or version("jaxlib").startswith("0.10."):
            return _FAST_COMPILE
    except (PackageNotFoundError, ValueError):
        pass
    probe = [sys.executable, "-c", "import jax; jax.devices()"]
    env = {**os.environ, "XLA_FLAGS": _FAST_COMPILE, "JAX_PLATFORMS": "cpu"}
    known = subprocess.run(probe, env=env, capture_output=True, timeout=120).returncode == 0
    return _FAST_COMPILE if known else "--xla_backend_optimization_level=0"


if "XLA_FLAGS" not in os.environ:
    os.environ["XLA_FLAGS"] = _xla_flags()

# The CLI, example and bench processes the tests start share one persistent compilation cache for
# the whole session (both xdist workers: the controller makes it before they start, and they
# inherit the variable): a program one test's process compiled, another's loads (the same
# executable, so the same numbers). Tests that need a cache of their own still make one.
if "RNNJAX_TEST_JAX_CACHE" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="rnnjax-test-jax-cache-")
    os.environ["RNNJAX_TEST_JAX_CACHE"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)

import jax  # noqa: E402
from cases import CELLS, I, T  # noqa: E402

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
