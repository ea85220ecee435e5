"""Build one serving worker: tokenizer, model (with its DWDP manager or its expert-parallel
group when configured), engine.

The worker owns what it builds and releases it in ``close()`` (the manager unmaps its peers'
memory there; the EP group leaves its process group). ``group`` is the DWDP group this rank
belongs to (an MPI sub-communicator cut by ``disaggregated_mpi_worker``, or one picked from the
environment by ``comm.connect``); ``ep_rendezvous`` where the EP group meets (from mpirun, or
the TCP launch's environment when None). The worker measures its routed experts' memory after
loading (``model/memory.py``) and shows it on ``/metrics`` as ``expert_memory_bytes``, and
compiles every MoE kernel a step can pick before it serves (``moe.backends.warm_up_backends``).
Its KV export pool (``kv_pool.py``, the same-node hand-over of a context server) is sized from
the engine's KV budget; with an explicit ``kv_transfer_pool_bytes`` it is created at start-up.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from tensorrt_llm_dwdp.serve.options import OptionsError, ServeOptions

logger = logging.getLogger(__name__)


@dataclass
class Worker:
    engine: Any
    tokenizer: Any
    model_config: Any
    manager: Any = None
    ep_group: Any = None
    expert_memory_bytes: int = 0
    memory_source: str = ""
    kv_pool: Any = None

    def close(self) -> None:
        kv_pool, self.kv_pool = self.kv_pool, None
        if kv_pool is not None:
            kv_pool.close()
        manager, self.manager = self.manager, None
        if manager is not None:
            manager.close()
        ep_group, self.ep_group = self.ep_group, None
        if ep_group is not None:
            ep_group.close()


def resolve_device(requested: str | None, local_rank: int):
    """``requested`` ("cpu", "cuda", "cuda:N") or, when None, CUDA if present (one GPU per local
    rank) else the CPU."""
    import torch

    from tensorrt_llm_dwdp.run_job import pick_device

    if requested is not None and requested.startswith("cuda:"):
        return torch.device(requested)
    return pick_device(requested or "auto", local_rank)


def build_worker(options: ServeOptions, *, local_rank: int = 0, group: Any = None,
                 ep_rendezvous: Any = None) -> Worker:
    """Load everything ``options`` names. With ``options.dwdp_config`` set, ``group`` (or, when
    None, the group ``comm.connect`` finds in the environment) forms the DWDP group; with
    ``options.ep_config``, ``ep_rendezvous`` (or the environment) the expert-parallel group."""
    from tensorrt_llm_dwdp.engine.executor import Engine
    from tensorrt_llm_dwdp.model import ModelConfig, load_tokenizer
    from tensorrt_llm_dwdp.model.memory import dense_model_bytes, in_use
    from tensorrt_llm_dwdp.serve.kv_pool import KvExportPool

    device = resolve_device(options.device, local_rank)
    if device.type == "cuda":
        import torch

        # Make it the current device too: allocations and IPC handles made without an explicit
        # device (and the engine thread's streams) must land on this rank's GPU.
        torch.cuda.set_device(device)
    model_config = ModelConfig.from_file(options.model)
    if options.max_seq_len > model_config.max_position_embeddings:
        raise OptionsError(f"max_seq_len={options.max_seq_len} exceeds the model's "
                           f"max_position_embeddings={model_config.max_position_embeddings} "
                           f"({options.model}); lower max_seq_len")
    tokenizer = load_tokenizer(options.tokenizer_path)
    manager = ep_group = kv_pool = None
    before = in_use(device)
    try:
        if options.dwdp_config is not None:
            if options.dwdp_config.tiers_enabled:  # refuse before loading: names the numbers
                from tensorrt_llm_dwdp.dwdp.host_store import check_checkpoint_store

                check_checkpoint_store(options.model)
            manager = _make_manager(options, model_config, device, group)
        if options.ep_config is not None:
            ep_group = _make_ep_group(options, model_config, device, ep_rendezvous)
        model = _load_model(options, device, manager, ep_group)
        if manager is not None:
            manager.exchange()  # after every layer registered its experts (load_model's contract)
        expert_bytes = in_use(device) - before - dense_model_bytes(model_config, device)
        _warm_up_kernels(model)
        if options.kv_transfer_pool_bytes != 0:
            kv_pool = KvExportPool(device, options.kv_transfer_pool_bytes)
        engine = Engine(model, dwdp=manager, max_seqs=options.max_batch_size,
                        max_seq_len=options.max_seq_len, max_batch_tokens=options.max_num_tokens,
                        device=device, eos_token_id=tokenizer.eos_token_id,
                        kv_export_alloc=kv_pool.export_alloc if kv_pool is not None else None,
                        cuda_graphs=options.cuda_graphs,
                        graph_batch_sizes=options.cuda_graph_batch_sizes)
        if kv_pool is not None:
            _plan_pool(kv_pool, engine.kv_budget)
        if ep_group is not None:
            from tensorrt_llm_dwdp.parallel.lockstep import LockstepEngine

            engine = LockstepEngine(engine, ep_group, list(model.moe_modules().values()))
    except BaseException as exc:
        if kv_pool is not None:
            kv_pool.close()
        if manager is not None:
            _close_after(manager, exc)
        if ep_group is not None:
            ep_group.close()
        raise
    mode = (f"DWDP ({options.dwdp_config})" if manager is not None else
            f"expert-parallel ({options.ep_config}, {ep_group.transport})" if ep_group is not None
            else "replicated experts")
    logger.info("worker ready: model %s on %s, %s, routed experts %.3f GiB (%s)", options.model,
                device, mode, expert_bytes / 2**30, before.source)
    return Worker(engine, tokenizer, model_config, manager, ep_group, expert_bytes, before.source, kv_pool)


def _plan_pool(pool: Any, budget: Any) -> None:
    """Size the export pool from the KV budget; an explicit size is created now (a pool that
    cannot be made is a start-up error naming the option), the default at first use."""
    from tensorrt_llm_dwdp.serve.kv_pool import PoolUnavailable

    try:
        pool.plan(budget)
        if pool.explicit:
            pool.open()
    except (ValueError, PoolUnavailable) as exc:
        raise OptionsError(str(exc)) from exc


def _warm_up_kernels(model: Any) -> None:
    """Compile every MoE kernel a step can pick now, not in the first request that needs it
    (a JIT-compiling backend would stall that step, and every request queued behind it, for
    seconds per kernel)."""
    import time

    from tensorrt_llm_dwdp.moe.backends import warm_up_model

    start = time.perf_counter()
    compiled = warm_up_model(model)
    if compiled:
        logger.info("MoE kernels: %d compiled before serving in %.1f s", compiled,
                    time.perf_counter() - start)


def _make_ep_group(options: ServeOptions, model_config: Any, device: Any, rendezvous: Any):
    from tensorrt_llm_dwdp.parallel.config import exchange_capacity_bytes
    from tensorrt_llm_dwdp.parallel.group import EpRendezvous, ExpertParallelGroup

    config = options.ep_config
    rdv = rendezvous or EpRendezvous.from_env()
    step_tokens = max(options.max_num_tokens, options.max_seq_len)  # a long prompt runs alone
    capacity = exchange_capacity_bytes(config.ep_size, step_tokens, model_config.hidden_size,
                                       model_config.top_k)
    return ExpertParallelGroup.create(config, rank=rdv.rank, device=device,
                                      master_addr=rdv.master_addr, master_port=rdv.master_port,
                                      num_experts=model_config.num_experts, capacity_bytes=capacity)


def _close_after(manager: Any, exc: BaseException) -> None:
    """Close ``manager`` after a start-up error: peers waiting in the exchange are told why, and
    a failing close (a peer timing out) is logged rather than masking ``exc``."""
    try:
        manager.close(reason=f"{type(exc).__name__}: {exc}")
    except Exception as close_exc:
        logger.error("DWDP close after %s also failed: %s", type(exc).__name__, close_exc)


def _make_manager(options: ServeOptions, model_config: Any, device: Any, group: Any):
    from tensorrt_llm_dwdp.dwdp.manager import DwdpManager

    config = options.dwdp_config
    if group is None:
        return DwdpManager.from_environment(config, model_config.num_experts, device=device)
    try:
        return DwdpManager(config, model_config.num_experts, group, device)
    except BaseException:
        group.close()
        raise


def _load_model(options: ServeOptions, device: Any, manager: Any, ep_group: Any = None):
    from tensorrt_llm_dwdp.model.checkpoint import load_model

    return load_model(options.model, device=device, moe_backend=options.moe_backend, dwdp=manager,
                      ep=ep_group.ep if ep_group is not None else None,
                      nvfp4_compute=options.nvfp4_compute)


def _bind_device_fn(device: Any):
    """On CUDA, a function making ``device`` current on the calling thread (else None)."""
    if device.type != "cuda":
        return None
    import torch

    return lambda: torch.cuda.set_device(device)


def run_worker_server(options: ServeOptions, *, local_rank: int = 0, group: Any = None,
                      advertise_host: str | None = None, ep_rendezvous: Any = None) -> None:
    """Take the port, build the worker, serve it on ``options.host:port`` until a signal, then
    close it. A port in use fails before the model loads; an error while serving is the one
    raised (a close that fails after it, e.g. DWDP peers that never hear from this rank, is
    logged, not raised over it)."""
    if options.ignored_keys:
        logger.info("options %s are TensorRT-LLM settings with no effect here; ignored",
                    list(options.ignored_keys))
    from tensorrt_llm_dwdp.serve.launch import advertised_url, bind_listener, serve_app
    from tensorrt_llm_dwdp.serve.openai_server import OpenAIServer, ServerConfig

    sock = bind_listener(options.host, options.port)
    try:
        worker = build_worker(options, local_rank=local_rank, group=group,
                              ep_rendezvous=ep_rendezvous)
    except BaseException:
        sock.close()
        raise
    try:
        config = ServerConfig(
            model_name=options.model, max_seq_len=options.max_seq_len,
            vocab_size=worker.model_config.vocab_size,
            public_url=advertised_url(advertise_host or options.host, options.port),
            device=str(worker.engine.device), kv_transfer=options.kv_transfer,
            static_gauges={"expert_memory_bytes": float(worker.expert_memory_bytes)})
        server = OpenAIServer(worker.engine, worker.tokenizer, config, kv_pool=worker.kv_pool,
                              engine_thread_init=_bind_device_fn(worker.engine.device))
        serve_app(server.make_app(), options.host, options.port, sock=sock)
    except BaseException:
        sock.close()
        try:
            worker.close()
        except Exception:  # noqa: BLE001 - the serving error is the one to report
            logger.exception("closing the worker after a serving error also failed")
        raise
    worker.close()
