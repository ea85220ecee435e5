import pytest
import torch

from tensorrt_llm_dwdp.engine.kv_handoff import (FORMAT_VERSION, KvHandoff, check_metadata, decode_token_ids,
                                                  encode_token_ids)


class SlotCache:
    """A minimal cache with the export/import contract the engine relies on."""

    def __init__(self, slots, length):
        self.k = torch.zeros(slots, length, 2, 4, dtype=torch.bfloat16)
        self.v = torch.zeros(slots, length, 2, 4, dtype=torch.bfloat16)

    def export_slot(self, slot, n):
        return {"layer0.k": self.k[slot, :n], "layer0.v": self.v[slot, :n]}

    def import_slot(self, slot, tensors):
        n = tensors["layer0.k"].shape[0]
        self.k[slot, :n] = tensors["layer0.k"]
        self.v[slot, :n] = tensors["layer0.v"]


def test_round_trip_through_bytes_is_bitwise():
    src = SlotCache(2, 8)
    src.k[1, :5] = torch.randn(5, 2, 4).bfloat16()
    src.v[1, :5] = torch.randn(5, 2, 4).bfloat16()
    h = KvHandoff.from_cache(src, 1, [7, 8, 9, 10, 11], 42)
    src.k.zero_()  # the export must be a copy, not a view of the live cache
    back = KvHandoff.from_bytes(h.to_bytes())
    assert back.prompt_ids == (7, 8, 9, 10, 11) and back.first_token == 42
    dst = SlotCache(3, 8)
    back.write_to_cache(dst, 2)
    assert torch.equal(dst.k[2, :5], h.tensors["layer0.k"])
    assert torch.equal(dst.v[2, :5], h.tensors["layer0.v"])
    assert h.nbytes == 2 * 5 * 2 * 4 * 2


def test_truncated_or_foreign_blob_is_rejected():
    h = KvHandoff.from_cache(SlotCache(1, 4), 0, [1, 2], 3)
    blob = h.to_bytes()
    with pytest.raises(ValueError, match="truncated"):
        KvHandoff.from_bytes(blob[:4])
    from safetensors.torch import save
    with pytest.raises(ValueError, match="format"):
        KvHandoff.from_bytes(save({"x": torch.zeros(1)}, metadata={"format": "99"}))


def test_corrupt_body_or_metadata_raises_value_error_naming_the_blob():
    """The server maps ValueError to HTTP 400; safetensors' own error type used to escape."""
    from safetensors.torch import save

    blob = KvHandoff.from_cache(SlotCache(1, 4), 0, [1, 2], 3).to_bytes()
    with pytest.raises(ValueError, match="KV hand-off blob of .* bytes is malformed"):
        KvHandoff.from_bytes(blob[:-4])  # header intact, tensor bytes cut short
    one = encode_token_ids([1])
    for meta, match in (({"prompt_ids": "[1, -2]", "first_token": "3"}, "prompt_ids .* not base64"),
                        ({"prompt_ids": "AAA=", "first_token": "3"}, "not a whole number"),
                        ({"prompt_ids": one, "first_token": "x"}, "malformed"),
                        ({"prompt_ids": one, "first_token": "-1"}, "first_token"),
                        ({"first_token": "1"}, "malformed")):
        bad = save({"x": torch.zeros(1)}, metadata={"format": str(FORMAT_VERSION), **meta})
        with pytest.raises(ValueError, match=match):
            KvHandoff.from_bytes(bad)


def test_token_ids_round_trip_compactly_and_bad_ids_are_refused():
    """Prompt ids travel as base64 uint32: 32K ids in 175 KB, every id back exactly."""
    ids = tuple(range(0, 2**32, 2**32 // 32768))[:32768]
    text = encode_token_ids(ids)
    assert decode_token_ids(text) == ids and ids[-1] > 2**31
    assert len(text) == -(-4 * 32768 // 3) * 4  # 174,764 characters
    assert decode_token_ids(encode_token_ids([])) == ()
    assert check_metadata({"format": str(FORMAT_VERSION), "prompt_ids": text, "first_token": "9"}) == (ids, 9)
    for bad in ([-1], [2**32], [1.5]):
        with pytest.raises(ValueError, match="token ids must be integers"):
            encode_token_ids(bad)
    with pytest.raises(ValueError, match="format '1' is not"):
        check_metadata({"format": "1", "prompt_ids": "[1]", "first_token": "2"})
