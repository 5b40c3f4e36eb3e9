"""mDNS discovery across a real bridge: three network namespaces, one probe process in each.

Needs root (skips with the reason otherwise). Each namespace runs scripts/mdns_probe.py, which
writes what its MdnsDiscovery sees to a JSON file; the test reads the files. All traffic stays
inside the namespaces (10.99.0.0/24 on a bridge with no host address).
"""

from __future__ import annotations

import json
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meshchat.mesh.identity import KEY_LEN, NodeId
from tests.netns_helpers import SCRIPTS, netns, read_json, require_netns, wait_for

pytestmark = [pytest.mark.netns, pytest.mark.timeout(120)]

TTL = 4  # short record lifetime so that a partition shows within ~TTL + 10 s
PROBE = SCRIPTS / "mdns_probe.py"


class Probes:
    """One mdns_probe.py per namespace, with its output file."""

    def __init__(self, lab: Any, tmp: Path) -> None:
        self.lab = lab
        self.tmp = tmp
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.ids: dict[str, str] = {}

    def start(self, node: str, secret: bytes | None, port: int = 7000) -> None:
        self.ids.setdefault(node, str(NodeId(secrets.token_bytes(KEY_LEN))))
        out = self.out(node)
        out.unlink(missing_ok=True)
        argv = [sys.executable, str(PROBE), "--node-id", self.ids[node], "--port", str(port)]
        argv += ["--out", str(out), "--ttl", str(TTL)]
        if secret is not None:
            argv += ["--secret", secret.hex()]
        log = (self.tmp / f"{node}.log").open("ab")
        self.procs[node] = self.lab.popen(node, argv, stdout=log, stderr=log)

    def kill(self, node: str) -> None:
        proc = self.procs.pop(node)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)

    def out(self, node: str) -> Path:
        return self.tmp / f"{node}.json"

    def view(self, node: str) -> dict[str, Any]:
        return read_json(self.out(node)) or {"peers": {}, "lost": [], "advertised": []}

    def peer(self, node: str, other: str) -> dict[str, Any] | None:
        peer: dict[str, Any] | None = self.view(node)["peers"].get(self.ids[other])
        return peer

    def dump(self) -> str:
        parts = []
        for node in self.procs:
            log = self.tmp / f"{node}.log"
            tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
            parts.append(f"--- {node}: {json.dumps(self.view(node))}\n{tail}")
        return "\n".join(parts)


@pytest.fixture
def lab() -> Iterator[Any]:
    require_netns()
    with netns.NetnsLab(3) as lab:
        yield lab


def test_members_find_each_other_restart_partition_renumber(lab: Any, tmp_path: Path) -> None:
    mesh = secrets.token_bytes(32)
    probes = Probes(lab, tmp_path)
    probes.start("n1", mesh)
    probes.start("n2", mesh)
    probes.start("n3", secrets.token_bytes(32))  # a node of another mesh: nearby only

    def sees(node: str, other: str, address: str | None = None) -> bool:
        peer = probes.peer(node, other)
        return peer is not None and (address is None or peer["addresses"] == [address])

    # 1. Discovery across the bridge, with membership judged by each side's secret.
    wait_for(
        "all three probes to see each other",
        lambda: all(sees(a, b) for a in lab.nodes for b in lab.nodes if a != b),
        timeout=20,
        dump=probes.dump,
    )
    for node in lab.nodes:
        assert probes.view(node)["advertised"] == [lab.address(node)]
        assert probes.ids[node] not in probes.view(node)["peers"]
    n1_sees_n2 = probes.peer("n1", "n2")
    assert n1_sees_n2 is not None
    assert n1_sees_n2 == {
        "addresses": [lab.address("n2")],
        "port": 7000,
        "is_member": True,
        "has_mesh": True,
    }
    assert probes.peer("n2", "n1")["is_member"]  # type: ignore[index]
    assert not probes.peer("n1", "n3")["is_member"]  # type: ignore[index]
    assert probes.peer("n1", "n3")["has_mesh"]  # type: ignore[index]
    assert not probes.peer("n3", "n1")["is_member"]  # type: ignore[index]

    # 2. n2 crashes (no goodbye), comes back on a new address: found again, same node id.
    probes.kill("n2")
    lab.change_address("n2", "10.99.0.22")
    probes.start("n2", mesh, port=7002)
    wait_for(
        "n1 to see n2 at its new address",
        lambda: sees("n1", "n2", "10.99.0.22") and probes.peer("n1", "n2")["port"] == 7002,  # type: ignore[index]
        timeout=20,
        dump=probes.dump,
    )
    assert probes.peer("n1", "n2")["is_member"]  # type: ignore[index]

    # 3. Partition n3: its records expire on both sides (no answers to refresh queries).
    lab.partition("n3")
    wait_for(
        "n1 to lose n3 after the partition",
        lambda: probes.ids["n3"] in probes.view("n1")["lost"] and not sees("n1", "n3"),
        timeout=TTL + 25,
        dump=probes.dump,
    )
    assert sees("n1", "n2"), "a partition of n3 must not cost n1 its link to n2"
    # 4. Heal: the next refresh query of n1/n2 reaches n3, which answers; n3 hears them too.
    lab.heal("n3")
    wait_for(
        "n1 and n3 to see each other again after healing",
        lambda: sees("n1", "n3") and sees("n3", "n1"),
        timeout=TTL + 25,
        dump=probes.dump,
    )

    # 5. n1 is renumbered while running: it notices and re-announces; n2 follows.
    lab.change_address("n1", "10.99.0.11")
    wait_for(
        "n2 to see n1's new address without a restart",
        lambda: sees("n2", "n1", "10.99.0.11"),
        timeout=TTL + 15,
        dump=probes.dump,
    )
