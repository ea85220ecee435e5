"""The main job: DWDP ranks prefill unequal prompt batches, decode a few tokens, and the run is
checked bit for bit against one rank that holds every expert.

Split in three: ``run_rank`` (one process: load the slice, exchange handles, generate, save
logits), ``run_reference`` (one process, all experts, the same batches), and pure helpers
(prompt assignment, parity, the report) that the tests exercise on their own.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass

import torch

logger = logging.getLogger(__name__)

# Unequal lengths on purpose: the ranks get different prefill loads and never wait on each other.
DEMO_PROMPTS = (
    "Distributed weight data parallelism keeps a slice of every expert on each GPU.",
    "Q: What is 17 times 23? A:",
    "The quick brown fox jumps over the lazy dog. " * 6,
    "Mixture-of-experts layers route each token to a few experts chosen by a learned gate; "
    "the experts a rank lacks are copied from its peers while an earlier layer computes.",
    "Hello",
    "Prefill workers of a disaggregated deployment see sequence lengths that vary widely, "
    "so a collective in the forward pass would make the short ones wait for the long ones. " * 2,
    "1 2 3 4 5 6 7 8 9 10 11 12",
    "NVLink moves the missing experts into a ping-pong buffer on a copy stream.",
)


@dataclass(frozen=True)
class RankReport:
    """What one rank measured; serialised to ``rank{r}.json``."""

    rank: int
    device: str
    num_prompts: int
    prefill_tokens: int
    prefill_seconds: float
    decode_tokens: int
    decode_seconds: float
    expert_bytes_local: int
    expert_bytes_buffers: int
    expert_bytes_replicated: int
    prefetch_bytes: int
    stall_ms_per_layer: float
    copy_ms_per_layer: float
    outputs: list[list[int]]

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds else 0.0


@dataclass(frozen=True)
class Parity:
    tokens_equal: bool
    logits_bitwise_equal: bool
    max_abs_diff: float
    compared_steps: int


def assign_prompts(num_prompts: int, num_ranks: int) -> list[list[int]]:
    """Round-robin prompt indices to ranks (rank r gets r, r+S, ...): unequal loads per rank."""
    if num_ranks < 1:
        raise ValueError(f"num_ranks must be >= 1, got {num_ranks}")
    return [list(range(r, num_prompts, num_ranks)) for r in range(num_ranks)]


def compare_logits(ours: list[list[torch.Tensor]], ref: list[list[torch.Tensor]]) -> tuple[bool, float, int]:
    """Per prompt, per step logits: (all bitwise equal, max |diff|, steps compared)."""
    if len(ours) != len(ref):
        raise ValueError(f"parity: {len(ours)} prompts against {len(ref)} in the reference")
    equal, worst, steps = True, 0.0, 0
    for i, (a_steps, b_steps) in enumerate(zip(ours, ref)):
        if len(a_steps) != len(b_steps):
            raise ValueError(f"parity: prompt {i} has {len(a_steps)} steps against {len(b_steps)}")
        for a, b in zip(a_steps, b_steps):
            steps += 1
            if not torch.equal(a, b):
                equal = False
                worst = max(worst, float((a.double() - b.double()).abs().max()))
    return equal, worst, steps


def format_report(reports: list[RankReport], parity: Parity | None) -> str:
    lines = ["rank  device    prompts  prefill tok  prefill tok/s  expert MiB (local+buf / replicated)"
             "  prefetch MiB  stall ms/layer  copy ms/layer"]
    mib = 1 << 20
    for r in reports:
        local = (r.expert_bytes_local + r.expert_bytes_buffers) / mib
        lines.append(
            f"{r.rank:>4}  {r.device:<8}  {r.num_prompts:>7}  {r.prefill_tokens:>11}  "
            f"{r.prefill_tokens_per_s:>13.1f}  {local:>12.2f} / {r.expert_bytes_replicated / mib:<10.2f}"
            f"  {r.prefetch_bytes / mib:>12.2f}  {r.stall_ms_per_layer:>14.3f}  {r.copy_ms_per_layer:>13.3f}"
        )
    if parity is not None:
        verdict = "PASS" if parity.tokens_equal and parity.logits_bitwise_equal else "FAIL"
        lines.append(
            f"parity vs one rank holding all experts: {verdict} (greedy tokens equal: "
            f"{parity.tokens_equal}; logits bitwise equal: {parity.logits_bitwise_equal} over "
            f"{parity.compared_steps} steps; max |diff| {parity.max_abs_diff:.3g})"
        )
    return "\n".join(lines)


def pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda requested but torch sees no CUDA GPU")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if requested == "cpu":
        return torch.device("cpu")
    raise ValueError(f"device must be auto, cpu or cuda, got {requested!r}")


def local_rank_from_env() -> int:
    for key in ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID", "TRTLLM_DWDP_RANK"):
        if key in os.environ:
            return int(os.environ[key])
    return 0


def generate_with_logits(model, prompts: list[list[int]], *, max_tokens: int, device,
                         dwdp=None, progress_desc: str | None = None):
    """All prompts in one engine (one prefill step if they fit), greedy, logits recorded."""
    from tensorrt_llm_dwdp.executor import Engine, Request
    from tensorrt_llm_dwdp.scheduler import SamplingParams

    max_len = max(len(p) for p in prompts) + max_tokens + 1
    engine = Engine(model, dwdp=dwdp, max_seqs=len(prompts), max_seq_len=max_len,
                    max_batch_tokens=sum(len(p) for p in prompts), device=device,
                    record_logits=True)
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    ids = [f"p{i}" for i in range(len(prompts))]
    for rid, prompt in zip(ids, prompts):
        engine.add_request(Request(rid, prompt, params))
    outputs = {rid: [] for rid in ids}
    bar = _progress(max_tokens, progress_desc)
    while engine.has_work():
        for ev in engine.step():
            outputs[ev.request_id].append(ev.token_id)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return [outputs[r] for r in ids], [engine.logits[r] for r in ids], engine.stats


def _progress(total: int, desc: str | None):
    if desc is None:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", leave=False)


def write_rank_outputs(out_dir: str, name: str, report: RankReport | None, outputs, logits) -> None:
    os.makedirs(out_dir, exist_ok=True)
    torch.save({"outputs": outputs, "logits": logits}, os.path.join(out_dir, f"{name}.pt"))
    if report is not None:
        with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
            json.dump(asdict(report), f, indent=1)


def read_rank_report(path: str) -> RankReport:
    with open(path) as f:
        return RankReport(**json.load(f))
