"""A node's identity: an Ed25519 key pair on disk, its NodeID, and the QUIC certificate.

NodeID = the raw 32-byte public key. Its text form is lowercase base32 of the key plus a 2-byte
checksum, so a mistyped NodeID is caught locally. The certificate is self-signed and only carries
the key: peers trust the key (pinned NodeID), never a CA.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import NameOID

from meshchat.errors import MeshchatError
from meshchat.fsutil import atomic_write_bytes

KEY_LEN = 32
_CHECK_LEN = 2
_PEM_HEADER = b"-----BEGIN PRIVATE KEY-----"


def _b32(data: bytes) -> str:
    return base64.b32encode(data).decode().rstrip("=").lower()


def _unb32(text: str) -> bytes:
    clean = "".join(text.split()).upper().replace("-", "")
    return base64.b32decode(clean + "=" * (-len(clean) % 8))


@dataclass(frozen=True, order=True)
class NodeId:
    """A node's public key; compare, hash and sort by the raw bytes."""

    raw: bytes

    def __post_init__(self) -> None:
        if len(self.raw) != KEY_LEN:
            raise ValueError("a NodeID is 32 bytes")

    def __str__(self) -> str:
        return _b32(self.raw + hashlib.sha256(self.raw).digest()[:_CHECK_LEN])

    def __repr__(self) -> str:
        return f"NodeId({self.short})"

    @property
    def short(self) -> str:
        """A display prefix; not unique enough to authenticate anything."""
        return str(self)[:10]

    def fingerprint(self, n: int = 16) -> bytes:
        """A hash of the key, used where a full key does not fit (invite codes)."""
        return hashlib.sha256(b"meshchat node " + self.raw).digest()[:n]

    @classmethod
    def parse(cls, text: str) -> NodeId:
        """Parse the text form; a typo raises MeshchatError."""
        try:
            data = _unb32(text)
        except (ValueError, TypeError) as exc:
            raise MeshchatError(f"not a NodeID: {text!r}") from exc
        if len(data) != KEY_LEN + _CHECK_LEN:
            raise MeshchatError(f"not a NodeID (wrong length): {text!r}")
        raw, check = data[:KEY_LEN], data[KEY_LEN:]
        if hashlib.sha256(raw).digest()[:_CHECK_LEN] != check:
            raise MeshchatError(f"NodeID checksum mismatch (typo?): {text!r}")
        return cls(raw)

    def verify(self, signature: bytes, message: bytes) -> bool:
        try:
            Ed25519PublicKey.from_public_bytes(self.raw).verify(signature, message)
        except (InvalidSignature, ValueError):
            return False
        return True


@dataclass
class Identity:
    """This node's key pair."""

    private_key: Ed25519PrivateKey
    node_id: NodeId = field(init=False)

    def __post_init__(self) -> None:
        self.node_id = NodeId(public_raw(self.private_key.public_key()))

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, path: Path) -> Identity:
        """Load the key at `path`, or create it (mode 0600) if the file does not exist.

        A file that exists but cannot be read or parsed is an error: silently making a new
        key would give the node a new identity and lock it out of its mesh.
        """
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            ident = cls.generate()
            pem = ident.private_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            atomic_write_bytes(path, pem, mode=0o600)
            return ident
        except OSError as exc:
            raise MeshchatError(f"cannot read identity key {path}: {exc.strerror}") from exc
        try:
            if not data.startswith(_PEM_HEADER):
                raise ValueError("not a PEM private key")
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise MeshchatError(
                f"identity key {path} is corrupt; restore it or delete it to become a new node"
            ) from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise MeshchatError(f"identity key {path} is not an Ed25519 key")
        if path.stat().st_mode & 0o077:
            os.chmod(path, 0o600)  # tighten a key someone copied in with loose permissions
        return cls(key)

    def sign(self, message: bytes) -> bytes:
        return self.private_key.sign(message)

    def certificate(self) -> x509.Certificate:
        """A self-signed certificate carrying this key, for the QUIC handshake."""
        name = x509.Name(
            [x509.NameAttribute(NameOID.COMMON_NAME, f"meshchat {self.node_id.short}")]
        )
        now = datetime.datetime.now(datetime.UTC)
        return (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.private_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .sign(self.private_key, algorithm=None)
        )


def public_raw(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def node_id_of_certificate(cert: x509.Certificate) -> NodeId | None:
    """The NodeID a peer certificate carries, or None if it is not an Ed25519 key."""
    key = cert.public_key()
    if not isinstance(key, Ed25519PublicKey):
        return None
    return NodeId(public_raw(key))
