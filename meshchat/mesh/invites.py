"""Invite codes: one short line that lets a new node join a mesh.

Layout (then base32, prefixed `mc1`): version u8 | expiry u32 (unix s) | inviter fingerprint (16 B,
a hash of its key; the full key is proven by the QUIC handshake) | secret (16 B) | address count
u8 | per address: family u8 (4|6), IP, port u16 | checksum (4 B of SHA-256 over all before).
With one IPv4 address that is 82 characters. The checksum rejects typos before any traffic.

The issuer keeps only a hash of each secret, with its expiry and remaining uses, persisted
atomically so a restart keeps issued invites valid (and used ones used).
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from meshchat.errors import MeshchatError
from meshchat.fsutil import atomic_write_text
from meshchat.mesh.identity import NodeId

PREFIX = "mc1"
_VERSION = 1
_HEAD = struct.Struct("!BI16s16sB")
_CHECK = 4
SECRET_LEN = 16
DEFAULT_TTL = 3600.0
MAX_ADDRESSES = 4


class InviteError(MeshchatError):
    """An invite that cannot be used; the message says why."""


@dataclass(frozen=True)
class InviteCode:
    inviter: bytes  # NodeId.fingerprint() of the issuing node
    secret: bytes
    expires: int
    addresses: tuple[tuple[str, int], ...]

    def __str__(self) -> str:
        return self.encode()

    def encode(self) -> str:
        parts = [_HEAD.pack(_VERSION, self.expires, self.inviter, self.secret, len(self.addresses))]
        for host, port in self.addresses:
            ip = ipaddress.ip_address(host)
            parts.append(struct.pack("!B", ip.version) + ip.packed + struct.pack("!H", port))
        raw = b"".join(parts)
        raw += hashlib.sha256(raw).digest()[:_CHECK]
        return PREFIX + base64.b32encode(raw).decode().rstrip("=").lower()

    @classmethod
    def parse(cls, text: str) -> InviteCode:
        """Decode a code; a mistyped or truncated one raises InviteError before any traffic."""
        clean = "".join(text.split()).lower()
        if not clean.startswith(PREFIX):
            raise InviteError("not a meshchat invite code (it should start with 'mc1')")
        body = clean[len(PREFIX) :].upper()
        try:
            raw = base64.b32decode(body + "=" * (-len(body) % 8))
        except ValueError:
            raise InviteError(
                "invite code has characters that cannot be in a code (typo?)"
            ) from None
        digest = hashlib.sha256(raw[:-_CHECK]).digest()[:_CHECK]
        # The last base32 character may carry unused bits; a typo there must not pass either.
        canonical = base64.b32encode(raw).decode().rstrip("=") == body
        if len(raw) < _HEAD.size + _CHECK or digest != raw[-_CHECK:] or not canonical:
            raise InviteError("invite code checksum does not match (typo or truncated copy?)")
        raw = raw[:-_CHECK]
        version, expires, inviter, secret, count = _HEAD.unpack_from(raw)
        if version != _VERSION:
            raise InviteError(f"invite code version {version} is not supported by this meshchat")
        off = _HEAD.size
        addrs: list[tuple[str, int]] = []
        try:
            for _ in range(count):
                fam = raw[off]
                size = {4: 4, 6: 16}[fam]
                ip = ipaddress.ip_address(raw[off + 1 : off + 1 + size])
                (port,) = struct.unpack_from("!H", raw, off + 1 + size)
                addrs.append((str(ip), port))
                off += 3 + size
        except (IndexError, KeyError, ValueError, struct.error):
            raise InviteError("invite code is malformed") from None
        if off != len(raw) or not addrs:
            raise InviteError("invite code is malformed")
        return cls(inviter, secret, expires, tuple(addrs))

    def check_fresh(self, now: float | None = None) -> None:
        if (time.time() if now is None else now) >= self.expires:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.expires))
            raise InviteError(f"invite code expired at {when}; ask for a new one")

    def matches(self, node: NodeId) -> bool:
        return node.fingerprint(len(self.inviter)) == self.inviter


def _secret_key(secret: bytes) -> str:
    return hashlib.sha256(b"meshchat invite " + secret).hexdigest()


class InviteBook:
    """Invites this node has issued: hashed secret → expiry and remaining uses."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._entries: dict[str, dict[str, float | int]] = {}
        try:
            data = json.loads(path.read_text())
            self._entries = {
                k: {"expires": float(v["expires"]), "uses_left": int(v["uses_left"])}
                for k, v in data["invites"].items()
            }
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise MeshchatError(f"invite list {path} is unreadable ({exc}); delete it") from exc

    def _save(self) -> None:
        now = time.time()
        # Forget long-expired entries: a secret past its expiry is refused as expired anyway;
        # keep a day of history so "expired" is reported rather than "not recognised".
        self._entries = {k: v for k, v in self._entries.items() if v["expires"] > now - 86400}
        atomic_write_text(self.path, json.dumps({"invites": self._entries}, indent=1), mode=0o600)

    def issue(
        self,
        inviter: NodeId,
        addresses: list[tuple[str, int]],
        uses: int = 1,
        ttl: float = DEFAULT_TTL,
    ) -> InviteCode:
        if uses < 1:
            raise MeshchatError("an invite needs at least one use")
        if not addresses:
            raise MeshchatError("cannot issue an invite: this node has no address to put in it")
        secret = os.urandom(SECRET_LEN)
        expires = int(time.time() + ttl)
        self._entries[_secret_key(secret)] = {"expires": expires, "uses_left": uses}
        self._save()
        return InviteCode(inviter.fingerprint(), secret, expires, tuple(addresses[:MAX_ADDRESSES]))

    def redeem(self, secret: bytes, now: float | None = None) -> None:
        """Use one use of the invite with this secret, or raise InviteError saying why not."""
        key = _secret_key(secret)
        entry = self._entries.get(key)
        if entry is None:
            raise InviteError("invite not recognised by this node (forged, or issued elsewhere)")
        if (time.time() if now is None else now) >= entry["expires"]:
            raise InviteError("invite expired; ask for a new one")
        if entry["uses_left"] <= 0:
            raise InviteError("invite already used; ask for a new one")
        entry["uses_left"] = int(entry["uses_left"]) - 1
        self._save()  # persist before the newcomer is told it is in
