"""Incremental detokenizer, stop strings and the think/answer splitter."""

import random

import pytest

from test_generation import byte_level_tokenizer
from ktransformers.util.reasoning import ReasoningSplitter
from ktransformers.util.stop_strings import StopStringMatcher, partial_match_length
from ktransformers.util.text_stream import IncrementalDetokenizer

MULTILINGUAL = "hello 世界, 你好! emoji 🙂 family 👨‍👩‍👧 done. ünïcödé ok"


@pytest.fixture(scope="module")
def tokenizer():
    return byte_level_tokenizer()


def stream(tokenizer, ids):
    detok = IncrementalDetokenizer(tokenizer)
    return [detok.push(t) for t in ids], detok


def test_multibyte_characters_span_several_tokens(tokenizer):
    ids = tokenizer.encode("世🙂", add_special_tokens=False)
    assert len(ids) >= 7  # 3 + 4 UTF-8 bytes, each its own token in this small vocabulary


def test_deltas_never_split_a_character_and_concatenate_exactly(tokenizer):
    ids = tokenizer.encode(MULTILINGUAL, add_special_tokens=False)
    deltas, detok = stream(tokenizer, ids)
    assert detok.flush() == ""
    assert "".join(deltas) == tokenizer.decode(ids) == MULTILINGUAL
    assert all("\ufffd" not in d for d in deltas)
    assert deltas.count("") >= 10  # tokens that only carried part of a character
    assert "世" in deltas and "🙂" in deltas  # emitted whole, at the token completing them


def test_every_prefix_of_the_stream_matches_decode(tokenizer):
    ids = tokenizer.encode(MULTILINGUAL, add_special_tokens=False)
    for cut in range(1, len(ids) + 1):
        deltas, detok = stream(tokenizer, ids[:cut])
        text = "".join(deltas) + detok.flush()
        assert text == tokenizer.decode(ids[:cut]), cut


def test_special_tokens_are_shown(tokenizer):
    ids = tokenizer.encode("<think>好</think>", add_special_tokens=False) + [tokenizer.eos_token_id]
    deltas, _ = stream(tokenizer, ids)
    assert "".join(deltas) == tokenizer.decode(ids) == "<think>好</think><｜end▁of▁sentence｜>"


def test_control_tokens_can_be_hidden_but_think_tags_stay(tokenizer):
    eos = tokenizer.eos_token_id
    ids = [eos] + tokenizer.encode("<think>好</think>ok", add_special_tokens=False) + [eos]
    detok = IncrementalDetokenizer(tokenizer, hide_control_tokens=True)
    text = "".join(detok.push(t) for t in ids) + detok.flush()
    assert text == "<think>好</think>ok"
    # the oracle: Hugging Face's own skip_special_tokens, on the part without think tags
    tail = tokenizer.encode("ok", add_special_tokens=False) + [eos]
    assert tokenizer.decode(tail, skip_special_tokens=True) == "ok"


def test_partial_match_length():
    assert partial_match_length("abc</th", ["</think>"]) == 4
    assert partial_match_length("abc<", ["</think>"]) == 1
    assert partial_match_length("abc", ["</think>"]) == 0
    assert partial_match_length("xxST", ["STOP", "TOP!"]) == 2
    assert partial_match_length("STOP", ["STOP"]) == 0  # a full match is not partial
    assert partial_match_length("SSTO", ["STOP"]) == 3


def feed(matcher, pieces):
    return [matcher.push(p) for p in pieces]


def test_stop_string_split_across_pieces_is_never_shown():
    matcher = StopStringMatcher(["<END>"])
    shown = feed(matcher, ["Hello <", "E", "N", "D> after", "more"])
    assert shown == ["Hello ", "", "", "", ""]
    assert matcher.stopped


def test_stop_matcher_holds_back_only_the_possible_prefix():
    matcher = StopStringMatcher(["STOP"])
    assert matcher.push("abcST") == "abc"
    assert matcher.push("x") == "STx"  # the prefix did not grow into the stop string
    assert matcher.push("S") == ""
    assert matcher.flush() == "S"
    assert not matcher.stopped


def test_earliest_of_several_stop_strings_wins():
    matcher = StopStringMatcher(["world", "lo w"])
    assert matcher.push("hello world") == "hel"


def test_stop_strings_at_every_split_point():
    text = "some text 世界 then ###stop### and more"
    for _ in range(50):
        rng = random.Random(_)
        cuts = sorted(rng.sample(range(1, len(text)), 6))
        pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        matcher = StopStringMatcher(["###stop###", "never"])
        assert "".join(feed(matcher, pieces)) == "some text 世界 then "


@pytest.mark.parametrize("bad", ["", [""], ["ok", 3]])
def test_bad_stop_strings_are_rejected(bad):
    with pytest.raises(ValueError, match="stop"):
        StopStringMatcher(bad)


def split_all(splitter, pieces):
    reasoning = content = ""
    for piece in pieces:
        r, c = splitter.push(piece)
        reasoning, content = reasoning + r, content + c
    r, c = splitter.flush()
    return reasoning + r, content + c


def every_split(text):
    """The text as single characters, and at every two-way split."""
    yield list(text)
    for i in range(1, len(text)):
        yield [text[:i], text[i:]]


def test_generated_think_block_opens_reasoning():
    for pieces in every_split("\n<think>\nlet me see</think>\n\nThe answer."):
        assert split_all(ReasoningSplitter(), pieces) == ("\nlet me see", "\n\nThe answer.")


def test_forced_think_starts_in_reasoning():
    for pieces in every_split("hmm 世界</think>Answer"):
        assert split_all(ReasoningSplitter(start_in_reasoning=True), pieces) == ("hmm 世界", "Answer")


def test_output_without_think_is_all_content():
    for pieces in every_split("  <thing> is not a tag"):
        assert split_all(ReasoningSplitter(), pieces) == ("", "  <thing> is not a tag")


def test_unfinished_reasoning_and_lookalike_tags_stay_reasoning():
    for pieces in every_split("a </thin b </"):
        assert split_all(ReasoningSplitter(start_in_reasoning=True), pieces) == ("a </thin b </", "")


def test_splitter_releases_text_as_soon_as_it_cannot_be_a_tag():
    splitter = ReasoningSplitter(start_in_reasoning=True)
    assert splitter.push("abc</") == ("abc", "")
    assert splitter.push("b>") == ("</b>", "")
    assert splitter.push("</think>x") == ("", "x")
    assert splitter.push("</think>") == ("", "</think>")  # after the answer starts, text is text
