"""The parts of llama.cpp and ggml we call directly, beyond llama-cpp-python's high-level API.

llama-cpp-python exposes llama.cpp's C API as ctypes functions. Two ggml functions we need to
read a graph tensor inside an eval callback are not bound there, so we bind them from
libggml-base, which ships beside libllama. The version is pinned in pyproject.toml because
tensor names and struct layouts move between releases.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from pathlib import Path

import llama_cpp

log = logging.getLogger("meshchat.llama")

_init_lock = threading.Lock()
_initialised = False


@llama_cpp.llama_log_callback
def _route_log(level: int, text: bytes | None, _user_data: ctypes.c_void_p) -> None:
    # llama.cpp talks a lot on stderr; users see it only with --debug.
    if text:
        log.debug(text.decode(errors="replace").rstrip())


def _load_ggml_base() -> ctypes.CDLL:
    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    candidates = sorted(lib_dir.glob("libggml-base.*"))
    if not candidates:
        raise OSError(f"libggml-base not found beside libllama in {lib_dir}")
    lib = ctypes.CDLL(str(candidates[0]))
    lib.ggml_get_name.argtypes = [ctypes.c_void_p]
    lib.ggml_get_name.restype = ctypes.c_char_p
    lib.ggml_nbytes.argtypes = [ctypes.c_void_p]
    lib.ggml_nbytes.restype = ctypes.c_size_t
    lib.ggml_backend_tensor_get.argtypes = [
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_size_t,
    ]
    lib.ggml_backend_tensor_get.restype = None
    return lib


ggml_base = _load_ggml_base()


def init_backend() -> None:
    """Initialise llama.cpp once per process and route its logs to `logging`."""
    global _initialised
    with _init_lock:
        if _initialised:
            return
        llama_cpp.llama_log_set(_route_log, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
        _initialised = True
