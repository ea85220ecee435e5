"""The disaggregated-serving YAML, in the shape ``trtllm-serve disaggregated -c`` reads.

```yaml
hostname: localhost          # where the router listens
port: 8000
model: /path/to/checkpoint   # top-level LLM-API keys are inherited by both roles
context_servers:
  num_instances: 2           # one per DWDP rank: each rank serves its own requests
  urls: ["localhost:8001", "localhost:8002"]
  router: {type: round_robin}
  dwdp_config: {dwdp_size: 2, num_experts_per_worker: 40, num_prefetch_experts: 24}
  # or, attention-DP + expert-parallel context servers (each holds E/2 experts, lockstep):
  # ep_config: {ep_size: 2}
generation_servers:
  num_instances: 1
  urls: ["localhost:8003"]
```

Each role section holds ``num_instances``, ``urls``, ``router`` and any LLM-API keys for its
servers (checked by ``serve.options``). A key given both at the top level and in a section must
agree, as upstream. Servers are listed context first, then generation: that order is the MPI
world-rank order ``disaggregated_mpi_worker`` uses.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Mapping

from tensorrt_llm_dwdp.serve.options import OptionsError, ServeOptions, load_yaml_mapping, merge_options

logger = logging.getLogger(__name__)

ROUTER_TYPES = ("round_robin", "load_balancing")

# Top-level keys of upstream's disaggregated config that steer features we do not have.
KNOWN_IGNORED_TOP = frozenset({
    "perf_metrics_max_requests", "return_perf_metrics", "perf_metrics_output_dir",
    "conditional_disagg_config", "otlp_config", "node_id", "schedule_style",
    "allow_request_chat_template", "gen_strip_message_history", "gen_tokids_ctxbytes",
    "num_workers", "disagg_coordinator_url",
})
ROUTER_KEYS = frozenset({"hostname", "port", "max_retries", "context_servers", "generation_servers"})
SECTION_KEYS = frozenset({"num_instances", "urls", "router"})


@dataclass(frozen=True)
class ServerInstance:
    """One context or generation server: its role, index within the role, and address."""

    role: str  # "context" | "generation"
    index: int
    hostname: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.hostname}:{self.port}"


@dataclass(frozen=True)
class RoleConfig:
    instances: tuple[ServerInstance, ...]
    router_type: str
    llm_args: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DisaggConfig:
    hostname: str
    port: int
    max_retries: int
    context: RoleConfig
    generation: RoleConfig

    @property
    def instances(self) -> tuple[ServerInstance, ...]:
        """Context servers then generation servers (the MPI world-rank order)."""
        return self.context.instances + self.generation.instances

    def role(self, name: str) -> RoleConfig:
        return self.context if name == "context" else self.generation

    def serve_options(self, instance: ServerInstance) -> ServeOptions:
        """Options of one server: its role's LLM-API keys, bound to its own address."""
        args = dict(self.role(instance.role).llm_args)
        model = args.get("model")
        if not isinstance(model, str):
            raise OptionsError(f"{instance.role}_servers: no 'model' (set it at the top level or in the section)")
        base = ServeOptions(model=model, host=instance.hostname, port=instance.port)
        return merge_options(base, args, source=f"{instance.role}_servers")


def parse_disagg_config(data: Mapping[str, Any], *, source: str = "disaggregated config") -> DisaggConfig:
    """Validate a disaggregated config mapping; errors name the key and the file."""
    if "disagg_cluster" in data:
        raise OptionsError(f"{source}: disagg_cluster (dynamic discovery) is not supported; "
                           f"list the servers under context_servers.urls / generation_servers.urls")
    ignored = sorted(k for k in data if k in KNOWN_IGNORED_TOP)
    if ignored:
        logger.info("%s: keys %s have no effect here; ignored", source, ignored)
    inherited = {k: v for k, v in data.items() if k not in ROUTER_KEYS and k not in KNOWN_IGNORED_TOP}
    hostname = data.get("hostname", "localhost")
    port = data.get("port", 8000)
    if not isinstance(hostname, str) or not hostname:
        raise OptionsError(f"{source}: hostname must be a non-empty string, got {hostname!r}")
    _check_port(f"{source}: port", port)
    max_retries = data.get("max_retries", 1)
    if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
        raise OptionsError(f"{source}: max_retries must be an integer >= 0, got {max_retries!r}")
    context = _role(data.get("context_servers"), "context", inherited, source)
    generation = _role(data.get("generation_servers"), "generation", inherited, source)
    seen: dict[tuple[str, int], str] = {}
    for inst in context.instances + generation.instances:
        key = (inst.hostname, inst.port)
        if key in seen:
            raise OptionsError(f"{source}: {inst.hostname}:{inst.port} is listed twice "
                               f"({seen[key]} and {inst.role} server {inst.index})")
        seen[key] = f"{inst.role} server {inst.index}"
    if (hostname, port) in seen:
        raise OptionsError(f"{source}: the router's {hostname}:{port} is also {seen[(hostname, port)]}")
    config = DisaggConfig(hostname, port, max_retries, context, generation)
    _check_roles(config, source)
    return config


def load_disagg_config(path: str) -> DisaggConfig:
    return parse_disagg_config(load_yaml_mapping(path), source=path)


def _check_port(name: str, port: Any) -> None:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise OptionsError(f"{name} must be an integer in [1, 65535], got {port!r}")


def _role(section: Any, role: str, inherited: Mapping[str, Any], source: str) -> RoleConfig:
    name = f"{role}_servers"
    if not isinstance(section, dict):
        raise OptionsError(f"{source}: {name} must be a mapping with num_instances and urls")
    section = dict(section)
    for key, value in inherited.items():
        if key in section and section[key] != value:
            raise OptionsError(f"{source}: {key} is set at the top level ({value!r}) and in {name} "
                               f"({section[key]!r}) with different values")
        section.setdefault(key, value)
    num = section.pop("num_instances", 1)
    urls = section.pop("urls", None)
    router = section.pop("router", None) or {}
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise OptionsError(f"{source}: {name}.num_instances must be a positive integer, got {num!r}")
    if not isinstance(urls, list) or not urls:
        raise OptionsError(f"{source}: {name}.urls must list 'host:port' of every server "
                           f"(dynamic discovery is not supported)")
    if len(urls) != num:
        raise OptionsError(f"{source}: {name}.num_instances={num} but {len(urls)} urls are listed")
    if not isinstance(router, dict):
        raise OptionsError(f"{source}: {name}.router must be a mapping, got {router!r}")
    router_type = router.get("type", "round_robin")
    if router_type not in ROUTER_TYPES:
        raise OptionsError(f"{source}: {name}.router.type={router_type!r}; choose one of {list(ROUTER_TYPES)}")
    instances = tuple(_instance(role, i, u, f"{source}: {name}.urls[{i}]") for i, u in enumerate(urls))
    return RoleConfig(instances, router_type, section)


def _instance(role: str, index: int, url: Any, where: str) -> ServerInstance:
    if not isinstance(url, str) or url.count(":") != 1:
        raise OptionsError(f"{where}: expected 'host:port', got {url!r}")
    host, port_text = url.split(":")
    if not host or not port_text.isdigit():
        raise OptionsError(f"{where}: expected 'host:port', got {url!r}")
    _check_port(where, int(port_text))
    return ServerInstance(role, index, host, int(port_text))


def _check_roles(config: DisaggConfig, source: str) -> None:
    """Parse every server's options now, so a bad key fails before anything starts."""
    for inst in config.instances:
        opts = config.serve_options(inst)
        if inst.role == "generation" and opts.dwdp_config is not None:
            raise OptionsError(f"{source}: generation_servers has dwdp_config; DWDP runs on the context "
                               f"servers only (decode keeps all experts)")
        if inst.role == "context" and opts.dwdp_config is not None:
            world = opts.dwdp_config.world_size
            if world != len(config.context.instances):
                raise OptionsError(
                    f"{source}: context_servers.num_instances={len(config.context.instances)} but "
                    f"dwdp_config has dwdp_size * num_groups = {world}; each context server is one DWDP rank")
        if inst.role == "generation" and opts.ep_config is not None:
            raise OptionsError(f"{source}: generation_servers has ep_config; the expert-parallel "
                               f"mode is for the context servers")
        if inst.role == "context" and opts.ep_config is not None \
                and opts.ep_config.ep_size != len(config.context.instances):
            raise OptionsError(
                f"{source}: context_servers.num_instances={len(config.context.instances)} but "
                f"ep_config.ep_size={opts.ep_config.ep_size}; each context server is one EP rank")
