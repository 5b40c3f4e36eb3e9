"""`meshchat generate PROMPT`: one completion, streamed to stdout; diagnostics on stderr."""

from __future__ import annotations

import argparse
import asyncio
import sys
from dataclasses import dataclass

from meshchat.commands.common import ModelChoice, choose_model, thread_count
from meshchat.config import load_config
from meshchat.engine.chat_template import ChatMessage
from meshchat.engine.sampling import SamplingParams
from meshchat.engine.stage import StageOptions
from meshchat.engine.tokenizer import Tokenizer
from meshchat.errors import MeshchatError, UsageError
from meshchat.inference import memory_budget
from meshchat.inference.capabilities import tuned_options
from meshchat.inference.head import ChatPrompter, HeadSession
from meshchat.inference.local import LocalPipeline, build_stages
from meshchat.inference.local_model import LocalModel
from meshchat.inference.pipeline import Pipeline
from meshchat.model.architectures import parse_split, split_ranges
from meshchat.paths import DataDir

DEFAULT_CONTEXT = 4096


def sampling_from_args(args: argparse.Namespace) -> SamplingParams:
    if args.max_tokens < 1:
        raise UsageError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    if args.temperature < 0:
        raise UsageError(f"--temperature must be >= 0, got {args.temperature}")
    return SamplingParams.from_settings(args)


def prompt_tokens(choice: ModelChoice, tokenizer: Tokenizer, args: argparse.Namespace) -> list[int]:
    if args.raw:
        # As llama.cpp tokenizes a plain prompt: BOS only if the metadata asks, specials parsed.
        return tokenizer.tokenize(args.prompt, add_special=True, parse_special=True)
    messages = []
    if args.system:
        messages.append(ChatMessage("system", args.system))
    messages.append(ChatMessage("user", args.prompt))
    return ChatPrompter.for_model(choice.header, tokenizer).tokens(messages)


@dataclass(frozen=True)
class Generation:
    """What one `generate` run needs, whether it runs here or on a mesh: checked before any
    stage loads, so a prompt that cannot fit fails in a second, not after a load."""

    choice: ModelChoice
    model: LocalModel
    tokenizer: Tokenizer
    tokens: list[int]
    params: SamplingParams
    split: list[tuple[int, int]] | None  # None: one stage here, or the planner's choice
    n_ctx: int


def prepare_generation(args: argparse.Namespace, data: DataDir) -> Generation:
    params = sampling_from_args(args)
    choice = choose_model(args, data)
    split = split_ranges(choice.spec, parse_split(args.split)) if args.split else None
    tokenizer = Tokenizer(choice.path)
    tokens = prompt_tokens(choice, tokenizer, args)
    n_ctx = min(choice.spec.context_length, DEFAULT_CONTEXT)
    if len(tokens) >= n_ctx:
        raise MeshchatError(f"the prompt has {len(tokens)} tokens; the context holds {n_ctx}")
    model = LocalModel.from_header(choice.header, data)
    memory_budget.check_fits(model, n_ctx)
    return Generation(choice, model, tokenizer, tokens, params, split, n_ctx)


def run_generate(args: argparse.Namespace) -> int:
    memory_budget.apply(getattr(args, "max_memory", None), load_config().max_memory)
    if args.join:
        from meshchat.commands.generate_mesh import run_generate_on_mesh

        return run_generate_on_mesh(args)
    data = DataDir.resolve(args.data_dir)
    job = prepare_generation(args, data)
    ranges = job.split or [(0, job.choice.spec.n_layers)]
    options = tuned_options(
        job.model,
        data,
        StageOptions(n_ctx=job.n_ctx, max_sessions=1, n_threads=thread_count(args.threads)),
        notify=lambda message: print(f"meshchat: {message}", file=sys.stderr, flush=True),
    )
    stages = build_stages(job.choice.path, ranges, data.slices, data.fingerprints, options)
    if len(ranges) > 1:
        plan = " ".join(f"[{a},{b})" for a, b in ranges)
        print(f"meshchat: running stages {plan} in this process", file=sys.stderr)
    pipeline = LocalPipeline(stages, transport_dtype=args.transport_dtype)

    async def run() -> int:
        try:
            return await stream_to_stdout(
                pipeline, job.tokenizer, job.tokens, job.params, args.max_tokens
            )
        finally:
            await pipeline.close()

    return asyncio.run(run())


async def stream_to_stdout(
    pipeline: Pipeline,
    tokenizer: Tokenizer,
    tokens: list[int],
    params: SamplingParams,
    max_tokens: int,
) -> int:
    """Generate after `tokens` on `pipeline`, writing the text to stdout as it comes."""
    session = HeadSession(pipeline, tokenizer)
    try:
        async for text in session.generate(tokens, params, max_tokens):
            sys.stdout.write(text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
    finally:
        await session.close()
    return 0
