"""The forecast task: series data and baselines, the model's contracts, and the real CLI.

The CLI tests run ``python -m rnnjax.cli`` in a subprocess at tiny sizes (sharing compiled
programs through a cache; most bad-input cases call the same ``rnnjax.cli.main`` in-process);
bad input must exit with status 2 and one line on stderr, and leave any existing run directory
as it was.
"""

import hashlib
import json
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from cli_process import rnnjax

from rnnjax import cli
from rnnjax.data.series import (
    estimate_period,
    naive_forecast,
    read_series,
    seasonal_naive_forecast,
    seasonal_series,
)
from rnnjax.data.text import DataError
from rnnjax.tasks import forecast
from rnnjax.tasks.base import COMMON_DEFAULTS
from rnnjax.train import fit, init_state, make_step

CSV = Path(__file__).parent / "data" / "hourly_load.csv"  # time, load, temperature; 360 hours
TINY = ["--steps", "30", "--hidden", "16", "--seq-len", "24", "--batch-size", "16"]
TINY += ["--eval-every", "10", "--checkpoint-every", "20", "--no-progress"]
METRICS = {
    "loss", "mse", "naive_mse", "seasonal_naive_mse",
    "rollout_mse", "rollout_naive_mse", "rollout_seasonal_naive_mse",
}  # fmt: skip


def config(**flags) -> dict:
    """The full configuration of a run; in-process tests share one small size (compiles are
    cached per shape, so a second build of the same size costs next to nothing)."""
    small = {"hidden": 16, "seq_len": 24}
    return {"task": "forecast", **COMMON_DEFAULTS, **forecast.DEFAULTS, **small, **flags}


def snapshot(directory: Path) -> dict[str, str]:
    """Every file and folder under ``directory``, files with a hash of their bytes."""
    return {
        str(p.relative_to(directory)): (
            hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
        )
        for p in sorted(directory.rglob("*"))
    }


def assert_one_line_error(proc: subprocess.CompletedProcess, pattern: str) -> None:
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("rnnjax: error: "), lines
    assert re.search(pattern, lines[0]), f"{pattern!r} not in {lines[0]!r}"


# ----------------------------------------------------------------------------- series data


def test_generated_series_is_deterministic_in_the_seed_and_has_its_period():
    a, b = seasonal_series(2000, seed=3), seasonal_series(2000, seed=3)
    assert a.shape == (2000,) and a.dtype == np.float32 and (a == b).all()
    assert not np.allclose(a, seasonal_series(2000, seed=4))
    assert a[-500:].mean() > a[:500].mean() + 1.0  # the trend rises
    for period in (7, 12, 24):
        series = seasonal_series(2000, period=period, seed=0)
        assert estimate_period(series, max_lag=200) == period


def test_estimate_period_finds_no_season_in_a_random_walk():
    walk = np.random.default_rng(0).normal(size=2000).cumsum()
    assert estimate_period(walk, max_lag=200) == 1
    assert estimate_period(np.ones(50), max_lag=20) == 1  # constant: nothing to correlate


def test_seasonal_naive_is_exact_on_a_periodic_series_and_naive_is_not():
    pattern = np.random.default_rng(0).normal(size=7)
    y = np.tile(pattern, 20)
    origins = np.arange(7, len(y) - 15)
    truth = y[origins[:, None] + np.arange(15)]  # horizons past one season, too
    assert np.array_equal(seasonal_naive_forecast(y, origins, 15, 7), truth)
    assert np.abs(naive_forecast(y, origins, 15) - truth).max() > 0.5


def test_naive_is_exact_on_a_constant_series_and_equals_seasonal_naive_of_period_1():
    y = np.random.default_rng(1).normal(size=40)
    origins = np.array([1, 10, 30])
    assert np.array_equal(naive_forecast(np.full(40, 2.5), origins, 5), np.full((3, 5), 2.5))
    assert np.array_equal(naive_forecast(y, origins, 5), seasonal_naive_forecast(y, origins, 5, 1))
    assert np.array_equal(naive_forecast(y, origins, 3)[:, 0], y[origins - 1])


def test_seasonal_naive_needs_one_season_of_history():
    with pytest.raises(ValueError, match=r"origins >= period 24, got 5"):
        seasonal_naive_forecast(np.arange(100.0), np.array([5, 50]), 3, 24)


def write(tmp_path: Path, text: str, name: str = "x.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_read_series_named_column_and_automatic_single_numeric_column(tmp_path):
    values, name = read_series(CSV, "temperature")
    assert name == "temperature" and values.shape == (360,) and values[0] == pytest.approx(0.1)
    values, name = read_series(write(tmp_path, "day,sales\nmon,3\n\ntue,4.5\n"))
    assert name == "sales" and values.tolist() == [3.0, 4.5]  # blank line skipped
    values, name = read_series(write(tmp_path, "1.5\n2\n-3e2\n"))  # no header
    assert name == "1" and values.tolist() == [1.5, 2.0, -300.0]
    values, name = read_series(write(tmp_path, "a;b\n1;x\n2;y\n"), "a")  # sniffed delimiter
    assert values.tolist() == [1.0, 2.0]


@pytest.mark.parametrize(
    "text, column, pattern",
    [
        ("time,v\n0,1\n1,oops\n", "v", r"line 3, column 'v': 'oops' is not a finite number"),
        ("time,v\n0,1\n1,\n", "v", r"line 3, column 'v': '' is not a finite number"),
        ("v\n1\nnan\n", "v", r"line 3, column 'v': 'nan' is not a finite number"),
        ("a,b\n1,2\n", "c", r"has no column 'c'; its columns are: a, b"),
        ("a,b,t\n1,2,x\n", None, r"several numeric columns \(a, b\); choose one with --column"),
        ("t,u\nx,1\ny,z\n", None, r"no numeric column .*'t' line 2: 'x'.*'u' line 3: 'z'"),
        ("a,b\n1,2\n3\n", "a", r"line 3 has 1 fields, but the header has 2"),
        ("a,b\n", "a", r"has a header \(a, b\) but no rows of data"),
        ("", None, r"is empty"),
    ],
    ids=["text", "blank", "nan", "column", "several", "none", "ragged", "header-only", "empty"],
)
def test_read_series_refuses_bad_files_naming_the_problem(tmp_path, text, column, pattern):
    path = write(tmp_path, text)
    with pytest.raises(DataError, match=pattern) as info:
        read_series(path, column)
    assert "\n" not in str(info.value)


def test_read_series_missing_file():
    with pytest.raises(DataError, match=r"nope\.csv does not exist"):
        read_series("/nonexistent/nope.csv")


# ----------------------------------------------------------------------------- task, in-process


@pytest.mark.parametrize(
    "flags, pattern",
    [
        ({"bidirectional": True}, r"--bidirectional does not apply to the forecast task"),
        ({"column": "load"}, r"--column picks a column of a CSV file; give the file with --data"),
        ({"data": str(CSV), "column": "load", "seq_len": 300},
         r"360 steps, 288 for training .* one window of --seq-len 300"),
    ],
    ids=["bidirectional", "column-without-data", "too-short"],
)  # fmt: skip
def test_build_refuses_bad_flags_and_writes_nothing(tmp_path, flags, pattern):
    with pytest.raises(DataError, match=pattern):
        forecast.build(config(**flags), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_normalizer_is_fitted_on_the_training_part_only(tmp_path):
    task = forecast.build(config(data=str(CSV), column="load"), tmp_path)
    values, _ = read_series(CSV, "load")
    saved = json.loads((tmp_path / forecast.STATE_FILE).read_text())
    train = values[:288]  # the last 20% (72 of 360) is held out
    assert saved["normalizer"]["mean"][0] == pytest.approx(train.mean(), rel=1e-6)
    assert saved["normalizer"]["std"][0] == pytest.approx(train.std(), rel=1e-5)
    assert abs(values.mean() - train.mean()) > 1e-3  # so the test can tell the two apart
    assert saved["period"] == 24 and task.info["horizon"] == 24
    inputs, targets = task.train_data(0)
    assert inputs.shape == (64, 24, 1) and targets.shape == (64, 1)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The task on the generated series, built into a fresh run directory."""
    run = tmp_path_factory.mktemp("built")
    return forecast.build(config(batch_size=8), run), run


def test_training_batches_are_windows_and_their_next_values_addressed_by_step(built):
    task, run = built
    for step in (0, 7, 1000):
        (x1, y1), (x2, y2) = task.train_data(step), task.train_data(step)
        assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    assert not np.array_equal(task.train_data(0)[0], task.train_data(1)[0])
    values = seasonal_series(forecast.LENGTH, seed=0)[:2400]  # the training part
    saved = json.loads((run / forecast.STATE_FILE).read_text())["normalizer"]
    windows = np.lib.stride_tricks.sliding_window_view(
        (values - saved["mean"][0]) / saved["std"][0], 25
    )
    inputs, targets = task.train_data(3)
    assert inputs.shape == (8, 24, 1) and targets.shape == (8, 1)
    for example in np.concatenate([inputs[:, :, 0], targets], axis=1):
        assert np.isclose(windows, example, atol=1e-5).all(axis=1).any()


def test_a_rebuilt_run_uses_its_saved_normalizer(built, tmp_path):
    """series.json, not the data, decides the scaling of a run built before."""
    task, run = built
    shutil.copy(run / forecast.STATE_FILE, tmp_path)
    path = tmp_path / forecast.STATE_FILE
    saved = json.loads(path.read_text())
    saved["normalizer"]["std"] = [saved["normalizer"]["std"][0] * 2]
    path.write_text(json.dumps(saved))
    rebuilt = forecast.build(config(batch_size=8), tmp_path)
    np.testing.assert_allclose(rebuilt.train_data(0)[0] * 2, task.train_data(0)[0], atol=1e-4)
    path.write_text("{not json")
    with pytest.raises(DataError, match=r"series\.json is damaged"):
        forecast.build(config(), tmp_path)


@pytest.mark.parametrize("cell", ["lstm", "gru", "elman"])
def test_forecaster_feeds_predictions_back_ignores_the_level_and_drops_out_only_with_a_key(cell):
    flags = {"cell": cell, "layers": 2, "dropout": 0.5, "recurrent_dropout": 0.5}
    model = forecast.forecaster(config(**flags))
    params = model.init(jax.random.key(0))
    window = jax.random.normal(jax.random.key(1), (10, 1))
    rollout, predict = jax.jit(model.rollout, static_argnums=2), jax.jit(model.predict)
    rolled = rollout(params, window, 4)
    by_hand, w = [], window
    for _ in range(4):
        y = predict(params, w)
        by_hand.append(y)
        w = jnp.concatenate([w[1:], y[None]])
    np.testing.assert_allclose(rolled, jnp.stack(by_hand), rtol=1e-5, atol=1e-6)
    shifted = rollout(params, window + 5.0, 4)
    np.testing.assert_allclose(shifted, rolled + 5.0, rtol=1e-5, atol=1e-5)
    assert predict(params, window) == by_hand[0]  # no key: deterministic
    assert predict(params, window, jax.random.key(2)) != by_hand[0]


def test_decayed_step_is_adam_with_a_cosine_schedule():
    def loss(params, batch, key):
        return jnp.sum((params["w"] - batch) ** 2)

    scheduled = optax.adam(optax.cosine_decay_schedule(0.1, 6, alpha=forecast.LR_FLOOR))
    ours = jax.jit(forecast.decayed_step(loss, optax.adam(0.1), 1.0, steps=6))
    theirs = jax.jit(make_step(loss, scheduled, clip_norm=1.0))
    a = init_state({"w": jnp.zeros(3)}, optax.adam(0.1), jax.random.key(0))
    b = init_state({"w": jnp.zeros(3)}, scheduled, jax.random.key(0))
    for i in range(6):
        batch = jnp.array([1.0, -2.0, 3.0]) * (i + 1)
        (a, metrics), (b, _) = ours(a, batch), theirs(b, batch)
    np.testing.assert_allclose(a.params["w"], b.params["w"], rtol=1e-5)
    assert float(metrics["lr_scale"]) == pytest.approx(
        forecast.LR_FLOOR + (1 - forecast.LR_FLOOR) * 0.5 * (1 + np.cos(np.pi * 5 / 6))
    )


def test_a_small_model_beats_both_baselines_one_step_and_naive_in_rollout(tmp_path):
    """150 steps of a 16-unit LSTM on the generated series (a few seconds)."""
    cfg = config(steps=150, lr=1e-2)
    task = forecast.build(cfg, tmp_path)
    optimizer = optax.adam(cfg["lr"])
    state = init_state(task.params, optimizer, jax.random.key(1))
    untrained = task.evaluate(state.params)
    result = fit(task.make_step(optimizer, 1.0), state, task.train_data, steps=150, progress=False)
    m = task.evaluate(result.state.params)
    assert set(m) == METRICS and all(isinstance(v, float) for v in m.values())
    assert m["loss"] < 0.5 * untrained["loss"]
    assert m["mse"] < 0.6 * min(m["naive_mse"], m["seasonal_naive_mse"]), m
    assert m["rollout_mse"] < 0.2 * m["rollout_naive_mse"], m


# ----------------------------------------------------------------------------- the real CLI


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """Where this module's CLI processes share compiled programs (cli_process.launch): only the
    first to need a function compiles it."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache):
    """A tiny run on the ``load`` column of a copy of the CSV: (run dir, data, the process)."""
    tmp = tmp_path_factory.mktemp("forecast")
    data, run = tmp / "load.csv", tmp / "run"
    shutil.copy(CSV, data)
    proc = rnnjax("train", "--task", "forecast", "--data", data, "--column", "load", *TINY,
                  "--out", run, cache=cache)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return run, data, proc


def test_a_csv_column_trains_into_a_run_directory(trained):
    run, data, proc = trained
    for name in ("config.json", "metrics.jsonl", "checkpoints", "loss.png", "forecast.png"):
        assert (run / name).exists(), name
    assert (run / "forecast.png").read_bytes()[:4] == b"\x89PNG"
    cfg = json.loads((run / "config.json").read_text())
    assert (cfg["task"], cfg["hidden"], cfg["seq_len"], cfg["steps"]) == ("forecast", 16, 24, 30)
    assert (cfg["data"], cfg["column"]) == (str(data), "load")
    assert json.loads((run / forecast.STATE_FILE).read_text())["period"] == 24
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all({"step", "split", "loss"} <= set(r) for r in rows)
    val = [r for r in rows if r["split"] == "val"]
    assert [r["step"] for r in val] == [10, 20, 30]
    assert all(METRICS <= set(r) for r in val)
    scales = [r["lr_scale"] for r in rows if r["split"] == "train"]
    assert scales == sorted(scales, reverse=True) and scales[-1] < 0.1  # decays over the run
    assert "load.csv column 'load': 360 steps, the last 72 held out; season 24" in proc.stdout
    assert "24-step rollout" in proc.stdout and "seasonal naive" in proc.stdout, proc.stdout


def test_evaluate_prints_one_json_object_matching_the_last_validation(trained, cache):
    run = trained[0]
    proc = rnnjax("evaluate", "--run", run, "--json", cache=cache)
    assert proc.returncode == 0, proc.stderr
    [line] = proc.stdout.strip().splitlines()
    metrics = json.loads(line)
    assert set(metrics) == METRICS | {"step"} and metrics["step"] == 30
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if r["split"] == "val"][-1]
    for name in METRICS:
        assert metrics[name] == pytest.approx(last[name], rel=1e-5), name


def test_resume_with_more_steps_continues_and_refuses_a_different_model(trained, tmp_path, cache):
    run = tmp_path / "run"
    shutil.copytree(trained[0], run)
    before = snapshot(run)
    proc = rnnjax("train", "--resume", "--out", run, "--bidirectional", cache=cache)
    assert_one_line_error(proc, r"--bidirectional True differs from the run's False")
    assert snapshot(run) == before
    proc = rnnjax("train", "--resume", "--out", run, "--steps", "40", "--no-progress", cache=cache)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "trained to step 40" in proc.stdout
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "val"] == [10, 20, 30, 40]
    assert "40" in {p.name for p in (run / "checkpoints").iterdir()}
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    assert {"event": "resume", "step": 30}.items() <= events[-1].items()


def test_a_damaged_csv_fails_resume_and_evaluate_and_leaves_the_run_untouched(trained, cache):
    run, data, _ = trained
    before, text = snapshot(run), data.read_text()
    calls = {  # each must fail with one line, changing nothing
        r"load\.csv line 2, column 'load': 'n/a' is not a finite number": [
            "train", "--resume", "--out", run, "--steps", "40", "--no-progress"],
        r"'n/a' is not a finite number": ["evaluate", "--run", run],
        r"already holds a run": ["train", "--task", "forecast", "--data", data, "--out", run],
    }  # fmt: skip
    try:
        data.write_text(text.replace("10.589", "n/a"))
        with ThreadPoolExecutor(len(calls)) as pool:
            runs = pool.map(lambda a: rnnjax(*a, cache=cache), calls.values())
            procs = dict(zip(calls, runs, strict=True))
    finally:
        data.write_text(text)
    for pattern, proc in procs.items():
        assert_one_line_error(proc, pattern)
    assert snapshot(run) == before


def bad_inputs(tmp: Path) -> dict[str, tuple[list, str]]:
    (tmp / "empty.csv").write_text("")
    (tmp / "text.csv").write_text("time,v\n0,1\n1,2\n2,three\n")
    (tmp / "short.csv").write_text("v\n" + "\n".join(map(str, range(30))) + "\n")
    return {
        "missing": (["--data", tmp / "nope.csv"], r"nope\.csv does not exist"),
        "empty": (["--data", tmp / "empty.csv"], r"empty\.csv is empty"),
        "no-column": (["--data", CSV, "--column", "watts"],
                      r"no column 'watts'; its columns are: time, load, temperature"),
        "non-numeric": (["--data", tmp / "text.csv", "--column", "v"],
                        r"text\.csv line 4, column 'v': 'three' is not a finite number"),
        "several": (["--data", CSV], r"several numeric columns \(load, temperature\)"),
        "too-short": (["--data", tmp / "short.csv", "--seq-len", "24"],
                      r"30 steps, 24 for training .*shorter than one window of --seq-len 24"),
        "bidirectional": (["--bidirectional"], r"--bidirectional does not apply to the forecast"),
        "tbptt": (["--tbptt", "5"], r"--tbptt is a flag of the charlm task, not of forecast"),
    }  # fmt: skip


def test_bad_input_exits_2_with_one_line_and_creates_nothing(tmp_path, cache, capsys):
    """The first case as a real process (its exit status and stderr are the process's own);
    the others through the same entry point, rnnjax.cli.main, in this process: a process each
    would only import the same modules again."""
    cases = bad_inputs(tmp_path)
    outs = {name: tmp_path / f"out-{name}" for name in cases}
    outs["several"].mkdir()  # an existing, empty --out must stay, and stay empty

    def argv(name):
        return ["train", "--task", "forecast", *map(str, cases[name][0]), "--out", str(outs[name])]

    first, *others = cases
    procs = {first: rnnjax(*argv(first), cache=cache)}
    for name in others:
        status = cli.main(argv(name))
        captured = capsys.readouterr()
        procs[name] = subprocess.CompletedProcess(argv(name), status, captured.out, captured.err)
    for name, proc in procs.items():
        assert_one_line_error(proc, cases[name][1])
        assert not outs[name].exists() or name == "several", name
    assert outs["several"].is_dir() and list(outs["several"].iterdir()) == []
