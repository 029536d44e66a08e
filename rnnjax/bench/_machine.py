"""The machine and versions a benchmark ran on, recorded next to every result."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import sys
from typing import Any

PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "equinox", "rnnjax")


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """Platform, CPU, JAX devices, package versions, XLA flags and the time, as plain JSON.

    >>> info = machine_info()
    >>> sorted(info)[:3], info["versions"]["jax"] is not None
    (['cpu_count', 'cpu_model', 'date'], True)
    """
    import jax

    devices = jax.devices()
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "backend": jax.default_backend(),
        "devices": [f"{d.platform}:{getattr(d, 'device_kind', '?')}" for d in devices],
        "versions": {name: _version(name) for name in PACKAGES},
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
