"""bench/kv_handover.py on CPU ranks: two processes, the shm pool fast path beside HTTP and a
raw copy, every byte checked, the fast path's phases reported."""
import json

from bench import kv_handover


def test_cpu_handover_bench_verifies_both_paths(tmp_path):
    out = tmp_path / "kv.json"
    assert kv_handover.main(["--device", "cpu", "--tokens", "3", "300", "--layers", "2",
                             "--repeats", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["ok"] and [s["tokens"] for s in result["sizes"]] == [3, 300]
    for s in result["sizes"]:
        assert s["nbytes"] == 2 * s["tokens"] * (512 + 64) * 2
        assert s["fast"]["path"] == ["shm"] and s["http"]["path"] == ["http"]
        assert s["fast"]["verified"] and s["http"]["verified"] and s["raw"]["gb_per_s"] > 0
        phases = s["fast"]["phases_s"]
        assert list(phases) == ["share", "open_first", "open_cached", "alloc", "copy", "release", "other"]
        assert all(v is not None and v >= 0 for v in phases.values()), phases
        # mapped once per size, then reused: counted per pull, not inferred from two timings
        assert s["fast"]["opened"] == [True, False], s["fast"]["opened"]
