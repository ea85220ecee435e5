"""How a bench script hands its result over: one JSON object on stdout (the reply a device run
carries back) and, with ``--out``, the same text in a file."""
from __future__ import annotations

import json
import os


def emit(result: dict, out: str | None, quiet: bool = False) -> None:
    """Print ``result`` as JSON (unless ``quiet``) and write it to ``out`` when one is given;
    values JSON cannot hold are written as their ``str``. The file is replaced whole (written
    aside, then renamed), so a run killed while rewriting it keeps the previous result."""
    text = json.dumps(result, indent=1, default=str)
    if not quiet:
        print(text, flush=True)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out + ".tmp", "w") as f:
            f.write(text + "\n")
        os.replace(out + ".tmp", out)
