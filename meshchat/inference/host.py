"""Which machine a node runs on, as peers may know it: a hash, never the raw machine id.

Nodes on one host share its cores, so the planner charges their stages for it
(`Planner.share_charges`). Two nodes report the same `host_id()` exactly when they read the same
/etc/machine-id and the same boot id; the hash (salted with a constant) does not reveal either.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os

_SOURCES = ("/etc/machine-id", "/proc/sys/kernel/random/boot_id")
_SALT = b"meshchat host identity v1\0"
HOST_ID_CHARS = 16


@functools.cache
def host_id() -> str:
    """16 hex digits naming this machine in this boot ("" if neither id is readable)."""
    parts: list[bytes] = []
    for path in _SOURCES:
        with contextlib.suppress(OSError), open(path, "rb") as handle:
            parts.append(handle.read(256).strip())
    if not any(parts):
        return ""
    digest = hashlib.sha256(_SALT + b"\0".join(parts)).hexdigest()
    return digest[:HOST_ID_CHARS]


def host_cpus() -> int:
    """The host's CPUs (not this process's affinity: a pinned node still shares the host)."""
    return max(1, os.cpu_count() or 1)
