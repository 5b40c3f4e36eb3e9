"""The meshchat Textual app: chat pane, chat list, status line, split editor and peers table.

Workers do the slow work (loading the model, generating, re-splitting, mesh actions) and post
messages (`meshchat.tui.messages`); the handlers here own every state change. Failures become
messages on screen: the app keeps running without a model, a mesh or a history database.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
import traceback
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from textual import on, work
from textual.app import App, SystemCommand
from textual.binding import BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen, Screen
from textual.theme import Theme
from textual.widgets import Footer, Header
from textual.worker import Worker

from meshchat.config import ChatSettings, Config, save_config, with_theme
from meshchat.engine.chat_template import ChatMessage
from meshchat.errors import MeshchatError
from meshchat.fsutil import atomic_write_text
from meshchat.paths import DataDir
from meshchat.tui import messages as msg
from meshchat.tui.engine import ChatEngine
from meshchat.tui.history import (
    DB_NAME,
    Conversation,
    History,
    HistoryError,
    StoredMessage,
    export_markdown,
    title_from,
)
from meshchat.tui.keys import APP_BINDINGS, check_keymap
from meshchat.tui.markdown_text import code_blocks
from meshchat.tui.mesh_view import MeshView, NodeMesh, PeerRow
from meshchat.tui.planning import MeshPlanning
from meshchat.tui.screens.chat_settings import ChatSettingsScreen, ChatSetup
from meshchat.tui.screens.dialogs import AskText, Confirm, Pick, ShowInvite
from meshchat.tui.screens.help import HelpScreen
from meshchat.tui.screens.search import SearchScreen
from meshchat.tui.split import SELF, SplitPlan
from meshchat.tui.theming import load_themes, node_colours
from meshchat.tui.widgets.chat import ChatLog, LogAction, MessageView
from meshchat.tui.widgets.chats import ChatList
from meshchat.tui.widgets.peers import PeersTable
from meshchat.tui.widgets.prompt import PromptInput
from meshchat.tui.widgets.split_editor import SplitEditor
from meshchat.tui.widgets.status import StatusLine

log = logging.getLogger(__name__)

PEERS_REFRESH_S = 1.0
MeshFactory = Callable[[], Awaitable[MeshView]]
EngineLoader = Callable[[], ChatEngine]


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


class MeshchatApp(App[int]):
    CSS_PATH = "app.tcss"
    TITLE = "meshchat"
    BINDINGS: ClassVar[list[BindingType]] = APP_BINDINGS

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
        self._peer_states: dict[str, str] = {}

    # --- layout -----------------------------------------------------------------------------

    def compose(self) -> Any:
        yield Header(icon="◆")
        with Horizontal(id="body"):
            yield ChatList(id="chats")
            with Vertical(id="main"):
                yield ChatLog(id="log")
                keys = self.config.keys
                yield PromptInput(
                    id="prompt",
                    send_keys=keys.get("send", "enter"),
                    newline_keys=keys.get("newline", "ctrl+j,shift+enter"),
                )
                yield StatusLine(id="status")
        with Vertical(id="mesh"):
            yield SplitEditor(id="split")
            yield PeersTable(id="peers")
        yield Footer()

    def _keep_widgets(self) -> None:
        # Held, not queried each time: a worker's message or a timer may still arrive while
        # the app shuts down and its widgets are already gone from the screen.
        self.prompt = self.query_one("#prompt", PromptInput)
        self.chat_log = self.query_one("#log", ChatLog)
        self.status = self.query_one("#status", StatusLine)
        self.split = self.query_one("#split", SplitEditor)
        self.peers_table = self.query_one("#peers", PeersTable)
        self.chat_list = self.query_one("#chats", ChatList)
        self.mesh_panel = self.query_one("#mesh", Vertical)

    # --- start-up ---------------------------------------------------------------------------

    async def on_mount(self) -> None:
        self._keep_widgets()
        problems = list(self.config.problems)
        self._setup_themes(problems)
        problems += check_keymap(self.config.keys)
        self.set_keymap(dict(self.config.keys))
        self.chat_list.display = self.size.width >= 110
        self._open_history()
        await self._show_conversation(self._latest_conversation())
        self.prompt.focus()
        for problem in problems:
            self.notify(problem, severity="warning", timeout=10)
        self.set_interval(PEERS_REFRESH_S, self._refresh_peers)
        self._refresh_peers()
        self._load_engine()
        self._start_mesh()

    def _setup_themes(self, problems: list[str]) -> None:
        loaded = load_themes(*self.options.theme_dirs)
        for theme in loaded.themes:
            self.register_theme(theme)
        problems += loaded.problems
        self.theme_problems = loaded.problems
        wanted = self.config.theme
        if wanted in self.available_themes:
            self.theme = wanted
        else:
            if wanted:
                problems.append(f"theme {wanted!r} not found; using the default")
            fallback = next((t.name for t in loaded.themes), "textual-dark")
            self.theme = fallback
        self.theme_changed_signal.subscribe(self, self._on_theme_changed)
        self.split.set_colours(node_colours(self.current_theme))

    def _on_theme_changed(self, theme: Theme) -> None:
        self.split.set_colours(node_colours(theme))
        if theme.name != self.config.theme:
            self.config = with_theme(self.config, theme.name)
            if not self.config.writable:
                self.notify(
                    "theme not saved: config.toml has problems (see the warnings)",
                    severity="warning",
                )
                return
            try:
                save_config(self.config)
            except OSError as exc:
                self.notify(f"cannot save the theme choice: {exc}", severity="warning")

    def _open_history(self) -> None:
        path = self.options.history_path or self.data.root / DB_NAME
        try:
            self.history = History(path)
        except HistoryError as exc:
            # Keep chatting; nothing of this session is saved, and the file is left alone.
            self.history = History(Path(":memory:"))
            self.notify(
                f"{exc}. Chats of this session will not be saved.",
                title="Chat history",
                severity="error",
                timeout=15,
            )

    def _latest_conversation(self) -> Conversation | None:
        chats = self._history_call(lambda h: h.chats(), [])
        return chats[0] if chats else None

    def _history_call(self, fn: Callable[[History], Any], default: Any = None) -> Any:
        """Run a history operation; a failure is shown, never raised."""
        if self.history is None:
            return default
        try:
            return fn(self.history)
        except HistoryError as exc:
            self.notify(str(exc), title="Chat history", severity="error", timeout=10)
            return default

    @work(exclusive=True, group="engine", exit_on_error=False)
    async def _load_engine(self) -> None:
        if self.model_error:
            self.post_message(msg.EngineFailed(self.model_error))
            return
        self.status.set(state="loading", model=self._model_label())
        self.split.busy = "loading the model"
        try:
            if self._engine_loader is not None:
                engine = await asyncio.to_thread(self._engine_loader)
            else:
                path = self.options.model_path
                if path is None:
                    raise MeshchatError("no model given (use --model PATH)")
                config = self.config
                engine = await asyncio.to_thread(
                    ChatEngine.load, path, self.data, config.context_size, config.threads
                )
        except MeshchatError as exc:
            self.post_message(msg.EngineFailed(str(exc)))
        except Exception as exc:  # a bug, but the app must stay up and say so
            log.exception("model load failed")
            self.post_message(msg.EngineFailed(f"cannot load the model: {exc!r}"))
        else:
            self.post_message(msg.EngineLoaded(engine))

    def _model_label(self) -> str:
        if self.engine is not None:
            return self.engine.info.path.stem
        path = self.options.model_path
        return path.name if path else "no model"

    async def on_engine_loaded(self, event: msg.EngineLoaded) -> None:
        self.engine = event.engine
        info = event.engine.info
        self.model_error = ""
        self.split.busy = ""
        plan = SplitPlan.from_ranges(info.n_layers, event.engine.ranges)
        self.split.load(plan, info.allowed_splits)
        self.status.set(
            state="ready",
            model=self._model_label(),
            context_size=info.n_ctx,
            context_used=self._count_context(),
            layout=self._layout_label(plan),
            error="",
        )
        self._publish_status()
        self._refresh_peers()
        self._maybe_start_planning()

    def on_engine_failed(self, event: msg.EngineFailed) -> None:
        self.model_error = event.error
        self.split.busy = ""
        self.split.say(f"no model: {event.error}", error=True)
        self.status.set(state="error", model=self._model_label(), error=event.error)
        self.notify(event.error, title="Model", severity="error", timeout=20)

    @work(exclusive=True, group="mesh", exit_on_error=False)
    async def _start_mesh(self) -> None:
        try:
            if self._mesh_factory is not None:
                mesh = await self._mesh_factory()
            else:
                mesh = await NodeMesh.start(self.data, self.config.listen, self.config.mdns)
        except MeshchatError as exc:
            self.post_message(msg.MeshFailed(str(exc)))
            return
        except Exception as exc:
            log.exception("mesh start failed")
            self.post_message(msg.MeshFailed(f"cannot start the mesh node: {exc!r}"))
            return
        self.post_message(msg.MeshReady(mesh))

    def on_mesh_ready(self, event: msg.MeshReady) -> None:
        self.mesh = event.mesh
        self.mesh_error = ""
        self._update_mesh_title()
        self._publish_status()
        self._refresh_peers()
        self._maybe_start_planning()
        if self.options.join_code:
            self._join(self.options.join_code)

    def on_mesh_failed(self, event: msg.MeshFailed) -> None:
        self.mesh_error = event.error
        self._update_mesh_title()
        self.notify(
            f"{event.error}. Chat works on this machine alone.",
            title="Mesh",
            severity="warning",
            timeout=15,
        )
        self._refresh_peers()

    def _update_mesh_title(self) -> None:
        panel = self.mesh_panel
        if self.mesh is not None:
            addresses = self.mesh.addresses
            where = f" at {addresses[0]}" if addresses else ""
            panel.border_title = f"Mesh · node {self.mesh.node_id[:10]}{where}"
        else:
            panel.border_title = f"Mesh · offline: {self.mesh_error}" if self.mesh_error else "Mesh"

    def _publish_status(self) -> None:
        """Tell the mesh which layers this node runs and which model file it has."""
        if self.mesh is None or self.engine is None or self.split.applied is None:
            return
        if not self.engine.is_local:
            return  # the mesh pipeline says what this node serves
        mine = [s for s in self.split.applied.segments if s.node == SELF]
        layers = (mine[0].start, mine[-1].end) if mine else None
        info = self.engine.info
        model: dict[str, Any] = {"name": info.name, "path": str(info.path)}
        if self.planning is not None:
            model.update(self.planning.model_status)
        self.mesh.set_status(layers, model)

    async def on_unmount(self) -> None:
        if self._gen_worker is not None:
            self._gen_worker.cancel()
        if self.engine is not None:
            try:
                await self.engine.close()
            except Exception:
                log.exception("closing the model failed")
        if self.mesh is not None:
            try:
                await self.mesh.stop()
            except Exception:
                log.exception("stopping the mesh node failed")
        if self.history is not None:
            self.history.close()

    # --- conversations ----------------------------------------------------------------------

    async def _show_conversation(self, conversation: Conversation | None) -> None:
        self.conversation = conversation
        self.messages = (
            self._history_call(lambda h: h.messages(conversation.id), []) if conversation else []
        )
        self._leave_edit(restore=False)
        await self.chat_log.show([(m.role, m.content, m.meta) for m in self.messages])
        self.sub_title = conversation.title if conversation else "New chat"
        self._refresh_chat_list()
        if self.engine is not None:
            self.status.set(context_used=self._count_context(), ttft_s=None, tok_s=None)

    def _refresh_chat_list(self) -> None:
        chats = self._history_call(lambda h: h.chats(), [])
        self.chat_list.show(chats, self.conversation.id if self.conversation else None)

    def _settings(self) -> ChatSettings:
        return self.conversation.settings if self.conversation else self.config.sampling

    def _system_prompt(self) -> str:
        return self.conversation.system_prompt if self.conversation else self.config.system_prompt

    def _chat_messages(self) -> list[ChatMessage]:
        system = self._system_prompt()
        turns = [ChatMessage(m.role, m.content) for m in self.messages]
        return ([ChatMessage("system", system)] if system else []) + turns

    def _count_context(self) -> int:
        if self.engine is None:
            return 0
        try:
            return self.engine.count_tokens(self._chat_messages())
        except MeshchatError:
            return 0

    def _ensure_conversation(self, first_text: str) -> Conversation | None:
        if self.conversation is None:
            self.conversation = self._history_call(
                lambda h: h.create(
                    title_from(first_text), self.config.system_prompt, self.config.sampling
                )
            )
            if self.conversation is not None:
                self.sub_title = self.conversation.title
            self._refresh_chat_list()
        return self.conversation

    async def _stop_generation(self) -> None:
        """Cancel the answer being written and keep what it has said so far."""
        gen = self.generation
        if gen is None:
            return
        if self._gen_worker is not None:
            self._gen_worker.cancel()
        await self._finish_generation(gen, {"cancelled": True, "finish_reason": "cancelled"})

    async def action_new_chat(self) -> None:
        await self._stop_generation()
        await self._show_conversation(None)
        self.prompt.focus()

    async def _open_chat(self, conversation_id: int) -> None:
        if self.conversation and self.conversation.id == conversation_id:
            return
        chat = self._history_call(lambda h: h.get(conversation_id))
        if chat is None:
            self.notify("that chat is gone", severity="warning")
            return
        await self._stop_generation()
        await self._show_conversation(chat)

    @on(ChatList.Chosen)
    async def _on_chat_chosen(self, event: ChatList.Chosen) -> None:
        if event.action == "open":
            await self._open_chat(event.conversation_id)
            self.prompt.focus()
        elif event.action == "rename":
            await self._rename(event.conversation_id)
        elif event.action == "delete":
            await self._delete(event.conversation_id)

    async def _rename(self, conversation_id: int) -> None:
        chat = self._history_call(lambda h: h.get(conversation_id))
        if chat is None:
            return

        def done(title: str | None) -> None:
            if not title:
                return
            self._history_call(lambda h: h.rename(conversation_id, title))
            if self.conversation and self.conversation.id == conversation_id:
                self.conversation.title = title
                self.sub_title = title
            self._refresh_chat_list()

        await self.push_screen(AskText("Rename chat", chat.title), done)

    async def _delete(self, conversation_id: int) -> None:
        chat = self._history_call(lambda h: h.get(conversation_id))
        if chat is None:
            return

        async def done(yes: bool | None) -> None:
            if not yes:
                return
            if self.conversation and self.conversation.id == conversation_id:
                await self._stop_generation()
                await self._show_conversation(None)
            self._history_call(lambda h: h.delete(conversation_id))
            self._refresh_chat_list()
            self.notify(f"Deleted “{chat.title}”")

        await self.push_screen(Confirm(f"Delete the chat “{chat.title}”?", yes="Delete"), done)

    async def action_rename_chat(self) -> None:
        if self.conversation is None:
            self.notify("this chat has no messages yet", severity="warning")
            return
        await self._rename(self.conversation.id)

    async def action_delete_chat(self) -> None:
        if self.conversation is not None:
            await self._delete(self.conversation.id)

    def action_toggle_chats(self) -> None:
        chats = self.chat_list
        if chats.display and chats.has_focus:
            chats.display = False
            self.prompt.focus()
        else:
            chats.display = True
            chats.focus()

    async def action_search(self) -> None:
        if self.history is None:
            return

        async def done(conversation_id: int | None) -> None:
            if conversation_id is not None:
                await self._open_chat(conversation_id)
                self.prompt.focus()

        await self.push_screen(SearchScreen(self.history), done)

    async def action_chat_settings(self) -> None:
        title = self.conversation.title if self.conversation else "new chats"

        def done(setup: ChatSetup | None) -> None:
            if setup is None:
                return
            if self.conversation is None:
                # Settings for a chat not yet started: it starts now, empty.
                self.conversation = self._history_call(
                    lambda h: h.create("New chat", setup.system_prompt, setup.settings)
                )
                self._refresh_chat_list()
            else:
                chat = self.conversation
                self._history_call(
                    lambda h: h.configure(chat.id, setup.system_prompt, setup.settings)
                )
                chat.system_prompt, chat.settings = setup.system_prompt, setup.settings
            self.status.set(context_used=self._count_context())
            self.notify("Chat settings saved")

        await self.push_screen(
            ChatSettingsScreen(title, self._system_prompt(), self._settings()), done
        )

    async def action_export_chat(self) -> None:
        chat = self.conversation
        if chat is None or not self.messages:
            self.notify("nothing to export yet", severity="warning")
            return
        slug = "".join(c if c.isalnum() else "-" for c in chat.title.lower()).strip("-")[:40]
        default = str(Path.cwd() / f"{slug or 'chat'}.md")
        text = export_markdown(chat, self.messages)

        def done(target: str | None) -> None:
            if not target:
                return
            path = Path(target).expanduser()
            try:
                atomic_write_text(path, text)
            except OSError as exc:
                self.notify(f"cannot write {path}: {exc.strerror}", severity="error")
                return
            self.notify(f"Exported to {path}")

        await self.push_screen(AskText("Export chat as Markdown to", default), done)

    # --- sending and generating -------------------------------------------------------------

    @on(PromptInput.Submitted)
    async def _on_submit(self, event: PromptInput.Submitted) -> None:
        if self.generation is not None:
            self.notify("an answer is still being written: wait, or Esc to stop it")
            return
        if self.engine is None:
            reason = self.model_error or "the model is still loading"
            self.notify(reason, title="Cannot send", severity="warning")
            return
        text = event.text.strip()
        if self.editing is not None:
            await self._truncate(self.editing)
            self._leave_edit(restore=False)
        chat = self._ensure_conversation(text)
        self.prompt.clear()
        message = StoredMessage("user", text)
        if chat is not None:
            self._history_call(lambda h: h.append(chat.id, message))
        self.messages.append(message)
        await self.chat_log.add("user", text)
        self._refresh_chat_list()
        await self._start_answer()

    async def _truncate(self, keep: int) -> None:
        """Drop messages from index `keep` on, in the store and on screen."""
        chat = self.conversation
        if chat is not None:
            self._history_call(lambda h: h.truncate(chat.id, keep))
        del self.messages[keep:]
        await self.chat_log.drop_from(keep)

    async def _start_answer(self) -> None:
        engine = self.engine
        chat = self.conversation
        if engine is None or chat is None:
            return
        settings = self._settings()
        try:
            fitted = engine.fit(self._chat_messages(), settings.max_tokens)
        except MeshchatError as exc:
            self.notify(str(exc), title="Cannot send", severity="error")
            return
        view = await self.chat_log.add("assistant")
        view.begin_stream()
        self._generation_ids += 1
        self.generation = Generation(self._generation_ids, chat.id, view, fitted.dropped)
        self.status.set(state="generating", ttft_s=None, tok_s=None, error="")
        self._gen_worker = self._generate(self._generation_ids, fitted.tokens, settings)
        self.refresh_bindings()

    @work(group="generate", exit_on_error=False)
    async def _generate(self, generation: int, tokens: list[int], settings: ChatSettings) -> None:
        engine = self.engine
        assert engine is not None
        meta: dict[str, Any]
        try:
            async for text in engine.stream(tokens, settings):
                self.post_message(msg.GenChunk(generation, text))
        except asyncio.CancelledError:
            meta = {"cancelled": True, "finish_reason": "cancelled"}
            self.post_message(msg.GenDone(generation, meta))
            raise
        except MeshchatError as exc:
            meta = {"error": str(exc)}
        except Exception as exc:
            log.exception("generation failed")
            meta = {"error": f"internal error: {exc!r}"}
        else:
            stats = engine.last_stats
            meta = {
                "finish_reason": stats.finish_reason,
                "tokens": stats.generated_tokens,
                "tok_s": round(stats.decode_tok_s, 1) if stats.decode_tok_s else None,
                "ttft_s": round(stats.ttft_s, 4) if stats.ttft_s is not None else None,
            }
        self.post_message(msg.GenDone(generation, meta))

    async def on_gen_chunk(self, event: msg.GenChunk) -> None:
        gen = self.generation
        if gen is None or gen.id != event.generation:
            return
        if not gen.view.text:
            ttft = time.perf_counter() - gen.started
            self.status.set(ttft_s=ttft)
        await gen.view.append(event.text)

    async def on_gen_done(self, event: msg.GenDone) -> None:
        gen = self.generation
        if gen is None or gen.id != event.generation:
            return
        await self._finish_generation(gen, event.meta)

    async def _finish_generation(self, gen: Generation, meta: dict[str, Any]) -> None:
        """Keep the answer (saved with how it ended) and make the app ready for the next."""
        self.generation = None
        self._gen_worker = None
        meta = {k: v for k, v in meta.items() if v is not None}
        if gen.dropped:
            meta["dropped"] = gen.dropped
        await gen.view.finish(meta)
        cancelled = bool(meta.get("cancelled"))
        same_chat = self.conversation is not None and self.conversation.id == gen.conversation_id
        if gen.view.text or meta.get("error"):
            answer = StoredMessage("assistant", gen.view.text, meta)
            self._history_call(lambda h: h.append(gen.conversation_id, answer))
            if same_chat:
                self.messages.append(answer)
        elif same_chat:
            await gen.view.remove()
        engine = self.engine
        stats = engine.last_stats if engine is not None else None
        self.status.set(
            state="error" if meta.get("error") else "ready",
            ttft_s=stats.ttft_s if stats else None,
            tok_s=stats.decode_tok_s if stats else None,
            context_used=engine.context_used if engine and not cancelled else self._count_context(),
            error=meta.get("error", ""),
        )
        if meta.get("error"):
            self.notify(meta["error"], title="The answer failed", severity="error", timeout=10)
        if cancelled and same_chat and not self.prompt.text.strip():
            # The question comes back into the box, ready to be changed and sent again.
            last_user = self._last_index("user")
            if last_user is not None:
                self._start_edit(last_user)
        self._refresh_chat_list()
        self._refresh_peers()
        self.refresh_bindings()

    def _last_index(self, role: str) -> int | None:
        for index in range(len(self.messages) - 1, -1, -1):
            if self.messages[index].role == role:
                return index
        return None

    async def action_cancel(self) -> None:
        if self.generation is not None:
            await self._stop_generation()
        elif self.editing is not None:
            self._leave_edit(restore=True)
        elif not self.prompt.has_focus:
            self.prompt.focus()

    async def action_regenerate(self) -> None:
        if self.generation is not None:
            self.notify("an answer is still being written", severity="warning")
            return
        if not self.messages:
            self.notify("nothing to regenerate yet", severity="warning")
            return
        if self.engine is None:
            self.notify(self.model_error or "the model is still loading", severity="warning")
            return
        if self.messages[-1].role == "assistant":
            await self._truncate(len(self.messages) - 1)
        self._leave_edit(restore=True)
        await self._start_answer()

    def _start_edit(self, index: int) -> None:
        if self.editing is None:
            self._draft = self.prompt.text
        self.editing = index
        prompt = self.prompt
        prompt.text = self.messages[index].content
        prompt.move_cursor(prompt.document.end)
        prompt.set_editing(True)
        prompt.focus()

    def _leave_edit(self, restore: bool) -> None:
        if self.editing is None:
            return
        self.editing = None
        self.prompt.set_editing(False)
        if restore:
            self.prompt.text = self._draft
        self._draft = ""

    def action_edit_last(self) -> None:
        if self.generation is not None:
            self.notify("an answer is still being written", severity="warning")
            return
        index = self._last_index("user")
        if index is None:
            self.notify("no message to edit yet", severity="warning")
            return
        self._start_edit(index)

    def action_copy_answer(self) -> None:
        index = self._last_index("assistant")
        if index is None:
            self.notify("no answer to copy yet", severity="warning")
            return
        self._copy(self.messages[index].content, "Answer")

    def _copy(self, text: str, what: str) -> None:
        self.copy_to_clipboard(text)
        self.notify(f"{what} copied to the clipboard")

    async def _copy_code(self, text: str) -> None:
        blocks = code_blocks(text)
        if not blocks:
            self.notify("that message has no code block", severity="warning")
            return
        if len(blocks) == 1:
            self._copy(blocks[0].code, "Code block")
            return

        def done(choice: str | None) -> None:
            if choice is not None:
                self._copy(blocks[int(choice)].code, "Code block")

        await self.push_screen(
            Pick("Copy which code block?", [(str(i), b.title()) for i, b in enumerate(blocks)]),
            done,
        )

    async def action_copy_code(self) -> None:
        index = self._last_index("assistant")
        if index is None:
            self.notify("no answer yet", severity="warning")
            return
        await self._copy_code(self.messages[index].content)

    @on(LogAction)
    async def _on_log_action(self, event: LogAction) -> None:
        if not 0 <= event.index < len(self.messages):
            return  # the answer being written: act on it when it is done
        message = self.messages[event.index]
        if event.action == "copy":
            self._copy(message.content, "Message")
        elif event.action == "code":
            await self._copy_code(message.content)
        elif event.action == "edit":
            if self.generation is not None:
                self.notify("an answer is still being written", severity="warning")
            elif message.role == "user":
                self._start_edit(event.index)
            elif event.index > 0:
                self._start_edit(event.index - 1)
        elif event.action == "regenerate":
            if event.index == len(self.messages) - 1 and message.role == "assistant":
                await self.action_regenerate()
            else:
                self.notify(
                    "only the last answer can be regenerated; edit the message before an "
                    "earlier one (e) to branch from there",
                    severity="warning",
                )

    @on(PromptInput.LeaveUp)
    def _on_leave_up(self) -> None:
        if self.chat_log.views():
            self.chat_log.focus()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        # App keys act on the main screen; in a dialog they fall through to the dialog.
        return action == "quit" or not isinstance(self.screen, ModalScreen)

    # --- split editor and mesh --------------------------------------------------------------

    def _layout_label(self, plan: SplitPlan) -> str:
        if plan.is_local:
            where = "local" if len(plan.segments) == 1 else f"local, {len(plan.segments)} stages"
            return f"{where} {plan.describe()}"
        return f"mesh {plan.describe()}"

    def action_focus_split(self) -> None:
        self._show_mesh_panel()
        self.split.focus()

    def action_focus_peers(self) -> None:
        self._show_mesh_panel()
        self.peers_table.focus()

    def _show_mesh_panel(self) -> None:
        self.mesh_panel.display = True

    def action_toggle_mesh(self) -> None:
        panel = self.mesh_panel
        panel.display = not panel.display
        if not panel.display:
            self.prompt.focus()

    @on(SplitEditor.Apply)
    def _on_split_apply(self, event: SplitEditor.Apply) -> None:
        if self.engine is None:
            self.split.say("no model loaded", error=True)
            return
        if self.generation is not None:
            self.split.say("wait for the answer to finish (or Esc), then apply", error=True)
            return
        if not event.plan.is_local:
            if self.planning is None:
                self.split.say(
                    "layers can go to other nodes once this node's mesh is up and has asked "
                    "them what they run",
                    error=True,
                )
                return
            problems = self.planning.violations(event.plan)
            if problems:
                self.split.say(problems[0], error=True)
                return
        if self.split.applied is not None and event.plan.same_layout(self.split.applied):
            self.split.say("that plan is already running")
            return
        self.split.busy = "applying (nodes load their layers)"
        self._apply_split(event.plan)

    @work(exclusive=True, group="split", exit_on_error=False)
    async def _apply_split(self, plan: SplitPlan) -> None:
        engine = self.engine
        assert engine is not None
        try:
            if plan.is_local:
                await engine.resplit(plan.boundaries)
            else:
                assert self.planning is not None
                pipeline = await self.planning.start(plan, engine.pipeline)
                await engine.switch(pipeline, plan.ranges)
                plan = self.planning.running(pipeline, plan.n_layers) or plan
        except MeshchatError as exc:
            self.post_message(msg.SplitFailed(str(exc)))
        except Exception as exc:
            log.exception("re-split failed")
            self.post_message(msg.SplitFailed(f"internal error: {exc!r}"))
        else:
            self.post_message(msg.SplitApplied(plan))

    def on_split_applied(self, event: msg.SplitApplied) -> None:
        self.split.busy = ""
        self.split.load(event.plan, self.split.allowed)
        self.split.say(f"running {event.plan.describe()}")
        self.status.set(layout=self._layout_label(event.plan), context_used=self._count_context())
        self._publish_status()
        self._refresh_peers()

    def on_split_failed(self, event: msg.SplitFailed) -> None:
        self.split.busy = ""
        self.split.say(f"not applied: {event.error}", error=True)

    @on(SplitEditor.Auto)
    def _on_split_auto(self) -> None:
        if self.engine is None:
            self.split.say("no model loaded", error=True)
            return
        n_layers = self.engine.info.n_layers
        if self.planning is None:
            plan = SplitPlan.solo(n_layers)
            note = "auto: every layer on this node (no other node known yet)"
        else:
            try:
                plan, note = self.planning.auto(n_layers)
            except (MeshchatError, ValueError) as exc:
                self.split.say(str(exc), error=True)
                return
            note = f"auto: {note}"
        self.split.plan = plan
        self.split.selected = 0
        self.split.say(note + ("; Enter applies" if self.split.edited else ""))

    # --- the mesh planner -------------------------------------------------------------------

    def _maybe_start_planning(self) -> None:
        node = self.mesh.planning_node() if self.mesh is not None else None
        if node is not None and self.engine is not None and self.planning is None:
            self._setup_planning(node)

    @work(exclusive=True, group="planning", exit_on_error=False)
    async def _setup_planning(self, node: Any) -> None:
        engine = self.engine
        assert engine is not None

        def notify(text: str) -> None:
            self.notify(text, title="Mesh")

        try:
            planning = await asyncio.to_thread(
                MeshPlanning.create,
                node,
                engine.info.path,
                self.data,
                threads=engine.options.n_threads,
                n_ctx=engine.options.n_ctx,
                notify=notify,
            )
            await planning.refresh()
        except MeshchatError as exc:
            self.post_message(msg.MeshActionDone("", f"the planner is unavailable: {exc}"))
            return
        except Exception as exc:
            log.exception("planner start failed")
            self.post_message(msg.MeshActionDone("", f"the planner is unavailable: {exc!r}"))
            return
        self.post_message(msg.PlanningReady(planning))

    def on_planning_ready(self, event: msg.PlanningReady) -> None:
        self.planning = event.planning
        self.split.predictor = event.planning.predict
        self._publish_status()
        self._refresh_peers()
        for note in event.planning.notes:
            self.notify(note, title="Mesh", severity="warning")

    @work(exclusive=True, group="caps", exit_on_error=False)
    async def _refresh_caps(self) -> None:
        planning = self.planning
        if planning is None:
            return
        try:
            await planning.refresh()
        except Exception as exc:  # a peer that cannot answer: keep the previous answers
            log.info("capabilities refresh failed: %s", exc)
        self.post_message(msg.PlanningReady(planning))

    def _refresh_peers(self) -> None:
        rows: list[PeerRow] = [self._self_row()]
        if self.mesh is not None:
            try:
                rows += self.mesh.peers()
            except Exception:
                log.exception("reading peers failed")
        self.peers_table.sync(rows, self._shares())
        self._note_lost_peers(rows)
        self._follow_mesh_plan()
        if self.mesh is not None:
            names = {r.key: r.name for r in rows if r.key != SELF}
            if self.planning is not None:
                usable = self.planning.usable()
            else:
                usable = self.mesh.usable_nodes(None) if self.engine else []
            self.split.set_nodes(names, usable)

    def _follow_mesh_plan(self) -> None:
        """After a failover the mesh pipeline runs another plan: show that one."""
        engine, planning = self.engine, self.planning
        if engine is None or planning is None or self.split.busy:
            return
        running = planning.running(engine.pipeline, engine.info.n_layers)
        applied = self.split.applied
        if running is not None and applied is not None and not running.same_layout(applied):
            edited = self.split.edited
            plan = self.split.plan
            self.split.load(running, self.split.allowed)
            if edited and plan is not None:
                self.split.plan = plan  # keep the user's unapplied edit on screen
            self.split.say(f"the mesh re-planned: now {running.describe()}")
            self.status.set(layout=self._layout_label(running))

    def _note_lost_peers(self, rows: list[PeerRow]) -> None:
        """Say so when a member that was connected is lost (and when it comes back)."""
        states = {r.key: r.state for r in rows if r.member and r.key != SELF}
        up = {k for k, v in states.items() if v in ("idle", "serving")}
        was_up = {k for k, v in self._peer_states.items() if v in ("idle", "serving")}
        if up != was_up and self.planning is not None:
            self._refresh_caps()  # who may take layers changed: ask the nodes again
        for key, state in states.items():
            before = self._peer_states.get(key)
            name = next(r.name for r in rows if r.key == key)
            if state == "lost" and before not in (None, "lost", "connecting"):
                self.notify(
                    f"node {name} stopped answering (lost); it is retried in the background",
                    title="Peer lost",
                    severity="warning",
                    timeout=10,
                )
            elif before == "lost" and state in ("idle", "serving"):
                self.notify(f"node {name} is back", title="Peer")
        self._peer_states = states

    def _self_row(self) -> PeerRow:
        plan = self.split.applied
        mine = [s for s in plan.segments if s.node == SELF] if plan else []
        layers = (mine[0].start, mine[-1].end) if mine else None
        if self.engine is None:
            state = "error" if self.model_error else "loading"
        elif self.generation is not None:
            state = "generating"
        else:
            state = "serving" if layers else "idle"
        mesh = self.mesh
        return PeerRow(
            key=SELF,
            name=mesh.node_id[:10] if mesh else "this node",
            address=mesh.addresses[0] if mesh and mesh.addresses else "",
            via="this node, mesh offline" if self.mesh_error else "this node",
            rtt_ms=None,
            layers=layers,
            state=state,
            member=True,
            model=self._model_label(),
        )

    def _shares(self) -> dict[str, str]:
        """Per node: its share of per-token time (compute), and the network's on this row."""
        engine = self.engine
        if engine is None:
            return {}
        if engine.is_local:
            return {SELF: self._self_share()}
        step = getattr(engine.pipeline, "last_step", None)
        plan = getattr(engine.pipeline, "plan", None)
        if step is None or plan is None or step.wall_s <= 0 or not step.stage_compute_s:
            return {}
        shares: dict[str, str] = {}
        for stage, compute in zip(plan.stages, step.stage_compute_s, strict=False):
            key = SELF if self.planning and stage.node == self.planning.head else stage.node
            shares[key] = f"compute {round(100 * compute / step.wall_s)}%"
        net = round(100 * step.network_s / step.wall_s)
        shares[SELF] = f"{shares.get(SELF, 'compute 0%')} · net {net}%"
        return shares

    def _self_share(self) -> str:
        """Compute share of the last answer's time spent on this node's stages."""
        engine = self.engine
        if engine is None:
            return "—"
        stats = engine.last_stats
        total = (stats.ttft_s or 0.0) + stats.decode_s
        if total <= 0:
            return "—"
        compute = sum(s.compute_s for s in engine.stage_shares())
        return f"compute {min(100, round(100 * compute / total))}%"

    def action_invite(self) -> None:
        mesh = self.mesh
        if mesh is None:
            self.notify(self.mesh_error or "the mesh node is still starting", severity="warning")
            return
        try:
            code = mesh.create_invite(uses=1, ttl=3600.0)
        except MeshchatError as exc:
            self.notify(str(exc), severity="error")
            return
        self.push_screen(ShowInvite(code, "valid for an hour"))

    def action_join(self) -> None:
        if self.mesh is None:
            self.notify(self.mesh_error or "the mesh node is still starting", severity="warning")
            return

        def check(code: str) -> str | None:
            from meshchat.mesh.invites import InviteCode

            try:
                InviteCode.parse(code.strip())
            except MeshchatError as exc:
                return str(exc)
            return None

        def done(code: str | None) -> None:
            if code:
                self._join(code)

        self.push_screen(
            AskText(
                "Join a mesh with an invite code",
                placeholder="mc1…",
                hint="Get a code with F5 in meshchat, or from `meshchat --headless` output.",
                check=check,
            ),
            done,
        )

    @work(group="mesh-action", exit_on_error=False)
    async def _join(self, code: str) -> None:
        mesh = self.mesh
        if mesh is None:
            return
        try:
            inviter = await mesh.join(code)
        except MeshchatError as exc:
            self.post_message(msg.MeshActionDone("", f"join failed: {exc}"))
        except Exception as exc:
            log.exception("join failed")
            self.post_message(msg.MeshActionDone("", f"join failed: {exc!r}"))
        else:
            self.post_message(msg.MeshActionDone(f"joined the mesh of {inviter}"))

    def on_mesh_action_done(self, event: msg.MeshActionDone) -> None:
        if event.error:
            self.notify(event.error, title="Mesh", severity="error", timeout=10)
        else:
            self.notify(event.text, title="Mesh")
        self._publish_status()
        self._refresh_peers()

    def _members(self) -> list[PeerRow]:
        if self.mesh is None:
            return []
        return [r for r in self.mesh.peers() if r.member and r.key != SELF]

    def action_remove_member(self) -> None:
        members = self._members()
        if not members:
            self.notify("no other member in this mesh", severity="warning")
            return

        def chosen(key: str | None) -> None:
            if key:
                self._confirm_remove(key)

        self.push_screen(
            Pick(
                "Remove which member? It needs a new invite to come back.",
                [(r.key, f"{r.name}  {r.address}  {r.state}") for r in members],
            ),
            chosen,
        )

    @on(PeersTable.RemoveRequested)
    def _on_remove_requested(self, event: PeersTable.RemoveRequested) -> None:
        if event.key == SELF:
            self.notify("this is you: a node cannot remove itself", severity="warning")
        elif event.key not in {r.key for r in self._members()}:
            self.notify("only members can be removed", severity="warning")
        else:
            self._confirm_remove(event.key)

    def _confirm_remove(self, key: str) -> None:
        def done(yes: bool | None) -> None:
            if yes:
                self._remove(key)

        self.push_screen(Confirm(f"Remove node {key[:10]} from the mesh?", yes="Remove"), done)

    @work(group="mesh-action", exit_on_error=False)
    async def _remove(self, key: str) -> None:
        mesh = self.mesh
        if mesh is None:
            return
        try:
            await mesh.remove(key)
        except MeshchatError as exc:
            self.post_message(msg.MeshActionDone("", f"remove failed: {exc}"))
        else:
            self.post_message(msg.MeshActionDone(f"removed {key[:10]} from the mesh"))

    # --- crashes ----------------------------------------------------------------------------

    def _fatal_error(self) -> None:
        # Textual prints a full traceback on the terminal when a handler raises. Unless
        # debugging, keep it in a log file and leave one line for the launcher to print.
        # (A private hook: textual is pinned below 9 in pyproject.toml.)
        if self.options.debug:
            super()._fatal_error()
            return
        error = sys.exc_info()[1]
        where = self.options.crash_log
        if where is not None:
            try:
                where.parent.mkdir(parents=True, exist_ok=True)
                with where.open("a", encoding="utf-8") as out:
                    out.write(time.strftime("--- %Y-%m-%d %H:%M:%S\n"))
                    out.write(traceback.format_exc())
            except OSError:
                where = None
        detail = f" (details in {where})" if where else ""
        self.crash_message = f"internal error: {error!r}{detail}"
        self.bell()
        self._close_messages_no_wait()

    # --- help and the command palette -------------------------------------------------------

    def action_help(self) -> None:
        path = str(self.config.path) if self.config.path else "config.toml"
        self.push_screen(HelpScreen(self._keymap, path))

    def get_system_commands(self, screen: Screen[Any]) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        commands: list[tuple[str, str, Callable[[], Any]]] = [
            ("New chat", "Start an empty chat (Ctrl+N)", self.action_new_chat),
            ("Stop the answer", "Cancel generation (Esc)", self.action_cancel),
            ("Regenerate answer", "Write the last answer again (Ctrl+R)", self.action_regenerate),
            (
                "Edit last message",
                "Change your last message and resend (F4)",
                self.action_edit_last,
            ),
            ("Copy last answer", "To the clipboard (F8)", self.action_copy_answer),
            ("Copy code block", "A code block of the last answer", self.action_copy_code),
            ("Chats", "Show the list of chats (Ctrl+B)", self.action_toggle_chats),
            ("Search chats", "Find words in titles and messages (Ctrl+F)", self.action_search),
            ("Rename chat", "Give this chat a title (F2)", self.action_rename_chat),
            ("Delete chat", "Delete this chat", self.action_delete_chat),
            (
                "Chat settings",
                "System prompt and sampling of this chat (F3)",
                self.action_chat_settings,
            ),
            ("Export chat", "Save this chat as Markdown (Ctrl+S)", self.action_export_chat),
            ("Edit layer split", "Move stage boundaries (Ctrl+L)", self.action_focus_split),
            ("Auto split", "Restore the planner's plan", self._on_split_auto),
            ("Apply split", "Run the edited plan", self.split.action_apply),
            ("Peers", "Focus the peers table (Ctrl+T)", self.action_focus_peers),
            ("Show invite code", "Let another machine join (F5)", self.action_invite),
            ("Join a mesh", "Use an invite code (F6)", self.action_join),
            ("Remove a member", "Take a node off the mesh (F7)", self.action_remove_member),
            (
                "Toggle mesh panel",
                "Show or hide the split bar and peers (F9)",
                self.action_toggle_mesh,
            ),
            ("Help: keys", "Every key binding (F1)", self.action_help),
        ]
        for title, help_text, callback in commands:
            yield SystemCommand(title, help_text, callback)
