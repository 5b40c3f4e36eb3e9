"""The in-connection authentication handshake (on the control stream, before anything else).

    dialer → HELLO(node_id, mesh_id, addresses)
    listener → CHALLENGE(nonce)
    dialer → AUTH(signature, invite_secret?)
    listener → WELCOME(...) or ERROR(code, reason), then closes

The signature covers a domain string, the listener's NodeID, the dialer's NodeID, the nonce and
a secret both ends derive from this TLS session (transport.session_binding): binding the
listener's identity stops a malicious member from relaying our proof elsewhere, the fresh nonce
stops replays, and the session binding makes the proof worthless on any other TLS session (the
listener never sees a client certificate, so this is what ties the dialer's key to the session).
The listener's own identity is already proven by TLS (pinned key).

A dialer redeeming an invite signs under the join domain instead (`membership.join_payload`):
that signature and the nonce go into the roster as its join proof, so other members can check
that it asked to join through that inviter. Other members cannot know this session's secret,
so the join proof leaves it out; the inviter's NodeID and its fresh nonce in the payload still
stop a replay or a relay to any other listener.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Awaitable, Callable
from typing import NoReturn

from meshchat.errors import MeshchatError
from meshchat.mesh import wire
from meshchat.mesh.identity import Identity, NodeId
from meshchat.mesh.membership import join_payload
from meshchat.mesh.transport import Connection, ConnectionLost
from meshchat.timeouts import TIMEOUTS

_DOMAIN = b"meshchat/1 auth\x00"
BINDING_SIZE = 32


class AuthRefused(MeshchatError):
    """The other side refused us; the message is its reason."""

    def __init__(self, code: wire.FaultCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code


def auth_payload(listener: NodeId, dialer: NodeId, nonce: bytes, binding: bytes) -> bytes:
    """What the dialer signs; `binding`: the connection's `tls_binding`."""
    if len(binding) != BINDING_SIZE:  # no handshake yet: never sign or check an unbound proof
        raise ConnectionLost("the TLS session is not established")
    return _DOMAIN + listener.raw + dialer.raw + nonce + binding


def new_nonce() -> bytes:
    return os.urandom(32)


async def dial_handshake(
    conn: Connection, identity: Identity, hello: wire.Hello, invite_secret: bytes | None
) -> wire.Welcome:
    """Run the dialer's side; the connection's peer key is already pinned."""
    assert conn.peer_id is not None
    await conn.send(hello)
    msg = await conn.recv_handshake(TIMEOUTS.auth_s)
    if isinstance(msg, wire.Error):
        raise AuthRefused(msg.code, msg.reason)
    if not isinstance(msg, wire.Challenge) or len(msg.nonce) != 32:
        conn.abort("expected a challenge")
        raise ConnectionLost("peer broke the handshake")
    if invite_secret is None:
        payload = auth_payload(conn.peer_id, identity.node_id, msg.nonce, conn.tls_binding)
    else:
        payload = join_payload(conn.peer_id, identity.node_id, msg.nonce)
    sig = identity.sign(payload)
    await conn.send(wire.Auth(sig, invite_secret))
    msg = await conn.recv_handshake(TIMEOUTS.auth_s)
    if isinstance(msg, wire.Error):
        conn.abort(msg.reason)
        raise AuthRefused(msg.code, msg.reason)
    if not isinstance(msg, wire.Welcome) or msg.node_id != conn.peer_id:
        conn.abort("expected a welcome")
        raise ConnectionLost("peer broke the handshake")
    conn.authenticated = True
    return msg


# decide(conn, dialer, hello, auth, nonce): the nonce the dialer signed (its join proof).
Decide = Callable[
    [Connection, NodeId, wire.Hello, wire.Auth, bytes], Awaitable[wire.Welcome | wire.Error]
]


async def accept_handshake(
    conn: Connection, identity: Identity, decide: Decide
) -> tuple[NodeId, wire.Hello, wire.Welcome]:
    """Run the listener's side; `decide` checks membership or redeems the invite."""
    msg = await conn.recv_handshake(TIMEOUTS.auth_s)
    if not isinstance(msg, wire.Hello):
        await refuse(conn, wire.FaultCode.PROTOCOL, "expected HELLO")
    dialer = msg.node_id  # a HELLO without a valid NodeID failed to decode (ProtocolError)
    if dialer == identity.node_id:
        await refuse(conn, wire.FaultCode.SELF, "a node cannot connect to itself")
    nonce = new_nonce()
    await conn.send(wire.Challenge(nonce))
    auth = await conn.recv_handshake(TIMEOUTS.auth_s)
    if not isinstance(auth, wire.Auth):
        await refuse(conn, wire.FaultCode.PROTOCOL, "expected AUTH")
    if auth.invite_secret is None:
        payload = auth_payload(identity.node_id, dialer, nonce, conn.tls_binding)
    else:
        payload = join_payload(identity.node_id, dialer, nonce)
    if not dialer.verify(auth.signature, payload):
        await refuse(
            conn, wire.FaultCode.BAD_SIGNATURE, "signature does not match the NodeID (wrong key)"
        )
    verdict = await decide(conn, dialer, msg, auth, nonce)
    if isinstance(verdict, wire.Error):
        await refuse(conn, verdict.code, verdict.reason)
    assert isinstance(verdict, wire.Welcome)
    conn.peer_id = dialer
    conn.authenticated = True
    await conn.send(verdict)
    return dialer, msg, verdict


async def refuse(conn: Connection, code: wire.FaultCode, reason: str) -> NoReturn:
    """Tell the dialer why, close, and raise AuthRefused."""
    with contextlib.suppress(ConnectionLost):
        await conn.send(wire.Error(code, reason))
    # Close only after the error frame had a chance to leave.
    conn._loop.call_later(0.2, conn.abort, reason)
    raise AuthRefused(code, reason)
