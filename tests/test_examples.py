"""The example scripts run as real processes, at small sizes, and do what they say."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rnnjax as rj
from rnnjax.data.series import seasonal_series

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


NUMBER = r"(-?[0-9.]+(?:e-?\d+)?)"


def char_lm(tmp_path, *extra):
    """char_lm.py on a text of random words from a 12-word vocabulary (about 0.8 bits per
    character are left once the words are learnt): its held-out bits per character and unigram
    baseline, the sample and the text."""
    rng = np.random.default_rng(0)
    words = "the cat sat on a mat and the dog ran to the red door".split()
    data = tmp_path / "words.txt"
    data.write_text(" ".join(rng.choice(words, 2500)))
    out = run_example(
        "char_lm.py", "--data", data, "--hidden", 32, "--embed", 16, "--seq-len", 32,
        "--batch-size", 16, "--steps", 60, "--eval-every", 30, "--lr", 1e-2,
        "--prompt", "the ", "--sample-length", 40, "--no-progress", *extra,
    )  # fmt: skip
    found = re.search(rf"held-out bits per character {NUMBER} \(unigram baseline {NUMBER}\)", out)
    assert found, out
    lines = out.splitlines()
    sample = lines[[i for i, line in enumerate(lines) if line.startswith("sample (")][0] + 1]
    return *map(float, found.groups()), sample, data.read_text()


def test_char_lm_beats_the_unigram_baseline_and_samples_text(tmp_path):
    """Random windows, full BPTT: far below the unigram baseline after 60 steps, and the
    sample continues the prompt with characters of the text."""
    bpc, baseline, sample, text = char_lm(tmp_path, "--temperature", 0.5)
    assert 2.5 < baseline < 4.5 and bpc < 0.5 * baseline, (bpc, baseline)
    assert sample.startswith("the ") and len(sample) == 44, sample
    assert set(sample) <= set(text), sample


def test_char_lm_truncated_bptt_over_streams_learns_too(tmp_path):
    """--tbptt: 16 contiguous streams read 16 characters per step, the carry flowing on (and
    restarting when the streams wrap around, after 35 steps); greedy sampling."""
    bpc, baseline, sample, text = char_lm(tmp_path, "--tbptt", 16, "--temperature", 0)
    assert bpc < 0.5 * baseline, (bpc, baseline)
    assert sample.startswith("the ") and set(sample) <= set(text), sample


def test_copy_memory_beats_the_memoryless_baseline():
    """At delay 3 with 2 symbols of 3 the model must remember the symbols to go below the
    memoryless baseline; 200 steps of a 16-unit GRU copy 83-100% of the symbols (seeds 0-3)."""
    out = run_example(
        "copy_memory.py", "--delay", 3, "--symbols", 2, "--alphabet", 3, "--hidden", 16,
        "--steps", 200, "--lr", 1e-2, "--eval-every", 100, "--no-progress",
    )  # fmt: skip
    found = re.search(
        rf"held-out copy accuracy {NUMBER} \(chance {NUMBER}\), cross-entropy {NUMBER} "
        rf"nats/step \(memoryless baseline {NUMBER}\)",
        out,
    )
    assert found, out
    acc, chance, loss, baseline = map(float, found.groups())
    assert chance == pytest.approx(1 / 3, abs=1e-4)
    assert baseline == pytest.approx(2 * np.log(3) / (3 + 2 * 2), abs=1e-4)  # S log K / (T + 2S)
    assert acc > 0.75 and loss < 0.5 * baseline, out


def test_forecast_beats_naive_and_seasonal_naive():
    """150 steps on a short generated series beat both baselines one step ahead and naive over
    the rollout; the baselines printed are those computed here from the same series."""
    length, steps = 1200, 150
    out = run_example(
        "forecast.py", "--length", length, "--window", 24, "--horizon", 12, "--hidden", 16,
        "--steps", steps, "--lr", 1e-2,
    )  # fmt: skip
    found = re.search(
        rf"held-out MSE: one step {NUMBER} \(naive {NUMBER}, seasonal naive {NUMBER}\); "
        rf"12-step rollout {NUMBER} \(naive {NUMBER}, seasonal naive {NUMBER}\)",
        out,
    )
    assert found, out
    one, naive, seasonal, many, many_naive, many_seasonal = map(float, found.groups())
    y = seasonal_series(length, period=24, seed=0).astype(np.float64)
    held = np.arange(length - length // 5, length)
    assert naive == pytest.approx(np.mean((y[held] - y[held - 1]) ** 2), abs=1e-4)
    assert seasonal == pytest.approx(np.mean((y[held] - y[held - 24]) ** 2), abs=1e-4)
    assert one < 0.7 * min(naive, seasonal), out
    assert many < 0.2 * many_naive and np.isfinite(many_seasonal), out


def test_seq2seq_learns_to_add_and_beam_1_is_greedy():
    """700 steps of 32 problems on 2-digit addition: the teacher-forced characters are well
    above chance (1/11) and many held-out sums are exact (48-59% over seeds 0-2; the baseline
    gets at most 0.5%); beam search with one beam is greedy decoding, answer for answer, and
    each example's verdict is right about its sum. (Batches of 32 at lr 2e-2 learn as much as
    batches of 64 at 1e-2, in half the time.)"""
    out = run_example(
        "seq2seq.py", "--digits", 2, "--hidden", 32, "--embed", 16, "--steps", 700,
        "--batch-size", 32, "--lr", 2e-2, "--eval-every", 700, "--beam", 1,
    )  # fmt: skip
    found = re.search(
        rf"held-out exact match: greedy {NUMBER}, beam {NUMBER} \(beam 1\); token accuracy "
        rf"{NUMBER}; baseline {NUMBER} \(always (\d+)\)",
        out,
    )
    assert found, out
    greedy, beam, tokens, baseline = map(float, found.groups()[:4])
    assert greedy == beam and tokens > 0.6 and greedy > baseline + 0.15, out
    examples = re.findall(r"  (\d+)\+(\d+) -> (\d*) \(beam: (\d*)\)  \[(right|wrong, \d+)\]", out)
    assert len(examples) == 6, out
    for a, b, answer, beam_answer, verdict in examples:
        assert answer == beam_answer
        right = answer == str(int(a) + int(b))
        assert verdict == ("right" if right else f"wrong, {int(a) + int(b)}")
