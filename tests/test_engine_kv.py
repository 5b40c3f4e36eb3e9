"""Sessions, KV caches, rollback and prefix reuse on real llama.cpp stages."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from meshchat.engine.chat_template import ChatMessage, ChatTemplate
from meshchat.engine.sampling import SamplingParams
from meshchat.engine.stage import ContextOverflowError, NoFreeSessionError, StageError, StageOptions
from meshchat.engine.tokenizer import Tokenizer
from meshchat.inference.head import ChatPrompter, HeadSession
from meshchat.inference.local import LocalPipeline
from meshchat.model.gguf_file import read_header
from tests.engine_helpers import GREEDY, chain_forward, greedy_run, open_chain, stage_chain

SPLIT = [(0, 12), (12, 30)]


async def _generate(
    session: HeadSession, tokens: list[int], n: int, params: SamplingParams = GREEDY
) -> str:
    return "".join([t async for t in session.generate(tokens, params, n)])


def test_rollback_then_regenerate_matches_fresh_run(smollm2: Path, tmp_path: Path) -> None:
    prompt = Tokenizer(smollm2).tokenize("Once upon a time, in a small village,")
    with stage_chain(smollm2, SPLIT, tmp_path) as stages:
        _, fresh = greedy_run(stages, "fresh", prompt, 24)
        _, first = greedy_run(stages, "s", prompt, 24)
        # Roll back to the end of the prompt plus a few generated tokens and regenerate.
        keep = len(prompt) + 5
        for stage in stages:
            stage.rollback("s", keep)
        stages[-1].configure_sampling("s", GREEDY)
        _, token = chain_forward(stages, "s", keep, [first[5]])
        regenerated = [token]
        for i in range(17):
            _, token = chain_forward(stages, "s", keep + 1 + i, [token])
            regenerated.append(token)
    assert first == fresh
    assert regenerated == fresh[6:24]


def test_sampled_regeneration_is_reproducible_with_a_seed(smollm2: Path, tmp_path: Path) -> None:
    prompt = Tokenizer(smollm2).tokenize("My favourite colour is")
    params = SamplingParams(temperature=1.0, top_k=50, top_p=0.95, min_p=0.0, seed=1234)
    runs = []
    with stage_chain(smollm2, SPLIT, tmp_path) as stages:
        open_chain(stages, "s", params)
        for _ in range(2):
            for stage in stages:
                stage.rollback("s", 0)
            stages[-1].configure_sampling("s", params)
            _, token = chain_forward(stages, "s", 0, prompt)
            tokens = [token]
            for i in range(15):
                _, token = chain_forward(stages, "s", len(prompt) + i, [token])
                tokens.append(token)
            runs.append(tokens)
    assert runs[0] == runs[1]


def test_second_chat_turn_prefills_only_new_tokens(smollm2: Path, tmp_path: Path) -> None:
    tokenizer = Tokenizer(smollm2)
    template = ChatTemplate(read_header(smollm2).get("tokenizer.chat_template"))
    prompter = ChatPrompter(tokenizer, template)
    turn1 = [ChatMessage("user", "Name a fruit.")]

    async def conversation() -> tuple[str, HeadSession, list[int]]:
        with stage_chain(smollm2, SPLIT, tmp_path) as stages:
            pipeline = LocalPipeline(stages)
            session = HeadSession(pipeline, tokenizer)
            answer = await _generate(session, prompter.tokens(turn1), 20)
            turn2 = [
                *turn1,
                ChatMessage("assistant", answer),
                ChatMessage("user", "And a vegetable?"),
            ]
            tokens2 = prompter.tokens(turn2)
            second = await _generate(session, tokens2, 20)
            stats = session.last_stats
            fresh = HeadSession(pipeline, tokenizer)
            whole = await _generate(fresh, tokens2, 20)
            assert second == whole
            return (
                second,
                session,
                [stats.prompt_tokens, stats.prefilled_tokens, fresh.last_stats.prefilled_tokens],
            )

    _, _, (prompt_tokens, prefilled, fresh_prefilled) = asyncio.run(conversation())
    assert fresh_prefilled == prompt_tokens
    # Only the tail after the shared prefix ran: the second question and what the template
    # re-rendered of the answer's end, far less than the whole conversation.
    assert prefilled < prompt_tokens / 2, (prefilled, prompt_tokens)


def test_sessions_are_independent(smollm2: Path, tmp_path: Path) -> None:
    tokenizer = Tokenizer(smollm2)
    prompts = [tokenizer.tokenize(t) for t in ("The sea is", "Mathematics is the study of")]
    with stage_chain(smollm2, SPLIT, tmp_path) as stages:
        alone = [greedy_run(stages, f"alone{i}", p, 12)[1] for i, p in enumerate(prompts)]
        # Interleave two sessions token by token.
        for i in range(2):
            open_chain(stages, f"x{i}")
        tokens = [[chain_forward(stages, f"x{i}", 0, p)[1]] for i, p in enumerate(prompts)]
        for step in range(11):
            for i, p in enumerate(prompts):
                tokens[i].append(chain_forward(stages, f"x{i}", len(p) + step, [tokens[i][-1]])[1])
    assert tokens == alone


def test_session_slots_are_bounded_and_freed(smollm2: Path, tmp_path: Path) -> None:
    options = StageOptions(n_ctx=256, max_sessions=2, n_batch=64, n_threads=2)
    with stage_chain(smollm2, SPLIT, tmp_path, options) as stages:
        stage = stages[0]
        stage.open_session("a")
        stage.open_session("b")
        with pytest.raises(NoFreeSessionError):
            stage.open_session("c")
        stage.close_session("a")
        stage.open_session("c")
        assert sorted(stage.session_ids()) == ["b", "c"]


def test_long_prompt_runs_in_chunks_and_overflow_is_reported(smollm2: Path, tmp_path: Path) -> None:
    options = StageOptions(n_ctx=256, max_sessions=1, n_batch=32, n_threads=2)
    prompt = list(range(1000, 1200))  # 200 tokens: seven chunks of at most 32
    with stage_chain(smollm2, [(0, 30)], tmp_path, options) as solo:
        solo_logits, _ = greedy_run(solo, "s", prompt, 1)
    with stage_chain(smollm2, SPLIT, tmp_path, options) as stages:
        logits, _ = greedy_run(stages, "s", prompt, 1)
        assert np.array_equal(logits[0], solo_logits[0])
        with pytest.raises(ContextOverflowError, match="do not fit"):
            chain_forward(stages, "s", 200, list(range(100)))


def test_bad_stage_input_is_an_error_not_a_crash(smollm2: Path, tmp_path: Path) -> None:
    with stage_chain(smollm2, SPLIT, tmp_path) as stages:
        first, last = stages
        with pytest.raises(StageError, match="unknown session"):
            first.forward("nobody", 0, [1, 2])
        open_chain(stages, "s")
        with pytest.raises(StageError, match="shape"):
            last.forward("s", 0, [1, 2], np.zeros((2, 7), dtype=np.float32))
        with pytest.raises(StageError, match="position"):
            first.forward("s", 5, [1])
        # The stage still works after refusing bad input.
        _, token = chain_forward(stages, "s", 0, [1, 2, 3])
        assert token >= 0


def test_head_reports_context_overflow(smollm2: Path, tmp_path: Path) -> None:
    options = StageOptions(n_ctx=256, max_sessions=1, n_batch=64, n_threads=2)
    tokenizer = Tokenizer(smollm2)

    async def run() -> None:
        with stage_chain(smollm2, SPLIT, tmp_path, options) as stages:
            session = HeadSession(LocalPipeline(stages), tokenizer)
            await _generate(session, list(range(500, 800)), 4)

    with pytest.raises(ContextOverflowError, match="300 tokens; the context holds 256"):
        asyncio.run(run())
