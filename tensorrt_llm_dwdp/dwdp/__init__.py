"""The DWDP runtime: config, expert layout, the manager and its copy engine, prefetch buffers,
agreement checks, stats and errors. Device and communication code enters only through
``manager`` and ``copy_engine``; the rest is pure."""
