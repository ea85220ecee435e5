"""Decode TPOT of the engine, eager vs CUDA-graphed, on a DeepSeek-V3-shaped model slice.

    python bench/decode_tpot.py --out bench/results/decode_tpot_h100.json

The model: the deepseek-v3 preset's 3 dense layers then ``--num-moe-layers`` (2) MoE layers
with shared experts, real sizes, a 1024-token vocabulary (``--vocab-size``), NVFP4 routed
experts on the cutedsl backend (``bench/e2e_model.py``, all experts on this GPU). For each
concurrency (``--concurrency``, default 1 and 16) and mode (eager, graphed) one engine runs that
many requests of ``--prompt-len`` (512) random tokens to ``--output-len`` (64) tokens, greedy,
all decoding together: TPOT = the engine's decode wall time per step (each step ends with its
tokens on the host), from its step log. A first, shorter run on the same engine captures its
graphs (and compiles every kernel) first, so a measured run only replays. Repeated ``--reps``
times: median, min, max. Also per step: CUDA-event time (``device_ms``) and the host share
(``wall - device``), and for graphed engines the graphs' capture seconds and pool growth.
Goal (issue): TPOT <= 4 ms at concurrency 16 on one GPU.
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys

import torch

sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])

from bench.json_out import emit  # noqa: E402


def _stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _run(engine, prompts: list[list[int]], output_len: int) -> list:
    """Generate; the decode steps' records of this run."""
    from tensorrt_llm_dwdp.engine.scheduler import SamplingParams

    last = engine.stats.step_count - 1  # the index of the step before this run's first
    engine.generate(prompts, SamplingParams(max_tokens=output_len, ignore_eos=True))
    return [s for s in engine.stats.steps_after(last) if s.kind == "decode"]


def measure(model, *, concurrency: int, graphed: bool, prompt_len: int, output_len: int,
            reps: int, max_seqs: int, seed: int, device: str) -> dict:
    from tensorrt_llm_dwdp.engine.executor import Engine

    rng = random.Random(seed)
    vocab = model.config.vocab_size
    engine = Engine(model, max_seqs=max_seqs, max_seq_len=prompt_len + output_len + 1,
                    max_batch_tokens=max(8192, prompt_len * concurrency), device=device,
                    cuda_graphs=graphed)

    def prompts():
        return [[rng.randrange(vocab) for _ in range(prompt_len)] for _ in range(concurrency)]

    _run(engine, prompts(), 4)  # warm-up: kernels compiled, this bucket's graph captured
    tpot, device, host = [], [], []
    for _ in range(reps):
        steps = _run(engine, prompts(), output_len)
        wall = [s.wall_s * 1e3 for s in steps]
        dev = [(s.device_s if s.device_s is not None else s.wall_s) * 1e3 for s in steps]
        tpot.append(statistics.mean(wall))
        device.append(statistics.mean(dev))
        host.append(statistics.mean(w - d for w, d in zip(wall, dev)))
    row = {"concurrency": concurrency, "mode": "graphed" if graphed else "eager",
           "decode_steps_per_run": len(steps), "tpot_ms": _stats(tpot),
           "device_ms_per_step": _stats(device), "wall_minus_device_ms": _stats(host)}
    if engine.graphs is not None:
        st = engine.graphs.stats
        row["graphs"] = {"captured": st.graphs, "capture_seconds": st.capture_seconds,
                         "pool_mib": st.pool_bytes / 2**20, "replays": st.replays,
                         "buckets": list(engine.graphs.buckets)}
    elif graphed:
        row["graphs"] = None  # the engine could not capture (logged why)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None)
    p.add_argument("--preset", default="deepseek-v3")
    p.add_argument("--num-moe-layers", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=1024,
                   help="default 1024, as the serving benches' DeepSeek-V3-shaped checkpoints "
                        "(0: the preset's own, 129280 for deepseek-v3)")
    p.add_argument("--moe-backend", default="cutedsl")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--concurrency", default="1,16")
    p.add_argument("--modes", default="eager,graphed")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda", help="cuda; cpu only as a dry run of the script")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("decode_tpot: needs a CUDA GPU (--device cpu for a dry run)", file=sys.stderr)
        return 2
    from bench.e2e_model import bench_config, build_bench_model
    from tensorrt_llm_dwdp.model.presets import get_preset
    from tensorrt_llm_dwdp.moe.backends import get_backend, warm_up_model

    vocab = args.vocab_size or int(get_preset(args.preset)["vocab_size"])
    config = bench_config(args.preset, args.num_moe_layers, vocab)
    backend = get_backend(args.moe_backend)
    built = build_bench_model("replicated", config, device=torch.device(args.device), backend=backend,
                              rank=0, world_size=1, seed=args.seed)
    model = built.model
    compiled = warm_up_model(model)
    levels = [int(c) for c in args.concurrency.split(",")]
    result = {"bench": "decode_tpot",
              "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "torch": torch.__version__, "preset": args.preset,
              "layers": {"dense": config.num_layers - len(config.moe_layer_indices),
                         "moe": len(config.moe_layer_indices)},
              "vocab_size": vocab, "moe_backend": args.moe_backend, "prompt_len": args.prompt_len,
              "output_len": args.output_len, "reps": args.reps, "kernels_compiled": compiled,
              "model_gib": built.loaded_bytes / 2**30, "rows": []}
    for mode in args.modes.split(","):
        for c in levels:
            result["rows"].append(measure(model, concurrency=c, graphed=mode == "graphed",
                                          prompt_len=args.prompt_len, output_len=args.output_len,
                                          reps=args.reps, max_seqs=max(levels), seed=args.seed,
                                          device=args.device))
            emit(result, args.out, quiet=True)
    at16 = [r for r in result["rows"] if r["concurrency"] == 16 and r["mode"] == "graphed"]
    if at16:
        result["goal_tpot_le_4ms_at_16"] = at16[0]["tpot_ms"]["median"] <= 4.0
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
