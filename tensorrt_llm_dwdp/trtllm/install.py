"""Make TensorRT-LLM build our manager wherever it builds its own ``DwdpManager``.

``install()`` replaces the name ``DwdpManager`` in ``tensorrt_llm._torch.pyexecutor.dwdp`` (and
in ``py_executor_creator`` if that module already holds the name) with
:class:`TrtllmDwdpManager`-style classes built by :func:`manager_class`, and keeps doing so for
the modules imported later (an import hook on ``sys.meta_path``), so it may run before or after
``tensorrt_llm`` is imported. From then on TensorRT-LLM's own call sites drive our manager
(``contract.py``). It patches only the process it runs in: ``activate.py`` is the switch that
runs it in every executor process, MPI workers included.

``attach_layer_hooks(module, layer_idx, bridge)``: for MoE modules without upstream's DWDP call
sites, a forward pre-hook binds the composite weights and a forward hook records the layer done.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import logging
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

from tensorrt_llm_dwdp.comm.base import GroupComm
from tensorrt_llm_dwdp.dwdp.config import DwdpConfig
from tensorrt_llm_dwdp.dwdp.errors import DwdpMismatchError
from tensorrt_llm_dwdp.trtllm.bridge import ManagerFactory, TrtllmDwdpBridge
from tensorrt_llm_dwdp.trtllm.config import from_trtllm

logger = logging.getLogger(__name__)

UPSTREAM_DWDP_MODULE = "tensorrt_llm._torch.pyexecutor.dwdp"
UPSTREAM_CREATOR_MODULE = "tensorrt_llm._torch.pyexecutor.py_executor_creator"
CommFactory = Callable[[DwdpConfig], GroupComm]


def default_manager_factory(device: torch.device | str | None = None) -> ManagerFactory:
    """Our ``DwdpManager`` on the bridge's group communicator, on the current CUDA device (the
    CPU where there is none: shared memory between CPU ranks)."""

    def make(config: DwdpConfig, num_experts: int, comm: GroupComm | None) -> Any:
        from tensorrt_llm_dwdp.dwdp.manager import DwdpManager

        if comm is None:
            raise ValueError("the default manager factory needs the bridge's group communicator")
        dev = device
        if dev is None:
            dev = (torch.device("cuda", torch.cuda.current_device())
                   if torch.cuda.is_available() else torch.device("cpu"))
        return DwdpManager(config, num_experts, comm=comm, device=dev)

    return make


def default_comm_factory(config: DwdpConfig) -> GroupComm:
    """The group as upstream forms it: a sub-communicator of ``COMM_WORLD`` (``group.py``)."""
    from tensorrt_llm_dwdp.trtllm.group import SubGroupComm

    return SubGroupComm(config)


def manager_class(options: Mapping[str, Any] | None = None,
                  manager_factory: ManagerFactory | None = None,
                  comm_factory: CommFactory | None = None) -> type:
    """A class TensorRT-LLM can construct as ``DwdpManager(config=, dist=, mapping=)``.

    ``options``: our config knobs that upstream's ``DwdpConfig`` lacks (``peer_timeout_s``,
    ``view_page_bytes``, ...). The group communicator is formed at construction, as upstream
    forms its sub-communicator there; the group rank comes from it and must agree with
    ``mapping.dwdp_rank``.
    """
    opts = dict(options or {})
    factory = manager_factory or default_manager_factory()
    make_comm = comm_factory or default_comm_factory

    class TrtllmDwdpManager(TrtllmDwdpBridge):
        """Our DWDP manager, built where TensorRT-LLM builds its own."""

        def __init__(self, config: Any, dist: Any = None, mapping: Any = None) -> None:
            ours = from_trtllm(config, **opts)
            if not ours.enabled:
                raise RuntimeError(f"DwdpManager requires dwdp_size > 1; got dwdp_config "
                                   f"dwdp_size={ours.dwdp_size}")
            if mapping is not None and mapping.dwdp_enabled is False:
                raise RuntimeError(f"DwdpManager requires mapping.dwdp_enabled (dwdp_size > 1); "
                                   f"got mapping.dwdp_size={mapping.dwdp_size}")
            comm = make_comm(ours)
            try:
                mapped = None if mapping is None else mapping.dwdp_rank
                if mapped is not None and mapped != comm.rank:
                    raise DwdpMismatchError(
                        f"mapping.dwdp_rank is {mapped} but this process is rank {comm.rank} of "
                        f"its DWDP group ({comm.describe()}): DWDP ranks are consecutive world "
                        "ranks, group g = [g*dwdp_size, (g+1)*dwdp_size)")
                super().__init__(ours, rank=comm.rank, manager_factory=factory, comm=comm)
            except BaseException:
                comm.close()
                raise
            self.dist, self.mapping = dist, mapping
            self.group_id = comm.group_id
            self.rank = comm.__dict__.get("world_rank", comm.rank)

    return TrtllmDwdpManager


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Patches upstream's DWDP module right after it executes, wherever it is imported from."""

    def __init__(self, installation: "Installation") -> None:
        self.installation = installation

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != UPSTREAM_DWDP_MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _PatchingLoader(spec.loader, self.installation)
        return spec


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, inner: Any, installation: "Installation") -> None:
        self._inner = inner
        self._installation = installation

    def create_module(self, spec: Any) -> Any:
        return self._inner.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._inner.exec_module(module)
        self._installation.patch(module)


@dataclass
class Installation:
    """The patches one ``install`` made; ``uninstall()`` puts the originals back."""

    cls: type
    replaced: dict[str, Any] = field(default_factory=dict)
    finder: Any = None

    def patch(self, module: Any) -> None:
        """Point ``module.DwdpManager`` at our class (once; the original is kept)."""
        current = module.__dict__.get("DwdpManager")
        if current is None or current is self.cls:
            return
        self.replaced[module.__name__] = current
        module.DwdpManager = self.cls
        logger.info("%s.DwdpManager now builds tensorrt_llm_dwdp's manager", module.__name__)

    def uninstall(self) -> None:
        if self.finder in sys.meta_path:
            sys.meta_path.remove(self.finder)
        for module_name, original in self.replaced.items():
            module = sys.modules.get(module_name)
            if module is not None:
                module.DwdpManager = original
        self.replaced.clear()


def active_installation() -> Installation | None:
    """The installation this process runs under, if any (its import hook is on sys.meta_path)."""
    for finder in sys.meta_path:
        if isinstance(finder, _PatchOnImport):
            return finder.installation
    return None


def install(*, options: Mapping[str, Any] | None = None,
            manager_factory: ManagerFactory | None = None,
            comm_factory: CommFactory | None = None) -> Installation:
    """Make every ``DwdpManager`` TensorRT-LLM builds in this process ours (see the module
    docstring). Raises RuntimeError when an installation is already active here."""
    if active_installation() is not None:
        raise RuntimeError("tensorrt_llm_dwdp's TensorRT-LLM adapter is already installed in "
                           "this process; uninstall() the active installation first")
    from tensorrt_llm_dwdp.trtllm.config import UPSTREAM_KEYS

    clash = sorted(set(options or {}) & set(UPSTREAM_KEYS))
    if clash:
        raise ValueError(f"install options {clash} belong in TensorRT-LLM's dwdp_config, not in "
                         "the adapter's options")
    installation = Installation(manager_class(options, manager_factory, comm_factory))
    installation.finder = _PatchOnImport(installation)
    sys.meta_path.insert(0, installation.finder)
    for module_name in (UPSTREAM_DWDP_MODULE, UPSTREAM_CREATOR_MODULE):
        module = sys.modules.get(module_name)
        if module is not None:
            installation.patch(module)
    return installation


def attach_layer_hooks(module: nn.Module, layer_idx: int, bridge: TrtllmDwdpBridge) -> list:
    """Bind the composite weights before ``module.forward`` and record the layer done after.

    Returns the two hook handles (``.remove()`` them to detach).
    """
    def before(mod: nn.Module, args: tuple) -> None:
        bridge.wait_and_bind(mod, layer_idx)

    def after(mod: nn.Module, args: tuple, output: Any) -> None:
        bridge.record_compute_and_prefetch_next(layer_idx)

    return [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
