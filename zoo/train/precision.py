"""Which precision a training run computes in (the recipe's ``train.precision`` on a device)."""

from __future__ import annotations

import torch

from zoo.errors import UsageError


def native_bf16(dev: torch.device) -> bool:
    """Whether ``dev`` computes bf16 natively: a CUDA GPU with bf16, or a CPU with AMX tiles or
    AVX512-BF16 (oneDNN then runs bf16 convolutions and matmuls at up to twice the fp32 rate;
    elsewhere bf16 is emulated and slower than fp32)."""
    if dev.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if dev.type == "cpu":
        # Private probes (torch.cpu._is_*); a torch without them is treated as lacking the ISA.
        probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in probes)
    return False


def use_bf16_autocast(precision: str, dev: torch.device) -> bool:
    """The recipe's ``train.precision`` on ``dev``: ``auto`` is bf16 on a GPU only.

    bf16 is opt-in on the CPU because oneDNN's CPU bf16 kernels have crashed the process (SIGFPE
    on a 393,216-wide Linear, torch 2.14.1).
    """
    if precision == "fp32":
        return False
    if precision == "auto":
        return dev.type == "cuda" and native_bf16(dev)
    if not native_bf16(dev):
        raise UsageError(f"precision bf16 asked for, but {dev} has no native bf16 arithmetic; use fp32 or auto")
    return True
