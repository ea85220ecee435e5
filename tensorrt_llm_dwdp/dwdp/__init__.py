"""The DWDP runtime: config, expert layout, the manager and what it is made of (registration,
the group exchange, the prefetch runtime, the per-step protocol), the copy engine, prefetch
buffers, the composite views (layout, ranges, virtual-memory mapping), host tiers, agreement
checks, stats and errors. Pure arithmetic, tested exhaustively on the CPU: ``config``,
``layout``, ``composite_layout``, ``copy_plan``, ``tiers``, ``agreement``."""
