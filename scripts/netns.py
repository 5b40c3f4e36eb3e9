#!/usr/bin/env python3
"""Network-namespace lab: N namespaces on one Linux bridge, for real multi-node mesh tests.

Needs root and iproute2 (`ip`), nothing else. Each namespace gets loopback, one veth (`eth0`) into
a bridge that has no address on the host, a private address 10.99.0.<i>/24 and a multicast route,
so mDNS between namespaces works exactly as on a LAN and no packet reaches the host's networks.

Library use (tests import this file by path, see tests/netns_helpers.py):

    with NetnsLab(3) as lab:
        proc = lab.popen("n1", [sys.executable, "prog.py"])
        lab.partition("n2"); ...; lab.heal("n2")
        lab.change_address("n3", "10.99.0.33")

Names carry the creating pid (`mc-<pid>-<k>-n1`, bridge `mcb-<pid36>-<k>`), so labs never
clash, and `cleanup_stale()` (run by every `up`) removes what dead processes left behind.

CLI (one persistent lab tagged `cli`):

    python scripts/netns.py up [-n 3] | down | list | cleanup
    python scripts/netns.py run n1 -- CMD ARGS...
    python scripts/netns.py partition n2 | heal n2 | addr n3 10.99.0.33
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

__all__ = ["NetnsError", "NetnsLab", "cleanup_stale", "netns_unavailable_reason"]

PREFIX = "mc"
DEFAULT_SUBNET = "10.99.0.0/24"
_STALE_NS = re.compile(rf"^{PREFIX}-(\d+)-\d+-")
_STALE_LINK = re.compile(rf"^{PREFIX}[bh]-([0-9a-z]+)-")
_counter = itertools.count(1)


class NetnsError(RuntimeError):
    """An `ip` command failed; the message holds the command and its stderr."""


def _ip(*args: str, check: bool = True, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        ["ip", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and proc.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {proc.stderr.strip() or proc.returncode}")
    return proc


def _bridge(*args: str) -> None:
    proc = subprocess.run(
        ["bridge", *args], capture_output=True, text=True, timeout=20, check=False
    )
    if proc.returncode != 0:
        raise NetnsError(f"bridge {' '.join(args)}: {proc.stderr.strip() or proc.returncode}")


def _b36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = digits[r] + out
        if n == 0:
            return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def netns_unavailable_reason() -> str | None:
    """Why namespace tests cannot run here, or None when they can."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "network namespace tests need root (ip netns, veth, bridge)"
    if shutil.which("ip") is None:
        return "iproute2 `ip` not found"
    probe = f"{PREFIX}-{os.getpid()}-0-probe"
    try:
        added = _ip("netns", "add", probe, check=False)
        if added.returncode != 0:
            return f"`ip netns add` failed: {added.stderr.strip()}"
        link = _ip(
            "link", "add", f"{PREFIX}b-probe{_b36(os.getpid())}", "type", "bridge", check=False
        )
        if link.returncode != 0:
            return f"cannot create a bridge: {link.stderr.strip()}"
        _ip("link", "del", f"{PREFIX}b-probe{_b36(os.getpid())}", check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"ip failed: {exc}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


def _kill_netns_pids(ns: str) -> None:
    pids = _ip("netns", "pids", ns, check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


def cleanup_stale() -> list[str]:
    """Delete namespaces, bridges and veths whose creating process is gone. Returns their names."""
    removed: list[str] = []
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        ns = line.split()[0] if line.strip() else ""
        m = _STALE_NS.match(ns)
        if m and not _pid_alive(int(m.group(1))):
            _kill_netns_pids(ns)
            if _ip("netns", "del", ns, check=False).returncode == 0:
                removed.append(ns)
    for line in _ip("-o", "link", "show", check=False).stdout.splitlines():
        parts = line.split(":")
        if len(parts) < 2:
            continue
        name = parts[1].strip().split("@")[0]
        m = _STALE_LINK.match(name)
        stale = m and m.group(1) != _CLI_TAG and not _pid_alive(int(m.group(1), 36))
        if stale and _ip("link", "del", name, check=False).returncode == 0:
            removed.append(name)
    return removed


class NetnsLab:
    """A bridge and `count` namespaces named n1..nN. Use as a context manager.

    `tag` names the lab; by default `<pid>-<k>` so that parallel labs never clash and stale
    ones are recognisable. Addresses are `subnet` host 1..N unless `addresses` says otherwise.
    """

    def __init__(
        self,
        count: int = 3,
        *,
        subnet: str = DEFAULT_SUBNET,
        tag: str | None = None,
    ) -> None:
        if not 1 <= count <= 50:
            raise ValueError("count must be 1..50")
        self.count = count
        self.network = ipaddress.IPv4Network(subnet)
        pid = os.getpid()
        k = next(_counter)
        self.tag = tag or f"{pid}-{k}"
        short = tag or f"{_b36(pid)}-{_b36(k)}"
        if len(short) > 8:
            raise ValueError("tag too long for interface names (max 8 chars)")
        self.bridge = f"{PREFIX}b-{short}"
        self._host_if_prefix = f"{PREFIX}h-{short}-"
        self.nodes = [f"n{i}" for i in range(1, count + 1)]
        hosts = list(itertools.islice(self.network.hosts(), count))
        self._addr: dict[str, str] = {n: str(h) for n, h in zip(self.nodes, hosts, strict=True)}
        self._procs: list[subprocess.Popen[Any]] = []
        self._up = False

    # ---- names ----------------------------------------------------------------------------

    def ns(self, node: str) -> str:
        """The namespace name of `node` (`n1`...)."""
        self._check(node)
        return f"{PREFIX}-{self.tag}-{node}"

    def host_if(self, node: str) -> str:
        """The host-side veth of `node`, a port of the bridge."""
        self._check(node)
        return f"{self._host_if_prefix}{node[1:]}"

    def address(self, node: str) -> str:
        """The node's current IPv4 address."""
        self._check(node)
        return self._addr[node]

    def _check(self, node: str) -> None:
        if node not in self.nodes:
            raise KeyError(f"no node {node!r} in this lab ({', '.join(self.nodes)})")

    # ---- lifecycle ------------------------------------------------------------------------

    def up(self) -> NetnsLab:
        """Create the bridge and namespaces. On any failure, what was made is removed."""
        cleanup_stale()
        try:
            self._up = True
            _ip("link", "add", self.bridge, "type", "bridge")
            # No STP (ports forward at once and their state can be set by hand), no snooping
            # (multicast is flooded to every port, like a plain switch).
            _ip(
                "link",
                "set",
                self.bridge,
                "type",
                "bridge",
                "stp_state",
                "0",
                "mcast_snooping",
                "0",
            )
            _ip("link", "set", self.bridge, "up")
            for node in self.nodes:
                self._add_node(node)
        except BaseException:
            self.down()
            raise
        return self

    def _add_node(self, node: str) -> None:
        ns, host_if = self.ns(node), self.host_if(node)
        peer = f"{PREFIX}p-{host_if[len(PREFIX) + 2 :]}"
        _ip("netns", "add", ns)
        _ip("link", "add", host_if, "type", "veth", "peer", "name", peer)
        _ip("link", "set", peer, "netns", ns)
        _ip("link", "set", host_if, "master", self.bridge)
        _ip("link", "set", host_if, "up")
        nsx = ("-n", ns)
        _ip(*nsx, "link", "set", "lo", "up")
        _ip(*nsx, "link", "set", peer, "name", "eth0")
        _ip(*nsx, "addr", "add", f"{self._addr[node]}/{self.network.prefixlen}", "dev", "eth0")
        _ip(*nsx, "link", "set", "eth0", "up")
        # mDNS sends to 224.0.0.251; without a route the kernel has nowhere to put it.
        _ip(*nsx, "route", "add", "224.0.0.0/4", "dev", "eth0")

    def down(self) -> None:
        """Stop started processes and remove everything. Safe to call more than once."""
        for proc in self._procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
        deadline = time.monotonic() + 3.0
        for proc in self._procs:
            try:
                proc.wait(timeout=max(0.05, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=2)
        self._procs.clear()
        for node in self.nodes:
            ns = self.ns(node)
            _kill_netns_pids(ns)
            _ip("netns", "del", ns, check=False)
            _ip("link", "del", self.host_if(node), check=False)
        _ip("link", "del", self.bridge, check=False)
        self._up = False

    def __enter__(self) -> NetnsLab:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()

    # ---- processes ------------------------------------------------------------------------

    def argv(self, node: str, cmd: Sequence[str]) -> list[str]:
        """The argv that runs `cmd` inside the node's namespace."""
        return ["ip", "netns", "exec", self.ns(node), *cmd]

    def popen(self, node: str, cmd: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start `cmd` in the node's namespace; it is stopped by `down()` unless it ends first."""
        proc: subprocess.Popen[Any] = subprocess.Popen(self.argv(node, cmd), **kwargs)
        self._procs.append(proc)
        return proc

    def run(
        self, node: str, cmd: Sequence[str], *, timeout: float = 30.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run `cmd` in the node's namespace to completion, capturing text output."""
        return subprocess.run(
            self.argv(node, cmd), capture_output=True, text=True, timeout=timeout, check=check
        )

    # ---- faults ---------------------------------------------------------------------------

    def partition(self, node: str) -> None:
        """Cut `node` off: its bridge port drops every frame, both ways.

        The node's own link stays up (no carrier change), like a cable pulled further away.
        """
        # `ip link set ... bridge_slave state` is accepted but ignored here; `bridge` works.
        _bridge("link", "set", "dev", self.host_if(node), "state", "0")

    def heal(self, node: str) -> None:
        """Undo `partition`: the bridge port forwards again."""
        _bridge("link", "set", "dev", self.host_if(node), "state", "3")

    def change_address(self, node: str, new_ip: str) -> None:
        """Replace the node's address (same prefix length), as a DHCP renumbering would."""
        addr = ipaddress.IPv4Address(new_ip)
        if addr not in self.network:
            raise ValueError(f"{new_ip} is outside the lab network {self.network}")
        nsx = ("-n", self.ns(node))
        _ip(*nsx, "addr", "flush", "dev", "eth0")
        _ip(*nsx, "addr", "add", f"{new_ip}/{self.network.prefixlen}", "dev", "eth0")
        self._addr[node] = new_ip


# ---- CLI --------------------------------------------------------------------------------

_CLI_TAG = "cli"


def _cli_lab(count: int) -> NetnsLab:
    return NetnsLab(count, tag=_CLI_TAG)


def _cli_nodes() -> list[str]:
    out = _ip("netns", "list", check=False).stdout
    return sorted(
        m.group(1) for m in re.finditer(rf"^{PREFIX}-{_CLI_TAG}-(n\d+)", out, re.MULTILINE)
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_up = sub.add_parser("up", help="create the CLI lab")
    p_up.add_argument("-n", "--count", type=int, default=3)
    sub.add_parser("down", help="remove the CLI lab")
    sub.add_parser("list", help="show the CLI lab's namespaces and addresses")
    sub.add_parser("cleanup", help="remove leftovers of dead processes")
    p_run = sub.add_parser("run", help="run a command in a node: run n1 -- CMD...")
    p_run.add_argument("node")
    p_run.add_argument("command", nargs=argparse.REMAINDER)
    for name in ("partition", "heal"):
        sub.add_parser(name).add_argument("node")
    p_addr = sub.add_parser("addr", help="change a node's address")
    p_addr.add_argument("node")
    p_addr.add_argument("ip")
    args = parser.parse_args(argv)

    reason = netns_unavailable_reason()
    if reason is not None:
        print(f"netns: {reason}", file=sys.stderr)
        return 1
    try:
        if args.cmd == "cleanup":
            for name in cleanup_stale():
                print(f"removed {name}")
            return 0
        nodes = _cli_nodes()
        lab = _cli_lab(max(len(nodes), 1) if args.cmd != "up" else args.count)
        if args.cmd == "up":
            if nodes:
                print("netns: the CLI lab is already up (run `down` first)", file=sys.stderr)
                return 1
            lab.up()
            for node in lab.nodes:
                print(f"{node} {lab.ns(node)} {lab.address(node)}")
            return 0
        if args.cmd == "down":
            lab.down()
            return 0
        if not nodes:
            print("netns: the CLI lab is not up", file=sys.stderr)
            return 1
        if args.cmd == "list":
            for node in nodes:
                out = _ip("-n", lab.ns(node), "-4", "-o", "addr", "show", "dev", "eth0").stdout
                addrs = re.findall(r"inet (\S+)", out)
                print(f"{node} {lab.ns(node)} {' '.join(addrs)}")
            return 0
        if args.cmd == "run":
            command = args.command[1:] if args.command[:1] == ["--"] else args.command
            if not command:
                parser.error("run needs a command after --")
            return subprocess.call(lab.argv(args.node, command))
        if args.cmd == "partition":
            lab.partition(args.node)
        elif args.cmd == "heal":
            lab.heal(args.node)
        elif args.cmd == "addr":
            lab.change_address(args.node, args.ip)
        return 0
    except (NetnsError, KeyError, ValueError) as exc:
        print(f"netns: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
