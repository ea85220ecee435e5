"""Pure checks that the ranks of a group agree; every rank runs them on the same records.

Because each rank sees every rank's record after one allgather, each computes the same verdict
and fails with the same message: nobody is left waiting in a later collective.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

MAX_LINES = 12


def config_problems(configs: Sequence[Mapping[str, Any]]) -> list[str]:
    """Lines naming each rank whose ``dwdp_config`` differs from rank 0's, key by key."""
    lines = []
    ref = configs[0]
    for rank, cfg in enumerate(configs[1:], start=1):
        for key in sorted(set(ref) | set(cfg)):
            if ref.get(key) != cfg.get(key):
                lines.append(
                    f"rank {rank} has dwdp_config.{key} = {cfg.get(key)!r} but rank 0 has "
                    f"{ref.get(key)!r}"
                )
    return lines


def record_problems(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """Lines naming every disagreement of a rank's exchange record with rank 0's.

    A record holds ``config`` (dict), ``num_experts``, ``transport``, ``weight_layout`` (the
    experts' byte order, ``moe/layouts.py``) and ``layers``: a list of ``(layer_idx, {name:
    (dtype, shape)})`` in registration order.
    """
    lines = config_problems([r["config"] for r in records])
    ref = records[0]
    for rank, rec in enumerate(records[1:], start=1):
        for key in ("num_experts", "transport", "weight_layout"):
            if rec[key] != ref[key]:
                lines.append(f"rank {rank} has {key} = {rec[key]!r} but rank 0 has {ref[key]!r}")
        mine, theirs = rec["layers"], ref["layers"]
        if [i for i, _ in mine] != [i for i, _ in theirs]:
            lines.append(
                f"rank {rank} registered {len(mine)} layer(s) {[i for i, _ in mine]} but rank 0 "
                f"registered {len(theirs)} layer(s) {[i for i, _ in theirs]}"
            )
            continue
        for (layer, tensors), (_, ref_tensors) in zip(mine, theirs):
            if sorted(tensors) != sorted(ref_tensors):
                extra = sorted(set(tensors) - set(ref_tensors))
                lacking = sorted(set(ref_tensors) - set(tensors))
                lines.append(
                    f"rank {rank} layer {layer} registered other tensors than rank 0: rank {rank} "
                    f"has {extra} that rank 0 lacks, and lacks {lacking} that rank 0 has"
                )
                continue
            for name in sorted(tensors):
                dtype, shape = tensors[name]
                ref_dtype, ref_shape = ref_tensors[name]
                if dtype != ref_dtype:
                    lines.append(
                        f"rank {rank} layer {layer} tensor {name!r} has dtype {dtype} but rank 0 "
                        f"has {ref_dtype}"
                    )
                if tuple(shape) != tuple(ref_shape):
                    lines.append(
                        f"rank {rank} layer {layer} tensor {name!r} has shape {tuple(shape)} but "
                        f"rank 0 has {tuple(ref_shape)}"
                    )
    return lines


def summarize(lines: Sequence[str], what: str) -> str:
    """One message: ``what`` then at most MAX_LINES problems (and how many were left out)."""
    shown = list(lines[:MAX_LINES])
    if len(lines) > MAX_LINES:
        shown.append(f"... and {len(lines) - MAX_LINES} more")
    return f"{what}:\n  " + "\n  ".join(shown)
