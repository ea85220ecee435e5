"""One rank of the host-tier multi-rank tests: real processes, a real SIGKILL, CPU memory
(memfd pages under the composite view, the default; shm under ``--view multi``).

Launched by tests/multirank/test_tiers_multirank.py (and, with ``--device cuda``, by
tests/gpu/test_tiers_gpu.py: CUDA IPC, ranks may share one GPU) as plain processes meeting
through the TCP rendezvous (mpirun would abort the job when a rank dies). Rank 1 is the victim; the others
survive. Ranks coordinate through files in ``--sync`` (``die``: the victim SIGKILLs itself;
``done``: the survivors are finished).

  failover --kill-at prefetch   rank 0 orders the kill right after start_step queued copies
                                from rank 1, waits until it is down, finishes the step:
                                end_step must ask for a retry; the retried step is exact
  failover --kill-at compute    the same, the kill lands between weights() and done()
  rejoin                        rank 1 is killed, survivors fail over; the test restarts it
                                (``--restarted``): it restores its slice from the host store,
                                rejoins, and survivors take it back; everyone's views stay exact
  corrupt                       rank 0 flips one byte of the store in rank 1's part, then rank 1
                                dies: rank 0's failover must fail, naming the checksum

A step whose end_step asked for a retry may have read a dying process: its views are not
judged. Every other step's views must equal the byte ramps exactly. Prints
``SCENARIO <name> rank=<r> OK ...`` or ``... FAILED <error>``.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time

import torch

from dwdp_rank import LAYERS, TENSORS, expected, page_tensors

from tensorrt_llm_dwdp.dwdp.config import DwdpConfig
from tensorrt_llm_dwdp.dwdp.errors import DwdpError, DwdpStepRetry
from tensorrt_llm_dwdp.dwdp.manager import DwdpManager

VICTIM = 1
WAIT_S = 60.0


def wait_for(cond, what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:g} s for {what}")
        time.sleep(0.01)


def flag(sync: str, name: str) -> str:
    return os.path.join(sync, name)


def raise_flag(sync: str, name: str) -> None:
    open(flag(sync, name), "w").close()


def register(mgr: DwdpManager, w: int) -> None:
    lo, _ = mgr.layout.owned_range()
    for layer in LAYERS:
        if mgr.restores_experts:
            tensors = mgr.restore_layer(layer)
            for name_id, (name, t) in enumerate(tensors.items()):
                raw = t.view(torch.uint8).view(w, -1).cpu()
                if not torch.equal(raw, expected(layer, name_id, lo, w, raw.shape[1])):
                    raise AssertionError(f"restored layer {layer} {name} differs")
        else:
            tensors = {}
            for name_id, (name, (dtype, tail)) in enumerate(TENSORS.items()):
                t = mgr.allocate((w,) + tail, dtype)
                raw = t.view(torch.uint8).view(w, -1)
                raw.copy_(expected(layer, name_id, lo, w, raw.shape[1]).to(raw.device))
                tensors[name] = t
        mgr.register_layer(layer, tensors)


def check(view: dict, layer: int, e: int) -> list[str]:
    bad = []
    for name_id, name in enumerate(TENSORS):
        whole = torch.cat([x.view(torch.uint8).reshape(x.shape[0], -1).cpu() for x in view[name]])
        if not torch.equal(whole, expected(layer, name_id, 0, e, whole.shape[1])):
            bad.append(f"layer {layer} {name}")
    return bad


def step(mgr: DwdpManager, e: int, hook=None) -> bool:
    """One step; ``hook(i)`` runs after weights() of layer i. True if it must be retried."""
    mgr.start_step()
    bad = []
    for i, layer in enumerate(LAYERS):
        bad += check(mgr.weights(layer), layer, e)
        if hook is not None:
            hook(i)
        mgr.done(layer)
    try:
        mgr.end_step()
    except DwdpStepRetry:
        return True
    if bad:
        raise AssertionError(f"rank {mgr.rank}: a completed step read wrong bytes: {bad}")
    return False


def victim_loop(mgr: DwdpManager, e: int, sync: str) -> None:
    """Step until told to die, then SIGKILL this process. (Its memory is not garbled first: a
    process writing garbage while alive is no failure a liveness check can see; that survivors
    stop reading a dead peer is shown in tests/unit/test_manager_tiers.py, which garbles the
    memory after the death.)"""
    while True:
        if os.path.exists(flag(sync, "die")):
            print(f"SCENARIO victim rank={mgr.rank} DYING pid={os.getpid()}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        step(mgr, e)
        time.sleep(0.005)


def survive(mgr: DwdpManager, e: int, until, extra_steps: int = 3) -> int:
    """Step until ``until()``, then ``extra_steps`` more; returns the retried steps."""
    retried = 0
    deadline = time.monotonic() + WAIT_S
    while not until():
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {mgr.rank}: condition not reached in {WAIT_S:g} s "
                               f"(events {[ev.message for ev in mgr.tier_events]})")
        retried += step(mgr, e)
    for _ in range(extra_steps):
        retried += step(mgr, e)
    return retried


def run(args) -> str:
    size = args.size
    e = args.w + (size - 1) * args.p
    view = {"expert_view": args.view} if args.view else {}  # default: the config's
    config = DwdpConfig(dwdp_size=size, num_experts_per_worker=args.w, num_prefetch_experts=args.p,
                        peer_timeout_s=WAIT_S, host_backup=True, heartbeat_interval_s=0.2,
                        peer_dead_after_s=30.0, **view)
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["TRTLLM_DWDP_RANK"]) % torch.cuda.device_count())
        torch.cuda.set_device(device)
    with DwdpManager.from_environment(config, e, device) as mgr:
        register(mgr, args.w)
        mgr.exchange()
        mgr.poison_buffers(0xA5)
        rank, sync = mgr.rank, args.sync
        if args.restarted:
            survive(mgr, e, lambda: os.path.exists(flag(sync, "done")), extra_steps=0)
            return f"rejoined events={[ev.kind for ev in mgr.tier_events]}"
        step(mgr, e)
        if rank == VICTIM:
            victim_loop(mgr, e, sync)
        down = lambda: mgr.peer_down(VICTIM) is not None  # noqa: E731
        if args.scenario == "failover" and rank == 0:
            def kill(i: int) -> None:
                if args.kill_at == "compute" and i == 0:
                    raise_flag(sync, "die")
                    wait_for(down, "rank 1 to die")
            mgr.start_step()
            if args.kill_at == "prefetch":
                raise_flag(sync, "die")
                wait_for(down, "rank 1 to die")
            for i, layer in enumerate(LAYERS):
                mgr.weights(layer)
                kill(i)
                mgr.done(layer)
            try:
                mgr.end_step()
                raise AssertionError("end_step did not ask for a retry after the peer died")
            except DwdpStepRetry:
                pass
            retried = 1 + survive(mgr, e, lambda: True)
        elif args.scenario == "corrupt" and rank == 0:
            lo = mgr.layout.owned_range(VICTIM)[0]
            store = mgr._host.store.experts(0, "w2_weight", lo + args.p, 1)
            store[0, 3] = int(store[0, 3]) ^ 0x40
            raise_flag(sync, "die")
            wait_for(down, "rank 1 to die")
            try:
                step(mgr, e)
            except DwdpError as exc:
                mgr.abort_step()
                return "detected " + str(exc).replace("\n", " | ")
            raise AssertionError("a corrupt host store was not detected")
        elif args.scenario == "rejoin":
            if rank == 0:
                raise_flag(sync, "die")
            retried = survive(mgr, e, lambda: mgr.stats.rejoins == 1)
            raise_flag(sync, f"survived{rank}")
            wait_for(lambda: all(os.path.exists(flag(sync, f"survived{r}"))
                                 for r in range(size) if r != VICTIM), "the other survivors")
            raise_flag(sync, "done")
        else:
            retried = survive(mgr, e, lambda: bool(mgr.tier_events))
        st = mgr.stats
        if st.failovers != 1 or mgr.tier_events[0].kind != "failover":
            raise AssertionError(f"rank {rank}: failovers {st.failovers}, events "
                                 f"{[ev.message for ev in mgr.tier_events]}")
        return (f"failovers={st.failovers} retries={st.step_retries} retried={retried} "
                f"rejoins={st.rejoins} host_bytes={st.host_bytes_copied} "
                f"events={[ev.kind for ev in mgr.tier_events]}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scenario", required=True, choices=["failover", "rejoin", "corrupt"])
    ap.add_argument("--kill-at", default="compute", choices=["prefetch", "compute"])
    ap.add_argument("--restarted", action="store_true")
    ap.add_argument("--sync", required=True)
    ap.add_argument("--size", type=int, default=3)
    ap.add_argument("--w", type=int, default=4)
    ap.add_argument("--p", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--view", default=None, choices=["multi", "composite"],
                    help="expert view (default: dwdp_config's default)")
    ap.add_argument("--page-size", type=int, default=4096,
                    help="experts sized on and around this many bytes, so the composite view's "
                    "pool pages (and not only its edges) carry a dead peer's experts")
    args = ap.parse_args()
    TENSORS.clear()
    TENSORS.update(page_tensors(args.page_size))
    rank = int(os.environ["TRTLLM_DWDP_RANK"])
    try:
        result = run(args)
        print(f"SCENARIO {args.scenario} rank={rank} OK {result}", flush=True)
    except (DwdpError, AssertionError, TimeoutError) as exc:
        text = str(exc).replace("\n", " | ")
        print(f"SCENARIO {args.scenario} rank={rank} FAILED {type(exc).__name__}: {text}",
              flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
