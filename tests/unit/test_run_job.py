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
