"""The llama.cpp settings that decide speed and safety on a machine: an engine profile.

No one setting is best everywhere (measured 2026-11-27 on 2-vCPU VMs, SmolLM2 Q4_1):
- ggml's extra weight buffer types (CPU repack, and AMX where llama.cpp was built with it)
  crash the first `llama_decode` on an Intel AMX machine (upstream llama.cpp issue #20824),
  while CPU repack speeds up Q4_0/Q4_K models on AVX2/AVX-512 machines;
- flash attention decoded at 51 tok/s against 75 without it on that AMX machine, and was the
  faster setting on the machine where it was first chosen.
So each machine measures its own profile (meshchat.inference.profiling) and every stage loads
with one. Flash attention changes numerics: every stage of one plan must use the same value.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import llama_cpp
import llama_cpp.llama_cpp as llama_bindings

from meshchat.errors import MeshchatError

MAX_THREADS = 512


@dataclass(frozen=True)
class EngineProfile:
    flash_attn: bool
    # llama.cpp's `use_extra_bufts`: one switch for CPU repack and AMX weight buffers.
    extra_bufts: bool
    threads: int

    def __post_init__(self) -> None:
        if not 1 <= self.threads <= MAX_THREADS:
            raise MeshchatError(f"an engine profile needs 1 to {MAX_THREADS} threads")

    @classmethod
    def safe(cls, threads: int) -> EngineProfile:
        """The settings least likely to hit a backend bug: no extra buffers, no flash attention."""
        return cls(flash_attn=False, extra_bufts=False, threads=threads)

    @property
    def label(self) -> str:
        """'flash_attn=on extra_bufts=off threads=2': for logs, tables and the test switch."""
        return (
            f"flash_attn={_on_off(self.flash_attn)} extra_bufts={_on_off(self.extra_bufts)} "
            f"threads={self.threads}"
        )

    def matches(self, pattern: str) -> bool:
        """Whether every `key=value` word of `pattern` holds for this profile."""
        words = set(self.label.split())
        return bool(pattern.split()) and all(word in words for word in pattern.split())

    def to_json(self) -> dict[str, Any]:
        return {
            "flash_attn": self.flash_attn,
            "extra_bufts": self.extra_bufts,
            "threads": self.threads,
        }

    @classmethod
    def from_json(cls, data: Any) -> EngineProfile:
        """Parse a cached or reported profile; MeshchatError if malformed."""
        if not isinstance(data, dict):
            raise MeshchatError("an engine profile must be an object")
        flash, bufts, threads = data.get("flash_attn"), data.get("extra_bufts"), data.get("threads")
        if not isinstance(flash, bool) or not isinstance(bufts, bool):
            raise MeshchatError("an engine profile's switches must be true or false")
        if not isinstance(threads, int) or isinstance(threads, bool):
            raise MeshchatError("an engine profile's thread count must be an integer")
        return cls(flash, bufts, threads)


def _on_off(value: bool) -> str:
    return "on" if value else "off"


def model_params(profile: EngineProfile, use_mmap: bool = True) -> llama_cpp.llama_model_params:
    """llama.cpp model parameters for a CPU load with this profile."""
    params = llama_cpp.llama_model_default_params()
    params.use_mmap = use_mmap
    params.n_gpu_layers = 0
    params.use_extra_bufts = profile.extra_bufts
    return params


def flash_attn_type(flash_attn: bool) -> int:
    # Set explicitly, never llama.cpp's "auto": it changes numerics, and stages must agree.
    if flash_attn:
        return int(llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED)
    return int(llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)


@contextlib.contextmanager
def llama_defaults(profile: EngineProfile) -> Iterator[None]:
    """Make llama-cpp-python's high-level `Llama(...)` load with this profile's buffer types.

    `Llama` has no argument for `use_extra_bufts`; it takes llama.cpp's default model params
    (extra buffers on). The reference runs (the bench's llama.cpp row, the tests' reference
    texts) construct `Llama` inside this block; pass `flash_attn` and `n_threads` as arguments.
    """
    original = llama_bindings.llama_model_default_params

    def with_profile() -> llama_cpp.llama_model_params:
        params = original()
        params.use_extra_bufts = profile.extra_bufts
        return params

    # `Llama` calls the function through the `llama_cpp.llama_cpp` module: patch it there.
    llama_bindings.llama_model_default_params = with_profile
    try:
        yield
    finally:
        llama_bindings.llama_model_default_params = original


def system_info() -> str:
    """llama.cpp's own line of what this build uses on this CPU (AVX2 = 1 | AMX_INT8 = 1 ...)."""
    return bytes(llama_cpp.llama_print_system_info()).decode(errors="replace").strip()


def build_id() -> str:
    """What identifies the llama.cpp build: the binding's version and its system info."""
    return f"llama-cpp-python {llama_cpp.__version__} | {system_info()}"
