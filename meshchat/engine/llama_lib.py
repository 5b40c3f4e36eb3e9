"""The parts of llama.cpp and ggml we call directly, beyond llama-cpp-python's high-level API.

llama-cpp-python exposes llama.cpp's C API as ctypes functions. Two ggml functions we need to
read a graph tensor inside an eval callback are not bound there, so we bind them from
libggml-base, which ships beside libllama. The version is pinned in pyproject.toml because
tensor names and struct layouts move between releases.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import llama_cpp

log = logging.getLogger("meshchat.llama")

_init_lock = threading.Lock()
_initialised = False
_captures = threading.local()  # .lines: list[str] while this thread runs `captured_log`


@llama_cpp.llama_log_callback
def _route_log(level: int, text: bytes | None, _user_data: ctypes.c_void_p) -> None:
    # llama.cpp talks a lot on stderr; users see it only with --debug.
    if text:
        line = text.decode(errors="replace").rstrip()
        lines = getattr(_captures, "lines", None)
        if lines is not None and len(lines) < _MAX_CAPTURED:
            lines.append(line)
        log.debug(line)


_MAX_CAPTURED = 20_000  # a model load logs a few hundred lines; more is not worth keeping


@contextlib.contextmanager
def captured_log() -> Iterator[list[str]]:
    """The lines llama.cpp logs on this thread inside the block (it reports the sizes of the
    buffers it allocates there and nowhere else in its C API)."""
    previous = getattr(_captures, "lines", None)
    lines: list[str] = []
    _captures.lines = lines
    try:
        yield lines
    finally:
        _captures.lines = previous


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
