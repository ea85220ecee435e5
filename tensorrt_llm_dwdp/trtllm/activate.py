"""The switch that turns the adapter on in every TensorRT-LLM executor process.

The LLM API and ``trtllm-serve`` build their executors in MPI worker processes (fresh Python
interpreters), where no user code runs before TensorRT-LLM does. So the switch lives where every
interpreter looks at start-up: a ``.pth`` file in site-packages, installed once with

    python -m tensorrt_llm_dwdp trtllm-switch install-pth

Its one line does nothing unless ``TRTLLM_DWDP_ADAPTER=1`` is set in the environment (workers
inherit the launcher's); then it calls :func:`from_environment`, which runs ``install()`` with
our extra knobs from ``TRTLLM_DWDP_ADAPTER_OPTIONS`` (a JSON object, e.g.
``{"peer_timeout_s": 120}``). Importing this module imports no tensorrt_llm.
"""
from __future__ import annotations

import importlib.abc
import json
import os
import sys
import sysconfig
from pathlib import Path
from typing import Any, Mapping

ENV_SWITCH = "TRTLLM_DWDP_ADAPTER"
ENV_OPTIONS = "TRTLLM_DWDP_ADAPTER_OPTIONS"
PTH_NAME = "tensorrt_llm_dwdp_adapter.pth"
PTH_LINE = (f'import os; os.environ.get("{ENV_SWITCH}", "0") not in ("", "0") and '
            '__import__("tensorrt_llm_dwdp.trtllm.activate", fromlist=["from_environment"])'
            '.from_environment(at_startup=True)\n')


def switched_on(environ: Mapping[str, str] | None = None) -> bool:
    """True when ``TRTLLM_DWDP_ADAPTER`` is set to anything but empty or ``0``."""
    env = os.environ if environ is None else environ
    return env.get(ENV_SWITCH, "0") not in ("", "0")


def options_from_environment(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Our extra config knobs from ``TRTLLM_DWDP_ADAPTER_OPTIONS`` ({} when unset)."""
    env = os.environ if environ is None else environ
    text = env.get(ENV_OPTIONS, "").strip()
    if not text:
        return {}
    try:
        options = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{ENV_OPTIONS} is not JSON ({exc}): {text!r}") from None
    if not isinstance(options, dict):
        raise ValueError(f"{ENV_OPTIONS} must be a JSON object such as "
                         f'{{"peer_timeout_s": 120}}, got {text!r}')
    from tensorrt_llm_dwdp.dwdp.config import DwdpConfig
    from tensorrt_llm_dwdp.trtllm.config import UPSTREAM_KEYS

    upstream = sorted(set(options) & set(UPSTREAM_KEYS))
    if upstream:
        raise ValueError(f"{ENV_OPTIONS}: {upstream} belong in TensorRT-LLM's dwdp_config")
    known = set(DwdpConfig.__dataclass_fields__) - set(UPSTREAM_KEYS)
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"{ENV_OPTIONS}: unknown key(s) {unknown}; known: {sorted(known)}")
    return options


class _RefuseTensorrtLlm(importlib.abc.MetaPathFinder):
    """Fails every import of ``tensorrt_llm`` with the reason the adapter could not start.

    Set at interpreter start-up when the switch is on but its options are bad: raising there
    would only be printed by ``site`` (and would break every Python process of the
    environment, pip included), while running on without the adapter would serve with
    upstream's manager in that one worker. Failing where TensorRT-LLM is first imported stops
    exactly the processes that would run DWDP, with the message naming the variable."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname == "tensorrt_llm" or fullname.startswith("tensorrt_llm."):
            raise ImportError(f"tensorrt_llm_dwdp adapter ({ENV_SWITCH}=1) cannot start: "
                              f"{self.reason}; fix {ENV_OPTIONS} or unset {ENV_SWITCH}")
        return None


def from_environment(environ: Mapping[str, str] | None = None, *,
                     at_startup: bool = False) -> Any:
    """Install the adapter when the switch is on (once per process); the active installation,
    or None when the switch is off. Bad options raise ValueError, except ``at_startup`` (the
    ``.pth`` line), where every later import of ``tensorrt_llm`` fails with the reason."""
    if not switched_on(environ):
        return None
    from tensorrt_llm_dwdp.trtllm.install import active_installation, install

    try:
        options = options_from_environment(environ)
    except ValueError as exc:
        if not at_startup:
            raise
        sys.meta_path.insert(0, _RefuseTensorrtLlm(str(exc)))
        return None
    return active_installation() or install(options=options)


def site_dir() -> Path:
    """This interpreter's site-packages (where the ``.pth`` goes by default)."""
    return Path(sysconfig.get_paths()["purelib"])


def install_pth(directory: str | Path | None = None) -> Path:
    """Write the ``.pth`` switch into ``directory`` (default: :func:`site_dir`)."""
    path = Path(directory or site_dir()) / PTH_NAME
    path.write_text(PTH_LINE)
    return path


def remove_pth(directory: str | Path | None = None) -> bool:
    """Remove the ``.pth`` switch; True when there was one."""
    path = Path(directory or site_dir()) / PTH_NAME
    if path.exists():
        path.unlink()
        return True
    return False


def main(argv: list[str] | None = None) -> int:
    """``python -m tensorrt_llm_dwdp.trtllm.activate ACTION``: the ``trtllm-switch`` command."""
    from tensorrt_llm_dwdp.cli import main as cli_main

    return cli_main(["trtllm-switch", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
