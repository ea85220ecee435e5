"""DWDP across real processes on CPU (shm transport): 2 and 4 ranks under mpirun where it is
installed, else as plain subprocesses meeting through the TCP rendezvous (the TCP tests run that
way always). Each launch runs several scenarios of dwdp_rank.py in the same processes (see its
docstring) so torch is imported once per rank.

Time bounds here are generous on purpose (the CI machine has 2 shared cores): a rank that should
fail by its peer timeout must wait at least that long, and at most well short of a hang.
"""
import glob
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "dwdp_rank.py")
ROOT = os.path.dirname(os.path.dirname(HERE))

pytestmark = pytest.mark.multirank
# A rank that gave up by its peer timeout reports within this much of it, even on a loaded
# machine; a hang would not (each launch also has its own subprocess timeout).
SLACK_S = 30.0


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _group(n: int, *args: str, recovery: bool = False, timeout: float = 240):
    """Run dwdp_rank.py on ``n`` ranks: mpirun where installed, else the TCP rendezvous.

    ``recovery``: a rank exiting early must not kill the others (mpirun --enable-recovery; the
    TCP ranks are independent processes anyway). Returns (ok, output, seconds, pids)."""
    start = time.monotonic()
    if shutil.which("mpirun") is None:
        procs, outs = _tcp(n, range(n), *args, timeout=timeout)
        ok = all(p.returncode == 0 for p in procs)
        return ok, "".join(outs), time.monotonic() - start, [p.pid for p in procs]
    cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", str(n)]
    if recovery:
        cmd.append("--enable-recovery")
    cmd += [sys.executable, SCRIPT, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env())
    return proc.returncode == 0, proc.stdout + proc.stderr, time.monotonic() - start, []


def _lines(out: str, scenario: str) -> dict:
    """rank -> the rest of that rank's SCENARIO line."""
    found = {}
    for m in re.finditer(rf"^SCENARIO {scenario} rank=(\d+) (.*)$", out, re.M):
        found[int(m.group(1))] = m.group(2)
    return found


def _assert_ok(out: str, scenario: str, n: int) -> None:
    lines = _lines(out, scenario)
    assert sorted(lines) == list(range(n)), out[-4000:]
    assert all(v.startswith("OK") for v in lines.values()), lines


def _assert_all_fail(out: str, scenario: str, n: int, *words: str) -> None:
    lines = _lines(out, scenario)
    assert sorted(lines) == list(range(n)), out[-4000:]
    for rank, text in lines.items():
        assert text.startswith("FAILED"), (rank, text)
        for w in words:
            assert w in text, (rank, w, text)


def _our_segments(pids) -> list:
    return [p for pid in pids for p in glob.glob(f"/dev/shm/trtllm_dwdp_{pid}_*")]


def test_four_ranks_views_and_shape_mismatch():
    ok, out, _, _ = _group(4, "--scenarios", "ok,contention,shape", "--w", "6", "--p", "2")
    assert ok, out[-4000:]
    _assert_ok(out, "ok", 4)
    _assert_ok(out, "contention", 4)
    _assert_all_fail(out, "shape", 4, "DwdpMismatchError", "rank 3 layer 3 tensor 'w2_weight'",
                     "has shape (6, 16, 9) but rank 0 has (6, 16, 8)")
    assert "LEAKED" not in out, out[-4000:]


def test_two_ranks_views_and_mismatches():
    n, timeout = 2, 60.0
    ok, out, _, _ = _group(n, "--scenarios", "ok,contention,shape,config,names,badtensor",
                           "--timeout", str(timeout))
    assert ok, out[-4000:]
    _assert_ok(out, "ok", n)
    _assert_ok(out, "contention", n)
    last = n - 1
    _assert_all_fail(out, "shape", n, "DwdpMismatchError", f"rank {last} layer 3 tensor 'w2_weight'",
                     "has shape (5, 16, 9) but rank 0 has (5, 16, 8)")
    _assert_all_fail(out, "config", n, "DwdpMismatchError",
                     f"rank {last} has dwdp_config.prefetch_slice_bytes")
    _assert_all_fail(out, "names", n, "DwdpMismatchError", "layer 4", "w2_bias")
    lines = _lines(out, "badtensor")
    assert "DwdpRegistrationError" in lines[0] and "not in shared memory" in lines[0], lines
    for rank in range(1, n):
        assert "rank 0 failed before the handle exchange" in lines[rank], lines
        assert "w2_weight" in lines[rank], lines
        assert "no answer from" not in lines[rank], lines  # told, not timed out
    waits = [float(re.search(r"after ([\d.]+)s", v).group(1)) for v in lines.values()]
    assert max(waits) < timeout, lines  # none sat out its peer timeout
    assert "LEAKED" not in out, out[-4000:]


def test_dead_rank_fails_others_within_timeout():
    timeout = 4.0
    _, out, _, _ = _group(2, "--scenarios", "die", "--timeout", str(timeout), recovery=True)
    lines = _lines(out, "die")
    assert lines[1].startswith("EXITING"), out[-4000:]
    assert lines[0].startswith("FAILED"), lines
    assert "DwdpPeerError" in lines[0] and "rank(s) [1]" in lines[0], lines
    waited = float(re.search(r"after ([\d.]+)s", lines[0]).group(1))
    assert timeout <= waited < timeout + SLACK_S, waited
    dead_pid = int(re.search(r"pid=(\d+)", lines[1]).group(1))
    for path in _our_segments([dead_pid]):  # a killed process cannot unlink; the test does
        os.unlink(path)


def test_rank_that_never_arrives_fails_others_within_timeout():
    timeout = 4.0
    _, out, took, _ = _group(2, "--scenarios", "never", "--timeout", str(timeout))
    lines = _lines(out, "never")
    assert lines[0].startswith("FAILED"), out[-4000:]
    assert "DwdpPeerError" in lines[0] and "rank(s) [1]" in lines[0], lines
    waited = float(re.search(r"after ([\d.]+)s", lines[0]).group(1))
    assert timeout <= waited < timeout + SLACK_S, waited
    assert took < 3 * timeout + 2 * SLACK_S  # the sleeper left or was taken down: no hang


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tcp(n: int, ranks, *args: str, timeout: float = 240):
    port = _free_port()
    procs = []
    for r in ranks:
        env = _env()
        for k in [k for k in env if k.startswith(("OMPI_", "PMIX_", "PMI_"))]:
            del env[k]
        env.update(TRTLLM_DWDP_RANK=str(r), TRTLLM_DWDP_MASTER_ADDR="127.0.0.1",
                   TRTLLM_DWDP_MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, SCRIPT, "--size", str(n), *args],
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, env=env))
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    return procs, outs


def test_tcp_rendezvous_views_and_mismatch():
    procs, outs = _tcp(2, [0, 1], "--scenarios", "ok,shape", "--contention-opt")
    out = "".join(outs)
    assert all(p.returncode == 0 for p in procs), out[-4000:]
    _assert_ok(out, "ok", 2)
    _assert_all_fail(out, "shape", 2, "DwdpMismatchError", "rank 1 layer 3 tensor 'w2_weight'")
    assert not _our_segments(p.pid for p in procs)


def test_tcp_peer_never_arrives():
    timeout = 4.0
    procs, outs = _tcp(2, [0], "--scenarios", "ok", "--timeout", str(timeout))
    line = _lines(outs[0], "ok")[0]
    assert line.startswith("FAILED") and "DwdpPeerError" in line and "[1]" in line, outs[0]
    waited = float(re.search(r"after ([\d.]+)s", line).group(1))
    assert timeout <= waited < timeout + SLACK_S, waited


def test_composite_views_over_processes():
    """Composite views across real processes: memfd pages mapped twice, descriptors passed
    over the unix socket, sizes around 4 KiB pages, 4 KiB and 16 KiB mapping units, 2 and 4
    ranks (redundant layouts); a lost descriptor server fails every rank; nothing leaks."""
    runs = [(2, ["--w", "5", "--p", "3", "--scenarios", "ok,contention,badtensor,fdfail"]),
            (2, ["--w", "5", "--p", "3", "--page-bytes", "16384", "--scenarios", "ok"]),
            (4, ["--w", "6", "--p", "2", "--scenarios", "ok,contention"])]
    for n, extra in runs:
        ok, out, _, _ = _group(n, "--view", "composite", "--tensors", "pages", "--slice-bytes",
                               "3000", *extra)
        assert ok, out[-4000:]
        _assert_ok(out, "ok", n)
        assert "LEAKED" not in out, out[-4000:]
        if "contention" in extra[-1]:
            _assert_ok(out, "contention", n)
        if "fdfail" in extra[-1]:
            _assert_all_fail(out, "fdfail", n, "DwdpPeerError", "FdPassingError",
                             "network namespace")
            lines = _lines(out, "badtensor")
            assert "not in memory the composite view can map twice" in lines[0], lines
