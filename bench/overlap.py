"""How much ranks' steps ran at the same time, from each step's start and end on one clock.

Ranks sharing a GPU (or CPU cores) time-slice it while their steps overlap, so a step time
measured while the other rank was idle is not comparable with one measured while it ran: the
serving comparison and the per-step sweep report the overlap beside their figures.
"""
from __future__ import annotations

Interval = tuple[float, float]


def covered(span: Interval, others: list[Interval]) -> float:
    """Seconds of ``span`` inside the union of ``others`` (sorted by start; may overlap)."""
    a, b = span
    total, reach = 0.0, a
    for s, e in others:
        if s >= b:
            break
        s, e = max(s, reach), min(e, b)
        if e > s:
            total += e - s
            reach = e
    return total


def overlap_per_step(per_rank: list[list[Interval]]) -> list[list[float]]:
    """For each rank's each step: the seconds of it during which another rank was in a step."""
    out = []
    for i, spans in enumerate(per_rank):
        others = sorted(iv for j, sp in enumerate(per_rank) if j != i for iv in sp)
        out.append([covered(span, others) for span in spans])
    return out


def overlap_fractions(per_rank: list[list[Interval]]) -> list[float | None]:
    """Each rank's share of its step time during which another rank was in a step too
    (None for a rank with no step time)."""
    out = []
    for spans, cov in zip(per_rank, overlap_per_step(per_rank)):
        total = sum(e - s for s, e in spans)
        out.append(sum(cov) / total if total > 0 else None)
    return out
