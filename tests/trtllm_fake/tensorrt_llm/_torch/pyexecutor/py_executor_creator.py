"""``create_py_executor``: the DWDP part of upstream's order (contract.CALL_ORDER): build the
manager with keywords and register it, build the model (its MoE layers read the manager's layout
and add themselves), load the weights, ``setup(model)``, warm up, hand the manager to the
executor."""
from __future__ import annotations

from tensorrt_llm._torch.distributed import MPIDist
from tensorrt_llm._torch.pyexecutor.dwdp import DwdpManager
from tensorrt_llm._torch.pyexecutor.model_engine import PyTorchModelEngine
from tensorrt_llm._torch.pyexecutor.py_executor import PyExecutor
from tensorrt_llm._utils import global_mpi_rank, mpi_world_size
from tensorrt_llm.mapping import Mapping


def _get_mapping(llm_args) -> Mapping:
    rank, world = global_mpi_rank(), mpi_world_size()
    cfg = llm_args.dwdp_config
    if cfg is None or cfg.dwdp_size <= 1:
        return Mapping(world_size=world, rank=rank)
    return Mapping(world_size=world, rank=rank, dwdp_size=cfg.dwdp_size,
                   dwdp_rank=rank % cfg.dwdp_size)


def create_py_executor(llm_args, build_model, checkpoint: dict, warmup_batches=()) -> PyExecutor:
    """``build_model(mapping)`` returns the model; ``checkpoint`` is loaded into it."""
    mapping = _get_mapping(llm_args)
    dist = MPIDist(mapping)
    dwdp_manager = None
    if mapping.dwdp_enabled:
        dwdp_manager = DwdpManager(config=llm_args.dwdp_config, dist=dist, mapping=mapping)
        dwdp_manager.__enter__()
    try:
        model = build_model(mapping)
        model.load_weights(checkpoint)
        if dwdp_manager is not None:
            dwdp_manager.setup(model)
        engine = PyTorchModelEngine(model)
        engine.warmup(warmup_batches)
    except BaseException:
        if dwdp_manager is not None:
            dwdp_manager.__exit__(None, None, None)
        raise
    return PyExecutor(engine, dwdp_manager)
