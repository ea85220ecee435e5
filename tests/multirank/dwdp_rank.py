"""One rank of the DWDP multi-rank tests (shm transport on CPU; CUDA IPC with --device cuda).

Launched by tests/multirank/test_dwdp_multirank.py (mpirun, or plain processes for --comm tcp)
and by tests/gpu/test_cuda_ipc_multirank.py. Runs the scenarios given by --scenarios in order,
in one process (torch imports once), each with a fresh group:

  ok           every rank's view equals experts [0, E) bit for bit, several steps
  contention   the same with contention_opt (interleaved slices, one batched copy on GPUs)
  shape        the last rank registers one tensor with another shape      -> all ranks fail
  config       the last rank has another dwdp_config                     -> all ranks fail
  names        rank 0 leaves one tensor out of one layer                 -> all ranks fail
  badtensor    rank 0 registers a tensor not in shared memory            -> all ranks fail
  die          the last rank exits (os._exit) right before the exchange  -> others fail in time
  never        the last rank never arrives                               -> others fail in time
  fdfail       (composite) the last rank's descriptor server is gone     -> all ranks fail

``--view composite`` runs the scenarios over composite views (``--tensors pages --page-size N``:
per-expert sizes on and around N bytes): besides the multi-tensor slices,
every layer's ``composite_weights`` tensor must equal experts [0, E) with expert e at byte
``e * expert_bytes`` of one range, the prefetch moves exactly the bytes on pool pages, and after
close nothing of ours is mapped (/proc/self/maps) or left in /dev/shm.

Prints ``SCENARIO <name> rank=<r> OK ...`` or ``SCENARIO <name> rank=<r> FAILED <error>`` per
scenario (expected failures are not a failed run), exits 0 unless a check went wrong.
Every (layer, tensor, expert) gets a unique byte ramp and buffers are poisoned first.
"""
from __future__ import annotations

import argparse
import functools
import gc
import glob
import os
import sys
import time

import torch

from tensorrt_llm_dwdp.comm import connect
from tensorrt_llm_dwdp.dwdp.config import DwdpConfig
from tensorrt_llm_dwdp.dwdp.errors import DwdpError
from tensorrt_llm_dwdp.dwdp.manager import DwdpManager
from tensorrt_llm_dwdp.moe.specs import NVFP4, expert_specs

LAYERS = (1, 3, 4)  # odd count: the wrap-around alternates buffer parity between steps
# The library's expert tensors (moe/specs.py) at a tiny size, biases included: every dtype the
# manager copies (uint8, e4m3, fp32) and tensors of several row widths.
TENSORS = {name: (spec.dtype, spec.per_expert)
           for name, spec in expert_specs(NVFP4, hidden=16, inter=16, bias=True).items()}


def page_tensors(page: int) -> dict:
    """Per-expert sizes on and around a page (``--tensors pages``): composite ranges whose own
    slice starts and ends mid-page, exactly on a page, one byte either side, and spanning
    pages."""
    return {
        "w3_w1_weight": (torch.uint8, (page,)),
        "w3_w1_weight_scale": (torch.uint8, (page - 1,)),
        "fc31_alpha": (torch.float32, ()),
        "w2_weight": (torch.uint8, (page + 1,)),
        "w2_weight_scale": (torch.bfloat16, (page // 3,)),
        "fc2_alpha": (torch.float32, (3, page // 4)),
        "w2_bias": (torch.uint8, (1,)),
    }


def pattern(layer: int, name_id: int, expert: int, nbytes: int) -> torch.Tensor:
    """A byte ramp unique to (layer, tensor, expert): a misplaced copy differs almost everywhere."""
    key = (layer * 1009 + name_id * 101 + expert * 7) % 251
    return ((torch.arange(nbytes, dtype=torch.int64) * 13 + key) % 251).to(torch.uint8)


@functools.lru_cache(maxsize=None)
def expected(layer: int, name_id: int, first: int, count: int, row: int) -> torch.Tensor:
    return torch.stack([pattern(layer, name_id, first + i, row) for i in range(count)])


def per_expert_bytes() -> int:
    """One expert over all tensors in use (the library's set, or ``--tensors pages``)."""
    return sum(torch.empty((1,) + tail, dtype=dtype).nbytes for dtype, tail in TENSORS.values())


def check_composite(mgr, view, layer: int, rank: int, step: int, num_experts: int) -> None:
    """One range per tensor, expert e at byte e * expert_bytes, equal to experts [0, E)."""
    comp = mgr.composite_weights(layer)
    for name_id, name in enumerate(TENSORS):
        t = comp[name]
        assert t.shape[0] == num_experts and t.is_contiguous(), (name, t.shape)
        eb = t[0].numel() * t.element_size()
        assert all(t[e].data_ptr() == t.data_ptr() + e * eb for e in range(num_experts))
        assert view[name][rank].data_ptr() == t[mgr.layout.owned_range()[0]].data_ptr()
        whole = t.view(torch.uint8).reshape(num_experts, -1).cpu()
        want = expected(layer, name_id, 0, num_experts, whole.shape[1])
        if not torch.equal(whole, want):
            bad = [g for g in range(num_experts) if not torch.equal(whole[g], want[g])]
            raise AssertionError(f"rank {rank} step {step} layer {layer} {name}: composite "
                                 f"experts {bad} differ")


def pool_bytes_copied(mgr) -> int:
    """Bytes one composite prefetch moves: the fetched bytes that lie on pool pages."""
    from tensorrt_llm_dwdp.dwdp.composite_layout import CompositeRange
    from tensorrt_llm_dwdp.dwdp.tiers import source_ranges

    total = 0
    for dtype, tail in TENSORS.values():
        eb = torch.empty((1,) + tail, dtype=dtype).nbytes
        r = CompositeRange.of(mgr.layout, eb, mgr.page_bytes)
        total += sum(c.nbytes for c in r.prefetch_copies(source_ranges(mgr.tier_layout)))
    return total


def our_mappings() -> list[str]:
    """Lines of /proc/self/maps naming our composite memory (memfd:trtllm_dwdp)."""
    with open("/proc/self/maps") as f:
        return [line.strip() for line in f if "trtllm_dwdp" in line]


def run(scenario: str, args, size: int, rank_hint: int, device: torch.device) -> str:
    cfg = dict(dwdp_size=size, num_experts_per_worker=args.w, num_prefetch_experts=args.p,
               contention_opt=args.contention_opt or scenario == "contention",
               prefetch_slice_bytes=args.slice_bytes,
               peer_timeout_s=args.timeout, expert_view=args.view,
               view_page_bytes=args.page_bytes)
    last = rank_hint == size - 1
    if scenario == "config" and last:
        cfg["prefetch_slice_bytes"] = args.slice_bytes + 8
    config = DwdpConfig.from_dict(cfg)
    num_experts = args.w + (size - 1) * args.p
    if scenario == "never" and last:
        if "OMPI_COMM_WORLD_RANK" in os.environ:
            from mpi4py import MPI  # noqa: F401  (MPI_Init waits for every rank: pass it)
        time.sleep(args.timeout * 3)  # joins long after everyone gave up
        return "slept"
    with DwdpManager(config, num_experts, connect(config), device) as mgr:
        rank = mgr.rank
        lo, _ = mgr.layout.owned_range()
        for layer in LAYERS:
            tensors = {}
            for name_id, (name, (dtype, tail)) in enumerate(TENSORS.items()):
                shape = (args.w,) + tail
                if scenario == "shape" and last and name == "w2_weight" and layer == 3:
                    shape = (args.w, tail[0], tail[1] + 1)
                t = mgr.allocate(shape, dtype)
                raw = t.view(torch.uint8).view(args.w, -1)
                raw.copy_(expected(layer, name_id, lo, args.w, raw.shape[1]).to(raw.device))
                tensors[name] = t
            if scenario == "names" and rank == 0 and layer == 4:
                tensors.pop("w2_bias")
            if scenario == "badtensor" and rank == 0 and layer == 3:
                dtype, tail = TENSORS["w2_weight"]
                tensors["w2_weight"] = torch.zeros((args.w,) + tail, dtype=dtype)
            mgr.register_layer(layer, tensors)
        if scenario == "die" and last:
            print(f"SCENARIO die rank={rank} EXITING pid={os.getpid()}", flush=True)
            os._exit(0)  # gone right before the exchange, without MPI_Finalize
        if scenario == "fdfail" and last:
            mgr._transport.after_exchange()  # its descriptor server stops before peers ask
        mgr.exchange()
        mapped = mgr.mapped_allocations
        assert 0 < mapped <= (size - 1) * len(LAYERS) * len(TENSORS), mapped
        mgr.poison_buffers(0xA5)
        for step in range(args.steps):
            mgr.start_step()
            for layer in LAYERS:
                view = mgr.weights(layer)
                if device.type == "cuda":
                    torch.cuda.current_stream().synchronize()
                for name_id, name in enumerate(TENSORS):
                    parts = view[name]
                    assert len(parts) == size, (name, len(parts))
                    whole = torch.cat([x.view(torch.uint8).reshape(x.shape[0], -1).cpu()
                                       for x in parts])
                    want = expected(layer, name_id, 0, num_experts, whole.shape[1])
                    if not torch.equal(whole, want):
                        bad = [g for g in range(num_experts) if not torch.equal(whole[g], want[g])]
                        raise AssertionError(
                            f"rank {rank} step {step} layer {layer} {name}: experts {bad} differ")
                if args.view == "composite":
                    check_composite(mgr, view, layer, rank, step, num_experts)
                mgr.done(layer)
        mgr.synchronize()
        stats = mgr.stats
        prefetches = args.steps * len(LAYERS) + 2  # the wrap-around queued two more
        want_bytes = prefetches * (size - 1) * args.p * per_expert_bytes()
        if args.view == "composite":
            want_bytes = prefetches * pool_bytes_copied(mgr)
        assert stats.prefetches == prefetches, (stats.prefetches, prefetches)
        assert stats.bytes_copied == want_bytes, (stats.bytes_copied, want_bytes)
        acquisitions = 2 if args.view == "composite" else 1  # weights() and composite_weights()
        assert stats.waits == acquisitions * args.steps * len(LAYERS), stats.waits
        assert all(layer.copy_time_s > 0 for layer in stats.layers), stats
    assert mgr.mapped_allocations == 0, mgr.mapped_allocations  # close() unmapped every peer
    return f"mapped={mapped} copied={stats.bytes_copied} copy_s={stats.copy_time_s:.6f}"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scenarios", default="ok")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--w", type=int, default=5)
    ap.add_argument("--p", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--contention-opt", action="store_true")
    ap.add_argument("--slice-bytes", type=int, default=40)
    ap.add_argument("--timeout", type=float, default=20.0)
    ap.add_argument("--size", type=int, default=0, help="dwdp_size (default: MPI world size)")
    ap.add_argument("--view", default="multi", choices=["multi", "composite"])
    ap.add_argument("--page-bytes", type=int, default=0, help="composite mapping unit (0: device)")
    ap.add_argument("--tensors", default="small", choices=["small", "pages"],
                    help="per-expert sizes: a few bytes (default) or around --page-size")
    ap.add_argument("--page-size", type=int, default=4096,
                    help="the page --tensors pages sizes its experts around (GPUs: 2097152)")
    args = ap.parse_args()
    if args.tensors == "pages":
        TENSORS.clear()
        TENSORS.update(page_tensors(args.page_size))
    rank = int(os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("TRTLLM_DWDP_RANK", 0)))
    size = args.size or int(os.environ.get("OMPI_COMM_WORLD_SIZE", 1))
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    for scenario in args.scenarios.split(","):
        start = time.monotonic()
        try:
            result = run(scenario, args, size, rank, device)
            print(f"SCENARIO {scenario} rank={rank} OK {result}", flush=True)
        except (DwdpError, ValueError) as exc:
            took = time.monotonic() - start
            text = str(exc).replace("\n", " | ")
            print(f"SCENARIO {scenario} rank={rank} FAILED after {took:.1f}s "
                  f"{type(exc).__name__}: {text}", flush=True)
            if scenario in ("die", "never"):
                os._exit(0)  # a peer is gone: leave without MPI_Finalize waiting on it
        gc.collect()  # tensors over our memory (the caller's weights) are gone by now
        leftover = glob.glob(f"/dev/shm/trtllm_dwdp_{os.getpid()}_*") + our_mappings()
        if leftover:
            print(f"SCENARIO {scenario} rank={rank} LEAKED {leftover}", flush=True)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
