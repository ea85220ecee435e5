"""``tensorrt_llm.logger.logger``: upstream's logger object (here a ``logging`` logger)."""
import logging

logger = logging.getLogger("tensorrt_llm")
