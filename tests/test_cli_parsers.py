"""The rnnjax command's parsers and what each command needs: every flag of every command,
subcommand and task says what it does and its default; every command runs with only its
required flags; the flags a task declares are its own; train --help shows its groups."""

import argparse
import json
import re
from pathlib import Path

import numpy as np
import pytest
from cli_process import finish, launch, ok

from rnnjax import cli, tasks
from rnnjax.cli import runs
from rnnjax.tasks import charlm, forecast
from rnnjax.tasks.base import COMMON_DEFAULTS
from rnnjax.tasks.flags import declared, generate_options, generates

ROOT = Path(__file__).resolve().parents[1]
TINY_TEXT = ROOT / "tests" / "data" / "tiny.txt"


def actions(parser: argparse.ArgumentParser, path=("rnnjax",)):
    """``(command path, action)`` for every flag of ``parser`` and its subcommands, but -h."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from actions(sub, (*path, name))
        elif action.option_strings and not isinstance(action, argparse._HelpAction):
            yield path, action


def problems(parser: argparse.ArgumentParser, task: str) -> list[str]:
    """The flags of ``parser`` (built for ``task``) without a help text, or whose help does not
    state the default they have. A train flag's default is the task's configuration's."""
    config = runs.defaults(task)
    found = []
    for path, action in actions(parser):
        name = " ".join([*path, action.option_strings[0]])
        if not action.help or len(action.help) < 12:
            found.append(f"{name}: no help")
            continue
        default = action.default
        if path[-1] == "train" and action.dest in config and action.dest != "task":
            if action.default is not None:  # else a resumed run cannot tell what was given
                found.append(f"{name}: default {action.default!r}, not None")
            default = config[action.dest]
        if default is None or default is False:
            continue
        if "default" not in action.help:
            found.append(f"{name}: the help does not state the default {default!r}")
        elif path[-1] == "train" and str(default) not in action.help:
            found.append(f"{name}: the help does not show {task}'s default {default!r}")
    return found


@pytest.mark.parametrize("task", tasks.NAMES)
def test_every_flag_says_what_it_does_and_its_default(task):
    parser = cli.parser(task=task)
    assert problems(parser, task) == []
    names = {
        a.option_strings[0] for path, a in actions(parser) if path[-1] in ("train", "generate")
    }
    mine = {a.option_strings[0] for kind in ("train", "generate") for a in declared(task, kind)}
    assert mine <= names  # the walk saw the task's own flags


def test_the_flag_check_finds_what_is_missing():
    parser = cli.errors.Parser(prog="rnnjax")
    sub = parser.add_subparsers().add_parser("train")
    sub.add_argument("--hidden", type=int, help="hidden units per layer")  # no default shown
    sub.add_argument("--layers", type=int, default=1, help="stacked layers (default: 1)")
    sub.add_argument("--quiet", action="store_true")
    assert problems(parser, "charlm") == [
        "rnnjax train --hidden: the help does not state the default 256",
        "rnnjax train --layers: default 1, not None",
        "rnnjax train --quiet: no help",
    ]


@pytest.mark.parametrize("task", tasks.NAMES)
def test_a_tasks_train_flags_take_its_defaults(task):
    """The hook's contract: a declared train flag is None unless given, and the task's
    DEFAULTS hold its value otherwise (so config.json always has it)."""
    for action in declared(task, "train"):
        assert action.default is None, action
        assert action.dest in tasks.module(task).DEFAULTS and action.dest not in COMMON_DEFAULTS


def sections(help_text: str) -> dict[str, str]:
    """``--help`` text split at its section titles (a line ``title:`` at the margin)."""
    parts = re.split(r"^(\S[^\n]*):\n", help_text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def help_of(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit:
        cli.main([*argv, "--help"])
    assert exit.value.code == 0
    return capsys.readouterr().out


def test_train_help_groups_its_flags(capsys):
    groups = sections(help_of(["train"], capsys))
    expected = {
        "task and data": ["--task", "--data", "--seq-len"],
        "model": ["--cell", "--hidden", "--layers", "--bidirectional", "--dropout",
                  "--recurrent-dropout", "--precision", "--heads", "--state-size",
                  "--layer-norm", "--peephole", "--log-space"],
        "optimisation": ["--steps", "--batch-size", "--lr", "--clip", "--seed", "--stop-at"],
        "run directory": ["--out", "--resume", "--checkpoint-every", "--eval-every",
                          "--no-progress"],
        "charlm task": ["--tbptt"],
    }  # fmt: skip
    assert list(groups) == ["options", *expected]
    for title, flags in expected.items():
        assert re.findall(r"^  (--[\w-]+)", groups[title], flags=re.M) == flags, title
    assert "(default: the task's (charlm: 256))" in " ".join(groups["model"].split())
    forecast_help = sections(help_of(["train", "--task", "forecast"], capsys))
    assert "forecast task" in forecast_help and "charlm task" not in forecast_help
    assert "--column" in forecast_help["forecast task"]
    assert "(forecast: 32)" in " ".join(forecast_help["model"].split())


def test_generate_help_without_a_run_lists_every_tasks_flags(capsys):
    text = help_of(["generate"], capsys)
    owned = [("charlm", "--temperature"), ("forecast", "--horizon"), ("seq2seq", "--prompt")]
    for title, flag in owned:
        assert re.search(rf"^{title} runs:\n(  .*\n|\n)*?  {flag} ", text, flags=re.M), title


@pytest.mark.parametrize(
    ("task", "flag", "owner"),
    [
        (task, a.option_strings[0], owner)
        for owner in tasks.NAMES
        for a in declared(owner, "train")
        for task in tasks.NAMES
        if task != owner
    ],
)
def test_another_tasks_train_flag_is_refused_naming_its_task(task, flag, owner, tmp_path, capsys):
    out = tmp_path / "never"
    assert cli.main(["train", "--task", task, flag, "1", "--out", str(out)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"rnnjax: error: {flag} is a flag of the {owner} task, not of {task}: drop it (rnnjax "
        f"train --task {task} --help lists the flags {task} takes)"
    ]
    assert not out.exists()


def test_generate_takes_the_flags_of_the_runs_task(tmp_path, capsys):
    """Read from the run's config.json before anything is built or restored."""
    for task in ("forecast", "adding"):
        (tmp_path / task).mkdir()
        (tmp_path / task / "config.json").write_text(json.dumps({"task": task}))
    assert cli.main(["generate", "--run", str(tmp_path / "forecast"), "--prompt", "x"]) == 2
    assert capsys.readouterr().err.startswith(
        "rnnjax: error: --prompt is a flag of charlm and seq2seq runs, not of this forecast run"
    )
    assert cli.main(["generate", "--run", str(tmp_path / "adding")]) == 2
    assert "the adding task does not generate" in capsys.readouterr().err
    text = help_of(["generate", "--run", str(tmp_path / "forecast")], capsys)
    assert "--horizon" in text and "--prompt" not in text
    assert [p.name for p in tmp_path.glob("*/*")] == ["config.json", "config.json"]


# ----------------------------------------------------------------------------- generate


def small(task: str, **flags) -> dict:
    return {**runs.defaults(task), "hidden": 8, "batch_size": 4, **flags}


@pytest.mark.parametrize("task", tasks.NAMES)
def test_generate_with_no_flags(task, tmp_path):
    """Every task that declares generate flags generates from their defaults alone, the
    others have no generate; charlm without a prompt once failed (None + str)."""
    config = small(task, data=str(TINY_TEXT), seq_len=16) if task == "charlm" else small(task)
    built = tasks.module(task).build(config, tmp_path)
    assert generates(task) == (built.generate is not None)
    if not generates(task):
        return
    out = built.generate(built.params, generate_options(task))
    if task == "charlm":  # the start of the text, then --length characters
        first = charlm.load_text(config)[0]
        assert out[0] == first and len(out) == 1 + 300
        assert (
            built.generate(built.params, generate_options(task, prompt="ab", length=4))[:2] == "ab"
        )
    elif task == "seq2seq":
        assert re.fullmatch(r"\d{1,3}\+\d{1,3} -> \d* \(beam: \d*\)", out)
    else:
        lines = out.splitlines()
        assert lines[0] == "step,forecast" and len(lines) == 1 + forecast.HORIZON
        steps, values = zip(*(line.split(",") for line in lines[1:]), strict=True)
        first = forecast.LENGTH  # the generated series' length: the step after its last value
        assert [int(s) for s in steps] == list(range(first, first + forecast.HORIZON))
        assert np.isfinite([float(v) for v in values]).all()


# ----------------------------------------------------------------------------- the real command


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def run(cache):
    """A tiny charlm run (a few seconds) for the commands that read one."""
    out = cache / "charlm"
    args = ["--data", TINY_TEXT, "--steps", "2", "--hidden", "8", "--seq-len", "8"]
    args += ["--batch-size", "2", "--eval-every", "0", "--no-progress", "--out", out]
    ok(finish(launch("train", *args, cache=cache)))
    return out


def test_every_command_runs_with_only_its_required_flags(run, cache):
    """train needs none (the fixture only keeps it small), nor does info; generate and evaluate
    need --run. bench SUITE needs no flag either, but its defaults take minutes: test_bench.py
    runs each suite through the command at its smallest sizes."""
    commands = {
        "generate": ["generate", "--run", run],
        "evaluate": ["evaluate", "--run", run],
        "info": ["info"],
    }
    processes = {name: launch(*argv, cache=cache) for name, argv in commands.items()}
    seen = {name: ok(finish(process)) for name, process in processes.items()}
    text = TINY_TEXT.read_text(encoding="utf-8")
    sample = seen["generate"].removesuffix("\n")
    assert sample[0] == text[0] and len(sample) == 1 + 300  # from the start of the text
    assert re.search(r"^ *bpc  \d", seen["evaluate"], flags=re.M)
    assert "devices" in seen["info"]
