"""Tokenizer, streaming detokenization, chat template and stop strings."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshchat.engine.chat_template import ChatMessage, ChatTemplate, ChatTemplateError
from meshchat.engine.tokenizer import Tokenizer, TokenizerError
from meshchat.inference.stop import StopStringFilter
from meshchat.model.gguf_file import read_header


@pytest.fixture(scope="module")
def tokenizer(smollm2: Path) -> Tokenizer:
    return Tokenizer(smollm2)


def test_round_trip_and_special_tokens(tokenizer: Tokenizer) -> None:
    text = "Hello, wörld! 日本語 🙂"
    tokens = tokenizer.tokenize(text, add_special=True)
    assert tokenizer.detokenize(tokens) == text
    assert not tokenizer.adds_bos  # SmolLM2's metadata asks for no BOS
    chat = tokenizer.tokenize("<|im_start|>user", parse_special=True)
    assert chat[0] == 1 and tokenizer.is_end_of_generation(2)
    with pytest.raises(TokenizerError):
        tokenizer.piece(10**9)


def test_stream_never_splits_a_character(tokenizer: Tokenizer) -> None:
    text = "日本語のテキスト 🙂🙂 café"
    tokens = tokenizer.tokenize(text, add_special=False)
    pieces = [tokenizer.piece(t) for t in tokens]
    assert any(_is_partial_utf8(p) for p in pieces), "pick text whose characters span tokens"
    stream = tokenizer.stream_decoder()
    deltas = [stream.push(t) for t in tokens] + [stream.flush()]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)


def _is_partial_utf8(data: bytes) -> bool:
    try:
        data.decode()
        return False
    except UnicodeDecodeError:
        return True


def test_chat_template_from_the_model(smollm2: Path) -> None:
    template = ChatTemplate(read_header(smollm2).get("tokenizer.chat_template"))
    text = template.render([ChatMessage("system", "Be brief."), ChatMessage("user", "Hi")])
    assert text.endswith("<|im_start|>assistant\n")
    assert "<|im_start|>system\nBe brief.<|im_end|>" in text
    assert not template.is_fallback


def test_fallback_template_and_sandbox() -> None:
    assert "<|im_start|>user\nHi<|im_end|>" in ChatTemplate(None).render(
        [ChatMessage("user", "Hi")]
    )
    hostile = ChatTemplate("{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(ChatTemplateError):
        hostile.render([])
    refusing = ChatTemplate("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        refusing.render([])
    with pytest.raises(ChatTemplateError, match="does not parse"):
        ChatTemplate("{% for %}")


def test_stop_strings_cut_and_hold_back() -> None:
    stops = StopStringFilter(["###", "\nUser:"])
    assert stops.push("Hello #") == "Hello "
    assert stops.push("# more") == "## more"  # the held "#" comes out once it is no stop
    assert stops.push(" end\nUs") == " end"
    assert stops.push("er: next") == ""
    assert stops.stopped and stops.flush() == ""


@given(
    text=st.text(alphabet="ab#\n", max_size=40),
    stop=st.text(alphabet="ab#\n", min_size=1, max_size=4),
    cuts=st.lists(st.integers(min_value=0, max_value=40), max_size=8),
)
def test_stop_filter_equals_cutting_the_whole_text(text: str, stop: str, cuts: list[int]) -> None:
    """However the text arrives in pieces, the output is the text up to the first stop."""
    bounds = sorted({0, len(text), *[c for c in cuts if c <= len(text)]})
    filt = StopStringFilter([stop])
    out = "".join(filt.push(text[a:b]) for a, b in itertools.pairwise(bounds))
    out += filt.flush()
    index = text.find(stop)
    assert out == (text if index < 0 else text[:index])
