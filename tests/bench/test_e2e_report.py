"""bench/e2e_report.py on hand-made records: the goals pass when the figures say so, and fail
when a point errored, was skipped, a mode did not build, or memory is off or unresolved."""
import copy

import pytest

from bench.e2e_report import aggregate_point, goals, memory_goal, point_keys, routed_tflops, summary_markdown

MiB = 2 ** 20
LAYERS = 4


def _rank(rank, tokens, step_ms, **extra):
    return {"rank": rank, "tokens": tokens, "step_ms_mean": step_ms,
            "tokens_per_s": tokens / (step_ms / 1e3), **extra}


def _dwdp(rank, tokens, step_ms):
    return _rank(rank, tokens, step_ms, dwdp_stall_ms_per_step=0.01, dwdp_copy_ms_per_layer=1.0)


def _ep(rank, tokens, step_ms):
    return _rank(rank, tokens, step_ms, ep_wait_ms_per_step=2.0,
                 ep_collective_ms_per_step={"ep_counts": 0.5, "ep_dispatch": 1.0, "ep_combine": 0.5})


def _memory(measured, predicted):
    return {"source": "cuda_allocator", "dense_model_bytes": 10 * MiB,
            "measured_expert_bytes_per_rank": [measured] * 2,
            "tensor_bytes_per_rank": [predicted] * 2,
            "predicted_expert_bytes_per_rank": [predicted] * 2}


def _results():
    """Two ranks, points equal/1000 and 4x/1000 (heavy rank 1000 tokens, light 250): DWDP and
    replicated step in their own time, EP ranks wait for the heavy one."""
    meta = {"preset": "tiny", "num_moe_layers": LAYERS, "num_layers": 5, "hidden_size": 64,
            "moe_intermediate_size": 32, "num_experts": 16, "top_k": 4, "world_size": 2,
            "seq_len": 100, "warmup": 1, "iters": 2, "moe_backend": "torch", "device_name": "NVIDIA H200",
            "modes": ["dwdp", "replicated", "ep"], "tokens": [1000], "imbalance": ["equal", "4x"],
            "peak": {"name": "H200", "bf16_tflops": 790.0, "copy_gbps": 4300.0},
            "memory_resolution_bytes": MiB}
    pts = {
        "dwdp": {"equal/1000": [_dwdp(0, 1000, 100.0), _dwdp(1, 1000, 100.0)],
                 "4x/1000": [_dwdp(0, 1000, 100.0), _dwdp(1, 250, 30.0)]},
        "replicated": {"equal/1000": [_rank(0, 1000, 98.0), _rank(1, 1000, 98.0)],
                       "4x/1000": [_rank(0, 1000, 98.0), _rank(1, 250, 29.0)]},
        "ep": {"equal/1000": [_ep(0, 1000, 105.0), _ep(1, 1000, 105.0)],
               "4x/1000": [_ep(0, 1000, 95.0), _ep(1, 250, 95.0)]},
    }
    mem = {"dwdp": _memory(60 * MiB, 60 * MiB), "replicated": _memory(96 * MiB, 96 * MiB),
           "ep": _memory(48 * MiB + MiB // 2, 48 * MiB)}
    modes = {m: {"points": {k: {"tokens": 1000, "imbalance": k.split("/")[0], **aggregate_point(recs)}
                            for k, recs in p.items()}, "memory": mem[m]} for m, p in pts.items()}
    return {"meta": meta, "modes": modes, "skipped": []}


def test_own_rate_and_lockstep_figures():
    p = aggregate_point([_dwdp(0, 1000, 100.0), _dwdp(1, 250, 30.0)])
    assert p["tokens_per_s_per_gpu"] == pytest.approx((10000 + 250 / 0.03) / 2)
    assert p["lockstep_tokens_per_s_per_gpu"] == pytest.approx(1250 / 0.1 / 2)
    assert "error" in aggregate_point([_rank(0, 10, 1.0), {"rank": 1, "error": "OOM"}])


def test_goals_met_on_good_records():
    r = _results()
    g = goals(r, LAYERS)
    assert g["dwdp_within_5pct_of_replicated"]["met"] is True
    own = g["dwdp_ahead_of_ep_under_4x_own_rate"]
    assert own["met"] is True and own["points"][0]["ratio"] == pytest.approx((10000 + 250 / 0.03) / 2 / (1250 / 0.095 / 2))
    # Timed to the slowest rank, DWDP (100 ms) is behind EP (95 ms): the lockstep goal fails.
    lock = g["dwdp_ahead_of_ep_under_4x_lockstep"]
    assert lock["met"] is False and lock["points"][0]["ratio"] == pytest.approx(95 / 100)
    mem = g["memory_as_layout_predicts"]
    assert mem["met"] is True
    assert mem["modes"]["dwdp"]["over_replicated"] == [pytest.approx(60 / 96)] * 2
    r["goals"] = g
    text = summary_markdown(r)
    assert "own rate" in text and "lockstep" in text and "**not met**" in text


def test_errored_and_skipped_points_count_as_missed():
    r = _results()
    r["modes"]["dwdp"]["points"]["equal/1000"] = {"tokens": 1000, "imbalance": "equal",
                                                   **aggregate_point([_rank(0, 1, 1.0), {"rank": 1, "error": "CUDA OOM"}])}
    r["modes"]["ep"]["points"]["4x/1000"] = {"tokens": 1000, "imbalance": "4x", "skipped": "time budget"}
    g = goals(r, LAYERS)
    near = g["dwdp_within_5pct_of_replicated"]
    assert near["met"] is False and "CUDA OOM" in near["points"][0]["missed"]
    for key in ("dwdp_ahead_of_ep_under_4x_own_rate", "dwdp_ahead_of_ep_under_4x_lockstep"):
        assert g[key]["met"] is False and "skipped" in g[key]["points"][0]["missed"]
    r["goals"] = g
    assert "missed" in summary_markdown(r)


def test_a_mode_that_did_not_build_fails_every_goal_it_is_in():
    r = _results()
    r["modes"]["replicated"] = {"error": "build failed: OutOfMemoryError", "points": {}}
    g = goals(r, LAYERS)
    assert g["dwdp_within_5pct_of_replicated"]["met"] is False
    assert g["memory_as_layout_predicts"]["met"] is False
    assert "OutOfMemoryError" in g["memory_as_layout_predicts"]["modes"]["replicated"]["missed"]


def test_a_mode_not_in_the_run_is_not_evaluated():
    r = _results()
    r["meta"]["modes"] = ["dwdp", "replicated"]
    del r["modes"]["ep"]
    g = goals(r, LAYERS)
    assert g["dwdp_ahead_of_ep_under_4x_own_rate"]["met"] is None
    assert g["dwdp_within_5pct_of_replicated"]["met"] is True


def test_memory_off_the_layout_or_unresolved_fails():
    r = _results()
    r["modes"]["dwdp"]["memory"] = _memory(80 * MiB, 60 * MiB)   # 33% more than the layout says
    assert memory_goal(r)["met"] is False
    assert memory_goal(r)["modes"]["dwdp"]["as_predicted"] is False
    r = _results()
    r["meta"]["memory_resolution_bytes"] = 16 * MiB   # RSS: 48 MiB of EP experts cannot be judged
    g = memory_goal(r)
    assert g["met"] is False and g["modes"]["ep"]["resolved"] is False


def test_point_keys_and_routed_tflops():
    meta = _results()["meta"]
    assert point_keys(meta) == ["equal/1000", "4x/1000"]
    assert routed_tflops(meta, 1e6) == pytest.approx(1e6 * 6 * 64 * 32 * 4 * LAYERS / 1e12)


def test_summary_without_peak_says_so():
    r = copy.deepcopy(_results())
    r["meta"]["peak"] = None
    r["goals"] = goals(r, LAYERS)
    assert "no peak known" in summary_markdown(r)


def _spans(start, step_ms, n=2):
    return [(start + i * step_ms / 1e3, start + (i + 1) * step_ms / 1e3) for i in range(n)]


def test_ranks_that_did_not_overlap_on_a_shared_device_give_no_ratio():
    # equal/8192 of the one-H200 run: rank 1 compiled kernels in its warm-up while rank 0
    # timed both steps alone, then rank 1 timed its steps alone (213 ms each, not 445).
    apart = [_dwdp(0, 8192, 213.0), _dwdp(1, 8192, 213.0)]
    apart[0]["step_spans"], apart[1]["step_spans"] = _spans(100.0, 213.0), _spans(103.5, 213.0)
    p = aggregate_point(apart, shared_device=True)
    assert p["steps_overlap_per_rank"] == [0.0, 0.0] and "not_comparable" in p
    assert "not_comparable" not in aggregate_point(apart, shared_device=False)   # GPUs of their own
    together = [_rank(0, 8192, 445.0), _rank(1, 8192, 445.0)]
    together[0]["step_spans"], together[1]["step_spans"] = _spans(200.0, 445.0), _spans(200.01, 445.0)
    q = aggregate_point(together, shared_device=True)
    assert q["steps_overlap"] == pytest.approx(1.0, abs=0.02) and "not_comparable" not in q
    # 4x: the light rank finishes first; every one of its steps ran beside the heavy rank's
    light = [_rank(0, 8192, 213.0), _rank(1, 2048, 100.0)]
    light[0]["step_spans"], light[1]["step_spans"] = _spans(300.0, 213.0), _spans(300.0, 100.0)
    assert "not_comparable" not in aggregate_point(light, shared_device=True)

    r = _results()
    r["modes"]["dwdp"]["points"]["equal/1000"].update(p)   # DWDP's equal point ran apart
    g = goals(r, LAYERS)
    near = g["dwdp_within_5pct_of_replicated"]
    assert near["met"] is False and near["points"][0]["missed"].startswith("not comparable")
    r["goals"] = g
    text = summary_markdown(r)
    row = next(line for line in text.splitlines() if line.startswith("| equal/1000 |"))
    assert "not overlapped" in row and " *" in row and "dwdp equal/1000" in text
