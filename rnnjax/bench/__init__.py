"""Benchmarks: ``lax.scan`` vs unrolled loops, rnnjax vs its peers, BPTT memory, the
backends of :func:`rnnjax.linear_scan` against the memory-bandwidth bound (``linear``), and the
cell zoo trained at equal parameter counts (``zoo``: real ``rnnjax train`` runs, see
:mod:`rnnjax.bench.zoo`).

Run them with ``rnnjax bench SUITE`` or from Python; every result records the machine
(:func:`machine_info`), the config and the command, and is written as JSON with a PNG plot.
The methodology (worker processes, compile limits, interleaved medians, the untimed settle
before each sample) is in :mod:`rnnjax.bench._harness`.

Every suite returns (and ``rnnjax bench`` writes as ``OUT/SUITE.json``) one JSON object::

    suite        "scan-vs-unroll" | "peers" | "memory" | "linear" | "zoo"
    schema       1
    command      the command line (CLI) or Python call that made it
    config       every parameter, defaults included
    machine      machine_info(): CPU, cpu_count, backend, devices, package versions, XLA flags
                 and thread settings, date (peers adds torch_threads)
    methodology  how the numbers were made (timer, warm-up, order, settle and settle_s,
                 statistic, compile and memory definitions, compile_timeout_s, reference)
    results      one row per measurement (below); peers adds "summary", its fastest candidate
                 per peer against rnnjax

A row of scan-vs-unroll or peers: the group's fields (``cell``, ``T``; peers: ``shape``
``"BxTxIxH"``, ``batch``, ``input_size``, ``hidden``, ``peer``), ``candidate``, ``mode``
(``"fwd"`` or ``"fwd+bwd"``) and ``status``:

- ``"ok"``: ``trace_s`` and ``compile_s`` (None for PyTorch), ``memory`` (``temp_bytes``,
  ``argument_bytes``, ``output_bytes``, ``alias_bytes``, ``generated_code_bytes``,
  ``peak_bytes`` = temp + argument + output, ``xla_peak_memory_bytes``; None for PyTorch),
  ``time_s`` (median seconds per call), ``min_s``, ``q1_s``, ``q3_s``, ``iqr_s``,
  ``samples_s``, ``calls_per_sample``, ``vs_reference`` (time_s over the reference's), and for
  peers ``rnnjax_over_peer`` and ``speedup``; PyTorch rows carry ``notes`` (device, threads,
  layout);
- ``"timed out"``: ``compile_timeout_s`` and ``reason``;
- ``"error"``, ``"unavailable"``, ``"not installed"``: ``error``.

A row of linear adds ``width``, ``bytes`` (moved by the pass), ``bandwidth_bytes_per_s``,
``bound_s`` and ``vs_bound`` (:mod:`rnnjax.bench.linear` has the arithmetic). A row of zoo is
one training run (``task``, ``cell``, ``hidden``, ``layer_params``, ``command``, the task's
figures: :func:`rnnjax.bench.zoo.zoo`).

Note: ``rnnjax.bench.peers``, ``rnnjax.bench.linear``, ``rnnjax.bench.scan_vs_unroll`` and
``rnnjax.bench.zoo`` are the functions; import the modules with
``importlib.import_module("rnnjax.bench.peers")``.
"""

from rnnjax.bench._machine import machine_info
from rnnjax.bench.linear import linear, plot_linear
from rnnjax.bench.peers import peers, plot_peers
from rnnjax.bench.scan_vs_unroll import plot_scan_vs_unroll, scan_vs_unroll
from rnnjax.bench.zoo import plot_zoo, zoo

__all__ = [
    "linear",
    "machine_info",
    "peers",
    "plot_linear",
    "plot_peers",
    "plot_scan_vs_unroll",
    "plot_zoo",
    "scan_vs_unroll",
    "zoo",
]
