"""Helpers for the API tests: the model id the API serves, and a streamed chat."""

from __future__ import annotations

import openai

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
