"""The API's guards (issue 12, item 8): hostile request bodies get 400, never 500, and an API
reachable from other machines needs a key unless the user says otherwise.

The bodies go over real HTTP to a real server (SmolLM2 in two in-process stages, as in
tests/test_api.py); the bind refusal is checked through `meshchat --headless` subprocesses.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio

from meshchat.api.mesh_host import is_loopback_host, refuse_open_bind
from meshchat.errors import UsageError
from tests.api_helpers import MODEL_ID
from tests.cli_helpers import run_meshchat
from tests.test_api import KEY, Served, _serve

pytestmark = pytest.mark.timeout(120)

HEADERS = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
HI = '[{"role": "user", "content": "hi"}]'


def chat(extra: str, messages: str = HI) -> bytes:
    return f'{{"model": "{MODEL_ID}", "messages": {messages}, {extra}}}'.encode()


# Each: (what it attacks, route, body). Every one gave a 500 or reached llama.cpp before.
HOSTILE = [
    ("integer over 4300 digits", "chat/completions", chat('"max_tokens": ' + "9" * 5000)),
    ("integer past 64 bits", "chat/completions", chat('"seed": ' + "1" * 25)),
    ("seed past int64", "chat/completions", chat(f'"seed": {2**63}')),
    ("max_tokens past 2**31", "chat/completions", chat(f'"max_tokens": {2**31}')),
    ("NaN", "chat/completions", chat('"temperature": NaN')),
    ("Infinity", "chat/completions", chat('"top_p": Infinity')),
    ("-Infinity", "chat/completions", chat('"temperature": -Infinity')),
    ("float overflow", "chat/completions", chat('"temperature": 1e400')),
    ("deep nesting", "chat/completions", b"[" * 100_000 + b"]" * 100_000),
    ("deep nesting in a field", "chat/completions", chat('"x": ' + "[" * 50_000 + "]" * 50_000)),
    (
        "lone surrogate",
        "chat/completions",
        chat('"n": 1', '[{"role": "user", "content": "\\ud800"}]'),
    ),
    (
        "lone surrogate in a part",
        "chat/completions",
        chat('"n": 1', '[{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]'),
    ),
    ("lone surrogate in stop", "chat/completions", chat('"stop": ["\\ud800"]')),
    ("lone surrogate prompt", "completions", b'{"prompt": "x\\ud800"}'),
    (
        "role of the wrong type",
        "chat/completions",
        chat('"n": 1', '[{"role": ["user"], "content": "x"}]'),
    ),
    (
        "content of the wrong type",
        "chat/completions",
        chat('"n": 1', '[{"role": "user", "content": {}}]'),
    ),
    ("stop of the wrong type", "chat/completions", chat('"stop": [1, 2]')),
    ("stream of the wrong type", "chat/completions", chat('"stream": "yes"')),
    ("seed of the wrong type", "chat/completions", chat('"seed": 1.5')),
    ("n of the wrong type", "chat/completions", chat('"n": true')),
    ("prompt of the wrong type", "completions", b'{"prompt": [1, 2, 3]}'),
    ("body not an object", "completions", b'"just a string"'),
    ("not UTF-8", "chat/completions", b'{"messages": "\xff\xfe"}'),
]


@pytest_asyncio.fixture
async def served(smollm2: Path, tmp_path: Path) -> AsyncIterator[Served]:
    async for value in _serve(smollm2, tmp_path, max_sessions=1, max_waiting=4):
        yield value


async def test_hostile_bodies_get_400_with_a_message_never_500(served: Served) -> None:
    statuses = {}
    async with aiohttp.ClientSession() as http:
        for what, route, body in HOSTILE:
            url = f"{served.base_url}/{route}"
            async with http.post(url, data=body, headers=HEADERS) as reply:
                statuses[what] = reply.status
                if reply.status == 400:
                    error = (await reply.json())["error"]
                    assert error["message"] and error["type"] == "invalid_request_error", what
        assert statuses == {what: 400 for what, _, _ in HOSTILE}
        # The service is unharmed: a plain request right after is answered.
        body = chat('"max_tokens": 4, "temperature": 0')
        async with http.post(
            f"{served.base_url}/chat/completions", data=body, headers=HEADERS
        ) as r:
            assert r.status == 200
            assert (await r.json())["choices"][0]["message"]["content"]


# ---- the bind refusal -------------------------------------------------------------------


def test_only_loopback_counts_as_private() -> None:
    for host in ("127.0.0.1", "127.9.9.9", "::1", "localhost", "LOCALHOST"):
        assert is_loopback_host(host), host
    for host in ("0.0.0.0", "::", "10.0.0.5", "192.168.1.2", "myhost", "localhost.evil.com"):
        assert not is_loopback_host(host), host


def test_open_bind_needs_a_key_or_the_flag() -> None:
    for address in ("127.0.0.1:8080", ":8080", "[::1]:8080", "localhost:8080"):
        refuse_open_bind(address, None, False)
    for address in ("0.0.0.0:8080", "[::]:8080", "10.0.0.5:8080", "myhost:8080"):
        with pytest.raises(UsageError, match="--api-allow-no-key"):
            refuse_open_bind(address, None, False)
        refuse_open_bind(address, "a-key", False)
        refuse_open_bind(address, None, True)


def test_headless_refuses_an_open_api_without_a_key(tmp_path: Path) -> None:
    env = {"MESHCHAT_CONFIG_DIR": str(tmp_path / "config")}  # no config.toml: no api_key
    done = run_meshchat(
        "--headless", "--api", "0.0.0.0:0", data_dir=tmp_path / "data", timeout=60, env=env
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "--api-allow-no-key" in lines[0] and "--api-key" in lines[0]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "data").exists(), "refused before anything started"


@pytest.mark.parametrize("how", ["flag", "key", "config"])
def test_headless_open_api_passes_the_check_when_meant(tmp_path: Path, how: str) -> None:
    config = tmp_path / "config"
    config.mkdir()
    if how == "config":
        (config / "config.toml").write_text('api_key = "from-config"\n')
    extra = {"flag": ["--api-allow-no-key"], "key": ["--api-key", "k"], "config": []}[how]
    done = run_meshchat(
        "--headless",
        "--listen",
        "127.0.0.1:0",
        "--api",
        "0.0.0.0:0",
        *extra,
        data_dir=tmp_path / "data",
        timeout=60,
        env={"MESHCHAT_CONFIG_DIR": str(config)},
    )
    # Past the bind check, this empty data dir has no model: the next error says so.
    assert done.returncode == 1, done.stderr
    assert "--api needs a model" in done.stderr and "allow-no-key" not in done.stderr
