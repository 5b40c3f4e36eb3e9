"""`meshchat generate --join CODE`: one completion run on the mesh the invite leads to.

This process is the head: it joins with the invite, waits until it is connected to the mesh's
nodes, asks them what they can run, plans (automatically, or `--split` mapped onto the nodes),
prints the plan on stderr, runs the prompt and streams the text to stdout. A node lost on the
way is replaced (see meshchat.inference.mesh_pipeline); stderr says so.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import sys

from meshchat.commands.common import thread_count
from meshchat.commands.generate import Generation, prepare_generation, stream_to_stdout
from meshchat.engine import compute
from meshchat.errors import MeshchatError
from meshchat.inference.coordinator import MeshCoordinator
from meshchat.inference.mesh_pipeline import MeshPipeline
from meshchat.mesh.invites import InviteCode
from meshchat.mesh.node import Node
from meshchat.paths import DataDir


def _say(message: str) -> None:
    print(f"meshchat: {message}", file=sys.stderr, flush=True)


def run_generate_on_mesh(args: argparse.Namespace) -> int:
    data = DataDir.resolve(args.data_dir)
    return asyncio.run(_run(args, data, prepare_generation(args, data)))


async def _run(args: argparse.Namespace, data: DataDir, job: Generation) -> int:
    compute.adopt_loop()  # the head's stage computes on this loop's thread
    mdns = os.environ.get("MESHCHAT_MDNS", "1") != "0"
    node = Node(data, _listen_for(args.join), discovery=mdns)
    await node.start()
    pipeline: MeshPipeline | None = None
    try:
        inviter = await node.join(args.join)
        coordinator = MeshCoordinator(
            node, job.model, data, threads=thread_count(args.threads), n_ctx=job.n_ctx, notify=_say
        )
        await coordinator.settle(inviter)
        plan, advice, planner = await coordinator.choose(job.split)
        for note in coordinator.mismatch_notes(planner):
            _say(note)
        if advice is not None:
            _say(advice.advice)
        tok_s = planner.predict(plan).decode_tok_s
        flash = "on" if coordinator.flash_attn else "off"
        _say(
            f"plan {plan.describe(node.node_id)} (predicted {tok_s:.1f} tok/s, "
            f"flash attention {flash})"
        )
        pipeline = await coordinator.start(plan, transport_dtype=args.transport_dtype)
        return await stream_to_stdout(
            pipeline, job.tokenizer, job.tokens, job.params, args.max_tokens
        )
    finally:
        if pipeline is not None:
            await pipeline.close()
        await node.stop()


def _listen_for(code: str) -> str:
    """Listen on loopback when the invite leads to loopback (a mesh on this machine)."""
    try:
        hosts = [host for host, _ in InviteCode.parse(code).addresses]
    except MeshchatError:
        return "0.0.0.0:0"  # join() reports the bad code
    local = hosts and all(ipaddress.ip_address(h).is_loopback for h in hosts)
    return "127.0.0.1:0" if local else "0.0.0.0:0"
