"""What the training machine is and what it computes fast: the CPU precision choice and the hardware line of the card.

bf16 autocast halves the cost of a convolution only where the CPU has bfloat16 instructions (AVX512-BF16 or AMX);
elsewhere oneDNN emulates bf16 and training runs 2-3x SLOWER than fp32 (README "Training on a
CPU"). `torch.ops.mkldnn._is_mkldnn_bf16_supported()` is true in both cases, so the choice reads the CPU's flags,
with the same test as the model package's fast inference path (`cpu_has_native_bf16`).
"""

from __future__ import annotations

import torch

from modeling_cnn_lstm.fast_inference_cnn_lstm import NATIVE_BF16_FLAGS, cpu_flags, cpu_has_native_bf16, cpu_model_name

CPU_PRECISIONS = ("auto", "fp32", "bf16")


def choose_cpu_precision(requested: str, flags: frozenset[str] | None = None) -> tuple[bool, str]:
    """`--cpu_precision` -> (use bf16 autocast, the reason, for the log and the card)."""
    if requested not in CPU_PRECISIONS:
        raise ValueError(f"--cpu_precision must be one of {CPU_PRECISIONS}, got {requested!r}")
    if requested != "auto":
        return requested == "bf16", f"--cpu_precision {requested}"
    flags = cpu_flags() if flags is None else flags
    if not flags:
        return False, "CPU flags unknown: fp32 (bf16 may be emulated, which is slower)"
    if cpu_has_native_bf16(flags):
        found = ", ".join(flag for flag in NATIVE_BF16_FLAGS if flag in flags)
        return True, f"native bf16 in the CPU flags ({found})"
    return False, f"no {'/'.join(NATIVE_BF16_FLAGS)} in the CPU flags: bf16 would be emulated (slower than fp32)"


def hardware() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return f"CPU ({cpu_model_name()}, {torch.get_num_threads()} threads)"
