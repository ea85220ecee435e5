"""Server options: the flags of ``trtllm-serve serve`` merged with its ``--extra_llm_api_options`` YAML.

The YAML overrides the flags, as upstream. Keys are sorted into three sets: keys we use, keys
TensorRT-LLM's LLM API knows that have no meaning here (logged once and ignored, so one YAML can
serve both projects), and keys nobody knows (an error naming the key: a typo must not pass).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

import yaml

from tensorrt_llm_dwdp.dwdp.config import DwdpConfig, DwdpConfigError
from tensorrt_llm_dwdp.parallel.config import EpConfig, EpConfigError

logger = logging.getLogger(__name__)

# trtllm-serve's --log_level choices, mapped onto Python logging levels.
LOG_LEVELS: dict[str, int] = {
    "internal_error": logging.CRITICAL,
    "error": logging.ERROR,
    "warning": logging.WARNING,
    "info": logging.INFO,
    "verbose": logging.DEBUG,
    "debug": logging.DEBUG,
    "trace": logging.DEBUG,
}

# Keys of the LLM-API YAML this server reads.
USED_KEYS = frozenset({
    "model", "tokenizer", "backend", "max_batch_size", "max_num_tokens", "max_seq_len",
    "tensor_parallel_size", "pipeline_parallel_size", "context_parallel_size",
    "moe_expert_parallel_size", "moe_config", "dwdp_config",
    # Our own: where the engine runs ("cpu", "cuda", "cuda:1"); absent = CUDA when present.
    "device",
    # Our own: how a generation server pulls KV: "auto" (same-node CUDA IPC / shm, else HTTP)
    # or "http" (always HTTP).
    "kv_transfer",
    # Our own: bytes of the context server's KV export pool (serve/kv_pool.py); absent: sized
    # from the KV cache at the first context-only request; 0: none (hand-overs over HTTP).
    "kv_transfer_pool_bytes",
    # Our own: attention-DP + expert-parallel context servers (parallel/config.py), the
    # alternative to dwdp_config.
    "ep_config",
    # TensorRT-LLM's: decode steps replayed from CUDA graphs (null: off; absent: on).
    "cuda_graph_config",
})

KV_TRANSFER_MODES = ("auto", "http")

# Keys TensorRT-LLM's LLM API / trtllm-serve know that change nothing here (KV moves through
# our own hand-over, see kv_transfer; there is no scheduler policy or overlap scheduler).
KNOWN_IGNORED_KEYS = frozenset({
    "allreduce_strategy", "attention_dp_config", "attn_backend", "batch_wait_timeout_ms",
    "batch_wait_max_tokens_ratio", "batched_logits_processor", "build_config",
    "cache_transceiver_config", "calib_config", "checkpoint_format", "checkpoint_loader",
    "cp_config", "custom_tokenizer", "decoding_config", "disable_overlap_scheduler",
    "disable_flashinfer_sampling", "disagg_cluster", "dtype", "enable_attention_dp",
    "enable_autotuner", "enable_chunked_prefill", "enable_iter_perf_stats", "enable_iter_req_stats",
    "enable_layerwise_nvtx_marker", "enable_lm_head_tp_in_adp", "enable_lora", "enable_min_latency",
    "enable_sleep", "fail_fast_on_attention_window_too_large", "force_dynamic_quantization",
    "garbage_collection_gen0_threshold", "gather_generation_logits", "gpus_per_node",
    "guided_decoding_backend", "iter_stats_max_iterations", "kv_cache_config", "kv_connector_config",
    "layer_wise_benchmarks_config", "load_format", "lora_config", "max_beam_width", "max_input_len",
    "mm_encoder_only", "moe_cluster_parallel_size", "moe_tensor_parallel_size",
    "num_postprocess_workers", "otlp_traces_endpoint", "peft_cache_config", "perf_metrics_max_requests",
    "postprocess_tokenizer_dir", "print_iter_log", "quant_config", "reasoning_parser",
    "request_stats_max_iterations", "return_perf_metrics", "revision", "sampler_type",
    "scheduler_config", "skip_tokenizer_init", "sleep_config", "speculative_config", "stream_interval",
    "tokenizer_mode", "tokenizer_revision", "torch_compile_config", "trust_remote_code",
})

# moe_config.backend values (TensorRT-LLM spelling) -> our MoE backend names.
MOE_BACKENDS: dict[str, str] = {"CUTEDSL": "cutedsl", "VANILLA": "torch", "TORCH": "torch"}

# Defaults differ from trtllm-serve's (2048 sequences): this engine preallocates its KV slots.
DEFAULT_MAX_BATCH_SIZE = 16
DEFAULT_MAX_NUM_TOKENS = 8192
DEFAULT_MAX_SEQ_LEN = 4096


class OptionsError(ValueError):
    """A flag or YAML key with a value this server cannot honour."""


@dataclass(frozen=True)
class ServeOptions:
    """Everything one OpenAI server process needs to build its engine and listen.

    ``dwdp_config`` is the parsed ``dwdp_config:`` section, None when DWDP is off (it is
    checked against the model's expert count and the group size when the worker starts);
    ``ep_config`` the parsed ``ep_config:`` section (expert parallelism), None when off; at
    most one of the two is set;
    ``cuda_graphs``: decode steps replayed from CUDA graphs (on a GPU, where every MoE layer
    can be captured), one per batch size of ``cuda_graph_batch_sizes`` (None: powers of two up
    to ``max_batch_size``); ``ignored_keys`` lists YAML keys that were accepted but have no
    effect here.
    """

    model: str
    tokenizer: str | None = None
    host: str = "localhost"
    port: int = 8000
    backend: str = "pytorch"
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    max_num_tokens: int = DEFAULT_MAX_NUM_TOKENS
    max_seq_len: int = DEFAULT_MAX_SEQ_LEN
    moe_backend: str = "torch"
    nvfp4_compute: str = "bf16"
    device: str | None = None
    log_level: str = "info"
    dwdp_config: DwdpConfig | None = None
    ep_config: EpConfig | None = None
    kv_transfer: str = "auto"
    kv_transfer_pool_bytes: int | None = None
    cuda_graphs: bool = True
    cuda_graph_batch_sizes: tuple[int, ...] | None = None
    ignored_keys: tuple[str, ...] = field(default=())

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer or self.model


def load_yaml_mapping(path: str) -> dict[str, Any]:
    """Read a YAML file that must hold a mapping (an empty file is an empty mapping)."""
    try:
        with open(path, "r", encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise OptionsError(f"cannot read YAML file {path!r}: {e}") from e
    except yaml.YAMLError as e:
        raise OptionsError(f"{path}: not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise OptionsError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def _positive_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise OptionsError(f"{key} must be a positive integer, got {value!r}")
    return value


def _only_one(key: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value != 1:
        raise OptionsError(
            f"{key}={value!r} is not supported: every DWDP worker is one rank holding the whole "
            f"model except its expert slice (use dwdp_config to spread experts); set it to 1"
        )


def moe_backend_name(value: Any) -> str:
    """Our MoE backend name for an options YAML's ``moe_config`` mapping (OptionsError if none)."""
    if not isinstance(value, dict):
        raise OptionsError(f"moe_config must be a mapping, got {type(value).__name__}")
    backend = str(value.get("backend", "VANILLA")).upper()
    if backend not in MOE_BACKENDS:
        raise OptionsError(
            f"moe_config.backend={value.get('backend')!r} is not available here; "
            f"choose one of {sorted(MOE_BACKENDS)}"
        )
    unknown = sorted(set(value) - {"backend", "nvfp4_compute"})
    if unknown:
        logger.warning("moe_config keys %s have no effect here and are ignored", unknown)
    return MOE_BACKENDS[backend]


def merge_options(base: ServeOptions, extra: Mapping[str, Any], *, source: str = "YAML") -> ServeOptions:
    """Apply an LLM-API style mapping over ``base`` (the mapping wins, as in trtllm-serve)."""
    unknown = sorted(k for k in extra if k not in USED_KEYS and k not in KNOWN_IGNORED_KEYS)
    if unknown:
        raise OptionsError(
            f"{source}: unknown key(s) {unknown}: neither this server nor TensorRT-LLM's LLM API "
            f"knows them (check the spelling)"
        )
    ignored = tuple(sorted(k for k in extra if k in KNOWN_IGNORED_KEYS))
    if ignored:
        logger.debug("%s: keys %s are TensorRT-LLM options with no effect here; ignored", source, list(ignored))
    changes: dict[str, Any] = {"ignored_keys": tuple(sorted(set(base.ignored_keys) | set(ignored)))}
    for key in ("model", "tokenizer", "device"):
        if key in extra:
            if extra[key] is not None and not isinstance(extra[key], str):
                raise OptionsError(f"{source}: {key} must be a string, got {extra[key]!r}")
            changes[key] = extra[key]
    if "backend" in extra:
        changes["backend"] = extra["backend"]
    if "kv_transfer" in extra:
        changes["kv_transfer"] = extra["kv_transfer"]
    if "kv_transfer_pool_bytes" in extra:
        value = extra["kv_transfer_pool_bytes"]
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise OptionsError(f"{source}: kv_transfer_pool_bytes must be a byte count >= 0 (0: no "
                               f"export pool, KV over HTTP) or null (sized from the KV cache), got {value!r}")
        changes["kv_transfer_pool_bytes"] = value
    for key in ("max_batch_size", "max_num_tokens", "max_seq_len"):
        if key in extra and extra[key] is not None:
            changes[key] = _positive_int(f"{source}: {key}", extra[key])
    for key in ("tensor_parallel_size", "pipeline_parallel_size", "context_parallel_size",
                "moe_expert_parallel_size"):
        if key in extra:
            _only_one(f"{source}: {key}", extra[key])
    if "moe_config" in extra and extra["moe_config"] is not None:
        changes["moe_backend"] = moe_backend_name(extra["moe_config"])
        if extra["moe_config"].get("nvfp4_compute") is not None:
            changes["nvfp4_compute"] = str(extra["moe_config"]["nvfp4_compute"])
    if "dwdp_config" in extra:
        section = extra["dwdp_config"]
        if section is not None and not isinstance(section, dict):
            raise OptionsError(f"{source}: dwdp_config must be a mapping, got {type(section).__name__}")
        changes["dwdp_config"] = _dwdp_section(section)
    if "ep_config" in extra:
        changes["ep_config"] = _ep_section(extra["ep_config"], source)
    if "cuda_graph_config" in extra:
        changes.update(_cuda_graph_section(extra["cuda_graph_config"], source))
    return check_options(replace(base, **changes))


def _cuda_graph_section(section: Any, source: str) -> dict[str, Any]:
    """TensorRT-LLM's ``cuda_graph_config``: null turns graphs off; a mapping turns them on,
    with ``batch_sizes`` (a list) or ``max_batch_size`` (powers of two up to it, and it).
    ``enable_padding`` is always true here (a batch runs in the smallest bucket holding it)."""
    if section is None:
        return {"cuda_graphs": False, "cuda_graph_batch_sizes": None}
    if not isinstance(section, dict):
        raise OptionsError(f"{source}: cuda_graph_config must be a mapping or null (off), got "
                           f"{section!r}")
    unknown = sorted(set(section) - {"batch_sizes", "max_batch_size", "enable_padding"})
    if unknown:
        logger.warning("%s: cuda_graph_config keys %s have no effect here and are ignored",
                       source, unknown)
    if section.get("enable_padding") is False:
        logger.warning("%s: cuda_graph_config.enable_padding: false is ignored (batches are "
                       "padded to their bucket)", source)
    sizes = section.get("batch_sizes")
    if sizes is not None:
        if not isinstance(sizes, list) or not sizes:
            raise OptionsError(f"{source}: cuda_graph_config.batch_sizes must be a non-empty list "
                               f"of positive integers, got {sizes!r}")
        sizes = tuple(sorted({_positive_int(f"{source}: cuda_graph_config.batch_sizes", s)
                              for s in sizes}))
    elif section.get("max_batch_size") is not None:
        top = _positive_int(f"{source}: cuda_graph_config.max_batch_size",
                            section["max_batch_size"])
        sizes = tuple(sorted({top} | {1 << i for i in range(top.bit_length()) if 1 << i < top}))
    return {"cuda_graphs": True, "cuda_graph_batch_sizes": sizes}


def _ep_section(section: Any, source: str) -> EpConfig | None:
    """Parse an ``ep_config`` section; none or ``ep_size: 1`` mean off."""
    if section is None:
        return None
    if not isinstance(section, dict):
        raise OptionsError(f"{source}: ep_config must be a mapping, got {type(section).__name__}")
    try:
        config = EpConfig.from_dict(section)
    except EpConfigError as e:
        raise OptionsError(f"{source}: {e}") from e
    return config if config.enabled else None


def _dwdp_section(section: Mapping[str, Any] | None) -> DwdpConfig | None:
    """Parse a ``dwdp_config`` section; none, ``enabled: false`` or ``dwdp_size: 1`` mean off.

    ``enabled`` is TensorRT-LLM's switch; DwdpConfig has no such key, so it is consumed here.
    """
    if not section:
        return None
    section = dict(section)
    enabled = section.pop("enabled", True)
    if not isinstance(enabled, bool):
        raise OptionsError(f"dwdp_config.enabled must be true or false, got {enabled!r}")
    try:
        config = DwdpConfig.from_dict(section)
    except DwdpConfigError as e:
        raise OptionsError(str(e)) from e
    return config if enabled and config.enabled else None


def check_options(options: ServeOptions) -> ServeOptions:
    """Reject values no flag combination can serve; returns ``options`` unchanged."""
    if options.backend not in ("pytorch", None):
        raise OptionsError(
            f"backend={options.backend!r} is not supported: this server runs its own PyTorch "
            f"engine; use --backend pytorch"
        )
    if options.log_level not in LOG_LEVELS:
        raise OptionsError(f"log_level={options.log_level!r}; choose one of {sorted(LOG_LEVELS)}")
    if not (0 <= options.port < 65536):
        raise OptionsError(f"port={options.port} is outside [0, 65535]")
    if options.kv_transfer not in KV_TRANSFER_MODES:
        raise OptionsError(f"kv_transfer={options.kv_transfer!r}; choose one of {list(KV_TRANSFER_MODES)}")
    if options.dwdp_config is not None and options.ep_config is not None:
        raise OptionsError("dwdp_config and ep_config are alternatives (experts sliced and "
                           "prefetched, or experts split and tokens sent to them); set one")
    if options.moe_backend not in set(MOE_BACKENDS.values()):
        raise OptionsError(f"moe_backend={options.moe_backend!r}; choose 'torch' or 'cutedsl'")
    if options.nvfp4_compute not in ("bf16", "fp8"):
        raise OptionsError(f"moe_config.nvfp4_compute={options.nvfp4_compute!r}; choose 'bf16' "
                           f"(W4A16, the default) or 'fp8' (W4A8, cutedsl only)")
    if options.nvfp4_compute == "fp8" and options.moe_backend != "cutedsl":
        raise OptionsError(f"moe_config.nvfp4_compute='fp8' (W4A8) runs on the CUTEDSL MoE "
                           f"backend only, not {options.moe_backend!r}")
    if options.max_num_tokens < 1 or options.max_batch_size < 1 or options.max_seq_len < 2:
        raise OptionsError(
            f"max_batch_size={options.max_batch_size}, max_num_tokens={options.max_num_tokens} must "
            f"be >= 1 and max_seq_len={options.max_seq_len} >= 2"
        )
    too_big = [b for b in options.cuda_graph_batch_sizes or () if b > options.max_batch_size]
    if too_big:
        raise OptionsError(f"cuda_graph_config batch sizes {too_big} exceed max_batch_size="
                           f"{options.max_batch_size} (a step never holds more sequences)")
    return options


def options_from_cli(args: Any) -> ServeOptions:
    """Build options from parsed ``serve`` flags, then apply ``--extra_llm_api_options``."""
    for key in ("tp_size", "pp_size", "cp_size", "ep_size"):
        _only_one(f"--{key}", getattr(args, key))
    base = check_options(ServeOptions(
        model=args.model,
        tokenizer=args.tokenizer,
        host=args.host,
        port=args.port,
        backend=args.backend,
        max_batch_size=_positive_int("--max_batch_size", args.max_batch_size),
        max_num_tokens=_positive_int("--max_num_tokens", args.max_num_tokens),
        max_seq_len=_positive_int("--max_seq_len", args.max_seq_len),
        device=args.device,
        log_level=args.serve_log_level or "info",
        cuda_graphs=args.cuda_graphs,
    ))
    if args.extra_llm_api_options:
        extra = load_yaml_mapping(args.extra_llm_api_options)
        return merge_options(base, extra, source=args.extra_llm_api_options)
    return base
