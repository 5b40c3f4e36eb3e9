"""The namespace lab itself: addresses, reachability, partition/heal, renumbering, cleanup.

Needs root (skips with the reason otherwise).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import pytest

from tests.netns_helpers import netns, require_netns

pytestmark = [pytest.mark.netns, pytest.mark.timeout(60)]

ECHO = textwrap.dedent(
    """
    import socket, sys
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", 9999))
    print("ready", flush=True)
    while True:
        data, addr = s.recvfrom(2048)
        s.sendto(data, addr)
    """
)
ASK = textwrap.dedent(
    """
    import socket, sys
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(0.5)
    for _ in range(3):
        s.sendto(b"hi", (sys.argv[1], 9999))
        try:
            print(s.recvfrom(2048)[0].decode()); break
        except TimeoutError:
            pass
    else:
        print("timeout")
    """
)


@pytest.fixture
def lab() -> Iterator[Any]:
    require_netns()
    with netns.NetnsLab(3) as lab:
        yield lab


def ask(lab: Any, src: str, dst_ip: str) -> str:
    return str(lab.run(src, [sys.executable, "-c", ASK, dst_ip], timeout=20).stdout.strip())


def start_echo(lab: Any, node: str) -> None:
    proc = lab.popen(node, [sys.executable, "-c", ECHO], stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b"ready"


def ns_list() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def test_lab_reachability_partition_heal_renumber(lab: Any) -> None:
    assert [lab.address(n) for n in lab.nodes] == ["10.99.0.1", "10.99.0.2", "10.99.0.3"]
    for node in lab.nodes:
        assert lab.ns(node) in ns_list()
        out = lab.run(node, ["ip", "-4", "-o", "addr", "show", "dev", "eth0"]).stdout
        assert f"{lab.address(node)}/24" in out
        routes = lab.run(node, ["ip", "route", "show"]).stdout
        assert "224.0.0.0/4 dev eth0" in routes
    start_echo(lab, "n2")
    assert ask(lab, "n1", "10.99.0.2") == "hi"
    assert ask(lab, "n3", "10.99.0.2") == "hi"

    lab.partition("n2")
    assert ask(lab, "n1", "10.99.0.2") == "timeout"
    assert ask(lab, "n3", "10.99.0.2") == "timeout"
    lab.heal("n2")
    assert ask(lab, "n1", "10.99.0.2") == "hi"

    lab.partition("n3")  # only n3 is cut off: n1 still reaches n2
    assert ask(lab, "n1", "10.99.0.2") == "hi"
    assert ask(lab, "n3", "10.99.0.2") == "timeout"
    lab.heal("n3")

    lab.change_address("n2", "10.99.0.42")
    assert lab.address("n2") == "10.99.0.42"
    assert ask(lab, "n1", "10.99.0.42") == "hi"
    with pytest.raises(ValueError):
        lab.change_address("n2", "192.168.1.1")
    with pytest.raises(KeyError):
        lab.ns("n9")


def test_down_removes_everything_and_stale_labs_are_cleaned() -> None:
    require_netns()
    lab = netns.NetnsLab(2)
    with lab:
        start_echo(lab, "n1")
        names = [lab.ns(n) for n in lab.nodes]
    listed = ns_list()
    assert not any(name in listed for name in names)
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert lab.bridge not in links and lab.host_if("n1") not in links

    # Leftovers of a process that died without cleaning up.
    dead = subprocess.Popen(["true"])
    dead.wait()
    assert not os.path.exists(f"/proc/{dead.pid}")
    stale_ns = f"mc-{dead.pid}-1-n1"
    stale_br = f"mcb-{netns._b36(dead.pid)}-1"
    subprocess.run(["ip", "netns", "add", stale_ns], check=True)
    subprocess.run(["ip", "link", "add", stale_br, "type", "bridge"], check=True)
    try:
        removed = netns.cleanup_stale()
        assert stale_ns in removed and stale_br in removed
        assert stale_ns not in ns_list()
    finally:
        subprocess.run(["ip", "netns", "del", stale_ns], capture_output=True)
        subprocess.run(["ip", "link", "del", stale_br], capture_output=True)
