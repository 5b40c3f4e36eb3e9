"""Tiny random GGUF models for tests (the writer is meshchat.model.synthetic's).

Each borrows a real tokenizer (the default model's `tokenizer.*` metadata), so prompts tokenize
as usual, and has small random weights in the tensor layout llama.cpp expects for its
architecture. Random weights make nonsense text, which is all a parity test needs: the split
model must produce exactly the nonsense the whole model does.
"""

from __future__ import annotations

from meshchat.model.synthetic import F16, F32, Q8_0
from meshchat.model.synthetic import SyntheticConfig as TinyConfig
from meshchat.model.synthetic import write_model as write_tiny_model

__all__ = ["F16", "F32", "Q8_0", "TinyConfig", "write_tiny_model"]
