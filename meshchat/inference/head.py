"""The head session: the node where the user is drives a pipeline and streams text.

It turns a prompt into tokens, reuses what the stages already hold (only the new tokens are
prefilled: a chat's second turn costs its own length, not the conversation's), samples until an
end-of-generation token, a stop string or the token budget, and keeps timings.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from meshchat.engine.chat_template import ChatMessage, ChatTemplate
from meshchat.engine.sampling import SamplingParams
from meshchat.engine.stage import ContextOverflowError
from meshchat.engine.tokenizer import Tokenizer
from meshchat.inference.pipeline import Pipeline
from meshchat.inference.stop import StopStringFilter
from meshchat.model.gguf_file import GGUFHeader


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    prefilled_tokens: int = 0  # prompt tokens actually computed (the rest came from the KV cache)
    generated_tokens: int = 0
    ttft_s: float | None = None  # time to first token
    decode_s: float = 0.0  # time from first token to the last
    finish_reason: str = ""  # "stop" | "length" | "cancelled"
    token_ids: list[int] = field(default_factory=list)

    @property
    def decode_tok_s(self) -> float | None:
        if self.generated_tokens < 2 or self.decode_s <= 0:
            return None
        return (self.generated_tokens - 1) / self.decode_s


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class HeadSession:
    """One conversation's state on the pipeline (its KV caches on every stage)."""

    def __init__(
        self, pipeline: Pipeline, tokenizer: Tokenizer, session_id: str | None = None
    ) -> None:
        self.pipeline = pipeline
        self.tokenizer = tokenizer
        self.session_id = session_id or uuid.uuid4().hex
        self.tokens: list[int] = []  # what every stage's KV cache holds for this session
        self.last_stats = GenerationStats()
        self._opened = False
        # Set when a generation was interrupted: a forward may have finished on the stages
        # after we stopped listening, so they may hold more than `tokens`.
        self._dirty = False

    async def generate(
        self,
        prompt_tokens: list[int],
        params: SamplingParams,
        max_tokens: int,
        stop: list[str] | None = None,
    ) -> AsyncIterator[str]:
        """Stream the text generated after `prompt_tokens`; stats land in `last_stats`."""
        stats = self.last_stats = GenerationStats(prompt_tokens=len(prompt_tokens))
        n_ctx = self.pipeline.n_ctx
        if len(prompt_tokens) >= n_ctx:
            raise ContextOverflowError(
                f"the prompt has {len(prompt_tokens)} tokens; the context holds {n_ctx}"
            )
        if not prompt_tokens:
            raise ContextOverflowError("the prompt is empty")
        if not self._opened:
            await self.pipeline.open_session(self.session_id)
            self._opened = True
        start = await self._reuse_prefix(prompt_tokens)
        await self.pipeline.configure_sampling(self.session_id, params)
        stream = self.tokenizer.stream_decoder()
        stops = StopStringFilter(stop or [])
        began = time.perf_counter()
        first_token_at: float | None = None
        feed, position = prompt_tokens[start:], start
        stats.prefilled_tokens = len(feed)
        stats.finish_reason = "cancelled"
        try:
            while True:
                if position + len(feed) > n_ctx:
                    stats.finish_reason = "length"
                    break
                token = await self.pipeline.forward(self.session_id, position, feed)
                self.tokens.extend(feed)
                position += len(feed)
                now = time.perf_counter()
                if first_token_at is None:
                    first_token_at = now
                    stats.ttft_s = now - began
                stats.decode_s = now - first_token_at
                if self.tokenizer.is_end_of_generation(token):
                    stats.finish_reason = "stop"
                    break
                stats.generated_tokens += 1
                stats.token_ids.append(token)
                text = stops.push(stream.push(token))
                if text:
                    yield text
                if stops.stopped:
                    stats.finish_reason = "stop"
                    break
                if stats.generated_tokens >= max_tokens:
                    stats.finish_reason = "length"
                    break
                feed = [token]
            tail = stops.push(stream.flush()) + stops.flush()
            if tail:
                yield tail
        except BaseException:
            self._dirty = True
            raise

    async def _reuse_prefix(self, prompt_tokens: list[int]) -> int:
        """Roll the stages back to the longest prefix they share with the prompt."""
        keep = common_prefix(self.tokens, prompt_tokens)
        if keep == len(prompt_tokens):
            keep -= 1  # at least one token must run to give logits for the next one
        if keep < len(self.tokens) or self._dirty:
            await self.pipeline.rollback(self.session_id, keep)
            del self.tokens[keep:]
            self._dirty = False
        return keep

    async def close(self) -> None:
        if self._opened:
            await self.pipeline.close_session(self.session_id)
            self._opened = False
            self.tokens.clear()


@dataclass
class ChatPrompter:
    """Renders a conversation with the model's template and tokenizes it."""

    tokenizer: Tokenizer
    template: ChatTemplate

    @classmethod
    def for_model(cls, header: GGUFHeader, tokenizer: Tokenizer) -> ChatPrompter:
        """The model's own template (`tokenizer.chat_template`), or ChatML if it has none."""
        bos = tokenizer.token_text(tokenizer.bos_id) if tokenizer.bos_id >= 0 else ""
        eos = tokenizer.token_text(tokenizer.eos_id) if tokenizer.eos_id >= 0 else ""
        template = ChatTemplate(header.get("tokenizer.chat_template"), bos, eos)
        return cls(tokenizer, template)

    def tokens(self, messages: list[ChatMessage]) -> list[int]:
        text = self.template.render(messages, add_generation_prompt=True)
        tokens = self.tokenizer.tokenize(text, add_special=True, parse_special=True)
        bos = self.tokenizer.bos_id
        if len(tokens) > 1 and tokens[0] == bos and tokens[1] == bos:
            tokens = tokens[1:]  # the template wrote BOS itself and llama.cpp added another
        return tokens
