"""The model behind the chat pane, without any UI: load, prompt, stream, re-split.

`ChatEngine` owns the tokenizer, the model's chat template and a pipeline over layer ranges
(in this process for now; a mesh pipeline speaks the same `Pipeline` protocol). It keeps one head
session, so a follow-up turn prefills only its own tokens and a regenerate rolls back.

Loading is blocking (llama.cpp reads the weights): call `ChatEngine.load` from a thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from meshchat.commands.common import thread_count
from meshchat.config import ChatSettings
from meshchat.engine.chat_template import ChatMessage, ChatTemplate
from meshchat.engine.sampling import SamplingParams
from meshchat.engine.stage import Stage, StageOptions
from meshchat.engine.tokenizer import Tokenizer
from meshchat.errors import MeshchatError
from meshchat.inference.capabilities import tuned_options
from meshchat.inference.head import ChatPrompter, GenerationStats, HeadSession
from meshchat.inference.local import LocalPipeline, build_stages
from meshchat.inference.local_model import LocalModel
from meshchat.inference.pipeline import Pipeline
from meshchat.model.architectures import allowed_split_points, is_supported, split_ranges
from meshchat.model.gguf_file import read_header
from meshchat.model.spec import ModelSpec, spec_from_header
from meshchat.paths import DataDir

Ranges = list[tuple[int, int]]


@dataclass(frozen=True)
class ModelInfo:
    """What the status line and the split editor show about the model."""

    path: Path
    name: str
    arch: str
    n_layers: int
    quant: str
    file_size: int
    n_ctx: int
    allowed_splits: tuple[int, ...]


@dataclass(frozen=True)
class StageShare:
    """Where the per-token time went during the last answer, for one stage."""

    layers: tuple[int, int]
    compute_s: float
    tokens: int


@dataclass(frozen=True)
class FittedPrompt:
    tokens: list[int]
    dropped: int  # oldest messages left out so the prompt and the answer fit the context


class ChatEngine:
    def __init__(
        self,
        spec: ModelSpec,
        template_source: str | None,
        tokenizer: Tokenizer,
        pipeline: Pipeline,
        ranges: Ranges,
        data: DataDir,
        options: StageOptions,
    ) -> None:
        self.spec = spec
        self.tokenizer = tokenizer
        self.template = ChatTemplate(
            template_source,
            bos_token=tokenizer.token_text(tokenizer.bos_id) if tokenizer.bos_id >= 0 else "",
            eos_token=tokenizer.token_text(tokenizer.eos_id) if tokenizer.eos_id >= 0 else "",
        )
        self.prompter = ChatPrompter(tokenizer, self.template)
        self.pipeline = pipeline
        self.ranges = ranges
        self._data = data
        self.options = options
        self.session = HeadSession(pipeline, tokenizer)
        self._compute_before: list[float] = []
        self._tokens_before: list[int] = []

    # --- loading ----------------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        model_path: Path,
        data: DataDir,
        n_ctx: int = 4096,
        threads: int = 0,
        ranges: Ranges | None = None,
    ) -> ChatEngine:
        """Read the model and start its stages (blocking). MeshchatError says what is wrong."""
        if not model_path.is_file():
            raise MeshchatError(f"model file not found: {model_path}")
        header = read_header(model_path)
        spec = spec_from_header(header)
        if not is_supported(spec.arch):
            raise MeshchatError(f"unsupported architecture {spec.arch!r} in {model_path}")
        ranges = ranges or [(0, spec.n_layers)]
        options = tuned_options(
            LocalModel.from_header(header, data),
            data,
            StageOptions(
                n_ctx=min(n_ctx, spec.context_length),
                max_sessions=1,
                n_threads=thread_count(threads or None),
            ),
        )
        tokenizer = Tokenizer(model_path)
        try:
            pipeline = cls._pipeline(model_path, ranges, data, options)
        except BaseException:
            tokenizer.close()
            raise
        template = header.get("tokenizer.chat_template")
        return cls(
            spec,
            template if isinstance(template, str) else None,
            tokenizer,
            pipeline,
            ranges,
            data,
            options,
        )

    @staticmethod
    def _pipeline(
        path: Path, ranges: Ranges, data: DataDir, options: StageOptions
    ) -> LocalPipeline:
        stages = build_stages(path, ranges, data.slices, data.fingerprints, options)
        return LocalPipeline(stages)

    @property
    def info(self) -> ModelInfo:
        return ModelInfo(
            path=self.spec.path,
            name=self.spec.name,
            arch=self.spec.arch,
            n_layers=self.spec.n_layers,
            quant=self.spec.main_quant,
            file_size=self.spec.file_size,
            n_ctx=self.pipeline.n_ctx,
            allowed_splits=tuple(allowed_split_points(self.spec)),
        )

    # --- prompts ----------------------------------------------------------------------------

    def fit(self, messages: Sequence[ChatMessage], max_tokens: int) -> FittedPrompt:
        """Tokens for the conversation, leaving room for the answer.

        The oldest turns are left out (the system prompt stays) until the prompt plus the
        answer budget fits, but never the last message: if that alone is too long, say so.
        """
        n_ctx = self.pipeline.n_ctx
        budget = n_ctx - min(max_tokens, n_ctx // 4)
        system = [m for m in messages[:1] if m.role == "system"]
        turns = list(messages[len(system) :])
        dropped = 0
        while True:
            tokens = self.prompter.tokens([*system, *turns])
            if len(tokens) <= budget or len(turns) <= 1:
                break
            turns.pop(0)
            dropped += 1
        if len(tokens) >= n_ctx:
            raise MeshchatError(
                f"the message is {len(tokens)} tokens long; the context holds {n_ctx}"
            )
        return FittedPrompt(tokens, dropped)

    def count_tokens(self, messages: Sequence[ChatMessage]) -> int:
        if not messages:
            return 0
        return len(self.prompter.tokens(list(messages)))

    # --- generation -------------------------------------------------------------------------

    async def stream(self, tokens: list[int], settings: ChatSettings) -> AsyncIterator[str]:
        """Stream an answer to `tokens`; cancel by closing the iterator or its task."""
        params = SamplingParams.from_settings(settings)
        self._mark_timings()
        async for text in self.session.generate(tokens, params, settings.max_tokens):
            yield text

    @property
    def last_stats(self) -> GenerationStats:
        return self.session.last_stats

    @property
    def context_used(self) -> int:
        return len(self.session.tokens)

    def _stages(self) -> list[Stage]:
        pipeline = self.pipeline
        return list(pipeline.stages) if isinstance(pipeline, LocalPipeline) else []

    def _mark_timings(self) -> None:
        self._compute_before = [s.timings.compute_s for s in self._stages()]
        self._tokens_before = [s.timings.tokens for s in self._stages()]

    def stage_shares(self) -> list[StageShare]:
        """Compute time per stage since the last answer began."""
        shares = []
        for i, stage in enumerate(self._stages()):
            before_s = self._compute_before[i] if i < len(self._compute_before) else 0.0
            before_n = self._tokens_before[i] if i < len(self._tokens_before) else 0
            shares.append(
                StageShare(
                    (stage.layers.first, stage.layers.end),
                    stage.timings.compute_s - before_s,
                    stage.timings.tokens - before_n,
                )
            )
        return shares

    async def reset_session(self) -> None:
        """Forget the KV cache (another conversation comes next)."""
        await self.session.close()
        self.session = HeadSession(self.pipeline, self.tokenizer)

    # --- layout -----------------------------------------------------------------------------

    @property
    def is_local(self) -> bool:
        return isinstance(self.pipeline, LocalPipeline)

    async def resplit(self, boundaries: list[int]) -> Ranges:
        """Run the model as in-process stages split at `boundaries` (SplitError if invalid)."""
        ranges = split_ranges(self.spec, boundaries)
        if ranges == self.ranges and self.is_local:
            return ranges
        new = await asyncio.to_thread(
            self._pipeline, self.spec.path, ranges, self._data, self.options
        )
        await self.switch(new, ranges)
        return ranges

    async def switch(self, pipeline: Pipeline, ranges: Ranges) -> None:
        """Generate with `pipeline` from now on (a mesh pipeline, or new local stages).

        The conversation's KV cache does not move: the next turn prefills it on the new
        stages (a mesh pipeline that was re-planned replays it by itself).
        """
        await self.session.close()
        old, self.pipeline, self.ranges = self.pipeline, pipeline, ranges
        self.session = HeadSession(pipeline, self.tokenizer)
        self._compute_before, self._tokens_before = [], []
        if old is not pipeline:
            await old.close()

    async def close(self) -> None:
        try:
            await self.session.close()
        finally:
            await self.pipeline.close()
            self.tokenizer.close()
