"""Model FLOPs utilisation: achieved model FLOP/s over the device's peak.

The numerator comes from mesh_model/flops.py (F_token, the model's FLOPs per
trained token) times tokens/s. The denominator is the dense bf16 peak of one
device: `logging.peak_tflops`, or looked up below from the CUDA device name.
On CPU there is no meaningful peak, so only the achieved FLOP/s are reported.
"""

from __future__ import annotations

from typing import Optional

import torch

# Dense (no sparsity) bf16 tensor-core peak, TFLOP/s per GPU, by a substring of
# torch.cuda.get_device_name(); the first match wins, so specific names come first.
PEAK_BF16_TFLOPS = {
    "H200": 989.4, "H100 SXM": 989.4, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 756.0,
    "A100": 312.0, "L40S": 362.1, "A10G": 70.0, "L4": 121.0, "V100": 125.0,
}


def peak_flops(device: torch.device, override_tflops: Optional[float] = None) -> Optional[float]:
    """Peak FLOP/s of one device, or None when unknown (CPU, an unlisted GPU)."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


def model_flops_per_device(flops_per_token: float, tokens_per_s: float, world_size: int) -> float:
    """Achieved model FLOP/s of one device (every rank does 1/world of the work)."""
    return flops_per_token * tokens_per_s / world_size
