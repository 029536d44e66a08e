"""Builds rnnjax's optional compiled CPU kernels (``rnnjax/_native/*.cc``, one library).

Everything else about the package is in ``pyproject.toml``. The kernels are XLA FFI handlers;
their headers ship with jaxlib (a build requirement). Compiling is best effort: without a C++17
compiler the install still succeeds, with a warning, and rnnjax runs its ``lax.scan`` loops
(``rnnjax._native.unavailable_reason()`` says why). ``RNNJAX_NATIVE_BUILD=0`` skips the build;
``RNNJAX_NATIVE_CFLAGS`` replaces the optimisation flags (the default tunes for this machine's
CPU with ``-march=native``, as a source build is compiled where it runs; on a CPU with AVX-512
that also compiles the kernels' AVX-512 loops, ``rnnjax._native.avx512()``).

Where oneDNN's headers are installed (the ``onednn-devel-cpu-gomp`` wheel, a build requirement on
Linux x86-64) the library is also linked against oneDNN (``onednn-cpu-gomp``, a dependency there)
and built with OpenMP (``-fopenmp``: the gate loops share oneDNN's libgomp team); oneDNN's matmul
then does the loops' products and its RNN primitives run unmasked inference;
``RNNJAX_ONEDNN_BUILD=0`` builds without it.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from glob import glob
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# The library's translation units and the headers they share (rnnjax/_native/rnn_cpu.h has the
# map); relative to the project root, so that an sdist carries them all.
SOURCES = sorted(glob("rnnjax/_native/*.cc"))
HEADERS = sorted(glob("rnnjax/_native/*.h"))
# 512-bit vectors where the CPU has them: the gate loops ran 1.1-1.8x faster than with
# GCC's default 256 on a Sapphire Rapids core.
TUNED = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp-simd"]
PORTABLE = ["-O3", "-fopenmp-simd"]


def _installed_file(distribution: str, name: str) -> Path | None:
    """Where an installed wheel put a file called ``name`` (its data files included)."""
    from importlib import metadata

    try:
        files = metadata.distribution(distribution).files or []
    except metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.name == name:
            return Path(metadata.distribution(distribution).locate_file(f)).resolve()
    return None


def onednn_flags() -> list[str]:
    """Compiler flags that build with oneDNN (and OpenMP), or [] when oneDNN is not installed."""
    if os.environ.get("RNNJAX_ONEDNN_BUILD", "1") == "0":
        return []
    header = _installed_file("onednn-devel-cpu-gomp", "dnnl.hpp")
    library = _installed_file("onednn-cpu-gomp", "libdnnl.so.3")
    if header is None or library is None:
        return []
    include = header.parent if header.parent.name != "dnnl" else header.parent.parent.parent
    return [
        "-DRNNJAX_WITH_DNNL", "-fopenmp", f"-I{include}", f"-L{library.parent}", "-l:libdnnl.so.3",
        f"-Wl,-rpath,{library.parent}",
    ]  # fmt: skip


class BuildNative(build_ext):
    """Compile the FFI library directly with the C++ compiler (it is not a Python module and
    needs no Python headers); warn instead of failing when that is impossible. The extension is
    ``optional``: where it was not built, setuptools copies nothing into the source tree for an
    editable install (``copy_extensions_to_source``), and an install of either kind succeeds
    without it."""

    def build_extension(self, ext: Extension) -> None:
        target = Path(self.get_ext_fullpath(ext.name))
        target.parent.mkdir(parents=True, exist_ok=True)
        target.unlink(missing_ok=True)  # a skipped build must not ship an earlier build's library
        if os.environ.get("RNNJAX_NATIVE_BUILD", "1") == "0":
            self.skip("RNNJAX_NATIVE_BUILD=0")
            return
        try:
            import jaxlib

            include = Path(jaxlib.__file__).resolve().parent / "include"
        except ImportError:
            self.skip("jaxlib is not importable at build time")
            return
        compiler = os.environ.get("CXX", "c++")
        custom = os.environ.get("RNNJAX_NATIVE_CFLAGS")
        attempts = [shlex.split(custom)] if custom else [TUNED, PORTABLE]
        onednn = onednn_flags()
        if onednn:
            attempts = [[*flags, *onednn] for flags in attempts] + attempts
        for flags in attempts:
            try:
                errors = self.compile_library(compiler, include, ext.sources, flags, target)
            except OSError as err:
                self.skip(f"no C++ compiler ({compiler}: {err})")
                return
            if errors is None:
                return
            print(errors[-4000:], file=sys.stderr)
        self.skip("they did not compile (pip install -v shows the compiler's errors)")

    def skip(self, why: str) -> None:
        """Say that the kernels were not built, and why, where pip shows it: pip prints the
        build backend's Python warnings (its log only with -v)."""
        message = (
            f"rnnjax: the native CPU kernels were not built: {why}. rnnjax will run its lax.scan "
            "loops instead (rnnjax._native.unavailable_reason() says why at run time)."
        )
        self.warn(message)
        warnings.warn(message, stacklevel=2)

    def copy_extensions_to_source(self) -> None:
        """Editable installs: the library goes next to the sources where it was built; where it
        was not, a copy left there by an earlier install is removed, so that rnnjax runs its
        ``lax.scan`` loops instead of kernels built from other sources."""
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            fullname = self.get_ext_fullname(ext.name)
            built = Path(self.build_lib) / self.get_ext_filename(fullname)
            package = build_py.get_package_dir(fullname.rpartition(".")[0])
            in_place = Path(package) / built.name
            if not built.exists() and in_place.exists():
                message = f"rnnjax: removing {in_place}, left there by an earlier build"
                self.warn(message)
                warnings.warn(message, stacklevel=2)
                in_place.unlink()
        super().copy_extensions_to_source()

    def compile_library(
        self, compiler: str, include: Path, sources: list[str], flags: list[str], target: Path
    ) -> str | None:
        """Compile each source to an object (in parallel), then link them into ``target``;
        the compiler's errors, or None on success. Everything but the FFI handlers and the C
        functions Python calls (default visibility in ``ffi.cc``) is hidden, so that calls
        between the files bind directly."""
        objects = Path(self.build_temp) / "rnnjax_native"
        objects.mkdir(parents=True, exist_ok=True)
        linking = ("-L", "-l", "-Wl,")
        compile_flags = [f for f in flags if not f.startswith(linking)]

        def compile_one(source: str) -> tuple[Path, subprocess.CompletedProcess]:
            obj = objects / (Path(source).stem + ".o")
            cmd = [
                compiler, "-std=c++17", "-fPIC", "-fvisibility=hidden", f"-I{include}",
                *compile_flags, "-c", source, "-o", str(obj),
            ]  # fmt: skip
            return obj, subprocess.run(cmd, capture_output=True, text=True)

        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            compiled = list(pool.map(compile_one, sources))
        failed = [done.stderr for _, done in compiled if done.returncode != 0]
        if failed:
            return "\n".join(failed)
        cmd = [compiler, "-shared", *[str(obj) for obj, _ in compiled], *flags, "-o", str(target)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        return None if done.returncode == 0 else done.stderr


setup(
    ext_modules=[
        Extension("rnnjax._native._rnn_cpu", sources=SOURCES, depends=HEADERS, optional=True)
    ],
    cmdclass={"build_ext": BuildNative},
)
