"""DwdpConfig: the ``dwdp_config:`` section of an LLM-API options YAML, validated at load.

The keys users know from TensorRT-LLM (``dwdp_size``, ``num_groups``, ``num_experts_per_worker``,
``num_prefetch_experts``, ``contention_opt``) keep their names and meaning, so one options file
(as ``trtllm-serve --extra_llm_api_options`` takes it) serves both projects. Two knobs are ours:
``prefetch_slice_bytes`` (slice size of the contention-aware copy plan), ``peer_timeout_s``
(how long a rank waits for its peers before failing with a clear error), and the weight view:
``expert_view`` (``composite``, the default: one ``[E, ...]`` tensor per parameter through
virtual-memory mapping, which any single-tensor MoE kernel takes and which measured no slower
than ``multi`` on an H200; ``multi``: a list of S tensors per parameter, for kernels written
for a tensor list and for UVM read-through offload), ``view_page_bytes`` (its mapping unit;
0 = the device's recommended granularity) and ``view_handles`` (how peers receive composite
memory: ``posix_fd`` on one host, ``fabric`` across multi-node NVLink); and the host tiers
(``dwdp/tiers.py``): ``host_backup`` (one copy of the group's experts per node in host memory,
so survivors fail over when a peer dies), ``host_experts_per_worker`` (H of each rank's W own
experts live in host memory and are prefetched like peer experts), ``host_offload``
(``prefetch`` or ``uvm``: how a rank reads its own host experts), ``heartbeat_interval_s`` and
``peer_dead_after_s`` (liveness timing, ``dwdp/liveness.py``).

Checks that need facts the file cannot know (the model's expert count E, the launcher's world
size) are separate methods, called as soon as those facts are known.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any, Mapping

SECTION = "dwdp_config"
DEFAULT_SLICE_BYTES = 2 << 20
DEFAULT_PEER_TIMEOUT_S = 60.0
EXPERT_VIEWS = ("multi", "composite")
VIEW_HANDLES = ("posix_fd", "fabric")
DEFAULT_HEARTBEAT_S = 0.5
DEFAULT_DEAD_AFTER_S = 10.0
HOST_OFFLOAD_MODES = ("prefetch", "uvm")


class DwdpConfigError(ValueError):
    """A DWDP configuration value is invalid; the message names the key and the value."""


@dataclass(frozen=True)
class DwdpConfig:
    """Validated DWDP settings of one deployment.

    A group of ``dwdp_size`` ranks shares the experts of every MoE layer: each rank owns
    ``num_experts_per_worker`` (W) of them and fetches ``num_prefetch_experts`` (P) from every
    peer, so ``W + (dwdp_size - 1) * P`` must equal the model's expert count E. ``num_groups``
    independent groups make up the world (world size ``dwdp_size * num_groups``).
    With ``dwdp_size == 1`` DWDP is off; W may then be left out (it resolves to E).
    Host tiers are on when ``host_backup`` or ``host_experts_per_worker > 0`` (``tiers_enabled``).
    """

    dwdp_size: int = 1
    num_groups: int = 1
    num_experts_per_worker: int | None = None
    num_prefetch_experts: int | None = None
    contention_opt: bool = False
    prefetch_slice_bytes: int = DEFAULT_SLICE_BYTES
    peer_timeout_s: float = DEFAULT_PEER_TIMEOUT_S
    expert_view: str = "composite"
    view_page_bytes: int = 0
    view_handles: str = "posix_fd"
    host_backup: bool = False
    host_experts_per_worker: int = 0
    host_offload: str = "prefetch"
    heartbeat_interval_s: float = DEFAULT_HEARTBEAT_S
    peer_dead_after_s: float = DEFAULT_DEAD_AFTER_S

    def __post_init__(self) -> None:
        _check_int("dwdp_size", self.dwdp_size, minimum=1)
        _check_int("num_groups", self.num_groups, minimum=1)
        _check_int("prefetch_slice_bytes", self.prefetch_slice_bytes, minimum=1)
        _check_choice("expert_view", self.expert_view, EXPERT_VIEWS)
        _check_choice("view_handles", self.view_handles, VIEW_HANDLES)
        _check_int("view_page_bytes", self.view_page_bytes, minimum=0)
        page = self.view_page_bytes
        if page & (page - 1):
            raise DwdpConfigError(
                f"dwdp_config.view_page_bytes must be 0 (the device's granularity) or a power of "
                f"two, got {page}")
        _check_int("host_experts_per_worker", self.host_experts_per_worker, minimum=0)
        for key in ("contention_opt", "host_backup"):
            if not isinstance(getattr(self, key), bool):
                raise DwdpConfigError(
                    f"dwdp_config.{key} must be true or false, got {getattr(self, key)!r}")
        _check_choice("host_offload", self.host_offload, HOST_OFFLOAD_MODES)
        if (self.host_offload == "uvm" and self.host_experts_per_worker
                and self.expert_view == "composite"):
            raise DwdpConfigError(
                "dwdp_config.host_offload: uvm does not combine with expert_view: composite: UVM "
                "read-through keeps a rank's host experts in CUDA managed memory, which cannot be "
                "mapped into the composite view's virtual range (cuMemMap maps cuMemCreate "
                "allocations only); use host_offload: prefetch with the composite view, or "
                "expert_view: multi for uvm")
        for key in ("peer_timeout_s", "heartbeat_interval_s", "peer_dead_after_s"):
            object.__setattr__(self, key, _seconds(key, getattr(self, key)))
        if self.peer_dead_after_s < 2 * self.heartbeat_interval_s:
            raise DwdpConfigError(
                f"dwdp_config.peer_dead_after_s ({self.peer_dead_after_s:g} s) must be at least "
                f"twice heartbeat_interval_s ({self.heartbeat_interval_s:g} s): a peer is declared "
                f"dead after missing its heartbeats for that long")
        w, p = self.num_experts_per_worker, self.num_prefetch_experts
        if self.dwdp_size == 1:
            if w is not None:
                _check_int("num_experts_per_worker", w, minimum=1)
            if p is not None:
                _check_int("num_prefetch_experts", p, minimum=0)
            self._check_host_experts()
            return
        for key, value in (("num_experts_per_worker", w), ("num_prefetch_experts", p)):
            if value is None:
                raise DwdpConfigError(
                    f"dwdp_config.{key} is required when dwdp_size > 1 (dwdp_size={self.dwdp_size})"
                )
            _check_int(key, value, minimum=1)
        if p > w:
            raise DwdpConfigError(
                f"dwdp_config.num_prefetch_experts ({p}) must not exceed num_experts_per_worker "
                f"({w}): a peer sends P experts out of the W it owns"
            )
        self._check_host_experts()

    def _check_host_experts(self) -> None:
        w, h = self.num_experts_per_worker, self.host_experts_per_worker
        if w is not None and h >= w:
            raise DwdpConfigError(
                f"dwdp_config.host_experts_per_worker ({h}) must be less than "
                f"num_experts_per_worker ({w}): a rank keeps at least one own expert in HBM")

    # ----------------------------------------------------------------------------- loading
    @classmethod
    def from_dict(cls, section: Mapping[str, Any] | None) -> "DwdpConfig":
        """Build from the mapping under ``dwdp_config:``; unknown keys are an error."""
        if section is None:
            return cls()
        if not isinstance(section, Mapping):
            raise DwdpConfigError(
                f"{SECTION} must be a mapping of keys to values, got {type(section).__name__}: "
                f"{section!r}"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in section if k not in known)
        if unknown:
            raise DwdpConfigError(
                f"unknown key(s) in {SECTION}: {', '.join(unknown)}; "
                f"known keys: {', '.join(sorted(known))}"
            )
        return cls(**dict(section))

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None) -> "DwdpConfig":
        """Build from a whole LLM-API options mapping; keys other than ``dwdp_config`` are ignored.

        A file without a ``dwdp_config`` section means DWDP off (``dwdp_size == 1``).
        """
        if options is None:
            return cls()
        if not isinstance(options, Mapping):
            raise DwdpConfigError(
                f"an LLM-API options file must hold a mapping at top level, got "
                f"{type(options).__name__}"
            )
        return cls.from_dict(options.get(SECTION))

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "DwdpConfig":
        """Load the ``dwdp_config:`` section of an LLM-API options YAML file."""
        import yaml

        try:
            with open(path, "r", encoding="utf-8") as f:
                options = yaml.safe_load(f)
        except OSError as exc:
            raise DwdpConfigError(f"cannot read DWDP options file {str(path)!r}: {exc}") from exc
        except yaml.YAMLError as exc:
            raise DwdpConfigError(f"{str(path)!r} is not valid YAML: {exc}") from exc
        try:
            return cls.from_options(options)
        except DwdpConfigError as exc:
            raise DwdpConfigError(f"{path}: {exc}") from exc

    def to_dict(self) -> dict[str, Any]:
        """The ``dwdp_config`` section as plain values (what the ranks compare at exchange)."""
        return dataclasses.asdict(self)

    # ----------------------------------------------------------------------------- derived
    @property
    def enabled(self) -> bool:
        """DWDP is on when more than one rank shares the experts."""
        return self.dwdp_size > 1

    @property
    def tiers_enabled(self) -> bool:
        """A host copy of the group's experts exists (backup, offload, or both)."""
        return self.host_backup or self.host_experts_per_worker > 0

    @property
    def world_size(self) -> int:
        return self.dwdp_size * self.num_groups

    @property
    def implied_num_experts(self) -> int | None:
        """``W + (S-1) * P``, the expert count this layout covers (None if W is not set)."""
        if self.num_experts_per_worker is None:
            return None
        return self.num_experts_per_worker + (self.dwdp_size - 1) * (self.num_prefetch_experts or 0)

    def experts_per_worker(self, num_experts: int) -> int:
        """W for a model of ``num_experts`` experts, after checking the layout covers them."""
        self.check_num_experts(num_experts)
        w = self.num_experts_per_worker
        return num_experts if w is None else w

    def prefetch_experts(self) -> int:
        """P; zero when DWDP is off and the key was left out."""
        return self.num_prefetch_experts or 0

    def check_num_experts(self, num_experts: int) -> None:
        """Raise unless ``W + (S-1) * P == num_experts`` (the model's routed expert count)."""
        if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
            raise DwdpConfigError(f"num_experts must be a positive integer, got {num_experts!r}")
        implied = self.implied_num_experts
        if implied is None:
            if self.host_experts_per_worker >= num_experts:
                raise DwdpConfigError(
                    f"dwdp_config.host_experts_per_worker ({self.host_experts_per_worker}) must "
                    f"be less than the model's {num_experts} experts")
            return
        if implied != num_experts:
            raise DwdpConfigError(
                f"dwdp_config does not cover the model's experts: num_experts_per_worker + "
                f"(dwdp_size - 1) * num_prefetch_experts = {self.num_experts_per_worker} + "
                f"({self.dwdp_size} - 1) * {self.prefetch_experts()} = {implied}, but the model "
                f"has {num_experts} experts"
            )

    def check_world_size(self, world_size: int) -> None:
        """Raise unless the launcher's world size is ``dwdp_size * num_groups``."""
        if world_size != self.world_size:
            raise DwdpConfigError(
                f"world size {world_size} does not match dwdp_config: dwdp_size * num_groups = "
                f"{self.dwdp_size} * {self.num_groups} = {self.world_size}"
            )

    def group_of(self, world_rank: int) -> tuple[int, int]:
        """``(group id, rank within the group)`` of a world rank: group g is [g*S, (g+1)*S)."""
        if not 0 <= world_rank < self.world_size:
            raise DwdpConfigError(
                f"world rank {world_rank} outside [0, {self.world_size}) "
                f"(dwdp_size={self.dwdp_size}, num_groups={self.num_groups})"
            )
        return divmod(world_rank, self.dwdp_size)


def _check_choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise DwdpConfigError(f"dwdp_config.{key} must be one of {', '.join(choices)}, "
                              f"got {value!r}")


def _seconds(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
        math.isfinite(value) and value > 0
    ):
        raise DwdpConfigError(
            f"dwdp_config.{key} must be a positive number of seconds, got {value!r}")
    return float(value)


def _check_int(key: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise DwdpConfigError(
            f"dwdp_config.{key} must be an integer, got {type(value).__name__} {value!r}"
        )
    if value < minimum:
        raise DwdpConfigError(f"dwdp_config.{key} must be >= {minimum}, got {value}")
