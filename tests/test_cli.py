"""The rnnjax command, driven as a real subprocess: train, resume, generate, evaluate, info, and
every kind of bad input (exit status 2, one line, no traceback, nothing written is lost)."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cli_process import cache_env

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "data" / "tiny.txt"
SMALL = ["--hidden", "16", "--seq-len", "16", "--batch-size", "4", "--no-progress"]


ENV = dict(os.environ)


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
    """The subprocesses share the session's JAX compilation cache: each compiles the same small
    programs, and the cache only skips recompiling them (the compiled code, so the numbers, are
    the same)."""
    ENV.update(cache_env(tmp_path_factory.mktemp("cache")))


def rnnjax(*args, cwd=None, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "rnnjax.cli", *map(str, args)],
        capture_output=True, text=True, cwd=cwd, timeout=timeout, env=ENV,
    )  # fmt: skip


def ok(result):
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout


def rows(run, name="metrics.jsonl"):
    return [json.loads(line) for line in (run / name).read_text().splitlines()]


def snapshot(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny char-LM run shared by the tests that read it (training costs seconds)."""
    out = tmp_path_factory.mktemp("runs") / "charlm"
    args = ["--data", TINY, "--steps", "20", "--eval-every", "10", "--checkpoint-every", "10"]
    stdout = ok(rnnjax("train", *args, *SMALL, "--out", out))
    return out, stdout


def test_train_writes_a_run_directory(run):
    out, stdout = run
    assert {"config.json", "metrics.jsonl", "checkpoints", "loss.png", "vocab.json"} <= {
        p.name for p in out.iterdir()
    }
    config = json.loads((out / "config.json").read_text())
    assert config["task"] == "charlm" and config["hidden"] == 16 and config["cell"] == "lstm"
    lines = rows(out)
    assert all({"step", "split", "loss", "bpc"} <= set(r) for r in lines)
    assert [r["step"] for r in lines if r["split"] == "val"] == [10, 20]
    assert (out / "loss.png").stat().st_size > 1000
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["10", "20"]
    assert "held-out bits per character" in stdout and "sample (temperature 0.8):" in stdout


def test_evaluate_json_is_full_precision(run):
    out, _ = run
    metrics = json.loads(ok(rnnjax("evaluate", "--run", out, "--json")))
    assert metrics["step"] == 20 and {"loss", "bpc", "baseline_bpc"} <= set(metrics)
    last_val = [r for r in rows(out) if r["split"] == "val"][-1]
    assert metrics["bpc"] == last_val["bpc"]  # same checkpoint, same float, every digit
    assert "bpc" in ok(rnnjax("evaluate", "--run", out))


def test_generate_is_reproducible_and_varies_with_the_seed(run):
    out, _ = run
    a = ok(
        rnnjax("generate", "--run", out, "--prompt", "The state", "--length", "40", "--seed", "1")
    )
    b = ok(
        rnnjax("generate", "--run", out, "--prompt", "The state", "--length", "40", "--seed", "1")
    )
    c = ok(
        rnnjax("generate", "--run", out, "--prompt", "The state", "--length", "40", "--seed", "2")
    )
    assert a == b and a != c
    assert a.startswith("The state") and len(a.rstrip("\n")) == len("The state") + 40


def test_resume_continues_the_run(run, tmp_path):
    """The shared run (20 steps, validated and saved every 10), resumed on a copy to 30."""
    out = shutil.copytree(run[0], tmp_path / "lm")
    before = snapshot(out / "checkpoints")
    base = ["--data", TINY, "--checkpoint-every", "10", "--eval-every", "10", *SMALL, "--out", out]
    ok(rnnjax("train", "--steps", "30", "--resume", *base))
    assert [e["step"] for e in rows(out, "events.jsonl") if e["event"] == "resume"] == [20]
    assert [r["step"] for r in rows(out) if r["split"] == "val"] == [10, 20, 30]
    assert json.loads((out / "config.json").read_text())["steps"] == 30
    after = snapshot(out / "checkpoints")
    assert before["20/state/_METADATA"] == after["20/state/_METADATA"]  # untouched
    assert any(k.startswith("30/") for k in after)


def test_truncated_bptt_stream(tmp_path):
    out = tmp_path / "tbptt"
    ok(rnnjax("train", "--data", TINY, "--steps", "6", "--tbptt", "8", *SMALL, "--out", out))
    assert [r["step"] for r in rows(out) if r["split"] == "train"] == [6]
    ok(
        rnnjax(
            "train",
            "--data",
            TINY,
            "--steps",
            "9",
            "--tbptt",
            "8",
            *SMALL,
            "--out",
            out,
            "--resume",
        )
    )


def test_default_corpus_needs_no_data_file_and_default_out_is_numbered(tmp_path):
    """Two runs without --out: the first on the default corpus (no --data), the second on a
    file; the second is numbered, not written over the first."""
    args = ["train", "--steps", "2", "--eval-every", "0", *SMALL]
    out = ok(rnnjax(*args, cwd=tmp_path))
    config = json.loads((tmp_path / "runs" / "charlm" / "config.json").read_text())
    assert config["data"] is None and "bits per character" in out
    ok(rnnjax(*args, "--data", TINY, cwd=tmp_path))
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["charlm", "charlm-2"]
    assert json.loads((tmp_path / "runs" / "charlm-2" / "config.json").read_text())["data"]


def test_info():
    out = ok(rnnjax("info"))
    assert "jax" in out and "devices" in out and "gpu" in out


# ----------------------------------------------------------------------------- bad input


def bad_files(tmp: Path) -> dict[str, Path]:
    (tmp / "empty.txt").write_text("")
    (tmp / "binary.bin").write_bytes(b"\x89PNG\x00\x00\x01\x02" * 10)
    (tmp / "latin1.txt").write_bytes("caf\xe9 au lait, cr\xe8me br\xfbl\xe9e".encode("latin-1") * 5)
    return {
        "missing": tmp / "nope.txt",
        "empty": tmp / "empty.txt",
        "binary": tmp / "binary.bin",
        "latin1": tmp / "latin1.txt",
    }


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data", "{missing}"], r"nope.txt does not exist"),
        (["--data", "{empty}"], r"empty.txt is empty"),
        (["--data", "{binary}"], r"binary.bin looks binary"),
        (["--data", "{latin1}"], r"latin1.txt is not valid UTF-8"),
        (["--task", "poetry"], r"invalid choice: 'poetry' \(choose from '?charlm'?, '?forecast"),
        (
            ["--cell", "transformer"],
            r"invalid choice: 'transformer' \(choose from '?lstm'?, '?gru'?, '?elman",
        ),
        (["--steps", "-5"], r"--steps: expected a number >= 1, got -5"),
        (["--hidden", "0"], r"--hidden: expected a number >= 1, got 0"),
        (["--lr", "abc"], r"--lr: expected a float, got 'abc'"),
        (["--dropout", "1.5"], r"--dropout: expected a rate in \[0, 1\), got 1.5"),
        (["--bidirectional", "--data", str(TINY)], r"--bidirectional does not apply to the charlm"),
        (["--seq-len", "5000", "--data", str(TINY)], r"too few for windows of --seq-len 5000"),
    ],
)
def test_bad_train_input_is_one_line_exit_2(tmp_path, args, message):
    files = bad_files(tmp_path)
    args = [a.format(**files) for a in args]
    out = tmp_path / "run"
    result = rnnjax("train", *args, "--steps", "2", "--no-progress", "--out", out)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert re.search(message, lines[0]), lines[0]
    assert not out.exists()  # a failed new run leaves nothing behind


def test_an_existing_run_is_never_clobbered(run, tmp_path):
    out, _ = run
    before = snapshot(out)
    checks = [
        # A new run into a taken directory.
        (["train", "--data", TINY, *SMALL, "--out", out], "already holds a run; pass --resume"),
        # A resume that changes the model.
        (
            ["train", "--resume", "--hidden", "32", "--out", out],
            "--hidden 32 differs from the run's 16",
        ),
        (
            ["train", "--resume", "--cell", "gru", "--out", out],
            "--cell gru differs from the run's lstm",
        ),
        # Evaluating or generating from what is not a run.
        (["evaluate", "--run", tmp_path], "is not a run directory"),
        (["generate", "--run", out, "--top-p", "0"], "--top-p: expected a number > 0.0"),
    ]
    for args, message in checks:
        result = rnnjax(*args)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert snapshot(out) == before


def test_resume_from_a_different_model_names_the_leaf(run, tmp_path):
    out, _ = run
    other = tmp_path / "other"
    other.mkdir()
    for name in ("checkpoints", "vocab.json", "metrics.jsonl"):
        src = out / name
        if src.is_dir():
            shutil.copytree(src, other / name)
        else:
            (other / name).write_bytes(src.read_bytes())
    config = json.loads((out / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "hidden": 24}))  # not the saved shape
    before = snapshot(other)
    result = rnnjax("train", "--resume", "--out", other, "--no-progress")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "does not match the model" in result.stderr and "w_h" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    after = snapshot(other)
    assert {k: v for k, v in after.items() if k != "config.json"} == {
        k: v for k, v in before.items() if k != "config.json"
    }
    result = rnnjax("evaluate", "--run", other)
    assert result.returncode == 2 and "does not match the model" in result.stderr
