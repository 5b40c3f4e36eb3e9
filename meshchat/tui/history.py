"""Conversations kept in SQLite (stdlib sqlite3) in the data dir: `chats.sqlite3`.

The schema is versioned with `PRAGMA user_version`; `_MIGRATIONS[i]` takes version i to i+1, so
an older file is upgraded in place and a file from a newer meshchat is refused with a message
rather than misread. Each chat has its own system prompt and sampling settings (JSON).

Every failure surfaces as `HistoryError` with a sentence for the user: the app shows it and
keeps running without history rather than dying.
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshchat.config import ChatSettings
from meshchat.errors import MeshchatError

DB_NAME = "chats.sqlite3"

_MIGRATIONS = [
    """
    CREATE TABLE conversations (
        id INTEGER PRIMARY KEY,
        title TEXT NOT NULL,
        created REAL NOT NULL,
        updated REAL NOT NULL,
        system_prompt TEXT NOT NULL DEFAULT '',
        settings TEXT NOT NULL DEFAULT '{}'
    );
    CREATE TABLE messages (
        id INTEGER PRIMARY KEY,
        conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
        position INTEGER NOT NULL,
        role TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
        content TEXT NOT NULL,
        created REAL NOT NULL,
        meta TEXT NOT NULL DEFAULT '{}',
        UNIQUE (conversation_id, position)
    );
    CREATE INDEX conversations_by_update ON conversations(updated DESC);
    """,
]
SCHEMA_VERSION = len(_MIGRATIONS)


class HistoryError(MeshchatError):
    """The chat history cannot be read or written."""


@dataclass
class StoredMessage:
    role: str  # "user" | "assistant"
    content: str
    meta: dict[str, Any] = field(default_factory=dict)  # stats, "cancelled", "error"
    id: int | None = None


@dataclass
class Conversation:
    id: int
    title: str
    created: float
    updated: float
    system_prompt: str = ""
    settings: ChatSettings = field(default_factory=ChatSettings)


@dataclass(frozen=True)
class SearchHit:
    conversation: Conversation
    snippet: str


def title_from(text: str, limit: int = 40) -> str:
    """A chat title from its first message: the first line, shortened at a word."""
    line = " ".join(text.strip().split("\n", 1)[0].split())
    if len(line) <= limit:
        return line or "New chat"
    cut = line[:limit].rsplit(" ", 1)[0]
    return (cut or line[:limit]) + "…"


class History:
    """One SQLite file of conversations. Not thread-safe: use it from the UI thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, isolation_level=None)
            self._db.execute("PRAGMA foreign_keys = ON")
            self._migrate()
        except sqlite3.DatabaseError as exc:
            raise HistoryError(f"chat history {path} is unreadable: {exc}") from None
        except OSError as exc:
            raise HistoryError(f"cannot open chat history {path}: {exc.strerror}") from None

    def _migrate(self) -> None:
        version = int(self._db.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise HistoryError(
                f"chat history {self.path} was written by a newer meshchat "
                f"(schema {version}, this one knows {SCHEMA_VERSION})"
            )
        for target in range(version, SCHEMA_VERSION):
            # executescript commits first and runs statements as given: one script, one
            # transaction, so a failed step leaves the previous version intact.
            try:
                self._db.executescript(
                    f"BEGIN; {_MIGRATIONS[target]}; PRAGMA user_version = {target + 1}; COMMIT;"
                )
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        try:
            self._db.execute("BEGIN")
            yield
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise

    @contextmanager
    def _guard(self, doing: str) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            raise HistoryError(f"cannot {doing} in {self.path}: {exc}") from None

    def close(self) -> None:
        self._db.close()

    # --- conversations ----------------------------------------------------------------------

    def _row(self, row: tuple[Any, ...]) -> Conversation:
        cid, title, created, updated, system, settings_json = row
        try:
            settings, _ = ChatSettings.from_dict(json.loads(settings_json))
        except (ValueError, TypeError):
            settings = ChatSettings()
        return Conversation(cid, title, created, updated, system, settings)

    _COLUMNS = "id, title, created, updated, system_prompt, settings"

    def create(
        self, title: str = "New chat", system_prompt: str = "", settings: ChatSettings | None = None
    ) -> Conversation:
        now = time.time()
        settings = settings or ChatSettings()
        with self._guard("create a chat"):
            cur = self._db.execute(
                "INSERT INTO conversations (title, created, updated, system_prompt, settings)"
                " VALUES (?, ?, ?, ?, ?)",
                (title, now, now, system_prompt, json.dumps(settings.to_dict())),
            )
        assert cur.lastrowid is not None
        return Conversation(cur.lastrowid, title, now, now, system_prompt, settings)

    def get(self, conversation_id: int) -> Conversation | None:
        with self._guard("read a chat"):
            row = self._db.execute(
                f"SELECT {self._COLUMNS} FROM conversations WHERE id = ?", (conversation_id,)
            ).fetchone()
        return self._row(row) if row else None

    def chats(self) -> list[Conversation]:
        """All chats, the most recently used first."""
        with self._guard("list chats"):
            rows = self._db.execute(
                f"SELECT {self._COLUMNS} FROM conversations ORDER BY updated DESC, id DESC"
            ).fetchall()
        return [self._row(r) for r in rows]

    def rename(self, conversation_id: int, title: str) -> None:
        with self._guard("rename a chat"):
            self._db.execute(
                "UPDATE conversations SET title = ? WHERE id = ?", (title, conversation_id)
            )

    def delete(self, conversation_id: int) -> None:
        with self._guard("delete a chat"):
            self._db.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))

    def configure(self, conversation_id: int, system_prompt: str, settings: ChatSettings) -> None:
        with self._guard("save chat settings"):
            self._db.execute(
                "UPDATE conversations SET system_prompt = ?, settings = ? WHERE id = ?",
                (system_prompt, json.dumps(settings.to_dict()), conversation_id),
            )

    def _touch(self, conversation_id: int) -> None:
        self._db.execute(
            "UPDATE conversations SET updated = ? WHERE id = ?", (time.time(), conversation_id)
        )

    # --- messages ---------------------------------------------------------------------------

    def messages(self, conversation_id: int) -> list[StoredMessage]:
        with self._guard("read messages"):
            rows = self._db.execute(
                "SELECT id, role, content, meta FROM messages"
                " WHERE conversation_id = ? ORDER BY position",
                (conversation_id,),
            ).fetchall()
        found = []
        for mid, role, content, meta_json in rows:
            try:
                meta = json.loads(meta_json)
            except ValueError:
                meta = {}
            found.append(StoredMessage(role, content, meta if isinstance(meta, dict) else {}, mid))
        return found

    def append(self, conversation_id: int, message: StoredMessage) -> StoredMessage:
        with self._guard("save a message"), self._transaction():
            (position,) = self._db.execute(
                "SELECT COALESCE(MAX(position) + 1, 0) FROM messages WHERE conversation_id = ?",
                (conversation_id,),
            ).fetchone()
            cur = self._db.execute(
                "INSERT INTO messages (conversation_id, position, role, content, created, meta)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (
                    conversation_id,
                    position,
                    message.role,
                    message.content,
                    time.time(),
                    json.dumps(message.meta),
                ),
            )
            self._touch(conversation_id)
        message.id = cur.lastrowid
        return message

    def update(self, message: StoredMessage) -> None:
        """Rewrite a saved message's text and meta (another version of an answer shown)."""
        with self._guard("change a message"):
            self._db.execute(
                "UPDATE messages SET content = ?, meta = ? WHERE id = ?",
                (message.content, json.dumps(message.meta), message.id),
            )

    def truncate(self, conversation_id: int, keep: int) -> None:
        """Keep the first `keep` messages of a chat (for regenerate and edit-and-resend)."""
        with self._guard("change a chat"), self._transaction():
            self._db.execute(
                "DELETE FROM messages WHERE conversation_id = ? AND position >= ?",
                (conversation_id, keep),
            )
            self._touch(conversation_id)

    # --- search -----------------------------------------------------------------------------

    def search(self, query: str, limit: int = 50) -> list[SearchHit]:
        """Chats whose title or messages contain `query` (case-insensitive), newest first."""
        query = query.strip()
        if not query:
            return [SearchHit(c, "") for c in self.chats()[:limit]]
        pattern = "%" + query.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        with self._guard("search chats"):
            rows = self._db.execute(
                f"""
                SELECT {self._COLUMNS},
                    (SELECT content FROM messages m WHERE m.conversation_id = c.id
                     AND m.content LIKE :p ESCAPE '\\' ORDER BY position LIMIT 1)
                FROM conversations c
                WHERE c.title LIKE :p ESCAPE '\\'
                   OR EXISTS (SELECT 1 FROM messages m WHERE m.conversation_id = c.id
                              AND m.content LIKE :p ESCAPE '\\')
                ORDER BY updated DESC, id DESC LIMIT :limit
                """,
                {"p": pattern, "limit": limit},
            ).fetchall()
        return [SearchHit(self._row(r[:6]), _snippet(r[6] or "", query)) for r in rows]


def _snippet(text: str, query: str, width: int = 60) -> str:
    match = re.search(re.escape(query), text, re.IGNORECASE)
    if match is None:
        return ""
    start = max(0, match.start() - width // 3)
    piece = " ".join(text[start : start + width].split())
    return ("…" if start else "") + piece + ("…" if start + width < len(text) else "")


def export_markdown(conversation: Conversation, messages: list[StoredMessage]) -> str:
    """The chat as a Markdown document: title, system prompt, then each turn."""
    lines = [f"# {conversation.title}", ""]
    stamp = time.strftime("%Y-%m-%d %H:%M", time.localtime(conversation.created))
    lines += [f"*Exported from meshchat — started {stamp}*", ""]
    if conversation.system_prompt:
        lines += ["## System", "", conversation.system_prompt, ""]
    for message in messages:
        heading = "You" if message.role == "user" else "Assistant"
        lines += [f"## {heading}", "", message.content.rstrip(), ""]
        if message.meta.get("cancelled"):
            lines += ["*(answer cancelled)*", ""]
    return "\n".join(lines).rstrip() + "\n"
