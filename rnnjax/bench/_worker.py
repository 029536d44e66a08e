"""The benchmark worker: ``python -m rnnjax.bench._worker`` compiles and times one group.

It reads a JSON spec on stdin (``builder``, ``group``, ``keys``, ``repeats``, ``min_sample_s``,
``settle_s``, ``machine``) and writes one JSON object per line on its stdout, which the parent
(:mod:`rnnjax.bench._harness`) reads with deadlines:

- ``{"event": "ready", "machine": ...}`` once the libraries are imported;
- ``{"event": "start", "candidate", "mode"}`` before building and compiling a program (the
  parent's compile limit runs from here), then ``"prepared"`` (``trace_s``, ``compile_s``,
  ``memory``, ``notes``) or ``"failed"`` (``status``, ``error``);
- ``{"event": "timing", "programs", "repeats"}`` when timing begins, ``{"event": "round",
  "index"}`` after each timing round, and ``{"event": "timings",
  "results": [...]}`` at the end.

Anything else written to stdout (by a library) is sent to stderr, away from the protocol.
"""

from __future__ import annotations

import importlib
import json
import os
import sys


def main() -> None:
    spec = json.loads(sys.stdin.read())
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)

    def emit(**event):
        protocol.write(json.dumps(event) + "\n")
        protocol.flush()

    import jax

    # Every compile must be a real one: a cache hit would report a cache read as compile time.
    jax.config.update("jax_enable_compilation_cache", False)

    from rnnjax.bench._harness import SETTLE_S, Unavailable, measure
    from rnnjax.bench._machine import machine_info

    module, name = spec["builder"].split(":")
    programs = getattr(importlib.import_module(module), name)(**spec["group"])
    by_key = {(p.candidate, p.mode): p for p in programs}
    emit(event="ready", machine=machine_info() if spec["machine"] else None)

    runs = {}
    for candidate, mode in map(tuple, spec["keys"]):
        emit(event="start", candidate=candidate, mode=mode)
        try:
            run, info = by_key[(candidate, mode)].build()
        except Unavailable as e:
            emit(event="failed", candidate=candidate, mode=mode, status="unavailable", error=str(e))
        except Exception as e:  # a broken candidate is reported; the others still run
            error = f"{type(e).__name__}: {e}"
            emit(event="failed", candidate=candidate, mode=mode, status="error", error=error)
        else:
            runs[(candidate, mode)] = run
            emit(event="prepared", candidate=candidate, mode=mode, **info)

    working = {}
    for key, run in runs.items():  # the warm-up call; a program that fails here is dropped
        try:
            run()
            working[key] = run
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
            emit(event="failed", candidate=key[0], mode=key[1], status="error", error=error)
    emit(event="timing", programs=len(working), repeats=spec["repeats"])
    stats = measure(
        working, repeats=spec["repeats"], min_sample_s=spec["min_sample_s"],
        settle_s=spec.get("settle_s", SETTLE_S), warmup=False,
        on_round=lambda index: emit(event="round", index=index),
    )  # fmt: skip
    results = [{"candidate": c, "mode": m, **s} for (c, m), s in stats.items()]
    emit(event="timings", results=results)


if __name__ == "__main__":
    main()
