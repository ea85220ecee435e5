import sys
import time

import pytest

from tensorrt_llm_dwdp import launcher

ECHO_RANK = (
    "import os, sys; r = os.environ.get('TRTLLM_DWDP_RANK') or os.environ.get('OMPI_COMM_WORLD_RANK');"
    "open(sys.argv[1] + '/rank' + r, 'w').write(os.environ.get('NCCL_NVLS_ENABLE', '?'))"
)


@pytest.mark.parametrize("kind", ["tcp", "mpirun"])
def test_launch_starts_every_rank_with_its_rank_and_safe_env(tmp_path, kind):
    if kind == "mpirun" and launcher.choose_launcher("auto") != "mpirun":
        pytest.skip("no mpirun on PATH")
    res = launcher.launch(3, [sys.executable, "-c", ECHO_RANK, str(tmp_path)], launcher=kind,
                          timeout_s=60)
    assert res.ok and res.launcher == kind and len(res.returncodes) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0", "rank1", "rank2"]
    assert all(p.read_text() == "0" for p in tmp_path.iterdir())


def test_a_failing_rank_stops_the_others_quickly():
    script = ("import os, sys, time; r = int(os.environ['TRTLLM_DWDP_RANK']);"
              "sys.exit(3) if r == 1 else time.sleep(60)")
    start = time.monotonic()
    res = launcher.launch(2, [sys.executable, "-c", script], launcher="tcp", timeout_s=60)
    assert not res.ok and 3 in res.returncodes
    # generous (process starts are slow on a loaded machine) yet short of the survivor's 60 s
    assert time.monotonic() - start < 45


def test_timeout_stops_ranks():
    res = launcher.launch(1, [sys.executable, "-c", "import time; time.sleep(60)"],
                          launcher="tcp", timeout_s=1)
    assert not res.ok


def test_bad_arguments():
    with pytest.raises(ValueError, match="launcher must be"):
        launcher.choose_launcher("slurm")
    with pytest.raises(ValueError, match="num_ranks"):
        launcher.launch(0, ["true"])


def test_ranks_started_before_a_failed_start_are_stopped(monkeypatch):
    started = []
    real = launcher.subprocess.Popen

    def popen(argv, env, **kw):
        if env["TRTLLM_DWDP_RANK"] == "2":
            raise OSError("fork failed (injected)")
        started.append(real(argv, env=env, **kw))
        return started[-1]

    monkeypatch.setattr(launcher.subprocess, "Popen", popen)
    with pytest.raises(OSError, match="injected"):
        launcher.launch(3, [sys.executable, "-c", "import time; time.sleep(60)"], launcher="tcp")
    assert len(started) == 2
    assert all(p.poll() is not None for p in started), "ranks 0 and 1 were left running"
