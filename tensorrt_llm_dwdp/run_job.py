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
from dataclasses import asdict, dataclass, field

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
    peak_rss_mib: float = 0.0
    host_prefetch_bytes: int = 0
    tier_events: list[str] = field(default_factory=list)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds else 0.0


@dataclass(frozen=True)
class Parity:
    tokens_equal: bool
    logits_bitwise_equal: bool
    max_abs_diff: float
    compared_steps: int


def synthetic_prompts(lengths: list[int], vocab_size: int, seed: int = 0) -> list[list[int]]:
    """Prompts of exactly ``lengths`` tokens, uniform over the vocabulary, a function of
    (seed, prompt index): what ``run --prompt-lengths`` prefills."""
    if not lengths or min(lengths) < 1:
        raise ValueError(f"prompt lengths must be >= 1, got {lengths}")
    out = []
    for i, n in enumerate(lengths):
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        out.append(torch.randint(0, vocab_size, (n,), generator=g).tolist())
    return out


def peak_rss_mib() -> float:
    """This process's peak resident memory (Linux ``ru_maxrss`` is in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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
             "  prefetch MiB  stall ms/layer  copy ms/layer  peak RSS MiB"]
    mib = 1 << 20
    for r in reports:
        local = (r.expert_bytes_local + r.expert_bytes_buffers) / mib
        lines.append(
            f"{r.rank:>4}  {r.device:<8}  {r.num_prompts:>7}  {r.prefill_tokens:>11}  "
            f"{r.prefill_tokens_per_s:>13.1f}  {local:>12.2f} / {r.expert_bytes_replicated / mib:<10.2f}"
            f"  {r.prefetch_bytes / mib:>12.2f}  {r.stall_ms_per_layer:>14.3f}  {r.copy_ms_per_layer:>13.3f}"
            f"  {r.peak_rss_mib:>12.0f}"
        )
    for r in reports:
        lines += list(r.tier_events)
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
                         dwdp=None, progress_desc: str | None = None,
                         max_num_tokens: int | None = None, before_step=None,
                         cuda_graphs: bool = False):
    """All prompts in one engine, greedy, logits recorded (decode from CUDA graphs with
    ``cuda_graphs``, where the engine can). Prefill steps hold up to
    ``max_num_tokens`` tokens (longer prompts are chunked); None: all prompts in one step.
    ``before_step(k)`` runs before the k-th step (1-based; failure injection)."""
    from tensorrt_llm_dwdp.engine.executor import Engine, Request
    from tensorrt_llm_dwdp.engine.scheduler import SamplingParams

    max_len = max(len(p) for p in prompts) + max_tokens + 1
    check_context_length(model.config, max_len)
    engine = Engine(model, dwdp=dwdp, max_seqs=len(prompts), max_seq_len=max_len,
                    max_batch_tokens=max_num_tokens or sum(len(p) for p in prompts), device=device,
                    record_logits=True, cuda_graphs=cuda_graphs)
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    ids = [f"p{i}" for i in range(len(prompts))]
    for rid, prompt in zip(ids, prompts):
        engine.add_request(Request(rid, prompt, params))
    outputs = {rid: [] for rid in ids}
    bar = _progress(max_tokens, progress_desc)
    step = 0
    while engine.has_work():
        step += 1
        if before_step is not None:
            before_step(step)
        events = engine.step()
        for ev in events:
            outputs[ev.request_id].append(ev.token_id)
        if bar is not None and events:  # a chunk of a long prompt emits no token
            bar.update(1)
    if bar is not None:
        bar.close()
    return [outputs[r] for r in ids], [engine.logits[r] for r in ids], engine.stats


def check_context_length(config, max_seq_len: int) -> None:
    """Refuse sequences longer than the model's positions (RoPE past them is untrained)."""
    if max_seq_len > config.max_position_embeddings:
        raise ValueError(f"sequences of up to {max_seq_len} tokens (prompt + max_tokens + 1) exceed "
                         f"the model's max_position_embeddings={config.max_position_embeddings}")


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


def partition_config(num_experts: int, ranks: int, experts_per_worker: int | None = None,
                     prefetch_experts: int | None = None, *, contention_opt: bool = False,
                     expert_view: str | None = None, **tiers):
    """A DwdpConfig for ``ranks`` ranks; by default a disjoint partition (W = P = E / ranks).
    ``expert_view``: None for dwdp_config's default; ``tiers``: host tier keys
    (``host_backup``, ``host_experts_per_worker``, ``host_offload``)."""
    from tensorrt_llm_dwdp.dwdp.config import DwdpConfig, DwdpConfigError

    if expert_view is not None:
        tiers["expert_view"] = expert_view
    if ranks == 1:
        return DwdpConfig(dwdp_size=1, **tiers)
    w = experts_per_worker
    if w is None:
        if num_experts % ranks:
            raise DwdpConfigError(f"{num_experts} experts do not split evenly over {ranks} ranks; "
                                  "give --experts-per-worker and --prefetch-experts")
        w = num_experts // ranks
    p = prefetch_experts
    if p is None:
        if (num_experts - w) % (ranks - 1):
            raise DwdpConfigError(f"E - W = {num_experts - w} is not a multiple of ranks - 1 = "
                                  f"{ranks - 1}; give --prefetch-experts")
        p = (num_experts - w) // (ranks - 1)
    return DwdpConfig(dwdp_size=ranks, num_experts_per_worker=w, num_prefetch_experts=p,
                      contention_opt=contention_opt, **tiers)


def write_dwdp_yaml(config, path: str) -> None:
    import yaml

    with open(path, "w") as f:
        yaml.safe_dump({"dwdp_config": config.to_dict()}, f, sort_keys=False)


def cache_dir(override: str | None = None) -> str:
    return override or os.environ.get("TRTLLM_DWDP_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "tensorrt_llm_dwdp")


def ensure_checkpoint(preset: str, num_layers: int, quant: str, vocab_size: int | None,
                      cache_override: str | None = None, *, dense_layers: int | None = None) -> str:
    """Path of a synthetic checkpoint for these settings, written once and then reused while
    its config.json equals the preset's (a preset that changed rebuilds it).

    Written into a temporary folder and renamed, so an interrupted build is never reused.
    """
    import shutil

    from tensorrt_llm_dwdp.model.presets import get_preset
    from tensorrt_llm_dwdp.model.synthetic import synthetic_config, write_synthetic_checkpoint

    overrides = {}
    if dense_layers is not None:
        hf = get_preset(preset)
        if "first_k_dense_replace" not in hf:
            raise ValueError(f"--dense-layers applies to DeepSeek presets; {preset!r} has no "
                             "first_k_dense_replace")
        if not 0 <= dense_layers < num_layers:
            raise ValueError(f"--dense-layers must be in [0, num_layers={num_layers}), got {dense_layers}")
        overrides["first_k_dense_replace"] = dense_layers
    hf = get_preset(preset, num_layers=num_layers, vocab_size=vocab_size, overrides=overrides)
    tag = (f"{preset}-L{num_layers}-{quant}" + (f"-V{vocab_size}" if vocab_size else "")
           + (f"-D{dense_layers}" if dense_layers is not None else ""))
    final = os.path.join(cache_dir(cache_override), "checkpoints", tag)
    if os.path.isfile(os.path.join(final, "config.json")):
        with open(os.path.join(final, "config.json"), encoding="utf-8") as f:
            stored = json.load(f)
        expected = {**hf, **{k: v for k, v in synthetic_config(hf, quant).items()
                             if k == "quantization_config"}}
        if stored == json.loads(json.dumps(expected)):
            logger.info("reusing synthetic checkpoint %s", final)
            return final
        changed = sorted(k for k in set(stored) | set(hf) if stored.get(k) != hf.get(k))
        logger.info("synthetic checkpoint %s was built from an older preset (%s differ); rebuilding",
                    final, changed)
    tmp = f"{final}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    logger.info("writing synthetic checkpoint %s (first run only)", final)
    write_synthetic_checkpoint(tmp, hf, quant=quant, seed=0)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    stale = f"{final}.stale-{os.getpid()}"
    if os.path.isdir(final):
        os.rename(final, stale)  # readers of the old checkpoint keep their open files
    try:
        os.rename(tmp, final)
    except OSError:  # another run finished the same checkpoint first
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(stale, ignore_errors=True)
    return final


def reference_parity(model_dir: str, out_dir: str, groups: list[list[list[int]]], *,
                     max_tokens: int, device: str, moe_backend: str, cpu_threads: int = 1,
                     max_num_tokens: int | None = None,
                     skip: frozenset[int] = frozenset(), cuda_graphs: bool = False) -> Parity:
    """Run each rank's prompt batch on one rank holding every expert, with the same steps
    (same ``max_num_tokens`` chunking); compare bit for bit. Ranks in ``skip`` (killed on
    purpose) have no outputs to compare. ``cuda_graphs`` as the ranks had it (a graphed decode
    step attends over a padded context: same bits only against a graphed one). The reference loads the backend's own weight layout
    whatever the ranks used (``run --weight-layout``): with a torch backend, ranks told to keep
    preshuffled experts are checked against the linear path too."""
    from tensorrt_llm_dwdp.model.checkpoint import load_model

    dev = pick_device(device, 0)
    if dev.type == "cpu":
        torch.set_num_threads(cpu_threads)
    model = load_model(model_dir, device=dev, moe_backend=moe_backend, dwdp=None)
    tokens_equal, bitwise, worst, steps = True, True, 0.0, 0
    for rank, prompts in enumerate(groups):
        if not prompts or rank in skip:
            continue
        outputs, logits, _ = generate_with_logits(model, prompts, max_tokens=max_tokens, device=dev,
                                                  progress_desc=f"reference for rank {rank}",
                                                  max_num_tokens=max_num_tokens,
                                                  cuda_graphs=cuda_graphs)
        saved = torch.load(os.path.join(out_dir, f"rank{rank}.pt"))
        tokens_equal &= saved["outputs"] == outputs
        eq, w, n = compare_logits(saved["logits"], logits)
        bitwise &= eq
        worst = max(worst, w)
        steps += n
        write_rank_outputs(out_dir, f"reference{rank}", None, outputs, logits)
    return Parity(tokens_equal, bitwise, worst, steps)


def local_expert_bytes(model) -> tuple[int, int]:
    """(bytes of this rank's expert tensors, bytes of one expert summed over MoE layers)."""
    local, per_expert = 0, 0
    for moe in model.moe_modules().values():
        weights = moe.local_weights
        layer = sum(t.numel() * t.element_size() for ts in weights.tensors.values() for t in ts)
        local += layer
        per_expert += layer // weights.num_experts
    return local, per_expert


def rank_report(rank: int, device, prompts, outputs, engine_stats, manager, model) -> RankReport:
    local, per_expert = local_expert_bytes(model)
    stats = manager.stats
    return RankReport(
        rank=rank, device=str(device), num_prompts=len(prompts),
        prefill_tokens=engine_stats.prefill_tokens if engine_stats else 0,
        prefill_seconds=engine_stats.prefill_seconds if engine_stats else 0.0,
        decode_tokens=engine_stats.decode_tokens if engine_stats else 0,
        decode_seconds=engine_stats.decode_seconds if engine_stats else 0.0,
        expert_bytes_local=local, expert_bytes_buffers=manager.buffer_bytes,
        expert_bytes_replicated=per_expert * manager.num_experts,
        prefetch_bytes=stats.bytes_copied,
        stall_ms_per_layer=1e3 * stats.stall_time_s / max(1, stats.waits),
        copy_ms_per_layer=1e3 * stats.copy_time_s / max(1, stats.prefetches),
        outputs=outputs, peak_rss_mib=peak_rss_mib(),
        host_prefetch_bytes=stats.host_bytes_copied,
        tier_events=[event.message for event in manager.tier_events])
