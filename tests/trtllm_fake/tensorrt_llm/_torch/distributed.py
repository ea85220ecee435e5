"""``MPIDist``: the Distributed object upstream's DwdpManager insists on."""


class MPIDist:
    def __init__(self, mapping) -> None:
        self.mapping = mapping
        self.rank, self.world_size = mapping.rank, mapping.world_size
