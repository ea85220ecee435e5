"""The GPU tests' hang watchdog (tests/_watchdog.py): a hung test ends its process with its
stack on the terminal, past pytest's output capture."""
import os
import subprocess
import sys
import textwrap
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_hung_test_prints_its_stack_past_capture_and_exits(tmp_path):
    (tmp_path / "conftest.py").write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {HERE!r})
        import pytest
        from _watchdog import hang_watchdog

        @pytest.fixture(autouse=True)
        def watchdog(request):
            with hang_watchdog(1.0, request.config):
                yield
    """))
    (tmp_path / "test_hang.py").write_text(textwrap.dedent("""
        import time

        def test_fast():
            pass

        def test_stuck_in_a_kernel():
            time.sleep(60)
    """))
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(tmp_path)], capture_output=True, text=True, timeout=50,
                          cwd=tmp_path)
    assert time.monotonic() - start < 40
    assert proc.returncode != 0
    err = proc.stdout + proc.stderr
    assert "Timeout (0:00:01)!" in err, err[-2000:]
    assert "test_stuck_in_a_kernel" in err, err[-2000:]
