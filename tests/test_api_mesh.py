"""The API served by a headless node that heads a two-node mesh on loopback (real processes):
the official `openai` client streams answers equal to the solo run's, eight at once."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.api_helpers import solo_answers, stream_chat
from tests.cli_helpers import free_port, run_meshchat
from tests.mesh_cluster import ApiHead, Cluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

KEY = "mesh-key"
PROMPTS = [f"Write one sentence about the number {i}." for i in range(8)]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def api_mesh(smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiHead]:
    root = tmp_path_factory.mktemp("apimesh")
    cluster = Cluster(root)
    head = None
    # The whole model with four 4096-token sessions needs about 514 MiB (planner estimate), a
    # two-way split 331 MiB a node; with 400 MiB each, neither node holds it all: the head
    # must share the layers with the worker.
    limit = {"MESHCHAT_MEMORY_LIMIT": "400M"}
    try:
        cluster.add(smollm2, env=limit)
        head = ApiHead(cluster, smollm2, free_port(), KEY, env=limit)
        yield head
    finally:
        if head is not None:
            head.stop()
        cluster.close()


def _plan_line(head: ApiHead) -> str:
    return next(line for line in head.log.read_text().splitlines() if "API plan" in line)


def _solo_answers(model: Path, tmp: Path, head: ApiHead) -> list[str]:
    flash = "flash attention on" in _plan_line(head)
    return solo_answers(model, tmp, flash, PROMPTS, MAX_TOKENS)


async def _stream(base_url: str, prompt: str) -> str:
    client = openai.AsyncOpenAI(base_url=base_url, api_key=KEY, max_retries=0, timeout=180)
    try:
        return await stream_chat(client, prompt, MAX_TOKENS)
    finally:
        await client.close()


def test_the_plan_uses_the_worker(api_mesh: ApiHead) -> None:
    plan = _plan_line(api_mesh)
    assert plan.count(" on ") == 2, plan  # two stages: the head and the worker


def test_stream_equals_meshchat_generate(api_mesh: ApiHead, smollm2: Path, tmp_path: Path) -> None:
    question = "What is the tallest mountain on Earth?"
    streamed = asyncio.run(_stream(api_mesh.base_url, question))
    cli = run_meshchat(
        "generate",
        "--model",
        str(smollm2),
        "--temperature",
        "0",
        "--max-tokens",
        str(MAX_TOKENS),
        question,
        data_dir=tmp_path,
    )
    assert cli.returncode == 0, cli.stderr
    assert streamed == cli.stdout[:-1] and streamed


def test_eight_concurrent_streams_equal_solo(
    api_mesh: ApiHead, smollm2: Path, tmp_path: Path
) -> None:
    solo = _solo_answers(smollm2, tmp_path, api_mesh)

    async def burst() -> list[str]:
        return list(await asyncio.gather(*(_stream(api_mesh.base_url, p) for p in PROMPTS)))

    asyncio.run(_stream(api_mesh.base_url, PROMPTS[0]))  # warm: the pool's sessions exist
    idle = api_mesh.rss_bytes()
    assert asyncio.run(burst()) == solo
    # KV caches are allocated up front per session slot: a burst leaves no growth behind.
    assert api_mesh.rss_bytes() < idle + 64 * 2**20


def test_wrong_key_is_refused(api_mesh: ApiHead) -> None:
    client = openai.OpenAI(base_url=api_mesh.base_url, api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()
