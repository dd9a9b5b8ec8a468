"""A training rank's GPU, sampled for the metrics: memory from torch's allocator, utilisation from NVML.

Read by the rank's progress thread once per report (about a second), never on the training step's path:
none of these calls waits for the GPU. Utilisation comes through `torch.cuda.utilization()`, which needs
NVML's Python binding (`nvidia-ml-py`); without it the sample has no utilisation, and the series stays
absent rather than reading 0.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


def gpu_index(use_gpu: bool, local_rank: int) -> int | None:
    """The CUDA device a rank trains on (as `loop.pick_device` picks it), or None on a CPU."""
    if not use_gpu:
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    return local_rank % torch.cuda.device_count()


class GpuSampler:
    """Samples one CUDA device; NVML is tried once and left alone when it is missing."""

    def __init__(self, index: int, cuda: Any = None) -> None:
        if cuda is None:
            import torch

            cuda = torch.cuda
        self.index, self.cuda = index, cuda
        self._nvml = True
        self._total: float | None = None

    def sample(self) -> dict[str, float]:
        """`allocated_bytes`, `reserved_bytes`, `total_bytes`, and `utilization` (0-1) when NVML answers."""
        cuda, index = self.cuda, self.index
        if self._total is None:
            self._total = float(cuda.get_device_properties(index).total_memory)
        found = {
            "allocated_bytes": float(cuda.memory_allocated(index)),
            "reserved_bytes": float(cuda.memory_reserved(index)),
            "total_bytes": self._total,
        }
        if self._nvml:
            try:
                found["utilization"] = float(cuda.utilization(index)) / 100.0
            except Exception as error:  # no pynvml, no NVML library, a device NVML cannot see
                self._nvml = False
                log.info("GPU utilisation not exported: NVML did not answer (%s)", error)
        return found
