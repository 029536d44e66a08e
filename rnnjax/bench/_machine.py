"""The machine and versions a benchmark ran on, recorded next to every result."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import sys
from typing import Any

PACKAGES = (
    "jax",
    "jaxlib",
    "flax",
    "optax",
    "numpy",
    "torch",
    "equinox",
    "memax",
    "recurrentgemma",
    "rnnjax",
)
# Environment variables that change how fast the same program runs.
ENV_PREFIXES = ("XLA_", "JAX_", "TF_CPP_", "OMP_", "MKL_", "OPENBLAS_", "CUDA_VISIBLE_DEVICES")


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
    """Platform, CPU, JAX devices, package versions, XLA flags, the environment variables that
    set threads and JAX/XLA options, and the time, as plain JSON.

    >>> info = machine_info()
    >>> {"cpu_model", "cpu_count", "date", "env"} <= set(info), info["versions"]["jax"] is not None
    (True, True)
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
        "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith(ENV_PREFIXES)},
    }
