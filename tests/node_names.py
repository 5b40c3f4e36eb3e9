"""NodeIDs for tests that name their nodes ("head", "b") or show them in snapshots."""

from __future__ import annotations

import base64

from meshchat.mesh.identity import KEY_LEN, NodeId


def named(name: str) -> NodeId:
    """A NodeID whose raw key begins with `name`: distinct per name, and NodeIDs sort as their
    names do (the planner breaks ties by NodeID order)."""
    raw = name.encode()
    assert len(raw) <= KEY_LEN, name
    return NodeId(raw.ljust(KEY_LEN, b"\0"))


def with_text(prefix: str) -> NodeId:
    """A NodeID whose text starts with `prefix` (base32 letters: a-z, 2-7), for views that show
    a NodeID's first characters."""
    assert len(prefix) <= 50, prefix
    text = (prefix + "a" * 56)[:56].upper()
    node = NodeId(base64.b32decode(text)[:KEY_LEN])
    assert str(node).startswith(prefix), prefix
    return node


# The planner tests' nodes: the head and two others.
HEAD, B, C = named("head"), named("b"), named("c")
