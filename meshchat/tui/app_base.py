"""The app's shared state and the hooks its parts offer each other.

`MeshchatApp` (app.py) is assembled from parts, each a subclass of `AppBase` with one job:
conversations (app_chats.py), sending and generating (app_chat.py), the mesh, split editor and
peers (app_mesh.py). They share the state declared here; a part calls another part's methods
through the hooks below, which the assembled class resolves by the usual method order.
"""

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from textual.app import App
from textual.worker import Worker

from meshchat.config import ChatSettings, Config
from meshchat.engine.chat_template import ChatMessage
from meshchat.errors import MeshchatError
from meshchat.paths import DataDir
from meshchat.tui.engine import ChatEngine
from meshchat.tui.history import (
    Conversation,
    History,
    HistoryError,
    StoredMessage,
)
from meshchat.tui.mesh_view import MeshView, MeshWatch
from meshchat.tui.planning import MeshPlanning
from meshchat.tui.versions import Version
from meshchat.tui.widgets.chat import ChatLog, MessageView
from meshchat.tui.widgets.chats import ChatList
from meshchat.tui.widgets.mesh_panel import MeshPanel
from meshchat.tui.widgets.peers import PeersTable
from meshchat.tui.widgets.prompt import PromptInput
from meshchat.tui.widgets.split_editor import SplitEditor
from meshchat.tui.widgets.status import StatusLine

log = logging.getLogger(__name__)

PEERS_REFRESH_S = 1.0
MeshFactory = Callable[[], Awaitable[MeshView]]
EngineLoader = Callable[[], ChatEngine]


def worker_error(exc: Exception, what: str) -> str:
    """One line for a worker that failed, for the screen.

    A MeshchatError says what is wrong in words for the user; anything else is a bug: its
    traceback goes to the log and the line says "internal error", so it never fails silently."""
    if isinstance(exc, MeshchatError):
        return str(exc)
    log.error("%s failed", what, exc_info=exc)
    return f"internal error: {exc!r}"


@dataclass
class AppOptions:
    data: DataDir
    config: Config
    model_path: Path | None
    model_error: str = ""
    join_code: str | None = None
    theme_dirs: tuple[Path, ...] = ()
    history_path: Path | None = None  # default: chats.sqlite3 in the data dir
    debug: bool = False  # show Textual's traceback on a crash instead of one line
    crash_log: Path | None = None  # where a crash's traceback goes when not debugging


@dataclass
class Generation:
    """The answer being written now."""

    id: int
    conversation_id: int
    view: MessageView
    dropped: int
    started: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    chunks: int = 0  # streamed pieces (about one per token): tok/s while it streams
    replans: int = 0  # failovers during this answer (its footer counts them)
    prompt: str = ""  # the question it answers
    earlier: list[Version] = field(default_factory=list)  # the answers it replaces, kept


class AppBase(App[int]):
    def __init__(
        self,
        options: AppOptions,
        *,
        mesh_factory: MeshFactory | None = None,
        engine_loader: EngineLoader | None = None,
    ) -> None:
        super().__init__()
        self.options = options
        self.config = options.config
        self.data = options.data
        self._mesh_factory = mesh_factory
        self._engine_loader = engine_loader
        self.engine: ChatEngine | None = None
        self.mesh: MeshView | None = None
        self.history: History | None = None
        self.conversation: Conversation | None = None
        self.messages: list[StoredMessage] = []
        self.generation: Generation | None = None
        self._generation_ids = 0
        self._gen_worker: Worker[None] | None = None
        self.editing: int | None = None  # index of the message being edited
        self._draft = ""
        self.planning: MeshPlanning | None = None
        self.model_error = options.model_error
        self.mesh_error = ""
        self.theme_problems: list[str] = []
        self.crash_message = ""  # set when the app died of a bug; the launcher prints it
        self.mesh_watch = MeshWatch()

    def _keep_widgets(self) -> None:
        # Held, not queried each time: a worker's message or a timer may still arrive while
        # the app shuts down and its widgets are already gone from the screen.
        self.prompt = self.query_one("#prompt", PromptInput)
        self.chat_log = self.query_one("#log", ChatLog)
        self.status = self.query_one("#status", StatusLine)
        self.split = self.query_one("#split", SplitEditor)
        self.peers_table = self.query_one("#peers", PeersTable)
        self.chat_list = self.query_one("#chats", ChatList)
        self.mesh_panel = self.query_one("#mesh", MeshPanel)

    def _history_call(self, fn: Callable[[History], Any], default: Any = None) -> Any:
        """Run a history operation; a failure is shown, never raised."""
        if self.history is None:
            return default
        try:
            return fn(self.history)
        except HistoryError as exc:
            self.notify(str(exc), title="Chat history", severity="error", timeout=10)
            return default

    def _model_label(self) -> str:
        if self.engine is not None:
            return self.engine.info.path.stem
        path = self.options.model_path
        return path.name if path else "no model"

    # --- hooks: what the chat parts (app_chat, app_chats) offer each other -------------------

    async def _stop_generation(self) -> None:
        raise NotImplementedError

    def _leave_edit(self, restore: bool) -> None:
        raise NotImplementedError

    def _count_context(self) -> int:
        raise NotImplementedError

    def _chat_messages(self) -> list[ChatMessage]:
        raise NotImplementedError

    def _settings(self) -> ChatSettings:
        raise NotImplementedError

    def _ensure_conversation(self, first_text: str) -> Conversation | None:
        raise NotImplementedError

    def _refresh_chat_list(self) -> None:
        raise NotImplementedError
