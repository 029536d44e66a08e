"""The example scripts run as real processes, at small sizes, and do what they say."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import rnnjax as rj

ROOT = Path(__file__).resolve().parents[1]


def run_example(name, *args):
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), *map(str, args)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out.stdout


def test_custom_cell_trains_checkpoints_and_restores(tmp_path):
    run = tmp_path / "run"
    out = run_example(
        "custom_cell.py", "--steps", 200, "--length", 10, "--hidden", 16, "--out", run,
        "--no-progress",
    )  # fmt: skip
    trained = re.search(r"validation MSE (\S+) after 200 steps \(baseline 0.167\)", out)
    restored = re.search(r"restored step 200 from .*checkpoints: validation MSE (\S+)", out)
    assert trained and restored, out
    assert float(trained.group(1)) < 0.05, out  # always answering 1: 0.167
    assert restored.group(1) == trained.group(1)
    assert re.search(r"\|\|dLoss/dh_t\|\| at the marked steps t=\d+: \S+, t=\d+: \S+;", out), out
    assert "200" in {p.name for p in (run / "checkpoints").iterdir()}
    assert (run / "metrics.jsonl").exists() and (run / "loss.png").exists()


def test_every_example_script_is_run_by_a_test():
    tests = "".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py"))
    for script in sorted((ROOT / "examples").glob("*.py")):
        assert f'"{script.name}"' in tests, f"no test runs examples/{script.name}"


def load_example(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_peephole_lstm_without_peepholes_is_the_lstm():
    """The custom cell is right: with zero peepholes it is rj.cells.lstm on the same weights,
    and the peepholes change its outputs and receive gradients."""
    cell = load_example("custom_cell").peephole_lstm(4)
    params = cell.init(jax.random.key(0), 3)
    xs = jax.random.normal(jax.random.key(1), (6, 3))
    reference = rj.cells.lstm(4)
    lstm_params = {k: params[k] for k in ("w_i", "w_h", "b")}
    (carry, ys), (ref_carry, ref_ys) = (
        rj.scan(cell, params, xs),
        rj.scan(reference, lstm_params, xs),
    )
    np.testing.assert_allclose(ys, ref_ys, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(carry.c, ref_carry.c, rtol=1e-6, atol=1e-6)
    peeped = {**params, "p": jnp.full((3, 4), 0.5)}
    assert float(jnp.abs(rj.scan(cell, peeped, xs)[1] - ys).max()) > 1e-3
    grads = jax.grad(lambda p: jnp.sum(rj.scan(cell, p, xs)[1] ** 2))(params)
    assert bool((jnp.abs(grads["p"]).sum(axis=1) > 0).all())
