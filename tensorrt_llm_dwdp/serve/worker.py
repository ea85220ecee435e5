"""Build one serving worker: tokenizer, model (with its DWDP manager when configured), engine.

The worker owns what it builds and releases it in ``close()`` (the manager unmaps its peers'
memory there). ``group`` is the DWDP group this rank belongs to (an MPI sub-communicator cut
by ``disaggregated_mpi_worker``, or one picked from the environment by ``comm.connect``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from tensorrt_llm_dwdp.serve.options import ServeOptions

logger = logging.getLogger(__name__)


@dataclass
class Worker:
    engine: Any
    tokenizer: Any
    model_config: Any
    manager: Any = None

    def close(self) -> None:
        manager, self.manager = self.manager, None
        if manager is not None:
            manager.close()


def resolve_device(requested: str | None, local_rank: int):
    """``requested`` ("cpu", "cuda", "cuda:N") or, when None, CUDA if present (one GPU per local
    rank) else the CPU."""
    import torch

    from tensorrt_llm_dwdp.run_job import pick_device

    if requested is not None and requested.startswith("cuda:"):
        return torch.device(requested)
    return pick_device(requested or "auto", local_rank)


def build_worker(options: ServeOptions, *, local_rank: int = 0, group: Any = None) -> Worker:
    """Load everything ``options`` names. With ``options.dwdp_config`` set, ``group`` (or, when
    None, the group ``comm.connect`` finds in the environment) forms the DWDP group."""
    from tensorrt_llm_dwdp.engine.executor import Engine
    from tensorrt_llm_dwdp.model import ModelConfig, load_tokenizer

    device = resolve_device(options.device, local_rank)
    if device.type == "cuda":
        import torch

        # Make it the current device too: allocations and IPC handles made without an explicit
        # device (and the engine thread's streams) must land on this rank's GPU.
        torch.cuda.set_device(device)
    model_config = ModelConfig.from_file(options.model)
    tokenizer = load_tokenizer(options.tokenizer_path)
    manager = None
    try:
        if options.dwdp_config is not None:
            manager = _make_manager(options, model_config, device, group)
        model = _load_model(options, device, manager)
        if manager is not None:
            manager.exchange()  # after every layer registered its experts (load_model's contract)
        engine = Engine(model, dwdp=manager, max_seqs=options.max_batch_size,
                        max_seq_len=options.max_seq_len, max_batch_tokens=options.max_num_tokens,
                        device=device, eos_token_id=tokenizer.eos_token_id)
    except BaseException as exc:
        if manager is not None:
            _close_after(manager, exc)
        raise
    logger.info("worker ready: model %s on %s, DWDP %s", options.model, device,
                "off" if manager is None else f"on ({options.dwdp_config})")
    return Worker(engine, tokenizer, model_config, manager)


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


def _load_model(options: ServeOptions, device: Any, manager: Any):
    from tensorrt_llm_dwdp.model.checkpoint import load_model

    return load_model(options.model, device=device, moe_backend=options.moe_backend, dwdp=manager)


def _bind_device_fn(device: Any):
    """On CUDA, a function making ``device`` current on the calling thread (else None)."""
    if device.type != "cuda":
        return None
    import torch

    return lambda: torch.cuda.set_device(device)


def run_worker_server(options: ServeOptions, *, local_rank: int = 0, group: Any = None,
                      advertise_host: str | None = None) -> None:
    """Build the worker, serve it on ``options.host:port`` until a signal, then close it."""
    if options.ignored_keys:
        logger.info("options %s are TensorRT-LLM settings with no effect here; ignored",
                    list(options.ignored_keys))
    from tensorrt_llm_dwdp.serve.launch import advertised_url, serve_app
    from tensorrt_llm_dwdp.serve.openai_server import OpenAIServer, ServerConfig

    worker = build_worker(options, local_rank=local_rank, group=group)
    try:
        config = ServerConfig(
            model_name=options.model, max_seq_len=options.max_seq_len,
            vocab_size=worker.model_config.vocab_size,
            public_url=advertised_url(advertise_host or options.host, options.port),
            device=str(worker.engine.device), kv_transfer=options.kv_transfer)
        server = OpenAIServer(worker.engine, worker.tokenizer, config,
                              engine_thread_init=_bind_device_fn(worker.engine.device))
        serve_app(server.make_app(), options.host, options.port)
    finally:
        worker.close()
