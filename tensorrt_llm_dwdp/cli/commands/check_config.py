"""check-config: validate the dwdp_config of an options YAML and print each rank's layout.

For every rank of a group: the experts it owns, what it fetches from whom, and its expert memory
(``L*W + 2*(S-1)*P`` expert slots against ``L*E`` replicated; with H host experts per rank
``L*(W-H) + 2*((S-1)*P + H)``, or ``+ 2*(S-1)*P`` with ``host_offload: uvm``), in bytes when the
expert size is known (``--expert-bytes`` or ``--model`` preset). With the composite view (the
file's ``expert_view`` or ``--expert-view composite``) and a ``--model`` preset it also prints
the composite footprint: own allocations with their edge pages, the two pools, the reserved
address space, and the overhead against the multi view at ``--page-bytes`` (the file's
``view_page_bytes``, else 2 MiB: CUDA's granularity on H100/H200). With host tiers it also
reports the host store (``L*E`` experts per group and node, in POSIX shm) beside this machine's
free shared and host memory. The expert weight layout the ranks will load is reported with
the rest: ``--weight-layout`` (auto: the MoE backend's, ``--moe-backend`` or else the file's
``moe_config.backend``: preshuffled for cutedsl, linear for torch); every rank of a group must
load the same one (the exchange refuses a mix, naming both), and ``preshuffled`` is checked
against the ``--model`` preset's expert sizes (NVFP4, H and I multiples of 64); it changes no
memory figure (the permutation stays inside each expert). With ``--model`` the expert size of
``--quant`` (nvfp4, bf16 or fp8 block 128: e4m3 weights + fp32 128x128 scales) is printed
against bf16's, the memory and copy traffic the format saves. Exits 1 with the message on a
bad file.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

from tensorrt_llm_dwdp.dwdp.config import DwdpConfig, DwdpConfigError
from tensorrt_llm_dwdp.dwdp.layout import ExpertLayout
from tensorrt_llm_dwdp.moe.specs import QUANT_MODES, expert_nbytes, expert_specs

NAME = "check-config"
HELP = "validate a dwdp_config YAML and print the expert layout of every rank"

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="LLM-API options YAML with a dwdp_config: section")
    p.add_argument("--num-experts", type=int, default=None,
                   help="routed experts E (default: the --model preset's, else W + (S-1)*P)")
    p.add_argument("--world-size", type=int, default=None,
                   help="check that the launch has dwdp_size * num_groups ranks")
    p.add_argument("--model", default=None,
                   help="model preset (e.g. deepseek-v3) giving E, MoE layer count and expert size")
    p.add_argument("--quant", choices=sorted(QUANT_MODES), default="nvfp4",
                   help="expert storage for --model sizes (default nvfp4)")
    p.add_argument("--expert-bytes", type=int, default=None,
                   help="bytes of one expert over all its tensors (overrides --model)")
    p.add_argument("--num-layers", type=int, default=None,
                   help="MoE layers L for the memory totals (default: the preset's, else 1)")
    p.add_argument("--json", action="store_true", help="print the layout as JSON")
    p.add_argument("--expert-view", choices=["multi", "composite"], default=None,
                   help="the weight view to report (default: the file's expert_view)")
    p.add_argument("--moe-backend", default=None, choices=["torch", "cutedsl", "torch-grouped"],
                   help="MoE backend the ranks run (default: the file's moe_config.backend, "
                   "else torch); it picks the weight layout")
    p.add_argument("--weight-layout", choices=["auto", "linear", "preshuffled"], default="auto",
                   help="byte order of the experts the ranks load (run --weight-layout); auto: "
                   "the backend's; preshuffled is checked against the --model preset")
    p.add_argument("--page-bytes", type=int, default=None,
                   help="composite mapping unit (default: the file's view_page_bytes, else 2 MiB)")


DEFAULT_PAGE_BYTES = 2 << 20


def _model_facts(name: str, quant: str) -> tuple[int, int, dict[str, int], int]:
    """``(num_experts, moe_layers, {tensor name: bytes per expert}, bf16 bytes per expert)`` of
    a model preset with ``quant`` experts."""
    from tensorrt_llm_dwdp.model import ModelConfig, get_preset, preset_names

    if name not in preset_names():
        raise DwdpConfigError(f"unknown --model {name!r}; presets: {', '.join(preset_names())}")
    cfg = ModelConfig.from_hf(get_preset(name))
    h, i = cfg.hidden_size, cfg.moe_intermediate_size
    try:
        names = {n: spec.nbytes() for n, spec in expert_specs(quant, h, i).items()}
    except ValueError as exc:
        raise DwdpConfigError(f"--model {name} --quant {quant}: {exc}") from None
    return cfg.num_experts, len(cfg.moe_layer_indices), names, expert_nbytes("bf16", h, i)


def _moe_backend(args: argparse.Namespace) -> str:
    """``--moe-backend``, else the file's ``moe_config.backend``, else torch."""
    if args.moe_backend:
        return args.moe_backend
    from tensorrt_llm_dwdp.serve.options import OptionsError, load_yaml_mapping, moe_backend_name

    try:
        section = load_yaml_mapping(args.file).get("moe_config")
        return moe_backend_name(section) if section is not None else "torch"
    except (OptionsError, OSError) as exc:
        raise DwdpConfigError(f"{args.file}: {exc}") from None


def _weight_layout(args: argparse.Namespace, backend: str) -> str:
    """The layout the ranks load (``--weight-layout`` for ``backend``), checked against the
    experts: NVFP4, and with ``--model`` the preset's sizes."""
    from tensorrt_llm_dwdp.moe.backends import expert_weight_layout

    hidden = inter = None
    if args.model:
        from tensorrt_llm_dwdp.model import ModelConfig, get_preset

        cfg = ModelConfig.from_hf(get_preset(args.model))
        hidden, inter = cfg.hidden_size, cfg.moe_intermediate_size
    try:
        return expert_weight_layout(backend, args.weight_layout, args.quant, hidden, inter)
    except ValueError as exc:
        where = f"--model {args.model}" if args.model else f"--quant {args.quant}"
        raise DwdpConfigError(f"--weight-layout {args.weight_layout} ({where}): {exc}") from None


def _composite(lay: ExpertLayout, layers: int, names: dict[str, int], page: int,
               host_experts: int = 0) -> dict:
    from tensorrt_llm_dwdp.dwdp.composite_layout import CompositeRange, footprint

    fp = footprint(lay, [names] * layers, page, host_experts=host_experts)
    edges = layers * sum(CompositeRange.of(lay, eb, page, host_experts).edge_bytes
                         for eb in names.values())
    return {"page_bytes": page, "own_bytes": fp.own_bytes, "edge_bytes": edges,
            "pool_bytes": fp.pool_bytes, "reserved_bytes": fp.reserved_bytes,
            "multi_bytes": fp.multi_own_bytes + fp.multi_buffer_bytes,
            "overhead_bytes": fp.overhead_bytes}


def resolve(args: argparse.Namespace) -> dict[str, Any]:
    """Validate and return the whole report as plain data (raises DwdpConfigError)."""
    config = DwdpConfig.from_yaml(args.file)
    model_e = model_layers = model_bytes = names = bf16_bytes = None
    if args.model:
        model_e, model_layers, names, bf16_bytes = _model_facts(args.model, args.quant)
        model_bytes = sum(names.values())
    backend = _moe_backend(args)
    weight_layout = _weight_layout(args, backend)
    if args.expert_view:  # validated as the run would see it (uvm offload is multi only)
        config = dataclasses.replace(config, expert_view=args.expert_view)
    view = config.expert_view
    page = args.page_bytes or config.view_page_bytes or DEFAULT_PAGE_BYTES
    if view == "composite":
        from tensorrt_llm_dwdp.dwdp.composite_layout import check_page_bytes

        try:
            check_page_bytes(page, 1, "--page-bytes")
        except ValueError as exc:
            raise DwdpConfigError(str(exc)) from exc
    num_experts = next((e for e in (args.num_experts, model_e, config.implied_num_experts)
                        if e is not None), None)
    if num_experts is None:
        raise DwdpConfigError(
            "dwdp_size is 1 and num_experts_per_worker is not set: pass --num-experts or --model"
        )
    config.check_num_experts(num_experts)
    if args.world_size is not None:
        config.check_world_size(args.world_size)
    layers = next((n for n in (args.num_layers, model_layers) if n is not None), 1)
    if layers < 1:
        raise DwdpConfigError(f"--num-layers must be >= 1, got {layers}")
    expert_bytes = args.expert_bytes if args.expert_bytes is not None else model_bytes
    ranks = []
    h = config.host_experts_per_worker
    for r in range(config.dwdp_size):
        lay = ExpertLayout.from_config(config, num_experts, r)
        fetch = [{"peer": p, "experts": list(lay.fetch_range(p)),
                  "part": "head" if p < r else "tail"} for p in lay.peers]
        slots = lay.expert_memory(layers) - layers * h
        if config.host_offload == "prefetch":
            slots += 2 * h
        entry = {"rank": r, "owns": list(lay.owned_range()), "fetches": fetch,
                 "expert_slots": slots, "replicated_slots": layers * num_experts,
                 "fraction_of_replicated": slots / (layers * num_experts)}
        if expert_bytes is not None:
            entry["bytes"] = slots * expert_bytes
            entry["replicated_bytes"] = layers * num_experts * expert_bytes
        if view == "composite" and names is not None and config.enabled:
            entry["composite"] = _composite(lay, layers, names, page, h)
        if h:
            entry["host_experts"] = [lay.owned_range(r)[1] - h, lay.owned_range(r)[1]]
        ranks.append(entry)
    report_tiers = None
    if config.tiers_enabled:
        report_tiers = {"host_store_slots": layers * num_experts, "host_offload": config.host_offload,
                        "host_experts_per_worker": h, "host_backup": config.host_backup}
        if expert_bytes is not None:
            from tensorrt_llm_dwdp.dwdp.host_store import host_memory, store_bytes

            report_tiers["host_store_bytes"] = store_bytes(num_experts, layers,
                                                           {"expert": expert_bytes})
            report_tiers["this_host"] = host_memory()
    return {
        "config": config.to_dict(), "enabled": config.enabled, "num_experts": num_experts,
        "moe_layers": layers, "expert_bytes": expert_bytes, "expert_view": view,
        "quant": args.quant, "expert_bytes_bf16": bf16_bytes,
        "moe_backend": backend, "weight_layout": weight_layout,
        "groups": [list(range(g * config.dwdp_size, (g + 1) * config.dwdp_size))
                   for g in range(config.num_groups)],
        "ranks": ranks,
        "host_tiers": report_tiers,
    }


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def _print_text(report: dict[str, Any]) -> None:
    cfg = report["config"]
    state = "on" if report["enabled"] else "off (dwdp_size == 1)"
    print(f"DWDP {state}: E={report['num_experts']} S={cfg['dwdp_size']} "
          f"W={cfg['num_experts_per_worker'] or report['num_experts']} "
          f"P={cfg['num_prefetch_experts'] or 0} groups={cfg['num_groups']} "
          f"contention_opt={cfg['contention_opt']} slice={cfg['prefetch_slice_bytes']} B "
          f"timeout={cfg['peer_timeout_s']:g} s")
    print(f"world ranks by group: {report['groups']}")
    print(f"expert weights: {report['weight_layout']} layout for MoE backend "
          f"{report['moe_backend']} (the same on every rank of a group"
          + (": permuted per expert at load for the sm90 kernels)"
             if report["weight_layout"] == "preshuffled" else ")"))
    layers = report["moe_layers"]
    if report["expert_bytes_bf16"] and report["expert_bytes"]:
        eb, bf = report["expert_bytes"], report["expert_bytes_bf16"]
        print(f"experts {report['quant']}: {eb / 2**20:.2f} MiB per expert (weights and scales) "
              f"vs {bf / 2**20:.2f} MiB in bf16: {1 - eb / bf:.1%} less expert memory and "
              f"NVLink traffic per prefetched expert")
    for entry in report["ranks"]:
        lo, hi = entry["owns"]
        fetch = ", ".join(f"[{a}, {b}) {f['part']} of rank {f['peer']}"
                          for f in entry["fetches"] for a, b in [f["experts"]]) or "nothing"
        mem = (f"{entry['expert_slots']} expert slots for {layers} MoE layer(s) vs "
               f"{entry['replicated_slots']} replicated ({entry['fraction_of_replicated']:.1%})")
        if "bytes" in entry:
            mem += f" = {_gib(entry['bytes'])} vs {_gib(entry['replicated_bytes'])}"
        host = (f"; experts [{entry['host_experts'][0]}, {entry['host_experts'][1]}) in host "
                f"memory" if "host_experts" in entry else "")
        print(f"rank {entry['rank']}: owns [{lo}, {hi}){host}; fetches {fetch}; {mem}")
        comp = entry.get("composite")
        if comp:
            mib = 2**20
            print(f"  composite view (pages of {comp['page_bytes'] // 1024} KiB): own "
                  f"allocations {_gib(comp['own_bytes'])} (edges {comp['edge_bytes'] / mib:.1f} "
                  f"MiB), pools {_gib(comp['pool_bytes'])}, reserved address space "
                  f"{_gib(comp['reserved_bytes'])}; overhead vs the multi view "
                  f"{comp['overhead_bytes'] / mib:+.1f} MiB "
                  f"({comp['overhead_bytes'] / comp['multi_bytes']:+.2%})")
    if report["expert_view"] == "composite" and not any("composite" in e for e in report["ranks"]):
        print("composite view: pass --model PRESET for its footprint (per-tensor expert sizes)")
    tiers = report["host_tiers"]
    if tiers is not None:
        line = (f"host store (one per group per node, POSIX shm): {tiers['host_store_slots']} "
                f"expert slots (all {report['num_experts']} experts of {layers} MoE layer(s))")
        if "host_store_bytes" in tiers:
            free = tiers["this_host"]
            avail = free["mem_available"]
            line += (f" = {_gib(tiers['host_store_bytes'])}; this host: {_gib(free['shm_free'])} "
                     f"free in /dev/shm, "
                     + (f"{_gib(avail)} MemAvailable" if avail >= 0 else "MemAvailable unknown"))
        print(line)


def main(args: argparse.Namespace) -> int:
    try:
        report = resolve(args)
    except DwdpConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_text(report)
    return 0
