"""Earlier answers to one turn (regenerate, edit-and-resend), kept with the answer.

An answer's meta holds the versions not shown ("versions": each {"content", "meta", "prompt"},
in the order they were written) and where the shown one sits among all of them ("version_at").
`prompt` is the question a version answered: edit-and-resend changes it, and switching back to
an older answer brings its question back too. No textual here; the history file is ours, but a
hand-edited one must not break the app, so what is read is checked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

VERSIONS = "versions"
AT = "version_at"
MAX_VERSIONS = 16  # per answer: the oldest are dropped first


@dataclass(frozen=True)
class Version:
    content: str
    prompt: str  # the question it answered
    meta: dict[str, Any] = field(default_factory=dict)  # its own stats (no versions inside)

    def to_json(self) -> dict[str, Any]:
        return {"content": self.content, "prompt": self.prompt, "meta": self.meta}


def own_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """An answer's meta without its other versions."""
    return {k: v for k, v in meta.items() if k not in (VERSIONS, AT)}


def _read(item: object) -> Version | None:
    if not isinstance(item, dict):
        return None
    content, prompt, meta = item.get("content"), item.get("prompt"), item.get("meta", {})
    if not isinstance(content, str) or not isinstance(prompt, str) or not isinstance(meta, dict):
        return None
    return Version(content, prompt, own_meta(meta))


def all_versions(content: str, prompt: str, meta: dict[str, Any]) -> tuple[list[Version], int]:
    """Every version of an answer in order, and the index of the one shown (`content`)."""
    raw = meta.get(VERSIONS)
    others = [v for v in map(_read, raw if isinstance(raw, list) else []) if v is not None]
    at = meta.get(AT)
    at = at if isinstance(at, int) and 0 <= at <= len(others) else len(others)
    shown = Version(content, prompt, own_meta(meta))
    return [*others[:at], shown, *others[at:]], at


def versioned_meta(versions: list[Version], at: int) -> dict[str, Any]:
    """The meta of answer `versions[at]`, holding the others (none: just its own)."""
    meta = dict(versions[at].meta)
    others = versions[:at] + versions[at + 1 :]
    if others:
        meta[VERSIONS] = [v.to_json() for v in others]
        meta[AT] = at
    return meta


def add_version(earlier: list[Version], new: Version) -> tuple[list[Version], int]:
    """`new` after the earlier versions (bounded): the list and the new one's index."""
    versions = [*earlier, new][-MAX_VERSIONS:]
    return versions, len(versions) - 1


def position(meta: dict[str, Any]) -> tuple[int, int] | None:
    """(shown, of) for the footer, 1-based, e.g. (2, 2); None for an answer with one version."""
    raw = meta.get(VERSIONS)
    if not isinstance(raw, list) or not raw:
        return None
    others = sum(1 for item in raw if _read(item) is not None)
    if not others:
        return None
    at = meta.get(AT)
    at = at if isinstance(at, int) and 0 <= at <= others else others
    return at + 1, others + 1
