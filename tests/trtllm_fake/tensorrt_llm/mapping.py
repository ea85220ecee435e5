"""``Mapping`` with the DWDP fields upstream's manager reads (``dwdp_size``, ``dwdp_rank``,
``dwdp_enabled``)."""


class Mapping:
    def __init__(self, world_size: int = 1, rank: int = 0, tp_size: int = 1,
                 dwdp_size: int = 1, dwdp_rank: int = 0) -> None:
        self.world_size, self.rank, self.tp_size = world_size, rank, tp_size
        self.dwdp_size, self.dwdp_rank = dwdp_size, dwdp_rank
        self.moe_ep_size, self.moe_ep_rank = 1, 0

    @property
    def dwdp_enabled(self) -> bool:
        return self.dwdp_size > 1
