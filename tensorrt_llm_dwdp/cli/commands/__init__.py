"""CLI commands, one module each (see ``tensorrt_llm_dwdp.cli``)."""
