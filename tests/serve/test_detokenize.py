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


def test_windowed_decode_equals_whole_decode_on_random_bytes_and_specials():
    """Random ids (broken UTF-8, specials) give exactly the text of one whole decode."""
    import random

    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.choice([rng.randrange(256), rng.randrange(0x80, 0x100), TOK.eos_token_id])
               for _ in range(rng.randrange(1, 40))]
        deltas, inc = _run(ids)
        assert inc.final_text == TOK.decode(ids) == "".join(deltas)


def test_each_push_decodes_a_bounded_window():
    calls = []

    def decode(ids):
        calls.append(len(ids))
        return TOK.decode(ids)

    inc = IncrementalText(decode)
    for t in b"plain ascii text that is long enough" * 4:
        inc.push(t)
    inc.finish()
    assert max(calls) <= 2


def test_windowed_decode_keeps_sentencepiece_leading_spaces():
    """A Metaspace decoder drops the space of a decode's first piece; the window's context
    token keeps it, so the text equals one whole decode."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["[UNK]", "▁Hello", "▁world", "!", "▁again", "▁a", "b"])}
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Metaspace()
    t.decoder = decoders.Metaspace()
    ids = [1, 2, 3, 4, 5, 6, 2]
    assert t.decode([2]) == "world"  # the behaviour the window must compensate
    inc = IncrementalText(t.decode)
    out = [inc.push(i)[0] for i in ids] + [inc.finish()]
    assert "".join(out) == inc.final_text == t.decode(ids)
