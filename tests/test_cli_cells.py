"""``rnnjax train --cell NAME`` for every cell of the tasks' registry, and the cell flags."""

import json
import math

import pytest
from cli_process import finish, launch, ok, rows

from rnnjax import cli
from rnnjax.cli import runs
from rnnjax.tasks.base import CELL_OPTIONS, CELLS, make_cell

TINY = "--task adding --hidden 8 --steps 2 --batch-size 2 --seq-len 6 --eval-every 0".split()
TINY += ["--checkpoint-every", "0", "--no-progress"]
# Each cell's own options, so every flag is exercised by a real run too.
OWN = {
    "lstm": ["--layer-norm", "--peephole"],
    "gru": ["--layer-norm"],
    "mingru": ["--log-space"],
    "rglru": ["--heads", "2"],
    "lru": ["--state-size", "4"],
    "slstm": ["--heads", "2"],
    "mlstm": ["--heads", "2"],
}


def test_every_cell_trains_in_a_real_process(tmp_path):
    """Each exits 0 with a finite training loss. The first runs alone and fills the shared
    compilation cache with what every cell's run shares (data, optimizer, loss); then the rest
    run all at once."""

    def train(name):
        args = ["train", *TINY, "--cell", name, *OWN.get(name, []), "--out", tmp_path / name]
        return launch(*args, cache=tmp_path)

    first, *rest = CELLS
    running = {first: train(first)}
    ok(finish(running[first]))
    running.update({name: train(name) for name in rest})
    for name, process in running.items():
        ok(finish(process))
        losses = [r["loss"] for r in rows(tmp_path / name / "metrics.jsonl")]
        assert losses and all(math.isfinite(v) for v in losses), name
        assert runs.load_config(tmp_path / name)["cell"] == name


@pytest.mark.parametrize("key", sorted(CELL_OPTIONS))
def test_a_cell_flag_of_another_cell_is_one_line(key, tmp_path, capsys):
    flag = "--" + key.replace("_", "-")
    value = [] if key in ("layer_norm", "peephole", "log_space") else ["2"]
    cells = CELL_OPTIONS[key][1]
    other = next(c for c in CELLS if c not in cells)
    out = tmp_path / "run"
    assert cli.main(["train", "--cell", other, flag, *value, "--out", str(out)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"rnnjax: error: {flag} does not apply to the {other} cell; it applies to "
        f"{', '.join(cells)}"
    ]
    assert not out.exists()  # nothing left behind


def test_bfloat16_with_a_float32_only_cell_is_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--cell", "mlstm", "--precision", "bfloat16", "--out", str(out)]
    assert cli.main(argv) == 2
    assert capsys.readouterr().err.splitlines() == [
        "rnnjax: error: --precision bfloat16 does not apply to the mlstm cell, which computes in "
        "float32; it applies to lstm, gru, elman"
    ]
    assert not out.exists()


def test_a_config_from_before_the_cell_flags_reads_back(tmp_path):
    """Runs written before the cell flags existed lack their keys: their defaults fill in."""
    config = runs.defaults("adding")
    old = {k: v for k, v in config.items() if k not in CELL_OPTIONS}
    (tmp_path / "config.json").write_text(json.dumps(old))
    assert runs.load_config(tmp_path) == config
    assert make_cell(old, 4).init is not None
