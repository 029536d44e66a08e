"""The adding and copy tasks: their generators, baselines and the real ``rnnjax`` command
(train, evaluate, resume) on tiny runs."""

import json
import math
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cli_process import ok, rnnjax, rows, train_evaluate_resume

from rnnjax import cli
from rnnjax.data.synthetic import ADDING_BASELINE_MSE, adding, copy_baseline, copy_memory
from rnnjax.tasks import adding as adding_task
from rnnjax.tasks import copy as copy_task
from rnnjax.tasks.base import COMMON_DEFAULTS
from rnnjax.train import cross_entropy

TINY = ["--hidden", "8", "--seq-len", "6", "--batch-size", "4", "--no-progress"]
METRIC = {"adding": "mse", "copy": "accuracy"}
EVALUATED = {
    "adding": set("loss mse baseline_mse baseline_mse_val".split()),
    "copy": set(
        "loss accuracy copy_loss baseline_loss baseline_loss_val baseline_accuracy".split()
    ),
}


def config(task, **overrides):
    module = {"adding": adding_task, "copy": copy_task}[task]
    return {"task": task, **COMMON_DEFAULTS, **module.DEFAULTS, "hidden": 8, **overrides}


# ----------------------------------------------------------------------------- generators


def test_adding_batches_and_baseline():
    xs, ys = adding(jax.random.key(0), 4096, 12)
    assert xs.shape == (4096, 12, 2) and ys.shape == (4096,)
    marks = np.asarray(xs[..., 1])
    assert (marks.sum(1) == 2).all() and (marks[:, :6].sum(1) == 1).all()
    np.testing.assert_allclose(ys, (xs[..., 0] * xs[..., 1]).sum(1), rtol=1e-6)
    assert abs(float(jnp.mean((ys - 1.0) ** 2)) - ADDING_BASELINE_MSE) < 0.01


def test_copy_layout():
    S, K, T = 5, 4, 7
    xs, ys = copy_memory(jax.random.key(0), 64, T, symbols=S, alphabet=K)
    xs, ys = np.asarray(xs), np.asarray(ys)
    assert xs.shape == ys.shape == (64, T + 2 * S)
    assert ((xs[:, :S] >= 1) & (xs[:, :S] <= K)).all()  # symbols 1..K
    assert (xs[:, S : S + T - 1] == 0).all() and (xs[:, S + T - 1] == K + 1).all()  # delimiter
    assert (xs[:, S + T :] == 0).all()
    assert (ys[:, : T + S] == 0).all() and (ys[:, T + S :] == xs[:, :S]).all()
    assert len(np.unique(xs[:, :S])) == K  # every symbol occurs


def test_copy_memoryless_baseline_formula_matches_a_measurement():
    S, K, T = 10, 8, 30
    _, ys = copy_memory(jax.random.key(1), 4096, T, symbols=S, alphabet=K)
    # The memoryless predictor, as logits: blank for T + S steps, then uniform over 1..K.
    logits = np.full((T + 2 * S, K + 1), -1e4, np.float32)
    logits[: T + S, 0] = 0.0
    logits[T + S :, 1:] = 0.0
    measured = float(cross_entropy(jnp.broadcast_to(logits, (*ys.shape, K + 1)), ys))
    assert measured == pytest.approx(S * math.log(K) / (T + 2 * S), rel=1e-5)
    assert copy_baseline(T, S, K) == pytest.approx(measured, rel=1e-5)
    # Fitting per-position frequencies to this sample does barely better, never worse.
    fitted = copy_task.positional_baseline(np.asarray(ys), K + 1)
    assert measured - 0.01 < fitted <= measured


def test_copy_generator_rejects_a_zero_delay():
    with pytest.raises(ValueError, match="copy_memory needs delay, symbols and alphabet >= 1"):
        copy_memory(jax.random.key(0), 2, 0)


# ----------------------------------------------------------------------------- tasks in-process


@pytest.mark.parametrize("task", ["adding", "copy"])
def test_a_data_file_is_refused(task, tmp_path):
    from rnnjax.data.text import DataError

    module = {"adding": adding_task, "copy": copy_task}[task]
    with pytest.raises(DataError, match=rf"--data does not apply to the {task} task: it generates"):
        module.build(config(task, data="x.csv"), tmp_path)


def test_cli_tbptt_is_one_line_exit_2(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--task", "copy", "--tbptt", "4", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "rnnjax: error: --tbptt is a flag of the charlm task, not of copy: drop it "
        "(rnnjax train --task copy --help lists the flags copy takes)"
    ]
    assert not out.exists()


def test_cli_stop_at_that_is_not_a_finite_number_is_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--task", "adding", "--stop-at", "nan", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--stop-at: expected a finite number, got 'nan'" in err[0]
    assert not out.exists()


# ----------------------------------------------------------------------------- the real CLI


def test_stop_at_ends_the_run_once_the_metric_reaches_it(tmp_path):
    """copy's metric is an accuracy (higher is better): any accuracy reaches --stop-at 0, so the
    run stops at its first validation, and says so; the rule is saved with the run."""
    out = tmp_path / "run"
    args = ["--task", "copy", *TINY, "--steps", "50", "--eval-every", "3", "--stop-at", "0"]
    printed = ok(rnnjax("train", *args, "--checkpoint-every", "0", "--out", out, cache=tmp_path))
    assert "stopped early: validation accuracy reached --stop-at 0" in printed
    lines = rows(out / "metrics.jsonl")
    assert [r["step"] for r in lines if r["split"] == "val"] == [3]
    assert max(r["step"] for r in lines) == 3
    assert json.loads((out / "config.json").read_text())["stop_at"] == 0.0


def run_task(task, root):
    """Train 10 steps; then evaluate that checkpoint (on a copy), resume to 20, and train 20
    steps without a stop (into another directory), all three at once."""
    out, straight = root / task, root / f"{task}-straight"
    args = ["--task", task, *TINY, "--eval-every", "5", "--checkpoint-every", "0"]
    seen = train_evaluate_resume(args, root, out, straight, 10, 20)
    return out, seen, straight


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Both tasks' CLI runs, in parallel (each command is a process of its own)."""
    root = tmp_path_factory.mktemp("runs")
    with ThreadPoolExecutor(2) as pool:
        chains = {t: pool.submit(run_task, t, root) for t in METRIC}
        return {t: chain.result() for t, chain in chains.items()}


@pytest.mark.parametrize("task", ["adding", "copy"])
def test_train_writes_a_run_directory(runs, task):
    out, seen, _ = runs[task]
    assert {"config.json", "metrics.jsonl", "checkpoints", "loss.png"} <= set(seen["files"])
    saved = json.loads((out / "config.json").read_text())
    assert saved["task"] == task and saved["hidden"] == 8 and saved["seq_len"] == 6
    assert (out / "loss.png").stat().st_size > 1000
    assert seen["checkpoints"] == ["10"]
    lines = seen["metrics"]
    assert all({"step", "split", "loss", METRIC[task]} <= set(r) for r in lines)
    assert [r["step"] for r in lines if r["split"] == "train"] == [10]
    assert [r["step"] for r in lines if r["split"] == "val"] == [5, 10]
    assert EVALUATED[task] <= set(lines[-1])
    assert "baseline" in seen["train"] and "run directory" in seen["train"]


@pytest.mark.parametrize("task", ["adding", "copy"])
def test_evaluate_json_is_the_checkpoint(runs, task):
    _, seen, _ = runs[task]
    evaluated = seen["evaluate"]
    assert EVALUATED[task] <= set(evaluated) and evaluated["step"] == 10
    last_val = seen["metrics"][-1]
    assert all(evaluated[k] == last_val[k] for k in EVALUATED[task])  # every digit


@pytest.mark.parametrize("task", ["adding", "copy"])
def test_resume_continues_the_same_run(runs, task):
    out, _, uninterrupted = runs[task]
    assert [e["step"] for e in rows(out / "events.jsonl") if e["event"] == "resume"] == [10]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["10", "20"]
    resumed = [r for r in rows(out / "metrics.jsonl") if r["split"] == "val"]
    assert [r["step"] for r in resumed] == [5, 10, 15, 20]
    # Batches are addressed by step: stopping and resuming changes nothing, bit for bit.
    assert resumed == [r for r in rows(uninterrupted / "metrics.jsonl") if r["split"] == "val"]
