"""This node's memory budget: what it offers the mesh, from the command line or config.toml.

The budget is, first found: `--max-memory SIZE`, the MESHCHAT_MEMORY_LIMIT environment variable,
`max_memory` in config.toml; without one a node offers 90% of its available RAM. A budget that
cannot hold even the model's smallest stage (one span between split points with its KV cache
and llama.cpp's buffers, meshchat.inference.planner.ModelNeeds.memory) is a usage error: such a
node could never take part.
"""

from __future__ import annotations

import os

from meshchat.errors import UsageError
from meshchat.inference import capabilities
from meshchat.inference.capabilities import MEMORY_LIMIT_ENV, parse_size
from meshchat.inference.local_model import LocalModel
from meshchat.inference.planner import ModelNeeds

MIN_CONTEXT = 256  # the smallest context a head plans with (config.toml's lower bound)
_MIB = 1 << 20


def apply(flag: str | None, configured: str = "") -> int | None:
    """Set this process's budget from the flag, the environment or the config; its bytes."""
    env = os.environ.get(MEMORY_LIMIT_ENV, "")
    if flag is not None:
        limit: int | None = parse_size(flag, "--max-memory")
    elif env:
        limit = parse_size(env, MEMORY_LIMIT_ENV)
    elif configured:
        limit = parse_size(configured, "max_memory in config.toml")
    else:
        limit = None
    capabilities.set_limit(limit)
    return limit


def check_fits(model: LocalModel, n_ctx: int = MIN_CONTEXT, sessions: int = 1) -> None:
    """UsageError if the budget cannot hold the smallest stage of `model`."""
    limit = capabilities.memory_limit()
    if limit is None:
        return
    smallest = ModelNeeds.of(model).smallest_stage(n_ctx, sessions)
    if limit < smallest:
        raise UsageError(
            f"a memory budget of {limit // _MIB} MiB cannot hold any stage of "
            f"{model.path.name}: the smallest needs {smallest // _MIB + 1} MiB "
            f"(one layer span with a {n_ctx}-token KV cache and llama.cpp's buffers)"
        )
