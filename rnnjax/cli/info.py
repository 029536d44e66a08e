"""``rnnjax info``: the versions of rnnjax and its dependencies, and the devices JAX sees."""

from __future__ import annotations

import argparse

PACKAGES = ("rnnjax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy")


def add_parser(sub) -> None:
    """Add ``info`` (no flags) to ``sub``."""
    sub.add_parser("info", help="versions and devices")


def main(args: argparse.Namespace) -> int:
    import importlib.metadata as md
    import platform

    import jax

    devices = jax.devices()
    gpu = any(d.platform == "gpu" for d in devices)
    versions = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = "not installed"
    print(f"python {platform.python_version()} on {platform.platform()}")
    for pkg, version in versions.items():
        print(f"{pkg:>17}  {version}")
    print(f"{'backend':>17}  {jax.default_backend()}")
    print(f"{'devices':>17}  {', '.join(str(d) for d in devices)}")
    print(f"{'gpu':>17}  {'yes' if gpu else 'no'}")
    return 0
