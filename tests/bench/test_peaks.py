"""bench/peaks.py: each device gets its own peak, an unknown one gets none."""
from bench.peaks import pct_of, peak_for


def test_peaks_per_device():
    assert peak_for("NVIDIA H200").copy_gbps == 4300.0
    assert peak_for("NVIDIA H100 80GB HBM3").bf16_tflops == 800.0
    assert peak_for("NVIDIA A100-SXM4-80GB") is None
    assert pct_of(395.0, peak_for("NVIDIA H200").bf16_tflops) == 50.0
    assert pct_of(1.0, None) is None
