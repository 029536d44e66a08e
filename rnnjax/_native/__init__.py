"""rnnjax's compiled CPU kernels: finding, loading and registering them with XLA.

``pip install`` compiles ``rnn_cpu.cc`` into this folder (``setup.py``; it needs a C++17
compiler, and is skipped with a warning when there is none). The library holds XLA FFI
handlers for the recurrent loops of float32 LSTMs and GRUs; its matrix products call ``cblas_sgemm``
from OpenBLAS (the ``scipy-openblas32`` wheel, a dependency), whose address is handed to the
library here, so the library itself links against nothing but the C and C++ runtimes.

:func:`available` says whether the kernels are loaded (``RNNJAX_NATIVE=0`` in the environment
switches them off); :func:`unavailable_reason` says why not. Cells use them on the CPU backend
only when available, and otherwise run the same recurrence as ``lax.scan`` loops.
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


@functools.cache
def _load() -> str | None:
    """Load and register the kernels once; None on success, else why they are unavailable."""
    if os.environ.get("RNNJAX_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
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
        lib = ctypes.CDLL(str(path))
        lib.rnnjax_set_sgemm(ctypes.c_void_p(sgemm))
        for target, symbol in TARGETS.items():
            capsule = jax.ffi.pycapsule(getattr(lib, symbol))
            jax.ffi.register_ffi_target(target, capsule, platform="cpu")
    except (OSError, AttributeError) as err:
        return f"could not load {path.name}: {err}"
    return None


def available() -> bool:
    """Whether the compiled CPU kernels are loaded and registered."""
    return _load() is None


def unavailable_reason() -> str | None:
    """Why :func:`available` is False (None when it is True)."""
    return _load()
