"""The machine training runs on: device, precision, and how it was launched (processes, FSDP, Liger's kernels)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import DeepRedError


@dataclass
class Hardware:
    device: str  # cuda | mps | cpu
    rocm: bool
    bf16: bool  # GPU: weights and compute in bf16; CPU: float32 weights, bf16 autocast (mixed precision)
    fp16: bool
    world_size: int

    @property
    def precision(self) -> str:
        return "bf16" if self.bf16 else "fp16" if self.fp16 else "fp32"

    def describe(self) -> str:
        mixed = " autocast over float32 weights" if self.device == "cpu" and self.bf16 else ""
        return f"{self.device}{' (ROCm)' if self.rocm else ''}, precision {self.precision}{mixed}"


def cpu_has_bf16() -> bool:
    """bf16 matrix instructions (AVX512-BF16 or AMX): there bf16 autocast trained SmolLM2 1.4x faster than float32."""
    import torch

    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def detect_hardware(precision: str = "auto") -> Hardware:
    import torch

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if torch.cuda.is_available():
        supported = torch.cuda.is_bf16_supported()
        if precision == "bf16" and not supported:
            raise DeepRedError("--precision bf16: this GPU has no bf16; use --precision fp16 or auto")
        bf16 = precision == "bf16" or (precision == "auto" and supported)
        return Hardware("cuda", torch.version.hip is not None, bf16, precision == "fp16" or (precision == "auto" and not bf16),
                        world_size)
    if precision == "fp16":
        raise DeepRedError("--precision fp16 needs a GPU; use auto, bf16 or fp32 on this machine")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        if precision == "bf16":
            raise DeepRedError("--precision bf16 is not supported on Apple GPUs here; use auto or fp32")
        return Hardware("mps", False, False, False, world_size)
    bf16 = precision == "bf16" or (precision == "auto" and cpu_has_bf16())
    return Hardware("cpu", False, bf16, False, world_size)


def liger_available() -> bool:
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        return False
    return True


def under_fsdp() -> bool:
    """`accelerate launch` with an FSDP config says so to every process through its environment."""
    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
