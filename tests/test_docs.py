"""The README's code blocks and the examples run as written; ruff is clean."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index):
    exec(compile(BLOCKS[index], f"README.md[python block {index}]", "exec"), {})


def test_readme_starts_with_the_two_commands_ci_runs():
    first_block = re.search(r"```bash\n(.*?)```", README, flags=re.S).group(1).strip().splitlines()
    assert len(first_block) == 2
    assert first_block[0].startswith("python -m pip install -e . && rnnjax train")
    assert first_block[1].startswith('python -m pip install -e ".[test]" && python -m pytest')
    assert "python -m pip install .*&& python -m pytest" in (ROOT / ".ci" / "run").read_text()


def test_quickstart_learns():
    """The main job, as a real subprocess: it must beat chance by a wide margin."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py"), "--steps", "300"],
        capture_output=True, text=True, timeout=300, check=True,
    ).stdout  # fmt: skip
    accuracy = float(re.search(r"held-out loss \S+  accuracy (\S+)", out).group(1))
    assert accuracy > 0.9, out


def test_ruff_lint_and_format():
    ruff = [sys.executable, "-m", "ruff"]
    paths = ["rnnjax", "tests", "examples"]
    lint = subprocess.run([*ruff, "check", *paths], cwd=ROOT, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    fmt = subprocess.run(
        [*ruff, "format", "--check", *paths], cwd=ROOT, capture_output=True, text=True
    )
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr


def test_native_page_names_every_switch_and_threshold():
    """docs/native.md, the one page on the native kernels' dispatch, names every ``RNNJAX_*``
    switch the kernels, their JAX rules and the build read, and the thresholds' values."""
    from rnnjax.cells._native import thresholds

    page = (ROOT / "docs" / "native.md").read_text()
    sources = [
        *ROOT.glob("rnnjax/_native/*.cc"), *ROOT.glob("rnnjax/_native/*.py"),
        *ROOT.glob("rnnjax/cells/**/*.py"), ROOT / "setup.py",
    ]  # fmt: skip
    switches = {s for f in sources for s in re.findall(r"\bRNNJAX_[A-Z0-9_]+", f.read_text())}
    assert {"RNNJAX_NATIVE", "RNNJAX_AVX512", "RNNJAX_ONEDNN_BUILD"} <= switches
    assert sorted(s for s in switches if f"`{s}`" not in page) == []
    values = [thresholds.INFERENCE_MAX_UNITS, *thresholds.ONEDNN_MIN_UNITS.values()]
    assert sorted(str(v) for v in values if f"{v}" not in page) == []
