import pytest
import torch

from tensorrt_llm_dwdp.run_job import (DEMO_PROMPTS, Parity, RankReport, assign_prompts,
                                       compare_logits, format_report, pick_device)


def test_assign_prompts_covers_every_prompt_once_with_unequal_loads():
    groups = assign_prompts(len(DEMO_PROMPTS), 2)
    flat = sorted(i for g in groups for i in g)
    assert flat == list(range(len(DEMO_PROMPTS)))
    loads = [sum(len(DEMO_PROMPTS[i]) for i in g) for g in groups]
    assert loads[0] != loads[1]
    assert assign_prompts(3, 4) == [[0], [1], [2], []]
    with pytest.raises(ValueError):
        assign_prompts(3, 0)


def test_compare_logits_is_bitwise_and_reports_worst_difference():
    a = [[torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])], [torch.tensor([0.5])]]
    same = [[t.clone() for t in steps] for steps in a]
    assert compare_logits(a, same) == (True, 0.0, 3)
    off = [[t.clone() for t in steps] for steps in a]
    off[0][1][1] = torch.nextafter(torch.tensor(4.0), torch.tensor(5.0))
    equal, worst, steps = compare_logits(a, off)
    assert not equal and 0 < worst < 1e-5 and steps == 3
    with pytest.raises(ValueError, match="prompt 1"):
        compare_logits(a, [a[0], []])


def test_report_mentions_each_rank_and_verdict():
    rep = RankReport(rank=1, device="cpu", num_prompts=2, prefill_tokens=100, prefill_seconds=0.5,
                     decode_tokens=8, decode_seconds=0.1, expert_bytes_local=1 << 20,
                     expert_bytes_buffers=1 << 20, expert_bytes_replicated=4 << 20,
                     prefetch_bytes=3 << 20, stall_ms_per_layer=0.25, copy_ms_per_layer=1.5,
                     outputs=[[1], [2]])
    assert rep.prefill_tokens_per_s == 200.0
    text = format_report([rep], Parity(True, False, 1e-3, 7))
    assert "FAIL" in text and "200.0" in text and "7 steps" in text


def test_pick_device():
    assert pick_device("cpu", 3).type == "cpu"
    with pytest.raises(ValueError):
        pick_device("tpu", 0)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA"):
            pick_device("cuda", 0)


def test_synthetic_prompts_have_the_asked_lengths_and_are_reproducible():
    from tensorrt_llm_dwdp.run_job import synthetic_prompts

    a = synthetic_prompts([5, 1, 300], vocab_size=7)
    assert [len(p) for p in a] == [5, 1, 300] and all(0 <= t < 7 for p in a for t in p)
    assert a == synthetic_prompts([5, 1, 300], vocab_size=7) and a[0] != synthetic_prompts([5], 7, seed=1)[0]
    with pytest.raises(ValueError, match=">= 1"):
        synthetic_prompts([3, 0], 7)


def test_cached_checkpoint_of_an_older_preset_is_rebuilt(tmp_path, monkeypatch):
    import json

    from tensorrt_llm_dwdp import run_job

    path = run_job.ensure_checkpoint("tiny-qwen3-moe", 1, "bf16", None, str(tmp_path))
    assert run_job.ensure_checkpoint("tiny-qwen3-moe", 1, "bf16", None, str(tmp_path)) == path
    cfg = json.loads(open(f"{path}/config.json").read())
    cfg["max_position_embeddings"] = 512  # what the preset said before
    with open(f"{path}/config.json", "w") as f:
        json.dump(cfg, f)
    assert run_job.ensure_checkpoint("tiny-qwen3-moe", 1, "bf16", None, str(tmp_path)) == path
    assert json.loads(open(f"{path}/config.json").read())["max_position_embeddings"] == 65536
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["tiny-qwen3-moe-L1-bf16"]
