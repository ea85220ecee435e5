"""The expert-parallel serving mode on 2 and 4 CPU ranks (mpirun or the TCP rendezvous; gloo and the shared-memory
exchange) against the replicated model.

Each rank builds its serving worker from an options mapping with ``ep_config`` (E/S experts
loaded, the lockstep engine), and requests arrive unevenly: some ranks start idle and join the
busy ranks' steps with an empty batch, others get work later, one rank gets none at all. Every
request's logits (prefill and greedy decode) must match a replicated engine's (all experts, one
process) within the documented tolerance, and each rank must hold exactly E/S experts per layer.
"""
import os

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
TOL = 3e-2          # logits: max |EP - replicated| / max |replicated| (parallel/expert_parallel.py)
MAX_TOKENS = 3


def _prompts(rank: int) -> list[tuple[int, list[int]]]:
    """(step at which the request arrives, prompt) for ``rank``: rank 0 from the start, rank 1
    two steps later, rank 2 one long prompt late, the last rank of four nothing."""
    g = torch.Generator().manual_seed(rank)

    def prompt(n):
        return torch.randint(3, 500, (n,), generator=g).tolist()
    plan = {0: [(0, prompt(5)), (0, prompt(11)), (3, prompt(2))],
            1: [(2, prompt(7))],
            2: [(4, prompt(19))],
            3: []}
    return plan[rank]


def _worker() -> None:
    from tensorrt_llm_dwdp.engine.executor import Engine, Request
    from tensorrt_llm_dwdp.engine.scheduler import SamplingParams
    from tensorrt_llm_dwdp.model.checkpoint import load_model
    from tensorrt_llm_dwdp.parallel.group import EpRendezvous
    from tensorrt_llm_dwdp.serve.options import ServeOptions, merge_options
    from tensorrt_llm_dwdp.serve.worker import build_worker

    from _ranks import rank_and_size

    rank, world = rank_and_size()
    ckpt, transport, port = os.environ["EP_CKPT"], os.environ["EP_TRANSPORT"], int(os.environ["EP_PORT"])
    device = os.environ.get("EP_DEVICE", "cpu")   # tests/gpu runs this worker with cuda
    base = ServeOptions(model=ckpt, device=device, max_batch_size=4, max_seq_len=64, max_num_tokens=32)
    options = merge_options(base, {"ep_config": {"ep_size": world, "transport": transport,
                                                 "timeout_s": 120}})
    worker = build_worker(options, local_rank=rank, ep_rendezvous=EpRendezvous(rank, "127.0.0.1", port))
    try:
        lock = worker.engine
        lock.engine.record_logits = True
        params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
        pending = sorted(_prompts(rank), key=lambda p: p[0])
        prompts = {}
        step = 0
        while True:
            while pending and pending[0][0] <= step:
                _, p = pending.pop(0)
                rid = f"r{rank}-{len(prompts)}"
                prompts[rid] = p
                lock.add_request(Request(rid, p, params))
            if not lock.group.any(lock.engine.has_work() or bool(pending)):
                break
            lock.step()
            step += 1
        got = lock.engine.logits
        assert set(got) == set(prompts), (sorted(got), sorted(prompts))
        if world == 4:
            assert lock.idle_steps > 0, "some rank must have joined idle"
        # the replicated model, all experts in this process
        ref = Engine(load_model(ckpt, device=lock.device), max_seqs=4, max_seq_len=64,
                     max_batch_tokens=32, device=lock.device, record_logits=True)
        ref_out = ref.generate(list(prompts.values()), params) if prompts else []
        for (rid, _), toks in zip(prompts.items(), ref_out):
            ref_logits = ref.logits[f"gen-0-{list(prompts).index(rid)}"]
            assert len(got[rid]) == MAX_TOKENS
            for i, (a, b) in enumerate(zip(got[rid], ref_logits)):
                err = ((a - b).abs().max() / b.abs().max()).item()
                assert err <= TOL, f"rank {rank} {rid} step {i}: rel err {err}"
                if a.argmax() != b.argmax():   # decode diverged on a near-tie: stop comparing
                    break
        def expert_bytes(model):
            return sum(t.numel() * t.element_size() for m in model.moe_modules().values()
                       for ts in m.local_weights.tensors.values() for t in ts)
        assert expert_bytes(lock.engine.model) * world == expert_bytes(ref.model)
    finally:
        worker.close()
    print(f"rank {rank} ok", flush=True)


@pytest.mark.multirank
@pytest.mark.parametrize("ranks,transport", [(2, "gloo"), (4, "shm")])
def test_ep_serving_matches_replicated(tmp_path, run_ranks_ok, ranks, transport):
    from tensorrt_llm_dwdp.launcher import free_port
    from tensorrt_llm_dwdp.model.presets import get_preset
    from tensorrt_llm_dwdp.model.synthetic import write_synthetic_checkpoint

    write_synthetic_checkpoint(tmp_path, get_preset("tiny-deepseek-v3", num_layers=3), quant="nvfp4",
                               seed=4)
    run_ranks_ok(__file__, ranks=ranks, timeout=240,
                 env={"EP_CKPT": str(tmp_path), "EP_TRANSPORT": transport, "EP_PORT": str(free_port())})


if __name__ == "__main__":
    _worker()
