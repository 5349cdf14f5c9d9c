"""The dtype the fused loss multiplies its matrices in: the inputs' own, unless the CPU only emulates it.

bf16 / fp16 matmuls on a CPU without native support (no AVX512-BF16 or AMX for bf16, no AMX-FP16 for fp16;
an AVX2-only EPYC, say) run emulated, 8-21x slower than fp32 ones of the same shape (on a 2-core AVX2 EPYC:
4096 x 1024 @ 1024 x 32000 takes 13.1 s in bf16 against 1.6 s in fp32). There the fused loss casts
``hidden`` and ``weight`` to fp32 once per call and multiplies in fp32, as torch's own chunked
``F.linear_cross_entropy`` does on every CPU (its "accurate" policy). The products of bf16 / fp16 values are
exact in fp32, so the result is at least as accurate as the low-precision matmuls; the cost is the fp32 copies
of ``hidden`` ``[N, H]`` and ``weight`` ``[V_shard, H]`` for the duration of the call.

GPUs, and CPUs with native bf16 / fp16 matmuls, keep the inputs' dtype.
"""

from __future__ import annotations

import functools

import torch

_LOW = (torch.bfloat16, torch.float16)
# torch.cpu's capability probes per low-precision dtype; any one true means native matmuls.
_NATIVE_PROBES = {torch.bfloat16: ("_is_avx512_bf16_supported", "_is_amx_tile_supported"),
                  torch.float16: ("_is_amx_fp16_supported",)}


@functools.lru_cache(maxsize=None)
def cpu_has_native_matmul(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies ``dtype`` matrices in hardware (fp32 / fp64: always); asked once per dtype."""
    if dtype not in _LOW:
        return True
    for probe in _NATIVE_PROBES[dtype]:
        fn = getattr(torch.cpu, probe, None)
        try:
            if fn is not None and fn():
                return True
        except RuntimeError:  # a probe this build cannot answer counts as "not native"
            continue
    return False


def matmul_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype of the fused loss's matmuls for inputs of ``dtype`` on ``device``: fp32 for bf16 / fp16 on a CPU
    without native matmuls in that dtype, else ``dtype``."""
    if dtype in _LOW and device.type == "cpu" and not cpu_has_native_matmul(dtype):
        return torch.float32
    return dtype


def matmul_inputs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """``(hidden, weight, bias)`` in ``matmul_dtype``: the tensors themselves, or fp32 copies (detached: the
    fused loss forms its gradients itself)."""
    target = matmul_dtype(hidden.device, hidden.dtype)
    if target == hidden.dtype:
        return hidden, weight, bias
    return (hidden.detach().to(target), weight.detach().to(target),
            None if bias is None else bias.detach().to(target))
