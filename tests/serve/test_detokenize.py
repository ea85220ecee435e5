"""Incremental text: UTF-8 hold-back, stop strings across token boundaries, hidden EOS."""
import pytest

from tensorrt_llm_dwdp.model.tokenizer import ByteTokenizer
from tensorrt_llm_dwdp.serve.detokenize import IncrementalText
from tensorrt_llm_dwdp.serve.output import RequestOutput

TOK = ByteTokenizer()


def _run(text_ids, stop=()):
    inc = IncrementalText(TOK.decode, stop)
    deltas = []
    for t in text_ids:
        d, stopped = inc.push(t)
        deltas.append(d)
        if stopped:
            break
    deltas.append(inc.finish())
    return deltas, inc


def test_multibyte_characters_are_held_until_complete():
    ids = list("aé€😀".encode())
    deltas, inc = _run(ids)
    assert "".join(deltas) == "aé€😀" == inc.final_text
    assert all("\ufffd" not in d for d in deltas)


@pytest.mark.parametrize("split", [1, 2, 3])
def test_stop_string_across_tokens_cuts_text(split):
    ids = list("The answer is 42.\n\nQuestion: next".encode())
    deltas, inc = _run(ids, stop=("\n\nQuestion:",))
    assert inc.final_text == "The answer is 42."
    assert "".join(deltas) == "The answer is 42."
    assert inc.stopped


def test_partial_stop_prefix_released_when_it_does_not_match():
    deltas, inc = _run(list(b"ab\n\nc"), stop=("\n\nQ",))
    assert "".join(deltas) == "ab\n\nc" and not inc.stopped
    # "\n" and "\n\n" were held back while they could still start the stop string
    assert deltas[2] == "" and deltas[3] == ""


def test_request_output_hides_eos_and_counts_it():
    out = RequestOutput(TOK.decode, (), {TOK.eos_token_id})
    assert out.feed(ord("h"), None) == "h"
    assert out.feed(TOK.eos_token_id, "stop") == ""
    assert out.text == "h" and out.ids == [ord("h"), TOK.eos_token_id] and out.finish_reason == "stop"
    with pytest.raises(RuntimeError):
        out.feed(1, None)


def test_request_output_natural_finish_of_first_token():
    out = RequestOutput(TOK.decode, (), {TOK.eos_token_id, 5})
    assert out.natural_finish(TOK.eos_token_id, 10) == "stop"
    assert out.natural_finish(5, 10) == "stop"
    assert out.natural_finish(ord("a"), 1) == "length"
    assert out.natural_finish(ord("a"), 2) is None


def test_stop_string_finishes_before_engine_does():
    out = RequestOutput(TOK.decode, ("XY",), ())
    for ch in "abX":
        out.feed(ord(ch), None)
    assert not out.finished and out.text == "ab"
    out.feed(ord("Y"), None)
    assert out.finish_reason == "stop" and out.text == "ab"
