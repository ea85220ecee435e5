"""Byte tokenizer round trips and the offline loader."""
import json

import pytest

from tensorrt_llm_dwdp.model.tokenizer import ByteTokenizer, load_tokenizer


def test_round_trip_unicode_and_specials(tmp_path):
    tok = ByteTokenizer(vocab_size=512)
    text = "héllo, wörld ✓"
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id and all(0 <= i < 256 for i in ids[1:])
    assert len(ids) == 1 + len(text.encode("utf-8"))
    assert tok.decode(ids + [tok.eos_token_id, 400]) == text
    tok.save(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, ByteTokenizer) and loaded.vocab_size == 512
    assert loaded.eos_token_id == 257
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "DwdpByteTokenizer"


def test_chat_template_and_errors(tmp_path):
    tok = ByteTokenizer()
    prompt = tok.apply_chat_template([{"role": "system", "content": "be brief"},
                                      {"role": "user", "content": "hi"}])
    assert prompt == "system: be brief\nuser: hi\nassistant:"
    with pytest.raises(ValueError, match="role"):
        tok.apply_chat_template([{"content": "x"}])
    with pytest.raises(ValueError, match="259"):
        ByteTokenizer(vocab_size=100)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "DwdpByteTokenizer", "vocab_size": 300, "eos_token_id": 5}))
    with pytest.raises(ValueError, match="eos_token_id"):
        load_tokenizer(tmp_path)


def _hf_tokenizer(adds_bos: bool):
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "</s>": 1, "hi": 2, "there": 3, "[UNK]": 4, "A:": 5}
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if adds_bos:
        t.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    hf = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", unk_token="[UNK]")
    hf.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }} {% endfor %}A:"
    return hf


@pytest.mark.parametrize("adds_bos", [True, False])
def test_hf_chat_prompt_encodes_with_exactly_one_bos(adds_bos):
    """A template that writes BOS plus an encode() that adds BOS gave [BOS, BOS, ...] (DeepSeek)."""
    from tensorrt_llm_dwdp.model.tokenizer import HfTokenizer

    hf = _hf_tokenizer(adds_bos)
    tok = HfTokenizer(hf)
    messages = [{"role": "user", "content": "hi there"}]
    ids = tok.encode(tok.apply_chat_template(messages))
    assert ids == [0, 2, 3, 5], ids
    want = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    assert ids == (want if isinstance(want, list) else list(want["input_ids"]))  # HF's own path
