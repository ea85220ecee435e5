"""The engine: scheduling requests into forward steps, running them, and handing KV over."""
