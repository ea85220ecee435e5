"""What the adapter depends on in TensorRT-LLM, as read from upstream's source (data only).

Every entry names the upstream file and the commit (or pull request) it was read at, through the
project's stored copies of NVIDIA/TensorRT-LLM (the whole repository was too large to fetch, so
single files were read by path and commit, or found by their content where the index reports no
commit). ``source`` says how: ``file`` (the file itself), ``test`` (only upstream's unit test of
it), ``diff`` (only a pull request's diff), ``doc`` (only upstream's architecture notes).

The fake ``tensorrt_llm`` package under ``tests/trtllm_fake`` replays these calls in this order;
``tests/unit/test_trtllm_upstream_sequence.py`` checks the fake and the adapter against this
table (every name the fake stands in for resolves there, every method exists on ours).
"""
from __future__ import annotations

from dataclasses import dataclass

REPO = "NVIDIA/TensorRT-LLM"
#: The pull requests whose DWDP the adapter follows: #14453 moved DWDP to composite virtual
#: addresses (``_torch/modules/dwdp/``); #17546 and later commits reshaped the facade and the MoE
#: layout hook read here. #12136 added the executor's per-step call.
PULL_REQUESTS = (12136, 14453, 17546)


@dataclass(frozen=True)
class Dependency:
    """One upstream name the adapter relies on."""

    name: str          #: dotted name, relative to ``tensorrt_llm``
    kind: str          #: constructor | method | attribute | function | call order
    signature: str     #: as upstream spells it (or the attributes read)
    caller: str        #: who calls / reads it upstream
    file: str          #: upstream path
    read_at: str       #: commit, or ``PR #n``, or ``content`` (found by content, no commit given)
    source: str        #: file | test | diff | doc
    note: str = ""


_DWDP = "tensorrt_llm/_torch/pyexecutor/dwdp.py"
_DWDP_TEST = "tests/unittest/_torch/modules/dwdp/test_dwdp_manager.py"
_IFACE = "tensorrt_llm/_torch/moe/fused_moe/interface.py"
_CMOE = "tensorrt_llm/_torch/moe/fused_moe/configurable_moe.py"
_SETUP = "tensorrt_llm/_torch/modules/dwdp/setup.py"
_WM = "tensorrt_llm/_torch/modules/dwdp/weight_manager.py"
_PYEXEC = "tensorrt_llm/_torch/pyexecutor/py_executor.py"
_CREATOR = "tensorrt_llm/_torch/pyexecutor/py_executor_creator.py"

DEPENDENCIES: tuple[Dependency, ...] = (
    Dependency("_torch.pyexecutor.dwdp.DwdpManager", "constructor",
               "DwdpManager(config: DwdpConfig, dist: object, mapping: Mapping)",
               "py_executor_creator (keywords: config=, dist=, mapping=)", _DWDP, "content", "file",
               "the facade 'DwdpManager facade for VA-based DWDP'; its unit test "
               f"({_DWDP_TEST} @ 22028b50237c185bcb54aa63419a6dfbb04af492) builds it with the "
               "three keywords; rejects a dist that is not MPIDist and a mapping without "
               "dwdp_enabled; validates num_groups > 0, group_id < num_groups and "
               "world size >= dwdp_size * num_groups"),
    Dependency("_torch.pyexecutor.dwdp.DwdpManager", "attribute",
               "dwdp_size, dwdp_rank, num_experts_per_worker, num_prefetch_experts, num_groups, "
               "rank, dwdp_group, config, dist", "set in __init__", _DWDP, "content", "file"),
    Dependency("_torch.pyexecutor.dwdp.DwdpManager", "attribute",
               "start_expert_id, num_experts_per_worker, dwdp_size",
               "MoE._init_dwdp_expert_layout, for every MoE layer while the model is built, "
               "before any add_layer", _IFACE, "581f0712048ea84c37836a583973e5aae306384d",
               "file", "slot_start = start_expert_id; slot_end = slot_start + "
               "num_experts_per_worker; expert_size_per_partition = num_experts_per_worker; "
               "num_slots = num_experts; EPLB must be off"),
    Dependency("_torch.pyexecutor.dwdp.get_global_dwdp_manager", "function", "() -> DwdpManager | None",
               "MoE._init_dwdp_expert_layout and ConfigurableMoE.__init__ (self.dwdp_manager)",
               _DWDP, "content", "file", "set by DwdpManager.__enter__ (raises when one is "
               "already set), cleared by __exit__"),
    Dependency("_torch.pyexecutor.dwdp.DwdpManager.__enter__", "method", "() -> DwdpManager",
               "py_executor_creator, before the model is built", _DWDP, "content", "file",
               "the creator's DWDP lines were not among the stored copies "
               f"({_CREATOR} @ bab0f2e6eea19bcce16c805101420ef7d9d62d75 predates DWDP): the order "
               "construct -> __enter__ -> build model -> setup(model) is inferred from the global "
               "read at MoE construction and the executor's explicit __exit__"),
    Dependency("_torch.pyexecutor.dwdp.DwdpManager.add_layer", "method", "add_layer(layer_idx: int) -> None",
               "ConfigurableMoE._register_dwdp (keyword layer_idx=) when _should_enable_dwdp()",
               _DWDP, "content", "file", "a duplicate logs a warning and is ignored"),
    Dependency("_torch.pyexecutor.dwdp.DwdpManager.setup", "method", "setup(model: nn.Module)",
               "py_executor_creator, once, after weight loading, before any forward", _DWDP,
               "content", "file", "runs setup_dwdp(model=, mapping=, device_id=, comm=, "
               "layer_indices=sorted(registered), num_experts_per_worker=, num_prefetch_experts=)"),
    Dependency("_torch.modules.dwdp.setup.fixup_moe_backends", "function",
               "sets ep_size=1, ep_rank=0, expert_size_per_partition=slot_end=num_slots=E, "
               "slot_start=0, initial_local_expert_ids=initial_global_assignments=range(E) on the "
               "ConfigurableMoE and its backend", "setup_dwdp", _SETUP,
               "4d994fe491f8cb3557826ef7ec5213a2dd02167a", "file"),
    Dependency("_torch.modules.dwdp.setup._allgather_expert_scales", "function",
               "every nn.Parameter of the backend whose name holds 'scale', 'scaling_factor', "
               "'dequant' or 'alpha', with shape[0] == num_experts_per_worker, not one of the "
               "four transported weights", "fixup_moe_backends", _SETUP,
               "4d994fe491f8cb3557826ef7ec5213a2dd02167a", "file",
               "then _rebuild_quant_scales points backend.quant_scales at the live parameters"),
    Dependency("_torch.pyexecutor.dwdp.DwdpManager.prefetch_first_layers", "method", "() -> None",
               "PyExecutor executor loop, before each _forward_step", _PYEXEC, "PR #12136",
               "diff", "the warm-up forwards (PyTorchModelEngine.warmup, during executor "
               "creation) run before the loop ever calls it"),
    Dependency("_torch.pyexecutor.dwdp.DwdpManager.wait_and_bind", "method",
               "wait_and_bind(backend_module: nn.Module, layer_idx: int) -> None",
               "ConfigurableMoE.forward_impl, before scheduler.forward", _CMOE, "content", "file",
               f"upstream's DWDPWeightManager ({_WM} @ 85681b49e05b53e4ec93ece8ae4b85769c82106d) "
               "waits an event that was never recorded when no prefetch ran (a no-op), so a "
               "bind before any prefetch is tolerated"),
    Dependency("_torch.pyexecutor.dwdp.DwdpManager.record_compute_and_prefetch_next", "method",
               "record_compute_and_prefetch_next(layer_idx: int) -> None",
               "ConfigurableMoE.forward_impl, after scheduler.forward returned", _CMOE, "content",
               "file", "not called when the forward raises; the next step starts with "
               "prefetch_first_layers() all the same"),
    Dependency("_torch.pyexecutor.dwdp.DwdpManager.__exit__", "method", "__exit__(None, None, None)",
               "PyExecutor shutdown (then dwdp_manager = None)", _PYEXEC, "content", "file",
               "cleanup() is idempotent upstream"),
    Dependency("_torch.pyexecutor.dwdp.DwdpManager.is_enabled", "method", "() -> bool",
               "callers that gate on DWDP", _DWDP, "content", "file"),
    Dependency("llmapi.llm_args.DwdpConfig", "attribute",
               "dwdp_size, num_groups, num_experts_per_worker, num_prefetch_experts, contention_opt",
               "TorchLlmArgs.dwdp_config", "tensorrt_llm/llmapi/llm_args.py", "content", "test",
               f"fields as constructed by {_DWDP_TEST}; contention_opt read by the IPC-era "
               f"{_DWDP} @ 753d71ccd9f1b0f03c742110e98fd6ff9683990a"),
    Dependency("mapping.Mapping", "attribute", "dwdp_size, dwdp_rank, dwdp_enabled",
               "DwdpManager.__init__, setup_dwdp", "tensorrt_llm/mapping.py", "content", "test",
               f"Mapping(world_size=, rank=, tp_size=, dwdp_size=, dwdp_rank=) in {_DWDP_TEST}"),
    Dependency("_torch.distributed.MPIDist", "attribute", "isinstance(dist, MPIDist)",
               "DwdpManager.__init__", _DWDP, "content", "file"),
    Dependency("_torch.moe.fused_moe.configurable_moe.ConfigurableMoE", "attribute",
               "layer_idx, backend, enable_dwdp, dwdp_manager", "setup_dwdp, forward_impl", _CMOE,
               "content", "file", "the index lists 8b97eb7496b9404f973ddee79048bbb67fa9c372 for "
               "the path (moved from _torch/modules/fused_moe/); the copy read was found by content"),
)

#: The order one executor process makes the calls in (``call order`` of the table above).
CALL_ORDER: tuple[str, ...] = (
    "DwdpManager(config=, dist=, mapping=)",
    "__enter__()",
    "per MoE layer at construction: read start_expert_id, num_experts_per_worker, dwdp_size",
    "per MoE layer at construction: add_layer(layer_idx=i)",
    "setup(model)",
    "warm-up forwards: wait_and_bind(backend, i) / record_compute_and_prefetch_next(i)",
    "per step: prefetch_first_layers(), then per MoE layer wait_and_bind / record",
    "__exit__(None, None, None)",
)

#: Read from nowhere: how MPI worker processes are started (``executor/worker.py``,
#: ``llmapi/mpi_session.py``) was not among the files read. The activation switch assumes only
#: that a worker is a fresh Python interpreter that inherits the launching environment.
NOT_READ = ("tensorrt_llm/executor/worker.py", "tensorrt_llm/llmapi/mpi_session.py",
            "the DWDP lines of " + _CREATOR)


def attributes_read_at_construction() -> tuple[str, ...]:
    """The manager attributes upstream's MoE layers read before any ``add_layer``."""
    return ("start_expert_id", "num_experts_per_worker", "dwdp_size")
