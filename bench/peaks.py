"""Peak rates per device, so a "% of peak" is always against the device that ran.

``copy_gbps`` is a device-to-device copy within one GPU's HBM (read + write counted once, the
bytes a copy moves), ``bf16_tflops`` dense bf16 tensor-core GEMM; both measured by the team
(H200 ~4.3 TB/s and ~790 TFLOP/s; H100 SXM ~3.0 TB/s and ~800 TFLOP/s), not the datasheet.
A device not listed has no peak: reports then say so instead of borrowing another's.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class DevicePeak:
    name: str
    bf16_tflops: float
    copy_gbps: float

    def to_dict(self) -> dict:
        return asdict(self)


# Matched as substrings of torch.cuda.get_device_name(), first match wins (H200 before H100).
PEAKS = (
    DevicePeak("H200", bf16_tflops=790.0, copy_gbps=4300.0),
    DevicePeak("H100", bf16_tflops=800.0, copy_gbps=3000.0),
)


def peak_for(device_name: str) -> DevicePeak | None:
    """The peak of the device called ``device_name`` (e.g. "NVIDIA H200"), None if unknown."""
    for peak in PEAKS:
        if peak.name.lower() in device_name.lower():
            return peak
    return None


def pct_of(value: float, peak: float | None) -> float | None:
    """``100 * value / peak``, None without a peak."""
    return None if not peak else 100.0 * value / peak
