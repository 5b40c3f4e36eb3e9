"""The OpenAI-compatible API, driven by the official `openai` client against a real server on
loopback, serving SmolLM2 split into two in-process stages."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import openai
import pytest
import pytest_asyncio

from meshchat.api.server import api_model, start_api
from meshchat.engine.chat_template import ChatMessage
from meshchat.engine.stage import StageOptions
from meshchat.engine.tokenizer import Tokenizer
from meshchat.inference.head import ChatPrompter, HeadSession
from meshchat.inference.local import LocalPipeline, build_stages
from meshchat.model.gguf_file import read_header
from tests.api_helpers import MODEL_ID, stream_chat
from tests.cli_helpers import free_port, run_meshchat
from tests.engine_helpers import GREEDY

KEY = "test-key-123"


@dataclass
class Served:
    base_url: str
    pipeline: LocalPipeline
    tokenizer: Tokenizer
    prompter: ChatPrompter

    def client(self, key: str = KEY) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.base_url, api_key=key, max_retries=0, timeout=120)


async def _serve(
    smollm2: Path, tmp: Path, max_sessions: int, max_waiting: int
) -> AsyncIterator[Served]:
    options = StageOptions(n_ctx=1024, max_sessions=max_sessions, n_batch=256, n_threads=2)
    stages = build_stages(smollm2, [(0, 15), (15, 30)], tmp / "slices", tmp / "fp", options)
    pipeline = LocalPipeline(stages)
    header = read_header(smollm2)
    tokenizer = Tokenizer(smollm2)
    model = api_model(MODEL_ID, "f" * 64, header, tokenizer, pipeline, max_sessions, max_waiting)
    port = free_port()
    runner = await start_api(model, "127.0.0.1", port, api_key=KEY)
    try:
        yield Served(f"http://127.0.0.1:{port}/v1", pipeline, tokenizer, model.prompter)
    finally:
        await runner.cleanup()
        await model.pool.close()
        await pipeline.close()


@pytest_asyncio.fixture
async def served(smollm2: Path, tmp_path: Path) -> AsyncIterator[Served]:
    async for value in _serve(smollm2, tmp_path, max_sessions=4, max_waiting=16):
        yield value


async def _chat(
    client: openai.AsyncOpenAI, prompt: str, max_tokens: int = 32, **extra: object
) -> str:
    response = await client.chat.completions.create(
        model=MODEL_ID,
        messages=[{"role": "user", "content": prompt}],
        temperature=0,
        max_tokens=max_tokens,
        **extra,
    )  # type: ignore[arg-type]
    return response.choices[0].message.content or ""


async def test_models_lists_the_mesh_model(served: Served) -> None:
    models = await served.client().models.list()
    assert [m.id for m in models.data] == [MODEL_ID]
    assert models.data[0].model_extra == {"fingerprint": "f" * 64}


async def test_chat_equals_meshchat_generate(served: Served, smollm2: Path, tmp_path: Path) -> None:
    question = "Give me three tips for sleeping well."
    client = served.client()
    whole = await _chat(client, question, 40)
    streamed = await stream_chat(client, question, 40)
    cli = await asyncio.to_thread(
        run_meshchat,
        "generate",
        "--model",
        str(smollm2),
        "--temperature",
        "0",
        "--max-tokens",
        "40",
        question,
        data_dir=tmp_path / "cli",
    )
    assert cli.returncode == 0, cli.stderr
    assert whole == streamed == cli.stdout[:-1]
    assert len(whole.split()) > 10


async def test_usage_finish_reason_and_raw_completions(served: Served) -> None:
    client = served.client()
    response = await client.chat.completions.create(
        model=MODEL_ID,
        messages=[{"role": "user", "content": "Count to twenty."}],
        temperature=0,
        max_tokens=8,
    )
    assert response.choices[0].finish_reason == "length"
    assert response.usage is not None and response.usage.completion_tokens == 8
    expected_prompt = len(served.prompter.tokens([ChatMessage("user", "Count to twenty.")]))
    assert response.usage.prompt_tokens == expected_prompt
    completion = await client.completions.create(
        model=MODEL_ID, prompt="The sky is", temperature=0, max_tokens=12
    )
    assert completion.choices[0].text.strip()
    assert completion.usage is not None and completion.usage.completion_tokens <= 12


async def test_stop_strings(served: Served) -> None:
    client = served.client()
    question = "List the numbers from 1 to 10."
    free = await _chat(client, question, 60)
    stop = free[len(free) // 2 : len(free) // 2 + 3]  # a string the free answer contains
    stopped = await _chat(client, question, 60, stop=[stop, "never-there"])
    assert stopped == free[: free.find(stop)]


async def test_bad_requests_get_openai_errors(served: Served) -> None:
    client = served.client()
    with pytest.raises(openai.AuthenticationError):
        await served.client(key="wrong").models.list()
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(
            model="gpt-imaginary", messages=[{"role": "user", "content": "hi"}]
        )
    with pytest.raises(openai.BadRequestError, match="temperature"):
        await client.chat.completions.create(
            model=MODEL_ID, temperature=7, messages=[{"role": "user", "content": "hi"}]
        )
    with pytest.raises(openai.BadRequestError, match="context"):
        await client.chat.completions.create(
            model=MODEL_ID, messages=[{"role": "user", "content": "hi " * 3000}]
        )
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as http:
        url = f"{served.base_url}/chat/completions"
        for body, status in (
            (b"{not json", 400),
            (b"[1, 2]", 400),
            (json.dumps({"messages": "hi"}).encode(), 400),
            (
                json.dumps(
                    {"messages": [{"role": "user", "content": "x"}], "max_tokens": "ten"}
                ).encode(),
                400,
            ),
            (b"{" + b" " * (2 << 20) + b"}", 413),
        ):
            async with http.post(url, data=body, headers=headers) as reply:
                assert reply.status == status
                error = (await reply.json())["error"]
                assert error["message"] and error["type"]
        async with http.get(f"{served.base_url}/models") as reply:
            assert reply.status == 401  # no key at all
    assert await _chat(client, "Say hi.", 4)  # still serving


async def test_eight_concurrent_streams_equal_solo(served: Served) -> None:
    prompts = [f"Write one sentence about the number {i}." for i in range(8)]
    client = served.client()
    solo = [await _chat(client, p, 24) for p in prompts]
    concurrent = await asyncio.gather(*(stream_chat(served.client(), p, 24) for p in prompts))
    assert list(concurrent) == solo
    for stage in served.pipeline.stages:
        assert len(stage.session_ids()) <= 4  # the pool never holds more than its sessions


async def test_a_full_queue_answers_429(smollm2: Path, tmp_path: Path) -> None:
    async for served in _serve(smollm2, tmp_path, max_sessions=1, max_waiting=0):
        client = served.client()
        results = await asyncio.gather(
            *(_chat(client, "Tell me a long story.", 48) for _ in range(3)), return_exceptions=True
        )
        refused = [r for r in results if isinstance(r, openai.RateLimitError)]
        answered = [r for r in results if isinstance(r, str)]
        assert len(answered) >= 1 and len(refused) >= 1, results


async def test_disconnect_mid_stream_frees_the_session(served: Served) -> None:
    body = {
        "model": MODEL_ID,
        "stream": True,
        "max_tokens": 400,
        "temperature": 0,
        "messages": [{"role": "user", "content": "Write a very long essay about rivers."}],
    }
    headers = {"Authorization": f"Bearer {KEY}"}
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{served.base_url}/chat/completions", json=body, headers=headers) as reply,
    ):
        chunks = 0
        async for line in reply.content:
            if line.startswith(b"data: "):
                chunks += 1
            if chunks == 5:
                break  # leave mid-stream: closing the session drops the connection
    for _ in range(100):
        if all(not stage.session_ids() for stage in served.pipeline.stages):
            break
        await asyncio.sleep(0.1)
    assert all(not stage.session_ids() for stage in served.pipeline.stages)
    assert await _chat(served.client(), "Say hi.", 4)  # and the server goes on


def test_head_session_is_what_the_api_runs(smollm2: Path, tmp_path: Path) -> None:
    """The API adds no sampling of its own: greedy text equals a bare HeadSession."""

    async def run() -> tuple[str, str]:
        async for served in _serve(smollm2, tmp_path, max_sessions=2, max_waiting=2):
            api_text = await _chat(served.client(), "Name a planet.", 16)
            session = HeadSession(served.pipeline, served.tokenizer)
            tokens = served.prompter.tokens([ChatMessage("user", "Name a planet.")])
            direct = "".join([t async for t in session.generate(tokens, GREEDY, 16)])
            await session.close()
            return api_text, direct
        raise AssertionError("server did not start")

    api_text, direct = asyncio.run(run())
    assert api_text == direct
