"""bench/plots.py renders the DWDP timeline (recorded only on GPUs) from its JSON record."""
import pytest

from bench.plots import plot_timeline

pytest.importorskip("matplotlib")


def test_timeline_png_from_record(tmp_path):
    compute, copy = [], []
    t = 0.0
    layers = [3, 4, 5, 6]
    for p, layer in enumerate(layers):
        compute.append({"layer": layer, "kind": "attention+dense", "start": t, "end": t + 1.0})
        compute.append({"layer": layer, "kind": "moe", "start": t + 1.0, "end": t + 3.0})
        copy.append({"for_layer": layers[(p + 2) % 4], "next_step": p >= 2, "start": t + 3.0, "end": t + 4.5})
        t += 3.0
    record = {"step_ms": t + 0.5, "start_step_copy": {"start": 0.0, "end": 0.0}, "compute": compute,
              "copy": copy, "tail_ms": 0.5, "tokens": 64}
    path = tmp_path / "timeline.png"
    plot_timeline(record, str(path), "test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
