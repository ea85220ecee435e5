"""``trtllm-switch``: install, remove or show the start-up switch that turns the TensorRT-LLM
adapter on in every Python process (TensorRT-LLM's MPI workers included)."""
from __future__ import annotations

import argparse
from pathlib import Path

NAME = "trtllm-switch"
HELP = ("install-pth | remove-pth | status of the .pth switch: with TRTLLM_DWDP_ADAPTER=1, every "
        "Python process then builds this project's DWDP manager where TensorRT-LLM builds its own")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=("install-pth", "remove-pth", "status"))
    p.add_argument("--site-dir", default=None,
                   help="site-packages folder (default: this interpreter's)")


def main(args: argparse.Namespace) -> int:
    from tensorrt_llm_dwdp.trtllm.activate import (ENV_SWITCH, PTH_NAME, install_pth, remove_pth,
                                                   site_dir, switched_on)

    directory = Path(args.site_dir) if args.site_dir else site_dir()
    if args.action == "install-pth":
        print(f"wrote {install_pth(directory)}; set {ENV_SWITCH}=1 to activate")
    elif args.action == "remove-pth":
        print("removed" if remove_pth(directory) else f"no {PTH_NAME} in {directory}")
    else:
        present = (directory / PTH_NAME).exists()
        print(f"{PTH_NAME} in {directory}: {'yes' if present else 'no'}; "
              f"{ENV_SWITCH} {'on' if switched_on() else 'off'} in this environment")
    return 0
