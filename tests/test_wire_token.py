"""The Token fast path of the wire codec: the same bytes and the same reading as the generic one."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshchat.mesh import wire
from meshchat.mesh.wire import MAX_JSON_INT, MAX_TRACE, MsgType, ProtocolError, Token


def _generic_bytes(tok: Token) -> bytes:
    obj = {f: getattr(tok, f) for f in ("session", "position", "token", "trace")}
    return json.dumps(obj, separators=(",", ":")).encode()


def _generic_read(body: bytes) -> Token | str:
    try:
        return wire._record(Token, wire.parse_json(body, "TOKEN"), "TOKEN")
    except (ProtocolError, TypeError, ValueError) as exc:
        return type(exc).__name__


def _read(body: bytes) -> Token | str:
    try:
        msg = wire.decode_body(MsgType.TOKEN, body)
    except ProtocolError as exc:
        return type(exc).__name__
    assert isinstance(msg, Token)
    return msg


ints = st.integers(0, MAX_JSON_INT - 1)


@settings(max_examples=200, deadline=None)
@given(ints, ints, ints, st.lists(ints, max_size=MAX_TRACE + 2))
def test_a_token_encodes_and_reads_as_the_generic_codec_does(
    session: int, position: int, token: int, trace: list[int]
) -> None:
    tok = Token(session, position, token, trace)
    body = wire.encode_body(tok)
    assert body == _generic_bytes(tok)
    assert _read(body) == tok == _generic_read(body)


@pytest.mark.parametrize(
    "body",
    [
        b'{"session":01,"position":5,"token":42,"trace":[]}',  # leading zero: not JSON
        b'{"session":-1,"position":5,"token":42,"trace":[]}',
        b'{"session":18446744073709551616,"position":5,"token":42,"trace":[]}',  # >= 2**64
        b'{"session":1, "position":5,"token":42,"trace":[]}',  # whitespace
        b'{"position":5,"session":1,"token":42,"trace":[1]}',  # another key order
        b'{"session":1,"position":5,"token":42,"trace":[1,]}',
        b'{"session":1,"position":5,"token":42}',  # no trace
        b'{"session":1,"position":5,"token":true,"trace":[]}',
        b'{"session":1,"position":5,"token":42,"trace":[]}x',
        b'{"session":1,"position":5,"token":42,"trace":[]',
    ],
)
def test_other_bodies_read_as_the_generic_codec_reads_them(body: bytes) -> None:
    assert _read(body) == _generic_read(body)
