"""Sampling parameters and llama.cpp's sampler chain built from them."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, replace
from typing import Protocol

import llama_cpp

from meshchat.config import ChatSettings
from meshchat.errors import UsageError

DEFAULT_SEED = 0xFFFFFFFF  # llama.cpp's LLAMA_DEFAULT_SEED: a random seed per chain


class SamplingSettings(Protocol):
    """Anything that names the sampling settings the user sets: command-line arguments, a
    chat's stored settings."""

    @property
    def temperature(self) -> float: ...
    @property
    def top_k(self) -> int: ...
    @property
    def top_p(self) -> float: ...
    @property
    def min_p(self) -> float: ...
    @property
    def repeat_penalty(self) -> float: ...
    @property
    def seed(self) -> int | None: ...


_DEFAULTS = ChatSettings()  # the sampling defaults are declared once, in config.py


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = _DEFAULTS.temperature
    top_k: int = _DEFAULTS.top_k
    top_p: float = _DEFAULTS.top_p
    min_p: float = _DEFAULTS.min_p
    repeat_penalty: float = _DEFAULTS.repeat_penalty
    repeat_last_n: int = 64
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def validated(self) -> SamplingParams:
        if self.top_k < 0:
            raise UsageError(f"top-k must be >= 0, got {self.top_k}")
        if not 0.0 <= self.top_p <= 1.0:
            raise UsageError(f"top-p must lie in [0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise UsageError(f"min-p must lie in [0, 1], got {self.min_p}")
        if self.repeat_penalty <= 0.0:
            raise UsageError(f"repeat penalty must be > 0, got {self.repeat_penalty}")
        return self

    def with_seed(self, seed: int | None) -> SamplingParams:
        return replace(self, seed=seed)

    @classmethod
    def from_settings(cls, settings: SamplingSettings) -> SamplingParams:
        return cls(
            temperature=settings.temperature,
            top_k=settings.top_k,
            top_p=settings.top_p,
            min_p=settings.min_p,
            repeat_penalty=settings.repeat_penalty,
            seed=settings.seed,
        ).validated()


class SamplerChain:
    """An owned llama.cpp sampler chain; free() (or garbage collection) releases it."""

    def __init__(self, params: SamplingParams, n_vocab: int) -> None:
        chain_params = llama_cpp.llama_sampler_chain_default_params()
        chain_params.no_perf = True
        self._chain = llama_cpp.llama_sampler_chain_init(chain_params)
        add = self._add
        if params.repeat_penalty != 1.0:
            add(
                llama_cpp.llama_sampler_init_penalties(
                    n_vocab, params.repeat_last_n, params.repeat_penalty, 0.0, 0.0
                )
            )
        if params.greedy:
            add(llama_cpp.llama_sampler_init_greedy())
            return
        if params.top_k > 0:
            add(llama_cpp.llama_sampler_init_top_k(params.top_k))
        add(llama_cpp.llama_sampler_init_top_p(params.top_p, 1))
        add(llama_cpp.llama_sampler_init_min_p(params.min_p, 1))
        add(llama_cpp.llama_sampler_init_temp(params.temperature))
        seed = DEFAULT_SEED if params.seed is None else params.seed & 0xFFFFFFFF
        add(llama_cpp.llama_sampler_init_dist(seed))

    def _add(self, sampler: ctypes.c_void_p) -> None:
        llama_cpp.llama_sampler_chain_add(self._chain, sampler)

    def accept(self, token: int) -> None:
        llama_cpp.llama_sampler_accept(self._chain, token)

    def sample(self, ctx: ctypes.c_void_p, index: int) -> int:
        """Sample from the context's logits at output `index`; the chain accepts the token."""
        return int(llama_cpp.llama_sampler_sample(self._chain, ctx, index))

    def free(self) -> None:
        if self._chain is not None:
            llama_cpp.llama_sampler_free(self._chain)
            self._chain = None

    def __del__(self) -> None:
        self.free()
