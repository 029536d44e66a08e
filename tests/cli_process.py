"""The rnnjax command as a real subprocess, for the task tests."""

import json
import os
import shutil
import subprocess
import sys


def cache_env(cache):
    """The environment of a process that shares the session's compilation cache (conftest.py),
    or, outside the test session, one in ``cache``: only the first process to need a function
    compiles it (the same executable, so the same numbers)."""
    return {
        "JAX_COMPILATION_CACHE_DIR": os.environ.get("RNNJAX_TEST_JAX_CACHE")
        or str(cache / "jax-cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }


def launch(*args, cache):
    """``rnnjax ARGS`` as a process, sharing a compilation cache (:func:`cache_env`)."""
    env = {**os.environ, **cache_env(cache)}
    return subprocess.Popen(
        [sys.executable, "-m", "rnnjax.cli", *map(str, args)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip


def finish(process):
    try:
        stdout, stderr = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def rnnjax(*args, cache):
    return finish(launch(*args, cache=cache))


def ok(result):
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def train_evaluate_resume(args, root, out, straight, first, total):
    """Train ``first`` steps into ``out``; then, all at once: evaluate that checkpoint (on a
    copy), resume ``out`` to ``total`` steps, and train ``total`` steps without a stop into
    ``straight``. Returns what each step showed, for the tests to compare."""
    seen = {"train": ok(rnnjax("train", *args, "--out", out, "--steps", str(first), cache=root))}
    seen["files"] = sorted(p.name for p in out.iterdir())
    seen["checkpoints"] = sorted(p.name for p in (out / "checkpoints").iterdir())
    seen["metrics"] = rows(out / "metrics.jsonl")
    at_first = shutil.copytree(out, root / f"{out.name}-at-{first}")
    running = [
        launch("evaluate", "--run", at_first, "--json", cache=root),
        launch("train", *args, "--out", out, "--steps", str(total), "--resume", cache=root),
        launch("train", *args, "--out", straight, "--steps", str(total), cache=root),
    ]
    evaluated, _, _ = [ok(result) for result in [finish(process) for process in running]]
    seen["evaluate"] = json.loads(evaluated)
    return seen
