"""The app's chat pane: send, stream an answer from a worker, stop, regenerate, edit and
resend, copy a message or a code block."""

import asyncio
import logging
import time
from typing import Any

from textual import on, work

from meshchat.config import ChatSettings
from meshchat.errors import MeshchatError
from meshchat.tui import messages as msg
from meshchat.tui.app_base import AppBase, Generation, worker_error
from meshchat.tui.history import (
    StoredMessage,
)
from meshchat.tui.markdown_text import code_blocks
from meshchat.tui.screens.dialogs import Pick
from meshchat.tui.versions import Version, add_version, all_versions, versioned_meta
from meshchat.tui.widgets.chat import LogAction
from meshchat.tui.widgets.prompt import PromptInput

log = logging.getLogger(__name__)


class ChatMixin(AppBase):
    async def _stop_generation(self) -> None:
        """Cancel the answer being written and keep what it has said so far."""
        gen = self.generation
        if gen is None:
            return
        if self._gen_worker is not None:
            self._gen_worker.cancel()
        await self._finish_generation(gen, {"cancelled": True, "finish_reason": "cancelled"})

    @on(PromptInput.Submitted)
    async def _on_submit(self, event: PromptInput.Submitted) -> None:
        if self.generation is not None:
            self.notify("an answer is still being written: wait, or Esc to stop it")
            return
        if self.engine is None:
            reason = self.model_error or "the model is still loading"
            self.notify(reason, title="Cannot send", severity="warning")
            return
        if self.split.busy:  # a plan is being applied: the model is moving
            self.notify(f"wait: {self.split.busy}", title="Cannot send", severity="warning")
            return
        text = event.text.strip()
        earlier: list[Version] = []
        if self.editing is not None:
            earlier = self._versions_after(self.editing)
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
        await self._start_answer(earlier)

    def _versions_after(self, index: int) -> list[Version]:
        """The versions of the answer to message `index` (kept when it is asked again)."""
        if index + 1 >= len(self.messages) or self.messages[index].role != "user":
            return []
        answer = self.messages[index + 1]
        if answer.role != "assistant" or not answer.content:
            return []
        return all_versions(answer.content, self.messages[index].content, answer.meta)[0]

    async def _truncate(self, keep: int) -> None:
        """Drop messages from index `keep` on, in the store and on screen."""
        chat = self.conversation
        if chat is not None:
            self._history_call(lambda h: h.truncate(chat.id, keep))
        del self.messages[keep:]
        await self.chat_log.drop_from(keep)

    async def _start_answer(self, earlier: list[Version] | None = None) -> None:
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
        where = "on this node" if engine.is_local else "on the mesh"
        view.show_waiting(f"reading the conversation ({len(fitted.tokens)} tokens) {where}…")
        self._generation_ids += 1
        asked = self._last_index("user")
        prompt = self.messages[asked].content if asked is not None else ""
        self.generation = Generation(
            self._generation_ids,
            chat.id,
            view,
            fitted.dropped,
            prompt=prompt,
            earlier=earlier or [],
        )
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
        except Exception as exc:
            meta = {"error": worker_error(exc, "generation")}
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
        now = time.perf_counter()
        gen.chunks += 1
        if gen.first_token_at is None:
            gen.first_token_at = now
            self.status.set(ttft_s=now - gen.started)
        elif now > gen.first_token_at:
            self.status.set(tok_s=(gen.chunks - 1) / (now - gen.first_token_at))
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
        self.mesh_watch.failover_active = False  # a failover that gave up ends with the answer
        self.post_message(msg.TurnEnded())
        meta = {k: v for k, v in meta.items() if v is not None}
        if gen.dropped:
            meta["dropped"] = gen.dropped
        if gen.replans:
            meta["replans"] = gen.replans
        if gen.view.notes:
            meta["notes"] = [list(n) for n in gen.view.notes]
        await gen.view.finish(meta)
        cancelled = bool(meta.get("cancelled"))
        same_chat = self.conversation is not None and self.conversation.id == gen.conversation_id
        if gen.view.text or meta.get("error"):
            if gen.earlier:  # regenerated or asked again: the earlier answers stay, one key away
                versions, at = add_version(gen.earlier, Version(gen.view.text, gen.prompt, meta))
                meta = versioned_meta(versions, at)
                gen.view.meta = meta
                gen.view.refresh_meta()
            answer = StoredMessage("assistant", gen.view.text, meta)
            self._history_call(lambda h: h.append(gen.conversation_id, answer))
            if same_chat:
                self.messages.append(answer)
        elif gen.earlier and gen.earlier[-1].prompt == gen.prompt:
            # A regenerate stopped before its first word: the answer it replaced comes back.
            at = len(gen.earlier) - 1
            answer = StoredMessage("assistant", gen.earlier[at].content)
            answer.meta = versioned_meta(gen.earlier, at)
            self._history_call(lambda h: h.append(gen.conversation_id, answer))
            if same_chat:
                self.messages.append(answer)
                await gen.view.remove()
                await self.chat_log.add("assistant", answer.content, answer.meta)
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
        earlier: list[Version] = []
        if self.messages[-1].role == "assistant":
            earlier = self._versions_after(len(self.messages) - 2)
            await self._truncate(len(self.messages) - 1)
        self._leave_edit(restore=True)
        await self._start_answer(earlier)

    async def _switch_version(self, index: int, step: int) -> None:
        """Show the answer written before (-1) or after (+1) the one at `index`, and the
        question it answered; the conversation goes on from the one shown."""
        if self.generation is not None:
            self.notify("an answer is still being written", severity="warning")
            return
        answer = self.messages[index]
        asked = index - 1 if index > 0 and self.messages[index - 1].role == "user" else None
        if answer.role != "assistant" or asked is None:
            self.notify("pick an answer (↑/↓) to see its other versions", severity="warning")
            return
        question = self.messages[asked]
        versions, at = all_versions(answer.content, question.content, answer.meta)
        if len(versions) == 1:
            self.notify("this answer has one version: Ctrl+R writes another", severity="warning")
            return
        target = at + step
        if not 0 <= target < len(versions):
            self.bell()
            return
        chosen = versions[target]
        answer.content, answer.meta = chosen.content, versioned_meta(versions, target)
        self._history_call(lambda h: h.update(answer))
        if chosen.prompt and chosen.prompt != question.content:
            question.content = chosen.prompt
            self._history_call(lambda h: h.update(question))
        await self.chat_log.show([(m.role, m.content, m.meta) for m in self.messages])
        self.chat_log.pick(index)
        if self.engine is not None:
            self.status.set(context_used=self._count_context())

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
        elif event.action in ("older", "newer"):
            await self._switch_version(event.index, -1 if event.action == "older" else 1)
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

    @on(PromptInput.ScrollChat)
    def _on_scroll_chat(self, event: PromptInput.ScrollChat) -> None:
        if event.pages < 0:
            self.chat_log.scroll_page_up(animate=False)
        else:
            self.chat_log.scroll_page_down(animate=False)
