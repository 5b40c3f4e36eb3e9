"""Helpers for the API tests: the model id the API serves, a streamed chat, and the solo
answers a mesh's answers must equal."""

from __future__ import annotations

import asyncio
from pathlib import Path

import openai

from meshchat.engine.chat_template import ChatMessage
from meshchat.engine.stage import StageOptions
from meshchat.engine.tokenizer import Tokenizer
from meshchat.inference.capabilities import calibration
from meshchat.inference.head import ChatPrompter, HeadSession
from meshchat.inference.local import LocalPipeline, build_stages
from meshchat.inference.local_model import LocalModel
from meshchat.model.gguf_file import read_header
from meshchat.paths import DataDir
from tests.conftest import DEFAULT_THREADS
from tests.engine_helpers import GREEDY

MODEL_ID = "SmolLM2-135M-Instruct.Q4_1"


async def stream_chat(client: openai.AsyncOpenAI, prompt: str, max_tokens: int) -> str:
    """One user message, greedy, streamed: the answer's text joined from its deltas."""
    stream = await client.chat.completions.create(
        model=MODEL_ID,
        messages=[{"role": "user", "content": prompt}],
        temperature=0,
        max_tokens=max_tokens,
        stream=True,
    )
    parts = []
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
    return "".join(parts)


def solo_answers(
    model: Path, tmp: Path, flash: bool, prompts: list[str], max_tokens: int
) -> list[str]:
    """`prompts` run greedily on one machine, in this process, with the engine profile the
    mesh's stages run with (flash attention as the head's plan fixed it)."""
    data = DataDir(tmp / "solo")
    profile = calibration(LocalModel.open(model, data), data, DEFAULT_THREADS).profile_for(flash)
    assert profile is not None

    async def run() -> list[str]:
        options = StageOptions(n_ctx=1024, max_sessions=1, n_batch=256).with_profile(profile)
        pipeline = LocalPipeline(build_stages(model, [(0, 30)], tmp, tmp, options))
        tokenizer = Tokenizer(model)
        prompter = ChatPrompter.for_model(read_header(model), tokenizer)
        answers = []
        for prompt in prompts:
            session = HeadSession(pipeline, tokenizer)
            tokens = prompter.tokens([ChatMessage("user", prompt)])
            answers.append("".join([t async for t in session.generate(tokens, GREEDY, max_tokens)]))
            await session.close()
        await pipeline.close()
        return answers

    return asyncio.run(run())
