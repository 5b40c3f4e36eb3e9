"""The meshchat Textual app: chat pane, chat list, status line, split editor and peers table.

Workers do the slow work (loading the model, generating, re-splitting, mesh actions) and post
messages (`meshchat.tui.messages`); the handlers here own every state change. Failures become
messages on screen: the app keeps running without a model, a mesh or a history database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, ClassVar

from textual import events, work
from textual.app import ComposeResult, SystemCommand
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen, Screen
from textual.theme import Theme
from textual.widgets import Header

from meshchat.config import save_config, with_theme
from meshchat.errors import MeshchatError
from meshchat.tui import messages as msg
from meshchat.tui.app_base import PEERS_REFRESH_S, AppOptions, worker_error
from meshchat.tui.app_chat import ChatMixin
from meshchat.tui.app_chats import ConversationsMixin
from meshchat.tui.app_mesh import MeshMixin
from meshchat.tui.app_model import ModelMixin, no_model_welcome
from meshchat.tui.engine import ChatEngine
from meshchat.tui.history import DB_NAME, Conversation, History, HistoryError
from meshchat.tui.keys import APP_BINDINGS, check_keymap, keys_for
from meshchat.tui.screens.help import HelpScreen
from meshchat.tui.split import SplitPlan, layout_label
from meshchat.tui.theming import load_themes, node_colours
from meshchat.tui.widgets.chat import ChatLog
from meshchat.tui.widgets.chats import ChatList
from meshchat.tui.widgets.footer import FittedFooter
from meshchat.tui.widgets.mesh_panel import MeshPanel
from meshchat.tui.widgets.prompt import PromptInput
from meshchat.tui.widgets.status import StatusLine

__all__ = ["AppOptions", "MeshchatApp"]

log = logging.getLogger(__name__)

_MAIN_SCREEN_ACTIONS = frozenset(
    b.action for b in APP_BINDINGS if isinstance(b, Binding) and b.action != "quit"
)


class MeshchatApp(ChatMixin, ConversationsMixin, MeshMixin, ModelMixin):
    """The whole app: its parts (the mixins) plus layout, start-up, help and the palette."""

    CSS_PATH = "app.tcss"
    TITLE = "meshchat"
    BINDINGS: ClassVar[list[BindingType]] = APP_BINDINGS

    def compose(self) -> ComposeResult:
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
        yield MeshPanel(id="mesh")
        yield FittedFooter()

    # --- start-up ---------------------------------------------------------------------------

    async def on_mount(self) -> None:
        self._keep_widgets()
        problems = list(self.config.problems)
        self._setup_themes(problems)
        problems += check_keymap(self.config.keys)
        self.set_keymap(dict(self.config.keys))
        self.chat_list.fit(self.size.width)
        self._open_history()
        await self._show_conversation(self._latest_conversation())
        self.prompt.focus()
        for problem in problems:
            self.notify(problem, severity="warning", timeout=10)
        self.set_interval(PEERS_REFRESH_S, self._refresh_peers)
        self._refresh_peers()
        self._load_engine()
        self._start_mesh()
        self._exit_on_signals()

    def on_resize(self, event: events.Resize) -> None:
        # Also before mount and under a dialog: the main screen is the stack's first.
        for chats in self.screen_stack[0].query(ChatList) if self.screen_stack else ():
            chats.fit(event.size.width)

    def _exit_on_signals(self) -> None:
        """SIGTERM or SIGINT from outside ends the app as Ctrl+Q does (the model closed, the
        terminal restored), with exit code 128 + the signal, as meshchat.stops says."""
        if self.is_headless:  # a test drives the app: the signals stay the test runner's
            return
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(RuntimeError, ValueError):  # not the main thread
                loop.add_signal_handler(sig, self.exit, None, 128 + sig)

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

    @work(exclusive=True, group="engine", exit_on_error=False)
    async def _load_engine(self) -> None:
        if self.model_error:
            self.post_message(msg.EngineFailed(self.model_error))
            return
        self.status.set(state="loading", model=self._model_label())
        self.split.model_loading()
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
        except Exception as exc:  # a bug too: the app must stay up and say so
            self.post_message(msg.EngineFailed(worker_error(exc, "model load")))
        else:
            self.post_message(msg.EngineLoaded(engine))

    async def on_engine_loaded(self, event: msg.EngineLoaded) -> None:
        self.chat_log.set_welcome(None)
        self.engine = event.engine
        info = event.engine.info
        self.model_error = ""
        plan = SplitPlan.from_ranges(info.n_layers, event.engine.ranges)
        self.split.model_loaded(plan, info.allowed_splits)
        self.status.set(
            state="ready",
            model=self._model_label(),
            context_size=info.n_ctx,
            context_used=self._count_context(),
            layout=layout_label(plan),
            error="",
        )
        self._publish_status()
        self._refresh_peers()
        self._maybe_start_planning()

    def on_model_chosen(self, event: msg.ModelChosen) -> None:
        self._load_engine()

    def on_engine_failed(self, event: msg.EngineFailed) -> None:
        self.chat_log.set_welcome(no_model_welcome(event.error))
        self.model_error = event.error
        self.split.model_failed(event.error)
        self.status.set(state="error", model=self._model_label(), error=event.error)
        self.notify(event.error, title="Model", severity="error", timeout=20)

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

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        # meshchat's own keys act on the main screen; in a dialog they fall through to the
        # dialog. Textual's own (Tab/Shift+Tab focus, the palette) keep working in dialogs.
        return action not in _MAIN_SCREEN_ACTIONS or not isinstance(self.screen, ModalScreen)

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
        # (title, what it does, binding id whose live keys the hint names, action)
        commands: list[tuple[str, str, str | None, Callable[[], Any]]] = [
            ("New chat", "Start an empty chat", "new_chat", self.action_new_chat),
            ("Stop the answer", "Cancel generation", "cancel", self.action_cancel),
            (
                "Regenerate answer",
                "Write the last answer again",
                "regenerate",
                self.action_regenerate,
            ),
            (
                "Edit last message",
                "Change your last message and resend",
                "edit_last",
                self.action_edit_last,
            ),
            ("Copy last answer", "To the clipboard", "copy_answer", self.action_copy_answer),
            ("Copy code block", "A code block of the last answer", None, self.action_copy_code),
            ("Chats", "Show the list of chats", "chats", self.action_toggle_chats),
            ("Search chats", "Find words in titles and messages", "search", self.action_search),
            ("Rename chat", "Give this chat a title", "rename_chat", self.action_rename_chat),
            ("Delete chat", "Delete this chat", None, self.action_delete_chat),
            (
                "Chat settings",
                "System prompt and sampling of this chat",
                "chat_settings",
                self.action_chat_settings,
            ),
            ("Export chat", "Save this chat as Markdown", "export_chat", self.action_export_chat),
            ("Edit layer split", "Move stage boundaries", "split_editor", self.action_focus_split),
            ("Auto split", "Restore the planner's plan", None, self.split.action_auto),
            ("Apply split", "Run the edited plan", None, self.split.action_apply),
            ("Peers", "Focus the peers table", "peers", self.action_focus_peers),
            ("Show invite code", "Let another machine join", "invite", self.action_invite),
            ("Join a mesh", "Use an invite code", "join", self.action_join),
            (
                "Remove a member",
                "Take a node off the mesh",
                "remove_member",
                self.action_remove_member,
            ),
            (
                "Toggle mesh panel",
                "Show or hide the split bar and peers",
                "toggle_mesh",
                self.action_toggle_mesh,
            ),
            (
                "Choose model",
                "Run another model: from the store or a path",
                "choose_model",
                self.action_choose_model,
            ),
            ("Help: keys", "Every key binding", "help", self.action_help),
        ]
        for title, help_text, binding_id, callback in commands:
            if binding_id is not None:
                help_text += f" ({keys_for(binding_id, self._keymap)})"
            yield SystemCommand(title, help_text, callback)
