"""rnnjax's compiled CPU kernels: finding, loading and registering them with XLA.

``pip install`` compiles ``rnnjax/_native/*.cc`` into this folder (``setup.py``; it needs a
C++17 compiler, and is skipped with a warning when there is none): XLA FFI handlers for the
recurrent loops of float32 LSTMs and GRUs. Their matrix products call ``cblas_sgemm`` from
OpenBLAS (the ``scipy-openblas32`` wheel), whose address is handed to the library here; on
Linux x86-64 the library is also linked against oneDNN (the ``onednn-cpu-gomp`` wheel, whose
``libdnnl.so.3`` is loaded here first).

:func:`available` says whether the kernels are loaded, :func:`unavailable_reason` why not,
:func:`onednn` and :func:`avx512` what this build runs, :func:`passes` which loops ran.
docs/native.md has the dispatch table (which kernel runs which pass, at which sizes) and every
``RNNJAX_*`` environment switch with when it is read; ``rnnjax.cells._native`` has JAX's
rules around the kernels.
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

import jax

TARGETS = {
    "rnnjax_lstm_forward": "RnnjaxLstmForward",
    "rnnjax_lstm_backward": "RnnjaxLstmBackward",
    "rnnjax_gru_forward": "RnnjaxGruForward",
    "rnnjax_gru_backward": "RnnjaxGruBackward",
    "rnnjax_lstm_replay": "RnnjaxLstmReplay",
    "rnnjax_gru_replay": "RnnjaxGruReplay",
}


def library_path() -> Path | None:
    """The compiled kernel library in this folder, or None when it was not built."""
    here = Path(__file__).resolve().parent
    found = sorted(here.glob("_rnn_cpu*.so")) + sorted(here.glob("_rnn_cpu*.dylib"))
    return found[0] if found else None


def _sgemm_address() -> int:
    import scipy_openblas32

    lib_dir = Path(scipy_openblas32.get_lib_dir())
    names = [
        f"lib{scipy_openblas32.get_library()}.so",
        f"lib{scipy_openblas32.get_library()}.dylib",
    ]
    path = next((lib_dir / n for n in names if (lib_dir / n).exists()), None)
    if path is None:
        raise OSError(f"no OpenBLAS library in {lib_dir}")
    blas = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    return ctypes.cast(blas.scipy_cblas_sgemm, ctypes.c_void_p).value


def _off(variable: str) -> bool:
    return os.environ.get(variable, "1").strip().lower() in ("0", "false", "no", "off")


def _preload_onednn() -> None:
    """Load the oneDNN wheel's library with global symbols, so that the kernel library (linked
    against ``libdnnl.so.3``) finds it wherever pip put it; nothing when it is not installed."""
    from importlib import metadata

    try:
        dist = metadata.distribution("onednn-cpu-gomp")
    except metadata.PackageNotFoundError:
        return
    for f in dist.files or []:
        if f.name == "libdnnl.so.3":
            ctypes.CDLL(str(Path(dist.locate_file(f)).resolve()), mode=ctypes.RTLD_GLOBAL)
            return


_LIBRARY: list[ctypes.CDLL] = []


@functools.cache
def _load() -> str | None:
    """Load and register the kernels once; None on success, else why they are unavailable."""
    if _off("RNNJAX_NATIVE"):
        return "switched off by RNNJAX_NATIVE=0"
    path = library_path()
    if path is None:
        return (
            "rnnjax/_native was not compiled (no C++ compiler when rnnjax was installed?); "
            "reinstall with a C++17 compiler on PATH"
        )
    try:
        sgemm = _sgemm_address()
    except (ImportError, OSError, AttributeError) as err:
        return f"no usable OpenBLAS (pip install scipy-openblas32): {err}"
    try:
        _preload_onednn()
    except OSError as err:
        return f"could not load oneDNN (pip install onednn-cpu-gomp==2023.2.0): {err}"
    try:
        lib = ctypes.CDLL(str(path))
        lib.rnnjax_set_sgemm(ctypes.c_void_p(sgemm))
        lib.rnnjax_workspace_bytes.restype = ctypes.c_int64
        lib.rnnjax_pass_count.restype = ctypes.c_int64
        if lib.rnnjax_pass_kinds() != len(PASSES):
            raise OSError(f"{lib.rnnjax_pass_kinds()} pass counters, expected {len(PASSES)}")
        lib.rnnjax_workspace_bytes.argtypes = [ctypes.c_int, *[ctypes.c_int64] * 4, ctypes.c_int]
        for target, symbol in TARGETS.items():
            capsule = jax.ffi.pycapsule(getattr(lib, symbol))
            jax.ffi.register_ffi_target(target, capsule, platform="cpu")
    except (OSError, AttributeError) as err:
        hint = " (built with oneDNN: pip install onednn-cpu-gomp==2023.2.0)" * ("dnnl" in str(err))
        return f"could not load {path.name}: {err}{hint}"
    _LIBRARY.append(lib)
    return None


def available() -> bool:
    """Whether the compiled CPU kernels are loaded and registered."""
    return _load() is None


def unavailable_reason() -> str | None:
    """Why :func:`available` is False (None when it is True)."""
    return _load()


def onednn() -> bool:
    """Whether the kernels use oneDNN: its RNN primitives for unmasked float32 LSTMs and GRUs
    where ``rnnjax.cells._native.ONEDNN_MIN_UNITS`` says so, its matmul in their own loops for
    steps of 4096 units or more. True when the kernels are loaded, were built with oneDNN, and
    ``RNNJAX_ONEDNN=0`` is not set."""
    return available() and not _off("RNNJAX_ONEDNN") and bool(_LIBRARY[0].rnnjax_has_onednn())


def avx512() -> bool:
    """Whether forward passes of the LSTM and the GRU run the kernels' AVX-512 loops:
    inference (saving nothing, padded or not) and the forward pass of training (saving every
    step; not checkpointed ``remat`` passes) at steps of 4096 units (batch rows x hidden units)
    or more in builds with oneDNN, whose backward pass runs on the same OpenMP threads. Per
    step, for 16 hidden units and up to 6 batch rows at a time, the gate pre-activations
    ``[x_t, h] @ [W_i; W_h]`` accumulate in vector registers and the new carry and ``y_t`` are
    computed from them (no gate array), on weights packed once per call, on all cores. True
    when the kernels are loaded and were compiled for a CPU with AVX-512 (``-march=native`` on
    one), and ``RNNJAX_AVX512=0`` is not set (the kernels read it at every call; with it 0 they
    run what they ran before: oneDNN's RNN primitive for unmasked inference where
    :data:`rnnjax.cells._native.ONEDNN_MIN_UNITS` says so, else their own loops)."""
    built = available() and bool(_LIBRARY[0].rnnjax_has_avx512())
    return built and not _off("RNNJAX_AVX512")


#: The kernels' pass counters, in the order of rnn_cpu.h's ``Pass``: rnnjax's own loops
#: (forward saving nothing or every step, BPTT, checkpointed forward and BPTT, the replay of a
#: checkpointed pass's ys; ``loops_onednn_matmul`` counts those of them whose matmuls ran on
#: oneDNN), the AVX-512 loops (``avx512``; ``avx512_by_panels`` and ``avx512_by_rows`` count
#: those that ran on several threads, split by panels or by rows) and oneDNN's RNN primitive.
PASSES = (
    "loops_forward", "loops_backward", "checkpoint_forward", "checkpoint_backward", "replay",
    "loops_onednn_matmul", "avx512", "avx512_by_panels", "avx512_by_rows", "onednn_forward",
    "onednn_backward",
)  # fmt: skip


def passes() -> dict[str, int]:
    """How many passes of each kind (:data:`PASSES`) the kernels ran in this process (all 0
    without them): which code ran, for tests and benchmarks.

    >>> sorted(passes()) == sorted(PASSES)
    True
    """
    if not available():
        return dict.fromkeys(PASSES, 0)
    lib = _LIBRARY[0]
    return {name: int(lib.rnnjax_pass_count(kind)) for kind, name in enumerate(PASSES)}


def avx512_passes() -> int:
    """How many forward passes the AVX-512 loops have run in this process (0 without them)."""
    return passes()["avx512"]


@functools.cache
def workspace_bytes(cell: str, steps: int, input_size: int, hidden: int, reverse: bool) -> int:
    """Bytes of oneDNN's saved training workspace for one example (batch 1) of an ``"lstm"`` or
    ``"gru"``; a batch of B needs at most B times as much (the kernels check)."""
    if not available():
        raise RuntimeError(f"rnnjax: the native CPU kernels are unavailable: {_load()}")
    gru = {"lstm": 0, "gru": 1}[cell]
    size = _LIBRARY[0].rnnjax_workspace_bytes(gru, 1, steps, input_size, hidden, int(reverse))
    if size < 0:
        raise RuntimeError(f"rnnjax: oneDNN could not plan a {cell} of this shape")
    return int(size)
