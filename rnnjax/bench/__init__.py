"""Benchmarks: ``lax.scan`` vs unrolled loops, rnnjax vs its peers, and BPTT memory.

Run them with ``rnnjax bench SUITE`` or from Python; every result records the machine
(:func:`machine_info`) and is written as JSON with a PNG plot.
"""

from rnnjax.bench._machine import machine_info

__all__ = ["machine_info"]
