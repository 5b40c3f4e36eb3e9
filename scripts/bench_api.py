#!/usr/bin/env python3
"""Throughput of the OpenAI-compatible API: total tokens/s for 1, 4 and 8 concurrent greedy
streams, against a `meshchat --headless --api` head on loopback, alone or heading a two-node
mesh (a worker process takes part of the layers).

    python scripts/bench_api.py --model PATH [--mesh] [--tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import openai

CMD = [sys.executable, "-m", "meshchat.cli"]
ENV = {**os.environ, "MESHCHAT_MDNS": "0"}
KEY = "bench"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_line(log: Path, text: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"process exited: {log.read_text()}")
        if log.exists() and text in log.read_text():
            return
        time.sleep(0.1)
    sys.exit(f"timed out waiting for {text!r} in {log}")


def start(root: Path, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    log = root / f"{name}.log"
    with log.open("w") as out:
        return subprocess.Popen(
            [*CMD, "--headless", "--listen", "127.0.0.1:0", "--data-dir", str(root / name), *args],
            env={**ENV, **env},
            stdout=out,
            stderr=out,
        )


async def one_stream(base_url: str, model: str, index: int, tokens: int) -> int:
    client = openai.AsyncOpenAI(base_url=base_url, api_key=KEY, max_retries=0, timeout=600)
    stream = await client.chat.completions.create(
        model=model,
        temperature=0,
        max_tokens=tokens,
        stream=True,
        stream_options={"include_usage": True},
        messages=[{"role": "user", "content": f"Tell a long story about lighthouse {index}."}],
    )
    used = 0
    async for chunk in stream:
        if chunk.usage is not None:
            used = chunk.usage.completion_tokens
    await client.close()
    return used


async def measure(base_url: str, model: str, concurrency: int, tokens: int) -> float:
    started = time.perf_counter()
    counts = await asyncio.gather(
        *(one_stream(base_url, model, i, tokens) for i in range(concurrency))
    )
    return sum(counts) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--mesh", action="store_true", help="a worker takes part of the layers")
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="meshchat-bench-api-") as tmp:
        root = Path(tmp)
        procs = []
        try:
            head_args = ["--model", args.model]
            head_env: dict[str, str] = {}
            if args.mesh:
                worker = start(
                    root,
                    "worker",
                    ["--model", args.model, "--invite-file", str(root / "invite")],
                    {},
                )
                procs.append(worker)
                wait_for_line(root / "worker.log", "invite:", worker, 120)
                head_args += ["--join", (root / "invite").read_text().strip()]
                head_env = {"MESHCHAT_MEMORY_LIMIT": "300M"}  # the head cannot hold it all
            port = free_port()
            head = start(
                root, "head", [*head_args, "--api", f"127.0.0.1:{port}", "--api-key", KEY], head_env
            )
            procs.append(head)
            wait_for_line(root / "head.log", "API on http", head, 300)
            plan = next(
                line for line in (root / "head.log").read_text().splitlines() if "API plan" in line
            )
            print(plan.removeprefix("meshchat: "))
            base_url = f"http://127.0.0.1:{port}/v1"
            model = Path(args.model).name.removesuffix(".gguf")
            asyncio.run(measure(base_url, model, 1, 8))  # warm-up
            print(f"{'streams':>8} {'total tok/s':>12}")
            for concurrency in (1, 4, 8):
                rate = asyncio.run(measure(base_url, model, concurrency, args.tokens))
                print(f"{concurrency:>8} {rate:>12.1f}")
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(timeout=20)


if __name__ == "__main__":
    main()
