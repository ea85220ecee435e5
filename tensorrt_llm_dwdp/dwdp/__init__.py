"""The DWDP runtime: config, expert layout, the manager and its copy engine, prefetch buffers,
the composite views (layout, ranges, virtual-memory mapping), agreement checks, stats and
errors. Device and communication code enters through ``manager``, ``copy_engine``,
``composite_views`` and ``vmm``; the rest (``composite_layout`` included) is pure."""
