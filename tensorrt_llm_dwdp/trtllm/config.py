"""Our ``DwdpConfig`` to and from TensorRT-LLM's (``tensorrt_llm.llmapi.llm_args.DwdpConfig``).

Both carry the same five keys (``dwdp_size``, ``num_groups``, ``num_experts_per_worker``,
``num_prefetch_experts``, ``contention_opt``). Upstream's disaggregated tests also show an
older spelling (``enabled``, ``num_group``, ``experts_per_worker``), accepted when reading.
Our two extra knobs (``prefetch_slice_bytes``, ``peer_timeout_s``) have no upstream field and
are dropped on the way out (kept at our defaults, or as given, on the way in).
"""
from __future__ import annotations

from typing import Any, Mapping

from tensorrt_llm_dwdp.dwdp.config import DwdpConfig, DwdpConfigError

UPSTREAM_KEYS = ("dwdp_size", "num_groups", "num_experts_per_worker", "num_prefetch_experts",
                 "contention_opt")
OLD_SPELLINGS = {"num_group": "num_groups", "experts_per_worker": "num_experts_per_worker"}


def to_trtllm_dict(config: DwdpConfig) -> dict[str, Any]:
    """The keyword arguments of TensorRT-LLM's ``DwdpConfig`` for ``config``."""
    return {key: getattr(config, key) for key in UPSTREAM_KEYS}


def to_trtllm(config: DwdpConfig) -> Any:
    """A ``tensorrt_llm.llmapi.llm_args.DwdpConfig`` (needs tensorrt_llm installed)."""
    try:
        from tensorrt_llm.llmapi.llm_args import DwdpConfig as TrtllmDwdpConfig
    except ImportError as exc:
        raise ImportError(
            "to_trtllm needs TensorRT-LLM (pip install tensorrt_llm, a release with DwdpConfig); "
            "to_trtllm_dict gives the same fields as a plain dict"
        ) from exc
    return TrtllmDwdpConfig(**to_trtllm_dict(config))


def from_trtllm(upstream: Any, **ours: Any) -> DwdpConfig:
    """Our config from TensorRT-LLM's ``DwdpConfig`` (an object, or a mapping as in its YAML).

    ``ours`` may set our extra knobs (``prefetch_slice_bytes``, ``peer_timeout_s``). ``None``
    or ``enabled: false`` means DWDP off.
    """
    if upstream is None:
        return DwdpConfig(**ours)
    if isinstance(upstream, Mapping):
        fields = dict(upstream)
    else:
        fields = {k: getattr(upstream, k) for k in UPSTREAM_KEYS if hasattr(upstream, k)}
        if hasattr(upstream, "enabled"):
            fields["enabled"] = getattr(upstream, "enabled")
    for old, new in OLD_SPELLINGS.items():
        if old in fields:
            if new in fields:
                raise DwdpConfigError(f"dwdp_config sets both {old!r} and {new!r}")
            fields[new] = fields.pop(old)
    enabled = fields.pop("enabled", True)
    if not isinstance(enabled, bool):
        raise DwdpConfigError(f"dwdp_config.enabled must be true or false, got {enabled!r}")
    unknown = sorted(set(fields) - set(UPSTREAM_KEYS))
    if unknown:
        raise DwdpConfigError(
            f"unknown TensorRT-LLM dwdp_config key(s) {unknown}; known: {list(UPSTREAM_KEYS)}"
        )
    if not enabled:
        return DwdpConfig(**ours)
    return DwdpConfig(**{k: v for k, v in fields.items() if v is not None}, **ours)
