#!/usr/bin/env python3
"""Per-hop overhead on the real path: `meshchat --headless` workers and a `generate --join`
head on 127.0.0.1, every process tracing its decode steps (meshchat.inference.hop_timing).

    python scripts/hop_profile.py --model M.gguf [--split 10,20] [--tokens 200] [--threads 1]

Prints the per-hop summary as JSON: p50/p99 of (time per token - compute) / hops, and the
median of each part (encode, send, wire, receive, queue, decode, head) per hop.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from meshchat.inference import hop_timing

CMD = [sys.executable, "-m", "meshchat.cli"]
PROMPT = "Once upon a time, in a small village by the sea,"


def main(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="hops-") as tmp:
        root = Path(tmp)
        env = {
            **os.environ, "MESHCHAT_MDNS": "0", hop_timing.ENV: str(root / "trace"),
            "MESHCHAT_THREADS": str(args.threads),
        }  # fmt: skip
        workers: list[subprocess.Popen[bytes]] = []
        invite = ""
        try:
            for i in range(len(args.split.split(","))):
                invite_file = root / f"w{i}.invite"
                cmd = [
                    *CMD, "--headless", "--listen", "127.0.0.1:0", "--data-dir",
                    str(root / f"w{i}"), "--model", args.model, "--invite-file",
                    str(invite_file), "--invite-uses", "8",
                ]  # fmt: skip
                if invite:
                    cmd += ["--join", invite]
                log = (root / f"w{i}.log").open("wb")
                workers.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=log))
                deadline = time.monotonic() + 120
                while not invite_file.exists():
                    if workers[-1].poll() is not None or time.monotonic() > deadline:
                        print((root / f"w{i}.log").read_text(), file=sys.stderr)
                        return 1
                    time.sleep(0.05)
                invite = invite or invite_file.read_text().strip()
            time.sleep(1.0)  # let the workers see each other
            head = subprocess.run(
                [*CMD, "generate", PROMPT, "--raw", "--temperature", "0", "--max-tokens",
                 str(args.tokens), "--model", args.model, "--data-dir", str(root / "head"),
                 "--join", invite, "--split", args.split, "--threads", str(args.threads)],
                env=env, capture_output=True, text=True, timeout=600,
            )  # fmt: skip
            if head.returncode != 0:
                print(head.stderr, file=sys.stderr)
                return 1
        finally:
            for proc in workers:
                proc.terminate()
            for proc in workers:
                proc.wait(timeout=30)
        if args.keep:
            import shutil

            shutil.copytree(root / "trace", args.keep, dirs_exist_ok=True)
        summary = hop_timing.per_hop_summary(hop_timing.load(root / "trace"))
        print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--split", default="10,20", help="layer boundaries: one worker each")
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--keep", help="copy the raw trace into this directory")
    sys.exit(main(parser.parse_args()))
