"""The app's conversations: the chat list, switching, rename, delete, search, per-chat
settings and export. Chats live in SQLite (`meshchat.tui.history`)."""

import logging
from pathlib import Path

from textual import on

from meshchat.config import ChatSettings
from meshchat.engine.chat_template import ChatMessage
from meshchat.errors import MeshchatError
from meshchat.fsutil import atomic_write_text
from meshchat.tui.app_base import AppBase
from meshchat.tui.history import (
    Conversation,
    export_markdown,
    title_from,
)
from meshchat.tui.screens.chat_settings import ChatSettingsScreen, ChatSetup
from meshchat.tui.screens.dialogs import AskText, Confirm
from meshchat.tui.screens.search import SearchChoice, SearchScreen
from meshchat.tui.widgets.chats import ChatList

log = logging.getLogger(__name__)


class ConversationsMixin(AppBase):
    async def _show_conversation(self, conversation: Conversation | None) -> None:
        self.conversation = conversation
        self.messages = (
            self._history_call(lambda h: h.messages(conversation.id), []) if conversation else []
        )
        self._leave_edit(restore=False)
        self.prompt.set_recall([m.content for m in self.messages if m.role == "user"])
        await self.chat_log.show([(m.role, m.content, m.meta) for m in self.messages])
        self.sub_title = conversation.title if conversation else "New chat"
        self._refresh_chat_list()
        self._show_chat_notes()
        if self.engine is not None:
            self.status.set(context_used=self._count_context(), ttft_s=None, tok_s=None)

    def _refresh_chat_list(self) -> None:
        chats = self._history_call(lambda h: h.chats(), [])
        self.chat_list.show(chats, self.conversation.id if self.conversation else None)

    def _show_chat_notes(self) -> None:
        notes = ["system prompt on"] if self._system_prompt() else []
        if self._settings().temperature == 0:
            notes.append("temperature 0 (greedy)")
        self.prompt.set_notes(notes)

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

        await self.push_screen(AskText("Rename chat", chat.title, enter="rename"), done)

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
            chats.choose_display(False)
            self.prompt.focus()
        else:
            chats.choose_display(True)
            chats.focus()

    async def action_search(self) -> None:
        if self.history is None:
            return

        async def done(choice: SearchChoice | None) -> None:
            if choice is not None:
                await self._open_chat(choice.conversation_id)
                self.prompt.focus()
                if self.conversation and self.conversation.id == choice.conversation_id:
                    index = self._match_index(choice.query)
                    self.chat_log.show_match(index, choice.query)

        await self.push_screen(SearchScreen(self.history), done)

    def _match_index(self, query: str) -> int | None:
        """The first message holding `query` (as the search matched it: case-insensitive)."""
        wanted = query.casefold()
        if not wanted:
            return None
        return next(
            (i for i, m in enumerate(self.messages) if wanted in m.content.casefold()), None
        )

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
            self._show_chat_notes()
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

        await self.push_screen(AskText("Export chat as Markdown to", default, enter="export"), done)
