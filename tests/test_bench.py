"""rnnjax bench at tiny sizes: both suites through the Python API, the compile time limit (a
candidate killed mid-compile while the others are measured), a peer that is not installed, the
CLI as a real process, and bad CLI input (exit status 2, one line)."""

import importlib
import json
import os
import subprocess
import sys

import pytest

import rnnjax.bench as bench
from rnnjax import cli
from rnnjax._native import linear as native_linear

peers_module = importlib.import_module("rnnjax.bench.peers")
_harness = importlib.import_module("rnnjax.bench._harness")
zoo_module = importlib.import_module("rnnjax.bench.zoo")
PNG = b"\x89PNG\r\n\x1a\n"
# min_sample_s: a sample of the tiny programs needs only a few ms, not the default 20; settle_s:
# one untimed call before each sample, not 0.15 s of them (the settle serves the numbers, which
# these tests do not judge; it was a third of the peers fixture's time).
FAST = {"min_sample_s": 0.005, "settle_s": 0.0}
TINY = {"batch": 2, "input_size": 3, "hidden": 8, **FAST}
MODES = ("fwd", "fwd+bwd")


@pytest.fixture(scope="module")
def scan_result():
    """lstm at T = 4 and 8; the Python loop gets a compile limit of 0 s, which expires the
    moment the worker announces that compile (deterministically), so at T=4 the worker is
    killed, and a fresh worker compiles and times the scans without it."""
    return bench.scan_vs_unroll(
        cells=("lstm",), lengths=(8, 4), unrolls=(4, "loop"), repeats=2,
        compile_timeouts={"loop": 0.0}, **TINY,
    )  # fmt: skip


@pytest.fixture(scope="module")
def peers_result():
    """Every peer at one tiny shape, plus a registered peer whose package does not exist."""
    missing = peers_module.Peer("rnnjax_no_such_package", {"lstm": ("missing LSTM",)})
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(peers_module.PEERS, "missing", missing)
        return bench.peers(shapes=((2, 4, 3, 8),), cells=("lstm", "gru"), repeats=2, **FAST)


def check_document(result, suite, settle_s=None):
    assert result["suite"] == suite and result["schema"] == 1
    assert isinstance(result["command"], str) and result["command"]
    machine = result["machine"]
    assert machine["cpu_count"] >= 1 and machine["versions"]["jax"] and machine["backend"]
    assert {"reference", "compile", "memory", "statistic", "repeats"} <= set(result["methodology"])
    if settle_s is not None:  # what the workers were given, recorded
        assert result["methodology"]["settle_s"] == result["config"]["settle_s"] == settle_s
    assert json.loads(json.dumps(result)) == result  # plain JSON


def check_ok(row):
    assert row["status"] == "ok", row
    assert row["time_s"] > 0 and row["min_s"] <= row["time_s"] <= max(row["samples_s"])
    assert len(row["samples_s"]) == 2 and row["calls_per_sample"] >= 1
    assert row["iqr_s"] == pytest.approx(row["q3_s"] - row["q1_s"])


def test_scan_vs_unroll_schema_and_ratios(scan_result):
    check_document(scan_result, "scan-vs-unroll", settle_s=0.0)
    assert scan_result["config"]["lengths"] == [4, 8]
    assert scan_result["config"]["unrolls"] == [1, 4, "loop"]  # the reference is always added
    rows = scan_result["results"]
    assert [(r["T"], r["candidate"], r["mode"]) for r in rows] == [
        (T, c, m)
        for T in (4, 8)
        for c in ("scan(unroll=1)", "scan(unroll=4)", "loop")
        for m in ("fwd", "fwd+bwd")
    ]
    for row in rows:
        assert row["cell"] == "lstm"
        if row["candidate"] == "loop":
            continue
        check_ok(row)
        assert row["trace_s"] > 0 and row["compile_s"] > 0
        memory = row["memory"]
        total = memory["temp_bytes"] + memory["argument_bytes"] + memory["output_bytes"]
        assert memory["peak_bytes"] == total > 0
        ref = next(
            r for r in rows
            if (r["T"], r["mode"], r["candidate"]) == (row["T"], row["mode"], "scan(unroll=1)")
        )  # fmt: skip
        assert row["vs_reference"] == pytest.approx(row["time_s"] / ref["time_s"])
    peak = {
        r["T"]: r["memory"]["peak_bytes"]
        for r in rows
        if r["candidate"] == "scan(unroll=1)" and r["mode"] == "fwd+bwd"
    }
    assert peak[8] > peak[4]  # the inputs and outputs alone grow with T


def test_compile_timeout_kills_that_candidate_and_skips_it_at_larger_t(scan_result):
    loop = {(r["T"], r["mode"]): r for r in scan_result["results"] if r["candidate"] == "loop"}
    assert all(r["status"] == "timed out" and r["compile_timeout_s"] == 0 for r in loop.values())
    assert "time_s" not in loop[(4, "fwd")]
    assert loop[(4, "fwd")]["reason"] == "trace + compile ran past 0 s"
    assert loop[(4, "fwd+bwd")]["reason"] == "not tried: fwd timed out"
    assert loop[(8, "fwd")]["reason"] == "not tried: timed out at a smaller size (lstm T=4)"
    assert loop[(8, "fwd+bwd")]["reason"] == loop[(8, "fwd")]["reason"]
    text = importlib.import_module("rnnjax.bench.scan_vs_unroll").format_table(scan_result)
    assert "lstm  T=8" in text and "timed out" in text and "> 0" in text


def test_peers_schema_ratios_and_missing_peer(peers_result):
    check_document(peers_result, "peers", settle_s=0.0)
    assert "torch" in peers_result["methodology"]["own_process"]
    rows = peers_result["results"]
    by = {(r["cell"], r["candidate"], r["mode"]): r for r in rows}
    expected = {
        "lstm": ["rnnjax", "flax.linen LSTMCell", "flax.linen OptimizedLSTMCell",
                 "flax.nnx LSTMCell", "flax.nnx OptimizedLSTMCell", "equinox LSTMCell",
                 "torch nn.LSTM", "jax.experimental.rnn.lstm", "rnnjax fused", "rnnjax bf16",
                 "torch nn.LSTM bf16", "rnnjax scan", "missing LSTM"],
        "gru": ["rnnjax", "flax.linen GRUCell", "flax.nnx GRUCell", "equinox GRUCell",
                "torch nn.GRU", "rnnjax fused", "rnnjax bf16", "torch nn.GRU bf16", "rnnjax scan"],
    }  # fmt: skip
    assert sorted(by) == sorted((c, n, m) for c in expected for n in expected[c] for m in MODES)
    gpu = peers_result["machine"]["backend"] == "gpu"
    for (cell, name, mode), row in by.items():
        assert row["shape"] == "2x4x3x8" and (row["batch"], row["T"], row["hidden"]) == (2, 4, 8)
        if name == "missing LSTM":
            assert row["status"] == "not installed" and row["peer"] == "missing"
            assert "rnnjax_no_such_package is not installed" in row["error"]
            continue
        if name == "jax.experimental.rnn.lstm" and not gpu:
            assert row["status"] == "unavailable" and "GPU" in row["error"]
            continue
        check_ok(row)
        ref = by[(cell, "rnnjax", mode)]
        assert row["vs_reference"] == pytest.approx(row["time_s"] / ref["time_s"])
        if name != "rnnjax":
            assert row["rnnjax_over_peer"] == pytest.approx(ref["time_s"] / row["time_s"])
            assert row["speedup"] == pytest.approx(1 / row["rnnjax_over_peer"])
        if name.startswith("torch"):
            assert row["trace_s"] is None and row["memory"] is None
            assert row["notes"]["torch_threads"] == peers_result["machine"]["torch_threads"] >= 1
            assert row["notes"]["layout"].startswith("time-major")
            bf16 = "torch.autocast bfloat16"
            assert row["notes"]["precision"] == (bf16 if name.endswith("bf16") else "float32")
        else:
            assert row["compile_s"] > 0 and row["memory"]["peak_bytes"] > 0
    linen = [
        s for s in peers_result["summary"]
        if (s["cell"], s["mode"], s["peer"]) == ("lstm", "fwd+bwd", "flax-linen")
    ]  # fmt: skip
    assert len(linen) == 1
    fastest = min(
        ("flax.linen LSTMCell", "flax.linen OptimizedLSTMCell"),
        key=lambda n: by[("lstm", n, "fwd+bwd")]["time_s"],
    )
    assert linen[0]["fastest"] == fastest
    text = peers_module.format_table(peers_result)
    assert "not installed" in text and "rnnjax/peer" in text and "gru  B x T x I x H" in text


def test_plots_are_pngs(scan_result, peers_result, tmp_path):
    bench.plot_scan_vs_unroll(scan_result, tmp_path / "s.png")
    bench.plot_peers(peers_result, tmp_path / "p.png")
    for name in ("s.png", "p.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG


def test_cli_runs_a_suite_as_a_process(tmp_path):
    out = tmp_path / "bench"
    args = ["--cells", "gru", "--lengths", "3", "--batch", "2", "--input-size", "3", "--hidden",
            "4", "--unrolls", "full,loop", "--repeats", "2", "--settle", "0", "--out",
            str(out)]  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "rnnjax.cli", "bench", "scan-vs-unroll", *args],
        capture_output=True, text=True, timeout=300, env=dict(os.environ),
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads((out / "scan-vs-unroll.json").read_text())
    assert (out / "scan-vs-unroll.png").read_bytes()[:8] == PNG
    check_document(result, "scan-vs-unroll")
    assert result["command"].startswith("rnnjax bench scan-vs-unroll --cells=gru --lengths=3")
    assert result["config"]["hidden"] == 4 and result["config"]["unrolls"] == [1, "full", "loop"]
    assert result["methodology"]["settle_s"] == 0.0
    assert len(result["results"]) == 6
    for row in result["results"]:
        check_ok(row)
    assert "gru  T=3" in done.stdout and "scan(unroll=True)" in done.stdout
    assert f"wrote {out / 'scan-vs-unroll.json'}" in done.stdout


def test_cli_replaces_its_own_result_and_refuses_others(peers_result, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "peers.json").write_text(json.dumps(peers_result))  # a previous peers result
    argv = ["bench", "peers", "--shapes", "2x4x3x8", "--cells", "gru", "--peers", "torch",
            "--repeats", "2", "--settle", "0", "--out", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    result = json.loads((out / "peers.json").read_text())
    assert result["command"].startswith("rnnjax bench peers --shapes=2x4x3x8 --cells=gru")
    assert result["config"]["shapes"] == [[2, 4, 3, 8]] and result["config"]["cells"] == ["gru"]
    assert {row["candidate"] for row in result["results"]} == {"rnnjax", "torch nn.GRU"}
    for row in result["results"]:
        check_ok(row)
    assert (out / "peers.png").read_bytes()[:8] == PNG
    assert "rnnjax/peer" in capsys.readouterr().out
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "peers.json").write_text('{"not": "a bench result"}')
    assert cli.main([*argv[:-1], str(foreign)]) == 2
    err = capsys.readouterr().err
    # One line and no progress lines: refused before any worker started.
    assert err.count("\n") == 1 and "is not a previous peers result" in err
    assert (foreign / "peers.json").read_text() == '{"not": "a bench result"}'


def test_cli_memory_runs_the_memory_suite(tmp_path, capsys):
    # A real run at a tiny size: one worker process per (T, mode), peak RSS read back; the LRU
    # reads --hidden features (not --input-size) through its parallel form.
    argv = ["bench", "memory", "--cell", "lru", "--lengths", "6", "--hidden", "4", "--batch",
            "2", "--input-size", "3", "--modes", "none,sqrt", "--loss", "final", "--timeout",
            "120", "--kernels", "native", "--out", str(tmp_path)]  # fmt: skip
    assert cli.main(argv) == 0
    result = json.loads((tmp_path / "memory.json").read_text())
    assert result["command"].startswith("rnnjax bench memory --cell=lru")
    assert "--loss=final" in result["command"] and "--kernels=native" in result["command"]
    assert result["config"]["loss"] == "final" and result["config"]["cell"] == "lru"
    assert result["config"]["kernels"] == "native"
    rows = {row["mode"]: row for row in result["results"]}
    assert sorted(rows) == ["none", "sqrt"]
    for row in rows.values():
        assert row["status"] == "ok" and row["T"] == 6 and row["finite"] is True
        assert row["peak_rss_bytes"] >= row["baseline_rss_bytes"] > 0
    assert rows["sqrt"]["k"] == 2 and rows["none"]["k"] is None
    assert (tmp_path / "memory.png").read_bytes()[:8] == PNG[:8]
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["scan-vs-unroll", "--lengths", "4,x"],
         "--lengths: expected comma-separated positive integers like 16,64,256, got '4,x'"),
        (["scan-vs-unroll", "--lengths", "0"], "positive integers"),
        (["scan-vs-unroll", "--cells", "lstm,tree"], "'tree' is neither"),
        (["scan-vs-unroll", "--cells", "no_such_mod:f"], "cannot import 'no_such_mod'"),
        (["scan-vs-unroll", "--unrolls", "2,half"], "positive ints, full or loop, got '2,half'"),
        (["scan-vs-unroll", "--compile-timeout", "0"], "--compile-timeout: expected a number > 0"),
        (["scan-vs-unroll", "--repeats", "x"], "--repeats: expected a int, got 'x'"),
        (["peers", "--shapes", "16x256x32"], "BxTxIxH shapes"),
        (["peers", "--peers", "torch,mxnet"], "'mxnet' is not one"),
        (["peers", "--cells", "elman,tree"], "from lstm,gru,elman,mingru"),
        (["memory", "--modes", "none,half"], "none, step, sqrt or ints, got 'none,half'"),
        (["memory", "--lengths", ""], "positive integers"),
        (["sorting"], "invalid choice: 'sorting'"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_and_status_2(argv, message, capsys, tmp_path):
    assert cli.main(["bench", *argv, "--out", str(tmp_path / "never")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and err.startswith("rnnjax bench")
    assert not (tmp_path / "never").exists()


def test_a_file_as_out_is_refused(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert cli.main(["bench", "peers", "--out", str(tmp_path / "file")]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err


def test_scan_vs_unroll_takes_a_zoo_cell_and_a_users_own(tmp_path, monkeypatch):
    """A built-in linear cell (whose inputs have H features) and a cell from the user's module in
    the working directory, given as ``module:function``, as the CLI's users would."""
    (tmp_path / "my_cells.py").write_text(
        "import rnnjax as rj\n\n\ndef wide_elman(hidden):\n    return rj.cells.elman(2 * hidden)\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    result = bench.scan_vs_unroll(
        cells=("rglru", "my_cells:wide_elman"), lengths=(4,), unrolls=(2,), repeats=2, **TINY
    )
    rows = result["results"]
    assert [(r["cell"], r["candidate"], r["mode"]) for r in rows] == [
        (cell, candidate, mode)
        for cell in ("rglru", "my_cells:wide_elman")
        for candidate in ("scan(unroll=1)", "scan(unroll=2)")
        for mode in MODES
    ]
    assert all(r["status"] == "ok" and r["time_s"] > 0 for r in rows), rows


def test_peers_times_the_zoo_against_memax_recurrentgemma_its_step_scan_and_the_lstm():
    """The linear cells beside their reference modules, their own step scans and rnnjax's LSTM,
    all in one worker per cell; a shape with I != H is refused for the cells reading H
    features."""
    result = bench.peers(
        shapes=((2, 5, 4, 4),), cells=("lru", "rglru"), repeats=2,
        peers=("memax", "recurrentgemma", "rnnjax-step", "rnnjax-lstm"), **FAST,
    )  # fmt: skip
    rows = result["results"]
    owners = {"rnnjax": "rnnjax", "memax LRU": "memax", "recurrentgemma RGLRU": "recurrentgemma",
              "rnnjax step": "rnnjax-step", "rnnjax lstm": "rnnjax-lstm"}  # fmt: skip
    expected = {
        "lru": ["rnnjax", "memax LRU", "rnnjax step", "rnnjax lstm"],
        "rglru": ["rnnjax", "recurrentgemma RGLRU", "rnnjax step", "rnnjax lstm"],
    }
    assert sorted((r["cell"], r["candidate"], r["mode"]) for r in rows) == sorted(
        (c, n, m) for c in expected for n in expected[c] for m in MODES
    )
    for row in rows:
        check_ok(row)
        assert row["peer"] == owners[row["candidate"]]
        if row["candidate"] != "rnnjax":
            assert row["rnnjax_over_peer"] > 0
    assert {(s["cell"], s["peer"]) for s in result["summary"]} >= {
        ("lru", "memax"),
        ("rglru", "recurrentgemma"),
    }
    for candidate in ("rnnjax", "memax LRU"):
        (program, *_) = peers_module.programs(
            cell="lru", batch=1, T=3, input_size=3, hidden=4, candidates=[candidate]
        )
        with pytest.raises(_harness.Unavailable, match="reads H features: .*I == H, got I=3, H=4"):
            program.build()


def test_zoo_trains_each_cell_at_the_lstms_parameter_count_through_rnnjax_train(tmp_path):
    """``rnnjax bench zoo`` as a process: real rnnjax train runs (kept in --runs-dir), the
    row's figures read back from their metrics.jsonl, the hidden size whose layer is nearest
    the LSTM's, and the commands that reproduce each run."""
    out, runs = tmp_path / "out", tmp_path / "runs"
    argv = ["bench", "zoo", "--cells", "mingru", "--reference-hidden", "6", "--charlm-steps",
            "3", "--adding-steps", "4", "--adding-len", "6", "--adding-eval-every", "2",
            "--runs-dir", str(runs), "--out", str(out)]  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "rnnjax.cli", *argv], capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((out / "zoo.json").read_text())
    assert result["suite"] == "zoo" and result["schema"] == 1 and result["machine"]["cpu_count"]
    assert {"params", "tokens_per_s", "solved_at", "processes"} <= set(result["methodology"])
    assert result["command"].startswith("rnnjax bench zoo --cells=mingru --tasks=charlm,adding")
    assert "--runs-dir" in result["command"] and (out / "zoo.png").read_bytes()[:8] == PNG
    rows = {r["task"]: r for r in result["results"]}
    assert sorted(rows) == ["adding", "charlm"]
    assert rows["charlm"]["hidden"] == rows["adding"]["hidden"]
    for task, row in rows.items():
        # the LSTM at 6 units reading 6 features: 4 * 6 * (6 + 6 + 1) params
        assert row["target_params"] == zoo_module.layer_params("lstm", 6) == 312
        assert row["layer_params"] == zoo_module.layer_params("mingru", row["hidden"])
        assert row["layer_params"] == 2 * row["hidden"] * (row["hidden"] + 1)  # w (H, 2H), b
        gap = abs(row["layer_params"] - row["target_params"])
        for h in (row["hidden"] - 1, row["hidden"] + 1):
            assert gap <= abs(zoo_module.layer_params("mingru", h) - row["target_params"])
        assert row["command"].startswith(
            f"rnnjax train --task {task} --cell mingru --hidden {row['hidden']} "
        )
        assert row["train_s"] > 0
    assert rows["adding"]["command"].endswith("--stop-at 0.01")
    records = [json.loads(line) for line in (runs / "charlm-mingru/metrics.jsonl").open()]
    lm = rows["charlm"]
    assert lm["steps"] == 3 and lm["bpc"] == [r for r in records if r["split"] == "val"][-1]["bpc"]
    assert lm["tokens_per_s"] == pytest.approx(lm["steps_per_s"] * 32 * 100)
    records = [json.loads(line) for line in (runs / "adding-mingru/metrics.jsonl").open()]
    val = [r["mse"] for r in records if r["split"] == "val"]
    add = rows["adding"]
    assert len(val) == 2 and add["best_mse"] == min(val) and add["final_mse"] == val[-1]
    assert add["solved_at"] is None and min(val) >= zoo_module.SOLVED_MSE  # 4 steps: not yet
    assert "not solved" in zoo_module.format_table(result)
    add["solved_at"] = 400
    (line,) = [x for x in zoo_module.format_table(result).splitlines() if x.startswith("mingru")]
    assert line.endswith(" 400") and f"{lm['bpc']:.3f}" in line
    with pytest.raises(ValueError, match="cells must be among lstm, .*; got 'tree'"):
        bench.zoo(cells=("tree",))
    with pytest.raises(ValueError, match="charlm_steps must be a positive int, got 0"):
        bench.zoo(charlm_steps=0)
    with pytest.raises(ValueError, match="tasks must be among charlm, adding; got 'copy'"):
        bench.zoo(tasks=("copy",))


def test_python_api_rejects_bad_arguments():
    with pytest.raises(
        ValueError, match="cells must be among lstm, gru, elman, mingru, .*; got 'rnn'"
    ):
        bench.scan_vs_unroll(cells=("rnn",))
    with pytest.raises(ValueError, match="'json' has no function 'nothing'"):
        bench.scan_vs_unroll(cells=("json:nothing",))
    with pytest.raises(ValueError, match="peers must be among .*; got 'mxnet'"):
        bench.peers(peers=("mxnet",))
    with pytest.raises(ValueError, match=r"each shape must be 4 positive ints \(B, T, I, H\)"):
        bench.peers(shapes=((1, 2, 3),))


def test_cli_linear_times_each_backend_beside_the_bandwidth_bound(tmp_path, capsys):
    argv = ["bench", "linear", "--lengths", "8,4", "--width", "16", "--backends", "native,chunked",
            "--repeats", "2", "--stream-floats", "65536", "--out", str(tmp_path)]  # fmt: skip
    assert cli.main(argv) == 0
    result = json.loads((tmp_path / "linear.json").read_text())
    check_document(result, "linear")
    assert result["command"].startswith("rnnjax bench linear --lengths=8,4 --width=16")
    assert result["config"]["backends"] == ["sequential", "native", "chunked"]
    assert "12 bytes per float32 element" in result["methodology"]["bound"]
    rows = result["results"]
    names = ("sequential", "native", "chunked")
    streams = ("stream", "stream-fresh")
    expected = [(T, c, m) for T in (4, 8) for c in (*names, *streams) for m in MODES]
    assert [(r["T"], r["candidate"], r["mode"]) for r in rows] == [
        key for key in expected if key[1] not in streams or key[2] == "fwd"
    ]
    by_t = {r["T"]: r for r in rows if r["candidate"] == "stream"}
    for row in rows:
        if row["candidate"] == "native" and not native_linear.available():
            assert row["status"] == "unavailable" and "unavailable" in row["error"]
            continue
        check_ok(row)
        if row["candidate"] in streams:
            assert row["bytes"] == 12 * 65536 and "vs_bound" not in row
            assert row["bandwidth_bytes_per_s"] == pytest.approx(row["bytes"] / row["time_s"])
            continue
        bandwidth = by_t[row["T"]]["bandwidth_bytes_per_s"]
        assert row["bandwidth_bytes_per_s"] == pytest.approx(bandwidth)
        per_element = 12 if row["mode"] == "fwd" else 32
        assert row["bytes"] == per_element * row["T"] * 16
        assert row["vs_bound"] == pytest.approx(row["time_s"] * bandwidth / row["bytes"])
    out = capsys.readouterr().out
    assert "T=8 chunked" in out and "bound = bytes / bandwidth" in out
    assert (tmp_path / "linear.png").read_bytes()[:8] == PNG
