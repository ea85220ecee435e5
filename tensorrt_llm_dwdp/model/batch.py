"""What one forward step computes: which sequences, where they start, how many new tokens."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BatchInfo:
    """Per-sequence step description; the new tokens are packed in ``input_ids`` in this order.

    ``slots[i]``: cache slot of sequence i. ``start_positions[i]``: tokens of sequence i already
    in the cache (its first new token has this position). ``lengths[i]``: new tokens this step
    (prompt length for prefill, 1 for decode; steps may mix both).
    """

    slots: tuple[int, ...]
    start_positions: tuple[int, ...]
    lengths: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "slots", tuple(int(s) for s in self.slots))
        object.__setattr__(self, "start_positions", tuple(int(s) for s in self.start_positions))
        object.__setattr__(self, "lengths", tuple(int(n) for n in self.lengths))
        n = len(self.slots)
        if n == 0 or len(self.start_positions) != n or len(self.lengths) != n:
            raise ValueError(
                f"BatchInfo needs equally long, non-empty slots/start_positions/lengths, got "
                f"{len(self.slots)}/{len(self.start_positions)}/{len(self.lengths)}"
            )
        if len(set(self.slots)) != n:
            raise ValueError(f"BatchInfo slots must be distinct, got {self.slots}")
        for i, (s, p, l) in enumerate(zip(self.slots, self.start_positions, self.lengths)):
            if s < 0 or p < 0 or l < 1:
                raise ValueError(
                    f"sequence {i}: slot={s} and start_position={p} must be >= 0, length={l} >= 1"
                )

    @property
    def num_seqs(self) -> int:
        return len(self.slots)

    @property
    def num_tokens(self) -> int:
        return sum(self.lengths)

    @property
    def offsets(self) -> tuple[int, ...]:
        """Start of each sequence's tokens in the packed input (length num_seqs + 1)."""
        out = [0]
        for n in self.lengths:
            out.append(out[-1] + n)
        return tuple(out)

    def positions(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Absolute position of every packed token, int64 ``[num_tokens]``."""
        return torch.cat(
            [torch.arange(p, p + n, dtype=torch.int64) for p, n in zip(self.start_positions, self.lengths)]
        ).to(device)

    def last_token_indices(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Index of each sequence's last token in the packed input, int64 ``[num_seqs]``."""
        return torch.tensor(self.offsets[1:], dtype=torch.int64, device=device) - 1

    @classmethod
    def prefill(cls, lengths: list[int], slots: list[int] | None = None) -> "BatchInfo":
        """Fresh sequences: slots 0..n-1 unless given, nothing cached yet."""
        slots = list(range(len(lengths))) if slots is None else slots
        return cls(tuple(slots), tuple(0 for _ in lengths), tuple(lengths))
