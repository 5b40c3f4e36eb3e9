"""Three real `meshchat --headless` nodes in three namespaces find each other by mDNS.

The mesh is formed once by invite (n2 and n3 join n1). Then every node is stopped, every
namespace is renumbered and the nodes are restarted without any invite: the addresses they had
stored are all stale, so the only way back together is mDNS, and each status file must list the
other two as connected members, at their new addresses, found `via: "mdns"`.
Needs root (skips with the reason otherwise).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.netns_helpers import REPO, netns, read_json, require_netns, wait_for

pytestmark = [pytest.mark.netns, pytest.mark.timeout(150)]

PORT = 47470


@pytest.fixture
def lab() -> Iterator[Any]:
    require_netns()
    with netns.NetnsLab(3) as lab:
        yield lab


class Nodes:
    def __init__(self, lab: Any, tmp: Path) -> None:
        self.lab = lab
        self.tmp = tmp
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "PYTHONUNBUFFERED": "1",
            "MESHCHAT_MDNS": "1",
        }

    def status_path(self, node: str) -> Path:
        return self.tmp / f"{node}.status.json"

    def status(self, node: str) -> dict[str, Any]:
        return read_json(self.status_path(node)) or {}

    def start(self, node: str, *extra: str) -> None:
        self.status_path(node).unlink(missing_ok=True)
        argv = [sys.executable, "-m", "meshchat.cli", "--headless"]
        argv += ["--data-dir", str(self.tmp / f"{node}.data")]
        argv += ["--listen", f"0.0.0.0:{PORT}", "--status-file", str(self.status_path(node))]
        log = (self.tmp / f"{node}.log").open("ab")
        self.procs[node] = self.lab.popen(
            node, [*argv, *extra], stdout=log, stderr=log, env=self.env, cwd=REPO
        )

    def stop_all(self) -> None:
        for proc in self.procs.values():
            proc.send_signal(signal.SIGTERM)
        for node, proc in self.procs.items():
            assert proc.wait(timeout=15) == 0, f"{node} did not stop cleanly"
        self.procs.clear()

    def connected(self, node: str) -> dict[str, dict[str, Any]]:
        peers = self.status(node).get("peers", [])
        return {p["node_id"]: p for p in peers if p.get("state") == "connected"}

    def node_id(self, node: str) -> str:
        return str(self.status(node).get("node_id", ""))

    def dump(self) -> str:
        out = []
        for node in self.lab.nodes:
            log = self.tmp / f"{node}.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            out.append(f"--- {node}: {json.dumps(self.status(node))}\n{tail}")
        return "\n".join(out)


def test_headless_members_refind_each_other_by_mdns(lab: Any, tmp_path: Path) -> None:
    nodes = Nodes(lab, tmp_path)
    invite = tmp_path / "invite.txt"
    nodes.start("n1", "--invite-uses", "2", "--invite-file", str(invite))
    wait_for("n1's invite", invite.exists, timeout=30, dump=nodes.dump)
    code = invite.read_text().strip()
    nodes.start("n2", "--join", code)
    nodes.start("n3", "--join", code)
    wait_for(
        "the mesh to form (each node connected to the other two)",
        lambda: all(len(nodes.connected(n)) == 2 for n in lab.nodes),
        timeout=40,
        dump=nodes.dump,
    )
    ids = {n: nodes.node_id(n) for n in lab.nodes}

    nodes.stop_all()
    new_ips = {n: f"10.99.0.{50 + i}" for i, n in enumerate(lab.nodes)}
    for n, ip in new_ips.items():
        lab.change_address(n, ip)
    for n in lab.nodes:
        nodes.start(n)  # no --join: membership is on disk, addresses are stale

    def refound() -> bool:
        for n in lab.nodes:
            conn = nodes.connected(n)
            for other in lab.nodes:
                if other == n:
                    continue
                peer = conn.get(ids[other])
                if peer is None or peer.get("via") != "mdns":
                    return False
                if not str(peer.get("address", "")).startswith(new_ips[other] + ":"):
                    return False
        return True

    wait_for(
        "every node to reconnect to the other two via mDNS at their new addresses",
        refound,
        timeout=60,
        dump=nodes.dump,
    )
    for n in lab.nodes:
        assert nodes.status(n)["node_id"] == ids[n], "identity must survive a restart"
    nodes.stop_all()
